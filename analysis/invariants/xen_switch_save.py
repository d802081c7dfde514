"""XEN-SWITCH-SAVE: no context switch while MMU-lazy; a lazy region cut by a switch is saved and restored.

A lazy batch lives in per-CPU state, so a task must not be switched out while its CPU is MMU-lazy. Xen PV
keeps a task's lazy region across a switch instead: ``context_switch()`` calls
``arch_start_context_switch(prev)``, i.e. ``paravirt_start_context_switch()`` (``arch/x86/kernel/paravirt.c``;
6.12: ``xen_start_context_switch()``, ``arch/x86/xen/enlighten_pv.c``), which, when the mode is MMU, leaves
lazy mode through the inlined ``arch_leave_lazy_mmu_mode()`` (flushing the batch), sets
``TIF_LAZY_MMU_UPDATES`` on ``prev`` and enters ``PARAVIRT_LAZY_CPU``. ``__switch_to`` then calls
``arch_end_context_switch(next)``, ``xen_end_context_switch()``: ``xen_mc_flush()``, then
``paravirt_end_context_switch()`` sets the mode back to NONE and, if ``next`` has ``TIF_LAZY_MMU_UPDATES``,
re-enters lazy MMU mode for it with the inlined ``arch_enter_lazy_mmu_mode()``. That enter runs before ``current_task`` is updated: the
trace records it with the *previous* task's pid, and it belongs to the switch's ``next_pid``
(``LazyState.switched_in``). The sites are :data:`analysis.lazystate.XEN_SAVE_SITES` (a ``lazy_leave``, the
*save*) and :data:`analysis.lazystate.XEN_RESTORE_SITES` (a ``lazy_enter``, the *restore*).

Checks, on events whose per-CPU ``lazy_mode`` is known (Xen PV traces; switches, saves and
restores with any ``lazy_mode`` still count as evidence):

* a ``switch`` event (``__switch_to``, probed before it runs) must not see ``lazy_mode`` MMU: the save
  has already moved the CPU to ``PARAVIRT_LAZY_CPU`` (or it was not lazy at all);
* a save by task P: at the next switch *to* P (a ``switch`` with ``next_pid`` P and a later ``seq``, on any
  CPU: the task may migrate), the events of that CPU after the switch must include a restore before the
  CPU's next switch. Not tested when P never runs again within the trace, or when the trace of that CPU
  ends right after the switch;
* a restore must belong to a task that saved: its task (``next_pid`` of the last switch on its CPU before
  it) must have been saved at its last switch-out (a save by that task on that CPU after the CPU's
  previous switch). Not tested when the restore has no switch before it on its CPU, or its task has no
  switch-out earlier in the trace (the save may predate the window).

``checked`` counts the switch events with a known ``lazy_mode`` plus the saves and restores tested.
"""

from __future__ import annotations

import numpy as np

from tracer import schema

from ..lazystate import ENTER, LEAVE, SWITCH, XEN_RESTORE_SITES, XEN_SAVE_SITES
from .base import CheckContext, CheckResult, concat_violations, invariant

ID = "XEN-SWITCH-SAVE"


