"""XEN-LAZY-STATE: the guest's own per-CPU lazy state agrees with the lazy regions of the trace.

Under Xen PV the lazy MMU hooks are real: ``arch_enter_lazy_mmu_mode`` calls ``paravirt_enter_lazy_mmu``,
which sets the per-CPU ``paravirt_lazy_mode`` to ``PARAVIRT_LAZY_MMU`` (``enter_lazy``,
``arch/x86/kernel/paravirt.c``, BUG()s if a mode is already set), and ``xen_leave_lazy_mmu``
(``arch/x86/xen/mmu_pv.c``) flushes the multicall batch and sets it back to ``PARAVIRT_LAZY_NONE``. Xen's
``xen_set_pte`` batches only while that variable says MMU (``xen_batched_set_pte``); a region the trace
shows open while the CPU is not lazy means PTE writes that the caller believes batched were issued at once
(harmless for ordering, but the region's bookkeeping is wrong), and a CPU left lazy outside every region
means updates that sit in a multicall batch nobody flushes until the next context switch.

Both recorders read ``paravirt_lazy_mode`` at every event (Xen PV only; ``lazy_mmu`` is null elsewhere). Probes
fire *before* the probed instruction, so the expected state is:

* at the ``lazy_enter`` that opens a region: not lazy (the pv-op has not run yet);
* at every other event of a region, its ``lazy_leave`` included: MMU-lazy;
* at every event outside a region: not MMU-lazy. ``PARAVIRT_LAZY_CPU`` (inside a context switch) counts
  as "not MMU": a region preempted under Xen is closed by the inlined leave in
  ``paravirt_start_context_switch`` and re-opened by the enter in ``paravirt_end_context_switch``
  (``TIF_LAZY_MMU_UPDATES``), and the trace records both as ordinary leave/enter events.

The raw per-CPU variable is read, not ``paravirt_get_lazy_mode()`` (which answers NONE in interrupt
context): an interrupt inside a region still expects MMU. ``checked`` counts the events with a known
``lazy_mmu``; a trace without any (native guests, traces older than the column) is
NOT-EXERCISED. A region open at the window's start is known only from its leave (a *virtual* region,
:mod:`analysis.lazystate`): its events are checked like any region's.
"""

from __future__ import annotations

import numpy as np

from .base import CheckContext, CheckResult, concat_violations, invariant, region_sites

ID = "XEN-LAZY-STATE"


@invariant(
    id=ID,
    title="per-CPU lazy state matches the regions (Xen PV)",
    rule="paravirt_lazy_mode is MMU at every event inside a lazy region (after its enter) and not MMU "
    "outside every region",
    source="2007 paravirt lazy MMU design as implemented for Xen PV: enter_lazy/leave_lazy "
    "(arch/x86/kernel/paravirt.c), xen_leave_lazy_mmu and xen_batched_set_pte (arch/x86/xen/mmu_pv.c)",
    requires=(),
    tested="events with a known per-CPU lazy state",
    idle_reason="no event carries the per-CPU lazy state: it is read only under Xen PV (by both "
    "recorders; on a native guest the lazy ops are NOP-patched and paravirt_lazy_mode stays 0)",
    order=90,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    if "lazy_mmu" not in st.df.columns or st.n == 0:
        return CheckResult(concat_violations([]), checked=0)
    values, valid = st.masked("lazy_mmu")
    rows = st.order
    known = valid[rows]
    if not known.any():
        return CheckResult(concat_violations([]), checked=0)
    pos = np.flatnonzero(known)
    lazy = values[rows[pos]].astype(bool)
    reg = st.region_of_pos[pos]
    inside = reg >= 0
    # the enter that opens a region fires before paravirt_enter_lazy_mmu ran: not lazy yet
    opening = np.zeros(len(pos), bool)
    opening[inside] = st.r_enter[reg[inside]] == pos[inside]
    expect = inside & ~opening

    not_lazy = expect & ~lazy
    stray = ~expect & lazy & ~opening
    lazy_at_enter = opening & lazy
    parts = [
        ctx.violations(ID, pos[not_lazy], "CPU not MMU-lazy inside a lazy region entered in {site}",
                       site=region_sites(st, reg[not_lazy]), related_pos=st.r_enter[reg[not_lazy]],
                       detail="paravirt_lazy_mode != PARAVIRT_LAZY_MMU between the region's enter and leave"),
        ctx.violations(ID, pos[lazy_at_enter], "CPU already MMU-lazy at the lazy enter in {site}",
                       detail="paravirt_lazy_mode == PARAVIRT_LAZY_MMU before enter_lazy (which BUG()s on it)"),
        ctx.violations(ID, pos[stray], "CPU MMU-lazy outside any lazy region at {site}",
                       detail="paravirt_lazy_mode == PARAVIRT_LAZY_MMU with no open region on this CPU "
                       "(a missed enter/leave, or a batch left unflushed)"),
    ]
    note = ""
    unknown = int((~known).sum())
    if unknown:
        note = f"{unknown} events without a known lazy state were not checked"
    return CheckResult(concat_violations(parts), checked=len(pos), note=note)
