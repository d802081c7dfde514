"""LAZY-NO-SWITCH: no context switch inside a lazy region; the region ends on its CPU and task.

A lazy batch lives in per-CPU state (``paravirt_lazy_mode``, Xen's multicall buffer). If the task that
entered lazy mode is switched out, its queued updates either stay behind on the old CPU or are issued
on behalf of the next task, and its later ``set_pte``\\ s are not batched where it expects (the 2007
design, "moved between set_pte and flush"). Under Xen PV ``paravirt_start_context_switch()`` papers
over this by leaving lazy mode and setting ``TIF_LAZY_MMU_UPDATES``; native and KVM guests do nothing.

Tested: every ``switch`` event (is its CPU lazy?) and every region that closes (does the task that
leaves it match the task that entered it?). A region is per CPU by construction, so "ends on the CPU
that began it" is a matter of pairing: a region that migrates shows up here as the switch away from
it and in LAZY-PAIRING as a leave without enter on the other CPU.

The task a region belongs to is its enter's, except under Xen PV for a region re-opened by the restore
enter in ``paravirt_end_context_switch()`` (``xen_end_context_switch()`` in 6.12): that ``lazy_enter`` runs
in ``__switch_to`` before ``current_task`` changes, so it carries the previous task's pid, and the region
belongs to the task switched in (``LazyState.r_task``). The switch that follows a Xen *save* (the region
closed by the leave inlined in ``paravirt_start_context_switch()``) is a switch inside the caller's lazy
region all the same: it is reported here exactly as on a native guest, so one kernel gives the same verdict
on both; whether Xen then saved and restored the state correctly is XEN-SWITCH-SAVE's question.
"""

from __future__ import annotations

import numpy as np

from ..lazystate import SWITCH, XEN_SAVE_SITES
from .base import CheckContext, CheckResult, concat_violations, invariant, region_sites

ID = "LAZY-NO-SWITCH"


@invariant(
    id=ID,
    title="no context switch inside a lazy region",
    rule="no context switch on a CPU inside a lazy region; the region ends on the CPU and task that began it",
    source='2007 lazy MMU design: per-CPU batches must not be "moved between set_pte and flush" '
    "(arch/x86/kernel/paravirt.c, paravirt_start_context_switch())",
    requires=("lazy_enter", "switch"),
    tested="switch events and closed lazy regions",
    idle_reason="no lazy region or no switch event: the switch probe (__switch_to) was not armed, or no "
    "batched page-table update happened",
    order=30,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    sw = st.positions(SWITCH)
    reg = st.region_of_pos[sw]
    inside = reg >= 0
    r_in = reg[inside]
    switches = ctx.violations(ID, sw[inside], "context switch inside lazy region entered in {site}",
                              site=region_sites(st, r_in), related_pos=st.r_enter[r_in],
                              detail="__switch_to while the CPU is lazy (related_seq: the region's enter)")
    # Under Xen PV the kernel itself closes a region that is being switched away from (the leave inlined in
    # paravirt_start_context_switch) and re-opens it when the task runs again: the caller still slept or was
    # preempted inside its lazy region, so the switch after such a save is the same violation as on a native
    # guest (XEN-SWITCH-SAVE checks that the backend saved and restored it correctly).
    saved = np.flatnonzero(st.r_closed & (st.r_leave >= 0))
    saved = saved[st.site_in(st.rows(st.r_leave[saved]), XEN_SAVE_SITES)] if len(saved) else saved
    after = st.next_in(st.r_leave[saved], sw)
    saved, after = saved[after >= 0], after[after >= 0]
    xen_saved = ctx.violations(ID, after, "context switch inside lazy region entered in {site}",
                               site=region_sites(st, saved), related_pos=st.r_enter[saved],
                               detail="__switch_to after Xen saved the lazy region (paravirt_start_context_switch, "
                               "TIF_LAZY_MMU_UPDATES); related_seq: the region's enter")

    closed = np.flatnonzero(st.r_closed & ~st.r_virtual)
    pid = st.column("pid")
    r_pid, _ = st.r_task  # the enter's task, or the switched-in task for a Xen restore enter
    enter_pid = r_pid[closed]
    leave_pid = pid[st.rows(st.r_leave[closed])]
    moved = closed[enter_pid != leave_pid]
    others = ctx.violations(ID, st.r_leave[moved], "lazy region entered in {site} left by another task",
                            site=region_sites(st, moved), related_pos=st.r_enter[moved],
                            detail=[f"entered by pid {p}" for p in r_pid[moved]])
    return CheckResult(concat_violations([switches, xen_saved, others]), checked=len(sw) + len(closed))
