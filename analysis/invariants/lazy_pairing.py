"""LAZY-PAIRING: per CPU, lazy_enter and lazy_leave alternate and every region closes.

The paravirt lazy state is one per-CPU variable and ``enter_lazy()``/``leave_lazy()``
(arch/x86/kernel/paravirt.c) ``BUG_ON`` entering while not ``PARAVIRT_LAZY_NONE`` and leaving a mode
that is not current. On native and KVM guests those pv-ops are NOPs, so a nesting or unbalanced
caller goes unnoticed there and only crashes a Xen PV guest: this check catches it anywhere.

Violations: an enter while the CPU is already lazy (nested), a leave while it is not (orphan), and --
in a complete trace recorded from boot -- a region still open at the end. Boundary effects are not
evidence: in a windowed trace the first enter/leave of a CPU may be a leave (the region began before
the window) and regions may be open when it closes; in a partial trace the end is missing.

A gdb-backend recording on multi-threaded TCG can show a nested enter that the guest never did
(QEMU's stub repeats a breakpoint hit; DESIGN.md): record with ``-accel tcg,thread=single`` or the
plugin before believing one.
"""

from __future__ import annotations

import numpy as np

from ..lazystate import ENTER, LEAVE
from .base import CheckContext, CheckResult, concat_violations, invariant

ID = "LAZY-PAIRING"


@invariant(
    id=ID,
    title="lazy enter/leave pairing",
    rule="per CPU, enter and leave alternate: no nested enter, no leave without enter, regions close",
    source="2007 paravirt lazy modes: enter_lazy()/leave_lazy() BUG_ON a nested or unbalanced mode "
    "(arch/x86/kernel/paravirt.c)",
    requires=("lazy_enter", "lazy_leave"),
    tested="lazy_enter and lazy_leave events",
    idle_reason="no lazy_enter/lazy_leave events: no batched page-table update happened in the trace, or "
    "the lazy probes were not armed",
    order=20,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    open_end = ~st.r_closed & ~st.r_virtual
    parts = [
        ctx.violations(ID, st.nested_pos, "nested lazy_enter in {site}",
                       related_pos=_region_enter(st, st.nested_pos),
                       detail="lazy_enter while the CPU is already lazy (related_seq: the open region's enter)"),
        ctx.violations(ID, st.orphan_pos, "lazy_leave without lazy_enter in {site}",
                       detail="lazy_leave while the CPU is not lazy"),
    ]
    notes = []
    if ctx.strict_end:
        parts.append(ctx.violations(ID, st.r_enter[open_end], "lazy region entered in {site} never left",
                                    detail="no lazy_leave on this CPU before the end of a complete trace"))
    elif open_end.any():
        why = "the trace is partial" if ctx.partial else "the trace is a window"
        notes.append(f"{int(open_end.sum())} region(s) still open at the end ({why}): not counted")
    if len(st.head_leave_pos):
        notes.append(f"{len(st.head_leave_pos)} region(s) already open when the window opened "
                     f"(cpu {', '.join(map(str, sorted(set(st.cpu_of_pos(st.head_leave_pos).tolist()))))})")
    v = concat_violations(parts)
    checked = len(st.positions(ENTER)) + len(st.positions(LEAVE))
    return CheckResult(v, checked=checked, note="; ".join(notes))


def _region_enter(st, pos: np.ndarray) -> np.ndarray:
    reg = st.region_of_pos[pos]
    return np.where(reg >= 0, st.r_enter[np.maximum(reg, 0)], -1) if len(pos) else np.zeros(0, np.int64)
