"""LAZY-PREEMPT: lazy MMU mode is entered with preemption disabled.

The 2007 design (``include/linux/pgtable.h``, "A facility to provide lazy MMU batching") says the mode
"can only be entered and left under the protection of the page table locks": with the lock held,
``preempt_count`` is at least 1 on non-RT kernels, so the batch and the per-CPU ``paravirt_lazy_mode``
cannot move to another CPU. User page-table walkers all take the PTE lock. ``apply_to_pte_range()`` on
``init_mm`` does not, so on 6.1/6.12 with ``preempt=full`` it enters lazy mode preemptible; upstream
dropped the rule in v6.15, 691ee97e1a9d ("mm: fix lazy mmu docs and usage"). Expect those violations
(analysis/expect/upstream-known.toml).

Vectorised: one mask over the ``lazy_enter`` events. An enter with interrupts off counts as
non-preemptible even at ``preempt_count`` 0 (nothing can preempt it).
"""

from __future__ import annotations

from ..lazystate import ENTER
from .base import CheckContext, CheckResult, invariant

ID = "LAZY-PREEMPT"


@invariant(
    id=ID,
    title="lazy mode entered with preemption disabled",
    rule="every lazy_enter has preempt_count > 0 or interrupts off",
    source='2007 lazy MMU rule (include/linux/pgtable.h: "only entered and left under the protection of '
    'the page table locks"); dropped upstream in v6.15 by 691ee97e1a9d ("mm: fix lazy mmu docs and usage")',
    requires=("lazy_enter",),
    tested="lazy_enter events",
    idle_reason="no lazy_enter event: the workload made no batched page-table update, or the lazy_enter "
    "probe was not armed",
    order=10,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    pos = st.positions(ENTER)
    rows = st.rows(pos)
    bad = (st.column("preempt_count")[rows] == 0) & st.column("irqs_on")[rows]
    v = ctx.violations(ID, pos[bad], "lazy_enter with preemption enabled in {site}",
                       detail="preempt_count=0 with interrupts on: the task can be preempted or migrated "
                       "while its CPU is lazy")
    return CheckResult(v, checked=len(pos))