def _pair_keys(a_pid: np.ndarray, a_seq: np.ndarray, b_pid: np.ndarray,
               b_seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``int64`` keys that order the (pid, seq) pairs of two sets together, pid first."""
    pids, pinv = np.unique(np.concatenate([a_pid, b_pid]), return_inverse=True)
    seqs, sinv = np.unique(np.concatenate([a_seq, b_seq]), return_inverse=True)
    key = pinv.astype(np.int64) * (len(seqs) + 1) + sinv.astype(np.int64)
    return key[: len(a_pid)], key[len(a_pid):]


def _first_after(a_pid: np.ndarray, a_seq: np.ndarray, q_pid: np.ndarray, q_seq: np.ndarray) -> np.ndarray:
    """For each query, the index into ``a`` of the first pair with the same pid and a larger seq; -1 if none."""
    if not len(a_pid) or not len(q_pid):
        return np.full(len(q_pid), -1, np.int64)
    ka, kq = _pair_keys(a_pid, a_seq, q_pid, q_seq)
    order = np.argsort(ka, kind="stable")
    j = np.searchsorted(ka[order], kq, side="right")
    hit = order[np.minimum(j, len(order) - 1)]
    return np.where((j < len(order)) & (a_pid[hit] == q_pid), hit, -1)


def _last_before(a_pid: np.ndarray, a_seq: np.ndarray, q_pid: np.ndarray, q_seq: np.ndarray) -> np.ndarray:
    """For each query, the index into ``a`` of the last pair with the same pid and a smaller seq; -1 if none."""
    if not len(a_pid) or not len(q_pid):
        return np.full(len(q_pid), -1, np.int64)
    ka, kq = _pair_keys(a_pid, a_seq, q_pid, q_seq)
    order = np.argsort(ka, kind="stable")
    j = np.searchsorted(ka[order], kq, side="left") - 1
    hit = order[np.maximum(j, 0)]
    return np.where((j >= 0) & (a_pid[hit] == q_pid), hit, -1)


@invariant(
    id=ID,
    title="lazy state saved and restored across context switches (Xen PV)",
    rule="no context switch while the CPU is MMU-lazy: a lazy region interrupted by a switch is saved "
    "(left in paravirt_start_context_switch, TIF_LAZY_MMU_UPDATES) and restored (re-entered in "
    "paravirt_end_context_switch) when its task next runs",
    source="2007 paravirt lazy MMU design as implemented for Xen PV: paravirt_start_context_switch/"
    "paravirt_end_context_switch (arch/x86/kernel/paravirt.c), xen_end_context_switch "
    "(arch/x86/xen/enlighten_pv.c)",
    requires=(),
    tested="switch events with a known lazy mode, and Xen lazy-state saves and restores",
    idle_reason="no event carries the per-CPU lazy mode: it is read only under Xen PV (by both recorders; "
    "on a native guest the lazy ops are NOP-patched and nothing is saved at a switch)",
    order=92,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    empty = concat_violations([])
    if "lazy_mode" not in st.df.columns or st.n == 0:
        return CheckResult(empty, checked=0)
    mode, mode_ok = st.masked("lazy_mode")
    known = mode_ok[st.order]  # per sorted position
    if not known.any():
        return CheckResult(empty, checked=0)
    seq, pid = st.column("seq"), st.column("pid")
    next_pid, next_ok = st.masked("next_pid")

    # (a) a switch while MMU-lazy
    sw = st.positions(SWITCH)
    sw_rows = st.rows(sw)
    sw_known = known[sw]
    lazy_sw = sw[sw_known & (mode[sw_rows] == schema.LAZY_MMU)]
    switches = ctx.violations(ID, lazy_sw, "context switch while the CPU is MMU-lazy",
                              detail="paravirt_lazy_mode == PARAVIRT_LAZY_MMU at __switch_to: "
                              "paravirt_start_context_switch did not leave lazy mode")

    leaves = st.positions(LEAVE)
    saves_all = leaves[st.site_in(st.rows(leaves), XEN_SAVE_SITES)]
    enters = st.positions(ENTER)
    restores_all = enters[st.site_in(st.rows(enters), XEN_RESTORE_SITES)]
    notes = []

    # (b) a save by P: the next switch to P is followed on its CPU by a restore before that CPU's next switch
    saves = saves_all[known[saves_all]]
    save_rows = st.rows(saves)
    in_ok = next_ok[sw_rows]
    sw_in = sw[in_ok]
    k = _first_after(next_pid[sw_rows][in_ok], seq[sw_rows][in_ok], pid[save_rows], seq[save_rows])
    found = k >= 0
    s_in = np.where(found, sw_in[np.maximum(k, 0)] if len(sw_in) else 0, -1)
    after = np.zeros(len(saves), bool)
    grp = np.searchsorted(st.grp_start, s_in[found], side="right") - 1
    after[found] = s_in[found] + 1 < st.grp_end[grp]  # an event follows the switch back on its CPU
    tested_b = found & after
    restore = st.next_in(s_in[tested_b], restores_all)
    nxt_sw = st.next_in(s_in[tested_b], sw)
    restored = (restore >= 0) & ((nxt_sw < 0) | (restore < nxt_sw))
    bad = np.flatnonzero(tested_b)[~restored]
    lost = ctx.violations(
        ID, saves[bad], "lazy region saved at a context switch was never restored", related_pos=s_in[bad],
        detail=[f"pid {p} switched in again at seq {s} with no restore before the CPU's next switch"
                for p, s in zip(pid[save_rows[bad]], seq[st.rows(s_in[bad])], strict=True)])
    if (~found).any():
        notes.append(f"{int((~found).sum())} saved task(s) never switched in again within the trace")
    if (found & ~after).any():
        notes.append(f"{int((found & ~after).sum())} save(s) not tested: the trace of the CPU ends at the "
                     "switch back")

    # (c) a restore belongs to a task saved at its last switch-out
    restores = restores_all[known[restores_all]]
    owner_sw = st.prev_in(restores, sw)
    owner_rows = st.rows(np.maximum(owner_sw, 0))
    has_owner = (owner_sw >= 0) & next_ok[owner_rows]
    owner = next_pid[owner_rows]
    # each task's last switch-out (a switch with pid == owner) before the switch that brought it in
    out_k = _last_before(pid[sw_rows], seq[sw_rows], owner[has_owner], seq[owner_rows[has_owner]])
    out_sw = np.full(len(restores), -1, np.int64)
    out_sw[has_owner] = np.where(out_k >= 0, sw[np.maximum(out_k, 0)] if len(sw) else 0, -1)
    tested_c = out_sw >= 0
    # a switch-out is saved when a save by the same task precedes it on its CPU, after the CPU's previous switch
    save_next = st.next_in(saves_all, sw)
    ok = save_next >= 0
    ok[ok] = pid[st.rows(save_next[ok])] == pid[st.rows(saves_all[ok])]
    saved_switches = save_next[ok]
    unsaved = tested_c & ~np.isin(out_sw, saved_switches)
    bogus = ctx.violations(
        ID, restores[unsaved], "lazy state restored for a task that never saved it", related_pos=out_sw[unsaved],
        detail=[f"restore for pid {p}, whose last switch-out (related_seq) had no save before it"
                for p in owner[unsaved]])
    if (~tested_c).any():
        notes.append(f"{int((~tested_c).sum())} restore(s) not tested: no switch-out of their task earlier "
                     "in the trace")

    checked = int(sw_known.sum()) + int(tested_b.sum()) + int(tested_c.sum())
    return CheckResult(concat_violations([switches, lost, bogus]), checked=checked, note="; ".join(notes))
