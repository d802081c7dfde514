"""XEN-BATCH-ISSUED: PTE updates in lazy MMU mode are batched, and the batch is issued once lazy mode ends.

The 2007 lazy MMU design lets a hypervisor *batch* the page-table updates of a lazy region and requires
them issued by the time the region ends. Xen PV implements it with a per-CPU multicall buffer
(``mc_buffer``, ``arch/x86/xen/multicalls.c``): ``xen_set_pte`` and ``xen_ptep_modify_prot_commit``
(``arch/x86/xen/mmu_pv.c``) queue the update there (``xen_batched_set_pte``: ``xen_mc_batch``,
``xen_extend_mmu_update``, ``xen_mc_issue(PARAVIRT_LAZY_MMU)``, which does not flush while
``paravirt_get_lazy_mode()`` says MMU) and otherwise issue it at once with a hypercall. A full buffer is
flushed before the new entry is queued, so right after a batched update at least one entry is pending.
``xen_leave_lazy_mmu`` calls ``xen_mc_flush()`` before setting the mode back to NONE, and the users of
``xen_mc_batch()`` outside lazy mode keep interrupts off from batch to issue: outside lazy mode the buffer
is empty at every probe. Inside a context switch (``PARAVIRT_LAZY_CPU``) entries may legitimately wait
for ``xen_end_context_switch``'s flush, and in interrupt context ``paravirt_get_lazy_mode()`` answers NONE
while the interrupted region's batch is still pending.

Both recorders read the per-CPU ``paravirt_lazy_mode`` (``lazy_mode``) and ``mc_buffer.mcidx``
(``mc_pending``) before each probed instruction (Xen PV only; null elsewhere). Per CPU, on the events
with both known:

* a ``set_pte`` at ``xen_set_pte``/``xen_ptep_modify_prot_commit`` with ``lazy_mode`` MMU, not in
  interrupt context (``preempt_count`` SOFTIRQ/HARDIRQ/NMI bits: ``in_interrupt()``), must leave an entry
  pending: the next event of its CPU not in interrupt context must see ``mc_pending > 0`` (else the
  update was issued at once, not batched). Interrupt-context events are skipped (an interrupt may issue
  its own multicalls); a set_pte with no such later event is not tested. The violation blames the
  function that entered the enclosing lazy region (the event's own site outside any region);
* every event with ``lazy_mode`` NONE must see ``mc_pending == 0`` (a batch left unissued after its
  region ended or was flushed).

``checked`` counts the tested set_pte events plus the events with ``lazy_mode`` NONE. A trace where no
event carries both values (native guests, traces older than the columns) is
NOT-EXERCISED. Other set_pte sites (``native_set_pte`` inlined into the mm code) are direct writes that
trap to Xen and are never batched: they are not tested by the first check.
"""

from __future__ import annotations

import numpy as np

from tracer import schema

from ..lazystate import SET_PTE
from .base import CheckContext, CheckResult, concat_violations, invariant, region_sites

ID = "XEN-BATCH-ISSUED"

#: The Xen PV set_pte paths that batch in lazy MMU mode (arch/x86/xen/mmu_pv.c).
BATCHING_SITES: frozenset[str] = frozenset({"xen_set_pte", "xen_ptep_modify_prot_commit"})


@invariant(
    id=ID,
    title="lazy PTE updates are batched and issued (Xen PV)",
    rule="a PTE update made in lazy MMU mode is queued in the per-CPU multicall batch (not issued at once), "
    "and the batch has been issued whenever the CPU is out of lazy mode",
    source='2007 lazy MMU design ("batched and flushed") as Xen PV implements it: xen_batched_set_pte and '
    "xen_leave_lazy_mmu (arch/x86/xen/mmu_pv.c), xen_mc_issue/xen_mc_flush (arch/x86/xen/multicalls.[ch])",
    requires=(),
    tested="Xen set_pte events in lazy MMU mode followed by a task-context event, and events outside lazy mode",
    idle_reason="no event carries the per-CPU lazy mode and multicall batch fill: they are read only under "
    "Xen PV, by both recorders (native guests and older traces lack them)",
    order=91,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    empty = concat_violations([])
    if "lazy_mode" not in st.df.columns or "mc_pending" not in st.df.columns or st.n == 0:
        return CheckResult(empty, checked=0)
    mode, mode_ok = st.masked("lazy_mode")
    mc, mc_ok = st.masked("mc_pending")
    kpos = np.flatnonzero((mode_ok & mc_ok)[st.order])  # sorted positions with both values known
    if not len(kpos):
        return CheckResult(empty, checked=0)
    krows = st.rows(kpos)
    kmode, kmc = mode[krows], mc[krows]
    kirq = (st.column("preempt_count")[krows] & schema.IRQ_CONTEXT_MASK) != 0

    # (a) a batched set_pte: the next task-context event of its CPU must still see an entry pending
    cand = (st.ev_s[kpos] == SET_PTE) & (kmode == schema.LAZY_MMU) & ~kirq
    ci = np.flatnonzero(cand)
    ci = ci[st.site_in(krows[ci], BATCHING_SITES)]
    sp = kpos[ci]
    task_ctx = ~kirq
    targets, t_mc = kpos[task_ctx], kmc[task_ctx]
    # each candidate is itself a task-context event: its successor among them is the next index, no search
    # (two searchsorted over millions of positions were most of this rule's time: bench/check_throughput --xen)
    j = np.cumsum(task_ctx)[ci]  # index of the successor in targets
    has = j < len(targets)
    nxt = targets[np.minimum(j, max(len(targets) - 1, 0))] if len(targets) else np.zeros(len(j), np.int64)
    tested = has & (nxt < st.cpu_end(sp))
    sp, nxt, j = sp[tested], nxt[tested], j[tested]
    nxt_mc = t_mc[j]
    bad = nxt_mc == 0
    bsp, bnxt = sp[bad], nxt[bad]
    reg = st.region_of_pos[bsp]
    inside = reg >= 0
    blame = st.site_names(st.rows(bsp))
    blame[inside] = region_sites(st, reg[inside])
    related = np.full(len(bsp), -1, np.int64)
    related[inside] = st.r_enter[reg[inside]]
    seq = st.column("seq")
    unbatched = ctx.violations(
        ID, bsp, "PTE update in lazy MMU mode issued at once, not batched, in {site}", site=blame,
        related_pos=related,
        detail=[f"mc_pending=0 at the next task-context event (seq {s}): the update did not stay queued"
                for s in seq[st.rows(bnxt)]])

    # (b) out of lazy mode, nothing may wait in the batch
    none = kmode == schema.LAZY_NONE
    pending = none & (kmc > 0)
    unissued = ctx.violations(
        ID, kpos[pending], "multicall batch not issued outside lazy mode at {site}",
        detail=[f"paravirt_lazy_mode=NONE with {n} multicall entries pending" for n in kmc[pending]])

    checked = int(tested.sum()) + int(none.sum())
    note = ""
    unknown = st.n - len(kpos)
    if unknown:
        note = f"{unknown} events without a known lazy mode and multicall fill were not checked"
    idle = "" if checked else ("no event outside lazy mode and no Xen set_pte in lazy MMU mode followed by a "
                               "task-context event")
    return CheckResult(concat_violations([unbatched, unissued]), checked=checked, note=note, idle=idle)
