"""KERNEL-UPDATE-FLUSHED: a kernel-mapping set_pte made in lazy mode is flushed before the next switch.

Kernel mappings are shared by every task: a kernel PTE update left in a CPU's lazy batch when that CPU
switches tasks is invisible to the next task (and to other CPUs) until some later flush, although the
code that made it has moved on (catalogue seeds 2 and B). So after such a ``set_pte`` the next of
{``lazy_flush``, ``lazy_leave``, ``switch``} on the same CPU must not be the switch.

Which set_pte writes a *kernel* mapping: ``ptep`` is always a kernel virtual address (the PTE slot
itself), so it cannot tell. A set_pte counts as kernel when (any of)

* its own ``mm_is_init`` is true;
* its site writes kernel PTEs (:data:`analysis.sites.KERNEL_SET_PTE_SITES`: vmalloc, kmap, fixmap);
* its lazy region is a kernel region: ``mm_is_init`` read at the region's enter, or, when the recorder
  could not read it, an enter at a site that only batches ``init_mm`` updates
  (:data:`analysis.sites.KERNEL_LAZY_SITES`, i.e. ``__apply_to_page_range``).

A set_pte after which the CPU's stream ends before any flush, leave or switch is not tested.
"""

from __future__ import annotations

import numpy as np

from ..lazystate import FLUSH, LEAVE, SWITCH
from ..sites import KERNEL_SET_PTE_SITES
from .base import CheckContext, CheckResult, invariant, region_sites

ID = "KERNEL-UPDATE-FLUSHED"


def kernel_lazy_set_ptes(ctx: CheckContext) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions and region indices of the set_pte events that update a kernel mapping in lazy mode."""
    st = ctx.state
    lsp = st.lazy_set_ptes
    sp, reg, rows = lsp.pos, lsp.reg, lsp.rows
    vals, valid = st.masked("mm_is_init")
    kernel = st.r_mm[reg] == 0
    kernel |= valid[rows] & vals[rows]
    kernel |= st.site_in(rows, KERNEL_SET_PTE_SITES)
    return sp[kernel], reg[kernel]


@invariant(
    id=ID,
    title="kernel-mapping updates flushed before a switch",
    rule="a kernel-mapping set_pte made in lazy mode is followed on that CPU by flush or leave before "
    "the next switch",
    source="2007 lazy MMU design: kernel updates must be visible before anything else runs on the CPU "
    "(arch_flush_lazy_mmu_mode(), paravirt_start_context_switch())",
    requires=("lazy_enter", "set_pte"),
    tested="kernel-mapping set_pte events inside lazy regions",
    idle_reason="no set_pte to a kernel mapping inside a lazy region: on x86_64 only "
    "apply_to_page_range(&init_mm, ...) batches kernel PTEs, and the workload did not call it",
    order=70,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    kp, reg = kernel_lazy_set_ptes(ctx)
    nxt = st.next_of(kp, (FLUSH, LEAVE, SWITCH))
    tested = nxt >= 0
    bad = tested.copy()
    bad[tested] = st.ev_s[nxt[tested]] == SWITCH
    v = ctx.violations(ID, kp[bad], "kernel-mapping set_pte not flushed before a switch in lazy region "
                       "entered in {site}", site=region_sites(st, reg[bad]), related_pos=nxt[bad],
                       detail="the next flush/leave/switch on this CPU is a switch (related_seq)")
    note = ""
    if (~tested).any():
        note = f"{int((~tested).sum())} kernel set_pte(s) at the end of a CPU stream: not tested"
    return CheckResult(v, checked=int(tested.sum()), note=note)
