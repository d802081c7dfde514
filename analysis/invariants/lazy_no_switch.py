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
"""

from __future__ import annotations

import numpy as np

from ..lazystate import SWITCH
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

    closed = np.flatnonzero(st.r_closed & ~st.r_virtual)
    pid = st.column("pid")
    enter_pid = pid[st.rows(st.r_enter[closed])]
    leave_pid = pid[st.rows(st.r_leave[closed])]
    moved = closed[enter_pid != leave_pid]
    others = ctx.violations(ID, st.r_leave[moved], "lazy region entered in {site} left by another task",
                            site=region_sites(st, moved), related_pos=st.r_enter[moved],
                            detail=[f"entered by pid {p}" for p in pid[st.rows(st.r_enter[moved])]])
    return CheckResult(concat_violations([switches, others]), checked=len(sw) + len(closed))
