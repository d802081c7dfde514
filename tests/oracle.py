"""The reference implementation of the invariant catalogue: one plain loop over the events, for clarity.

This is the specification the vectorised checks in :mod:`analysis.invariants` are tested against
(tests/unit/test_analysis_oracle.py, with Hypothesis) and the reference rate of bench/check_throughput.
It shares nothing with them but the schema constants and the site lists of :mod:`analysis.sites`
(configuration, not logic). Keep it obvious rather than fast.

The rules, per CPU stream (the events of one CPU, by ``seq``; ``cpu``, or ``vcpu`` when ``cpu < 0``):

* a ``lazy_enter`` while the CPU is not lazy opens a region; one while it is lazy is *nested* (the
  region stays open); a ``lazy_leave`` while lazy closes the region; one while not lazy is an *orphan*;
* in a windowed trace a CPU whose first enter/leave is a leave was lazy when the window opened: a
  *virtual* region (no enter, task unknown) covers its events up to that leave;
* "non-preemptible" means ``preempt_count > 0`` or interrupts off;
* "interrupt context" means any SOFTIRQ/HARDIRQ/NMI bit in ``preempt_count`` (``in_interrupt()``);
* under Xen PV a *save* is a ``lazy_leave`` in ``paravirt_start_context_switch`` (by the task switched
  out) and a *restore* a ``lazy_enter`` in ``paravirt_end_context_switch`` (6.12: ``xen_*``), which belongs
  to the ``next_pid`` of the last switch on its CPU (its own pid is the previous task's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from analysis.sites import (
    IRQ_ALLOWED_SET_PTE_SITES,
    KERNEL_LAZY_SITES,
    KERNEL_SET_PTE_SITES,
)
from tracer import schema

WINDOW_START_SITE = "<open at window start>"
KMAP_PREEMPT_OFFSET = 1
XEN_BATCHING_SITES = {"xen_set_pte", "xen_ptep_modify_prot_commit"}
XEN_SAVE_SITES = {"paravirt_start_context_switch", "xen_start_context_switch"}
XEN_RESTORE_SITES = {"paravirt_end_context_switch", "xen_end_context_switch"}
LAZY_NONE, LAZY_MMU = 0, 1


@dataclass
class Region:
    enter: dict | None  # the lazy_enter event (None: open at window start)
    kernel: bool        # a kernel-mapping (init_mm) region
    pid: int | None = None  # the task it belongs to (the switched-in task for a Xen restore)

    @property
    def site(self) -> str:
        return self.enter["site"] if self.enter is not None else WINDOW_START_SITE


@dataclass
class CpuState:
    region: Region | None = None
    pending_kernel_set_ptes: list = field(default_factory=list)
    switched_in: int | None = None    # next_pid of the last switch on this CPU
    owner_last_out: bool | None = None  # at that switch: was next_pid saved at its last switch-out (None: none)
    saved_pids: set = field(default_factory=set)  # tasks that saved since this CPU's last switch
    awaiting: list = field(default_factory=list)  # saves whose task was switched in here, awaiting a restore
    xen_saved: list = field(default_factory=list)  # regions closed by a Xen save since this CPU's last switch
    awaiting_seen: bool = False       # an event followed that switch-in
    batched: tuple | None = None      # (set_pte, blamed site) waiting for the next task-context event


@dataclass
class OracleResult:
    checked: dict[str, int]
    violations: set[tuple[str, int, str, str]]  # (invariant, seq, site, title)

    def ids(self) -> set[str]:
        return {v[0] for v in self.violations}


def _preemptible(e: dict) -> bool:
    return e["preempt_count"] == 0 and e["irqs_on"]


def _region_is_kernel(enter: dict) -> bool:
    if enter["mm_is_init"] is not None:
        return bool(enter["mm_is_init"])
    return enter["site"] in KERNEL_LAZY_SITES


def _events(df: pd.DataFrame):
    """The events as plain dicts in seq order (missing values as None), one at a time."""
    cols = ["seq", "cpu", "vcpu", "event", "site", "preempt_count", "irqs_on", "pid", "mm_is_init", "next_pid",
            "lazy_mmu", "lazy_mode", "mc_pending"]
    n = len(df)
    data = {c: df[c].astype(object).where(df[c].notna(), None).tolist() if c in df.columns else [None] * n
            for c in cols}  # the Xen columns may be absent (optional columns)
    order = sorted(range(len(df)), key=data["seq"].__getitem__)
    for i in order:
        e = {c: data[c][i] for c in cols}
        e["site"] = e["site"] if e["site"] is not None else "?"
        e["stream"] = e["cpu"] if e["cpu"] >= 0 else e["vcpu"]
        yield e


def check_oracle(df: pd.DataFrame, *, windowed: bool = False, partial: bool = False) -> OracleResult:
    """Check every invariant with one loop over the events."""
    checked = {k: 0 for k in ("LAZY-PREEMPT", "LAZY-PAIRING", "LAZY-NO-SWITCH", "LAZY-SETPTE-ATOMIC",
                              "KMAP-ATOMIC-PREEMPT", "SYNC-IRQS-OFF", "KERNEL-UPDATE-FLUSHED", "IRQ-IN-LAZY",
                              "XEN-LAZY-STATE", "XEN-BATCH-ISSUED", "XEN-SWITCH-SAVE")}
    found: set[tuple[str, int, str, str]] = set()

    def bug(inv: str, e: dict, site: str, what: str) -> None:
        found.add((inv, e["seq"], site, f"lazytrace {inv}: " + what.format(site=site)))

    # Pass 1 (windowed traces only): which CPUs were already lazy when the window opened.
    open_at_start: set[int] = set()
    if windowed:
        seen: set[int] = set()
        for e in _events(df):
            if e["event"] in ("lazy_enter", "lazy_leave") and e["stream"] not in seen:
                seen.add(e["stream"])
                if e["event"] == "lazy_leave":
                    open_at_start.add(e["stream"])
    cpus: dict[int, CpuState] = {}
    saves_pending: dict[int, list] = {}   # XEN-SWITCH-SAVE: task -> its saves not yet followed by a switch to it
    last_out_saved: dict[int, bool] = {}  # task -> whether it saved before its last switch-out

    for e in _events(df):
        if e["stream"] not in cpus:
            cpus[e["stream"]] = CpuState(Region(None, False) if e["stream"] in open_at_start else None)
        cpu = cpus[e["stream"]]
        region = cpu.region
        kind = e["event"]
        irq = e["preempt_count"] & schema.IRQ_CONTEXT_MASK != 0
        restore = kind == "lazy_enter" and e["site"] in XEN_RESTORE_SITES
        save = kind == "lazy_leave" and e["site"] in XEN_SAVE_SITES

        # XEN-BATCH-ISSUED: events with both the lazy mode and the multicall fill known
        if e["lazy_mode"] is not None and e["mc_pending"] is not None:
            if not irq and cpu.batched is not None:
                sp, sp_site = cpu.batched
                checked["XEN-BATCH-ISSUED"] += 1
                if e["mc_pending"] == 0:
                    bug("XEN-BATCH-ISSUED", sp, sp_site, "PTE update in lazy MMU mode issued at once, not batched, "
                        "in {site}")
                cpu.batched = None
            if e["lazy_mode"] == LAZY_NONE:
                checked["XEN-BATCH-ISSUED"] += 1
                if e["mc_pending"] > 0:
                    bug("XEN-BATCH-ISSUED", e, e["site"], "multicall batch not issued outside lazy mode at {site}")
            if (kind == "set_pte" and e["site"] in XEN_BATCHING_SITES and e["lazy_mode"] == LAZY_MMU
                    and not irq):
                cpu.batched = (e, region.site if region is not None else e["site"])

        # XEN-SWITCH-SAVE (b): a task switched in here after a save must be restored before the next switch
        if cpu.awaiting:
            if restore or kind == "switch":
                for s in cpu.awaiting:
                    checked["XEN-SWITCH-SAVE"] += 1
                    if not restore:
                        bug("XEN-SWITCH-SAVE", s, s["site"], "lazy region saved at a context switch was never restored")
                cpu.awaiting = []
            else:
                cpu.awaiting_seen = True
        # XEN-SWITCH-SAVE (c): a restore belongs to a task saved at its last switch-out
        if restore and e["lazy_mode"] is not None and cpu.switched_in is not None and cpu.owner_last_out is not None:
            checked["XEN-SWITCH-SAVE"] += 1
            if not cpu.owner_last_out:
                bug("XEN-SWITCH-SAVE", e, e["site"], "lazy state restored for a task that never saved it")
        if save:
            cpu.saved_pids.add(e["pid"])
            if e["lazy_mode"] is not None:
                saves_pending.setdefault(e["pid"], []).append(e)
        if kind == "switch":
            # (a) never while MMU-lazy
            if e["lazy_mode"] is not None:
                checked["XEN-SWITCH-SAVE"] += 1
                if e["lazy_mode"] == LAZY_MMU:
                    bug("XEN-SWITCH-SAVE", e, e["site"], "context switch while the CPU is MMU-lazy")
            nxt = e["next_pid"]
            cpu.switched_in = nxt
            cpu.owner_last_out = last_out_saved.get(nxt) if nxt is not None else None
            last_out_saved[e["pid"]] = e["pid"] in cpu.saved_pids
            cpu.saved_pids = set()
            if nxt is not None and nxt in saves_pending:
                cpu.awaiting, cpu.awaiting_seen = saves_pending.pop(nxt), False

        # XEN-LAZY-STATE: the per-CPU lazy state read before the event vs the region bookkeeping
        if e["lazy_mmu"] is not None:
            checked["XEN-LAZY-STATE"] += 1
            opening = kind == "lazy_enter" and region is None
            if opening and e["lazy_mmu"]:
                bug("XEN-LAZY-STATE", e, e["site"], "CPU already MMU-lazy at the lazy enter in {site}")
            elif not opening and region is not None and not e["lazy_mmu"]:
                bug("XEN-LAZY-STATE", e, region.site, "CPU not MMU-lazy inside a lazy region entered in {site}")
            elif not opening and region is None and e["lazy_mmu"]:
                bug("XEN-LAZY-STATE", e, e["site"], "CPU MMU-lazy outside any lazy region at {site}")

        if kind == "lazy_enter":
            checked["LAZY-PREEMPT"] += 1
            if _preemptible(e):
                bug("LAZY-PREEMPT", e, e["site"], "lazy_enter with preemption enabled in {site}")
            checked["LAZY-PAIRING"] += 1
            if region is not None:
                bug("LAZY-PAIRING", e, e["site"], "nested lazy_enter in {site}")
            else:
                owner = cpu.switched_in if restore and cpu.switched_in is not None else e["pid"]
                cpu.region = Region(e, _region_is_kernel(e), owner)

        elif kind == "lazy_leave":
            checked["LAZY-PAIRING"] += 1
            checked["KERNEL-UPDATE-FLUSHED"] += len(cpu.pending_kernel_set_ptes)  # flushed in time
            cpu.pending_kernel_set_ptes.clear()
            if region is None:
                bug("LAZY-PAIRING", e, e["site"], "lazy_leave without lazy_enter in {site}")
            else:
                if region.enter is not None:
                    checked["LAZY-NO-SWITCH"] += 1
                    if e["pid"] != region.pid:
                        bug("LAZY-NO-SWITCH", e, region.site, "lazy region entered in {site} left by another task")
                if e["site"] in XEN_SAVE_SITES:
                    cpu.xen_saved.append(region)  # the switch that follows is inside the caller's region
                cpu.region = None

        elif kind == "lazy_flush":
            checked["KERNEL-UPDATE-FLUSHED"] += len(cpu.pending_kernel_set_ptes)  # flushed in time
            cpu.pending_kernel_set_ptes.clear()

        elif kind == "switch":
            checked["LAZY-NO-SWITCH"] += 1
            if region is not None:
                bug("LAZY-NO-SWITCH", e, region.site, "context switch inside lazy region entered in {site}")
            for saved in cpu.xen_saved:
                bug("LAZY-NO-SWITCH", e, saved.site, "context switch inside lazy region entered in {site}")
            cpu.xen_saved = []
            for sp, sp_site in cpu.pending_kernel_set_ptes:
                checked["KERNEL-UPDATE-FLUSHED"] += 1
                bug("KERNEL-UPDATE-FLUSHED", sp, sp_site,
                    "kernel-mapping set_pte not flushed before a switch in lazy region entered in {site}")
            cpu.pending_kernel_set_ptes.clear()

        elif kind == "set_pte" and region is not None:
            checked["LAZY-SETPTE-ATOMIC"] += 1
            if _preemptible(e):
                bug("LAZY-SETPTE-ATOMIC", e, region.site,
                    "set_pte with preemption enabled in lazy region entered in {site}")
            elif region.enter is not None and e["pid"] != region.pid:
                bug("LAZY-SETPTE-ATOMIC", e, region.site, "set_pte by another task in lazy region entered in {site}")
            if e["preempt_count"] & schema.IRQ_CONTEXT_MASK:
                checked["IRQ-IN-LAZY"] += 1
                if e["site"] not in IRQ_ALLOWED_SET_PTE_SITES:
                    bug("IRQ-IN-LAZY", e, e["site"], "set_pte from interrupt context in {site} while the CPU is lazy")
            if region.kernel or e["mm_is_init"] is True or e["site"] in KERNEL_SET_PTE_SITES:
                cpu.pending_kernel_set_ptes.append((e, region.site))

        elif kind == "kmap_atomic":
            checked["KMAP-ATOMIC-PREEMPT"] += 1
            mapped = (e["preempt_count"] + KMAP_PREEMPT_OFFSET) & schema.PREEMPT_MASK_BITS
            if mapped == 0 and e["irqs_on"]:
                bug("KMAP-ATOMIC-PREEMPT", e, e["site"], "kmap_atomic with preemption enabled in {site}")

        elif kind == "sync_kernel_mappings":
            checked["SYNC-IRQS-OFF"] += 1
            if e["irqs_on"]:
                bug("SYNC-IRQS-OFF", e, e["site"], "kernel-mapping sync with interrupts on in {site}")

    # A kernel set_pte still pending at the end of its CPU's stream was never tested (not counted), nor a
    # batched set_pte with no task-context event after it. A save whose task was switched in again but not
    # restored is a violation if anything followed that switch on its CPU (else the trace ends there).
    for cpu in cpus.values():
        if cpu.awaiting and cpu.awaiting_seen:
            for s in cpu.awaiting:
                checked["XEN-SWITCH-SAVE"] += 1
                bug("XEN-SWITCH-SAVE", s, s["site"], "lazy region saved at a context switch was never restored")
    # The end of the trace: regions still open are a violation only in a complete trace from boot.
    if not windowed and not partial:
        for cpu in cpus.values():
            if cpu.region is not None and cpu.region.enter is not None:
                enter = cpu.region.enter
                bug("LAZY-PAIRING", enter, enter["site"], "lazy region entered in {site} never left")
    return OracleResult(checked, found)

