"""LAZY-SETPTE-ATOMIC: every set_pte inside a lazy region is atomic and belongs to the region.

A ``set_pte`` queued in lazy mode sits in the CPU's batch until the flush or leave. It must be issued
with preemption disabled (else the task can move and its update be flushed from -- or lost on -- the
wrong CPU) and by the task that entered the region (else one task's updates ride on another's batch).
"Atomic" is read as for LAZY-PREEMPT: ``preempt_count > 0`` or interrupts off.

The violation blames the function that *entered* the region (the batching caller a developer would
fix); the set_pte's own site and pc are in ``event_site``/``pc``. Regions entered preemptibly by
``__apply_to_page_range`` (see LAZY-PREEMPT, 691ee97e1a9d) make their set_pte\\ s fail here too.
A region already open when a window began has no known task: only its preemption is checked.
"""

from __future__ import annotations

from .base import CheckContext, CheckResult, concat_violations, invariant, region_sites

ID = "LAZY-SETPTE-ATOMIC"


@invariant(
    id=ID,
    title="set_pte in lazy mode is atomic",
    rule="every set_pte inside a lazy region has preempt_count > 0 and the region's CPU and task",
    source="2007 lazy MMU rule: batched PTE updates are made under the page table lock, on the CPU "
    "holding the batch (include/linux/pgtable.h)",
    requires=("lazy_enter", "set_pte"),
    tested="set_pte events inside lazy regions",
    idle_reason="no set_pte inside a lazy region: the regions were empty, or the set_pte probe was not armed",
    order=40,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    lsp = st.lazy_set_ptes
    sp, reg, enter = lsp.pos, lsp.reg, lsp.enter
    preemptible = (lsp.col("preempt_count") == 0) & lsp.col("irqs_on")
    # the task of each region (few), spread to its set_ptes; a region re-opened by a Xen restore belongs to
    # the task switched in, not to the pid its enter was recorded with (LazyState.r_task)
    r_pid, r_known = st.r_task
    known = r_known[reg]
    region_pid = r_pid[reg]
    foreign = known & (lsp.col("pid") != region_pid)

    parts = [
        ctx.violations(ID, sp[preemptible], "set_pte with preemption enabled in lazy region entered in {site}",
                       site=region_sites(st, reg[preemptible]), related_pos=enter[preemptible],
                       detail="preempt_count=0 with interrupts on inside a lazy region"),
        ctx.violations(ID, sp[foreign & ~preemptible],
                       "set_pte by another task in lazy region entered in {site}",
                       site=region_sites(st, reg[foreign & ~preemptible]),
                       related_pos=enter[foreign & ~preemptible],
                       detail=[f"region entered by pid {p}" for p in region_pid[foreign & ~preemptible]]),
    ]
    return CheckResult(concat_violations(parts), checked=len(sp))
