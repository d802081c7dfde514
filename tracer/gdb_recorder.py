"""The gdb recorder: arm the probes of :class:`tracer.symbols.Symbols` in a :class:`GdbSession` and let the
in-gdb collector (:mod:`tracer/gdb/collector.py`) stream raw records to ``events.raw``.

The host side only drives and monitors: it checks the booted kernel is the vmlinux's (``linux_banner`` in
guest memory against the file's), writes ``locations.json``, loads the collector with its JSON config,
continues the guest, and at the end interrupts, collects the collector's counters and detaches. The hot path
never crosses MI (a per-stop MI loop is ~2x slower: DESIGN.md, and ``bench/trace_throughput`` measures it).

Usage (the lead's orchestration)::

    with GdbSession(vmlinux, guest.gdb_socket, run_dir / "gdb.log") as gdb:
        rec = GdbRecorder(gdb, symbols, run_dir, arm="marker")
        rec.start()
        guest.run_workload(..., poll=rec.poll)
        stats = rec.stop()
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from . import schema
from .errors import ConfigError, GdbError, KernelError
from .gdb_session import GdbSession, GdbState
from .symbols import Symbols

log = logging.getLogger(__name__)

COLLECTOR_SCRIPT = Path(__file__).resolve().parent / "gdb" / "collector.py"
COLLECTOR_CONFIG = "gdb-collector.json"
#: From reset to the kernel's high mapping (decompression included) on TCG: ~1 s.
BANNER_BOOT_TIMEOUT_S = 60.0
#: The guest runs this long between two looks at the boot CPU's pc.
BANNER_POLL_S = 0.1
#: ... growing to at most this (a stop costs QEMU its translated code: short slices starve a slow boot).
BANNER_POLL_MAX_S = 2.0
#: ``__START_KERNEL_map`` (arch/x86/include/asm/page_64_types.h): kernel text runs at or above it.
KERNEL_TEXT_MAP = 0xFFFF_FFFF_8000_0000
#: Loading the collector and inserting ~200 breakpoints (no TCG flush for inserts).
COLLECTOR_LOAD_TIMEOUT_S = 60.0
#: Final flush, stats and breakpoint removal.
COLLECTOR_STOP_TIMEOUT_S = 30.0
ARM_MODES = ("marker", "boot")
#: Emulate the probe sites' NOPs and PTE stores (one debug stop per event instead of two)? Measured with
#: bench/trace_throughput on this 2-core host (same guest, workload and sites, modes interleaved), emulate/full
#: events/s: without icount 1.20, 1.10, 1.06, 1.05; with ``-icount shift=3,sleep=on`` -- what
#: ``lazytrace record --backend gdb`` runs -- 0.98, 1.04, 0.88, 1.04 (a tie). QEMU's re-translation after each
#: resume, not the stop count, dominates; and an emulated event costs gdb a register write (``P``), a register
#: refetch (``g``), a stack read for the frame and, for a store, a memory write (``M``). With no win where the
#: CLI runs, the default is the path that never writes into the guest. Emulation stays available and is
#: checked equivalent by tests/vm/test_gdb_record.py (same sites, balanced regions, same workload output);
#: it never performs a PTE store under Xen PV.
EMULATE_DEFAULT = False
#: Every rename of a task goes through it: __set_task_comm(tsk, buf, exec) (fs/exec.c).
COMM_HOOK_EXPR = "&__set_task_comm"
#: ``enum xen_domain_type`` (include/xen/xen.h): under Xen PV the page tables are read-only to the guest and
#: a PTE store traps to Xen, so the collector must never emulate one by writing memory behind Xen's back.
XEN_DOMAIN_TYPE_EXPR = "&xen_domain_type"


def _last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in {text!r}")


class GdbRecorder:
    """Record the probes through gdb breakpoints.

    :param gdb: an attached session (state ``STOPPED``).
    :param symbols: the resolved probes (``tracer.symbols.resolve(vmlinux)``).
    :param trace_dir: receives ``events.raw``, ``locations.json`` and the collector config.
    :param arm: ``"marker"`` traces between the workload markers; ``"boot"`` from the guest's first run.
    :param emulate: perform NOP/store instructions at probe sites instead of single-stepping them
        (:data:`EMULATE_DEFAULT`).
    :param mode: ``"full"`` records events; ``"count"`` only counts stops (the benchmark floor).
    :param text_base: the banner is checked once the boot CPU runs at or above this address (the kernel's
        high mapping; the fake-kernel tests pass 0).
    :param xen: per-CPU offsets for a Xen PV guest (:func:`tracer.plugin_recorder.extra_percpu_offsets`:
        ``pcpu_xen_vcpu`` required, ``pcpu_lazy_mode``/``pcpu_mc_buffer`` optional): the collector then reads
        the virtual interrupt flag, the lazy mode and the multicall fill, like the plugin's ``irq xen``.
    """

    def __init__(self, gdb: GdbSession, symbols: Symbols, trace_dir: Path, *, arm: str = "marker",
                 emulate: bool = EMULATE_DEFAULT, mode: str = "full", text_base: int = KERNEL_TEXT_MAP,
                 xen: dict[str, int] | None = None) -> None:
        if arm not in ARM_MODES:
            raise ValueError(f"bad arm: got {arm!r}, want one of {', '.join(ARM_MODES)}")
        if mode not in ("full", "count"):
            raise ValueError(f"bad mode: got {mode!r}, want full or count")
        self.gdb = gdb
        self.symbols = symbols
        self.trace_dir = Path(trace_dir)
        self.arm = arm
        self.emulate = emulate
        self.mode = mode
        if xen is not None and "pcpu_xen_vcpu" not in xen:
            raise ConfigError("a Xen PV guest needs the per-CPU xen_vcpu offset: this vmlinux has no xen_vcpu "
                              "symbol (is it a CONFIG_XEN_PV kernel?)")
        self.xen = xen
        self.raw_path = self.trace_dir / schema.RAW_FILE
        self.started = False
        self.stopped = False
        self.t_start: float | None = None
        self.t_stop: float | None = None
        self.unexpected_stops: list[dict] = []
        self.stats: dict | None = None
        self.banner_checked = False
        self.text_base = text_base

    # -- start -----------------------------------------------------------------------------------------

    def start(self, watch: Callable[[float], None] | None = None) -> None:
        """Write locations.json, load the collector (probes armed per ``arm``), check the banner, continue.

        :raises KernelError: the booted kernel is not the vmlinux's.
        :raises GdbError: gdb failed or a probe breakpoint did not resolve.
        """
        if self.gdb.state is not GdbState.STOPPED:
            raise GdbError(f"GdbRecorder.start needs an attached, stopped gdb (state {self.gdb.state.value})")
        self.symbols.check_required()
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        self.symbols.write_locations(self.trace_dir)
        self._load_collector()
        self.check_banner(watch)
        self.t_start = time.monotonic()
        self.gdb.cont()
        self.started = True

    def _load_collector(self) -> None:
        cfg = {
            "raw_path": str(self.raw_path),
            "offsets": self.symbols.offsets,
            "locations": self.symbols.locations,
            "hooks": self.symbols.hooks,
            "arm": self.arm,
            "emulate": self.emulate,
            "mode": self.mode,
            "events": list(schema.EVENTS),
            "comm_hooks": self._comm_hooks(),
            "xen_domain_type": self._address_of(XEN_DOMAIN_TYPE_EXPR),
            "xen": self.xen,
        }
        cfg_path = self.trace_dir / COLLECTOR_CONFIG
        cfg_path.write_text(json.dumps(cfg))
        load = ("import importlib.util, sys; "
                f"_s = importlib.util.spec_from_file_location('lazytrace_collector', {str(COLLECTOR_SCRIPT)!r}); "
                "_m = importlib.util.module_from_spec(_s); sys.modules['lazytrace_collector'] = _m; "
                "_s.loader.exec_module(_m)")
        self.gdb.python(load, timeout=COLLECTOR_LOAD_TIMEOUT_S)
        out = self.gdb.python(f"sys.modules['lazytrace_collector'].start({str(cfg_path)!r})",
                              timeout=COLLECTOR_LOAD_TIMEOUT_S)
        try:
            info = _last_json_line(out)
        except ValueError as exc:
            raise GdbError(f"the in-gdb collector did not start: {out.strip()[-500:]}", argv=self.gdb.argv,
                           log_tail=self.gdb.log_tail(), logs=[str(self.gdb.log_path)]) from exc
        want = len(set(self.symbols.by_pc()) | {h["pc"] for h in self.symbols.hooks} | set(cfg["comm_hooks"]))
        if info["breakpoints"] != want:
            raise GdbError(f"collector set {info['breakpoints']} breakpoints, want {want}")
        log.info("gdb collector armed=%s with %d breakpoints", info["armed"], info["breakpoints"])

    def _address_of(self, expr: str) -> int | None:
        """An address from the loaded vmlinux (``&symbol``), or None if it has no such symbol."""
        try:
            rec = self.gdb.mi(f"-data-evaluate-expression {expr}")
        except GdbError as exc:
            log.info("no %s in this vmlinux: %s", expr, exc.message)
            return None
        m = re.search(r"0x[0-9a-f]+", (rec.get("payload") or {}).get("value", ""))
        return int(m.group(0), 16) if m else None

    def _comm_hooks(self) -> list[int]:
        """``__set_task_comm``'s entry, where the collector learns a task is renamed (exec, PR_SET_NAME).

        With it the collector caches pid/comm per task and saves a stub round trip per event; without it
        (a kernel without the symbol) it reads them at every event.
        """
        addr = self._address_of(COMM_HOOK_EXPR)
        return [addr] if addr is not None else []

    def check_banner(self, watch: Callable[[float], None] | None = None) -> None:
        """Refuse a vmlinux that does not match the booted kernel (``linux_banner`` in guest memory).

        At reset (``-S``) the kernel is not even decompressed, so the guest runs in short slices
        (:data:`BANNER_POLL_S`) until the boot CPU executes in the kernel's high mapping (``rip`` at or above
        ``__START_KERNEL_map``): from then on the whole image is mapped and decompressed, and the banner read
        at the vmlinux's address is final. No symbol of the vmlinux is trusted for this (a wrong vmlinux's
        ``start_kernel`` would never be reached), and no guess is made from memory read in real mode.

        :raises KernelError: the banners differ, or the kernel never started within the timeout.
        """
        want = self.symbols.banner.encode("latin-1")
        addr = self.symbols.offsets["linux_banner"]
        deadline = time.monotonic() + BANNER_BOOT_TIMEOUT_S * self.gdb.scale
        slice_s = BANNER_POLL_S
        while not self._kernel_running():
            if time.monotonic() > deadline:
                raise KernelError(
                    f"the guest did not enter the kernel's high mapping within "
                    f"{BANNER_BOOT_TIMEOUT_S * self.gdb.scale:.0f} s (pcs {', '.join(f'{p:#x}' for p in self._pcs())})"
                    f": cannot check the vmlinux {self.symbols.vmlinux} against it")
            self.gdb.cont()
            if watch is not None:
                watch(slice_s)  # the guest's console must be read while it runs (Guest.watch_console)
            else:
                time.sleep(slice_s)
            self.gdb.interrupt()
            # every stop flushes QEMU's translated code: short slices would starve a slow boot (Xen
            # scrubbing memory and building dom0 under TCG), so the slices grow
            slice_s = min(slice_s * 1.5, BANNER_POLL_MAX_S)
        got = self._read_banner(addr, len(want))
        if got != want:
            what = "another kernel's banner" if got and got.startswith(b"Linux version") else \
                "no banner at all: the booted kernel is another build"
            raise KernelError(
                f"the vmlinux does not match the booted kernel ({what}):\n"
                f"  vmlinux {self.symbols.vmlinux}: {self.symbols.banner!r}\n"
                f"  guest memory at {addr:#x}: {got[:96] if got else got!r}")
        self.banner_checked = True

    def _pcs(self) -> dict[int, int]:
        """gdb thread id -> pc, for every vCPU."""
        rec = self.gdb.mi("-thread-info")
        pcs = {}
        for t in (rec.get("payload") or {}).get("threads", []):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                pcs[int(t["id"])] = int(t["frame"]["addr"], 16)
        return pcs

    def _kernel_running(self) -> bool:
        """Whether a vCPU runs in the kernel's high mapping; if so, select it (memory reads go through its page
        tables: under Xen the other one may be in the hypervisor, whose page tables do not map the guest)."""
        for tid, pc in sorted(self._pcs().items()):
            if pc >= self.text_base:
                self.gdb.mi(f"-thread-select {tid}")
                return True
        return False

    def _read_banner(self, addr: int, length: int) -> bytes | None:
        try:
            return self.gdb.read_memory(addr, length)
        except GdbError:
            return None

    # -- while the guest runs ---------------------------------------------------------------------------

    def records_on_disk(self) -> int:
        """Whole records in events.raw now (what the collector has flushed)."""
        try:
            size = self.raw_path.stat().st_size
        except OSError:
            return 0
        return max(0, (size - 8) // 80)

    def poll(self) -> int:
        """Health check while the guest runs. :returns: records on disk. :raises GdbError: gdb died or the
        target went away."""
        for rec in self.gdb.poll():
            if rec.get("message") == "thread-group-exited":
                raise GdbError("gdb lost the guest's stub (did QEMU exit?)", argv=self.gdb.argv,
                               log_tail=self.gdb.log_tail(), logs=[str(self.gdb.log_path)])
            if rec.get("message") != "stopped":
                continue
            payload = rec.get("payload") or {}
            reason = payload.get("reason", "")
            self.unexpected_stops.append(payload)
            if reason.startswith("exited") or "signal-name" in payload and payload.get("signal-name") == "SIGKILL":
                raise GdbError(f"the guest went away under gdb: {payload}", argv=self.gdb.argv,
                               log_tail=self.gdb.log_tail(), logs=[str(self.gdb.log_path)])
            log.warning("gdb: unexpected stop while recording (%s): resuming", reason or payload)
            self.gdb.cont()
        return self.records_on_disk()

    # -- stop ------------------------------------------------------------------------------------------

    def stop(self, *, detach: bool = True) -> dict:
        """Interrupt, flush the collector, remove its breakpoints and detach (the guest runs on).

        :param detach: ``False`` leaves gdb attached with the guest halted (the benchmark switches modes).
        Idempotent. :returns: stats for the manifest (see :meth:`manifest_stats`).
        """
        if self.stopped:
            return self.stats or {}
        self.stopped = True
        self.t_stop = time.monotonic()
        raw: dict = {}
        errors: list[str] = []
        try:
            if self.gdb.alive():
                self.gdb.drain_async()
                if self.gdb.state is GdbState.RUNNING:
                    try:
                        self.gdb.interrupt()
                    except GdbError as exc:  # QEMU gone: the collector's counters are still in gdb
                        errors.append(f"interrupt: {exc.message}")
                try:
                    out = self.gdb.python("sys.modules['lazytrace_collector'].stop()",
                                          timeout=COLLECTOR_STOP_TIMEOUT_S)
                    raw = _last_json_line(out)
                except (GdbError, ValueError) as exc:
                    errors.append(f"collector stop: {exc}")
                if detach and self.gdb.state is GdbState.STOPPED:
                    try:
                        self.gdb.mi("-target-detach")
                        self.gdb.state = GdbState.DETACHED
                    except GdbError as exc:
                        errors.append(f"detach: {exc.message}")
            else:
                errors.append("gdb was not running at stop")
        finally:
            self.stats = self.manifest_stats(raw)
            self.stats["stop_errors"] = errors
            for e in errors:
                log.warning("gdb recorder stop: %s", e)
        return self.stats

    def manifest_stats(self, raw: dict) -> dict:
        """Manifest fields from the collector's counters (``raw`` empty if gdb died: counted from disk)."""
        loc_hits = raw.get("loc_hits") or []
        probe_hits: Counter[str] = Counter({p["name"]: 0 for p in self.symbols.probes if p["event"]})
        for loc in self.symbols.locations:
            if loc["loc"] < len(loc_hits):
                probe_hits[loc["probe"]] += loc_hits[loc["loc"]]
        on_disk = self.records_on_disk()
        recorded = raw.get("events_recorded", on_disk)
        window = (self.t_stop - self.t_start) if self.t_start and self.t_stop else None
        return {
            "backend": "gdb",
            "gdb_version": self.gdb.version,
            "arm": self.arm,
            "emulate": self.emulate,
            "events_recorded": recorded,
            "events_on_disk": on_disk,
            # not on disk at the end (a failed flush), plus events whose reads raised in gdb
            "events_lost": raw.get("events_lost", 0) + max(0, recorded - on_disk),
            "probe_locations": self.symbols.probe_counts(),
            "probe_hits": dict(probe_hits),
            "hook_hits": raw.get("hook_hits", 0),
            "comm_hook_hits": raw.get("comm_hook_hits", 0),
            "task_cache": raw.get("task_cache", False),
            "stops_counted": raw.get("count_hits", 0),
            "flushes": raw.get("flushes", 0),
            "emulated": raw.get("emulated", 0),
            "markers": raw.get("markers", []),
            "unexpected_stops": len(self.unexpected_stops),
            "collector_errors": raw.get("errors", []),
            "collector_ok": bool(raw),
            "window_s": window,
            "events_per_s": (recorded / window) if window else None,
            "marker_window_s": _marker_window(raw.get("markers") or []),
            "stops": raw.get("stops", 0),
            "collector_stop_s": raw.get("stop_s", 0.0),
        }


def _marker_window(marks: list) -> float | None:
    """Seconds between the first workload-start and the last workload-end marker (host clock)."""
    starts = [m[2] for m in marks if m[1] == "workload-start"]
    ends = [m[2] for m in marks if m[1] == "workload-end"]
    if not starts or not ends or max(ends) <= min(starts):
        return None
    return (max(ends) - min(starts)) / 1e9


def df_probe_cpu_summary(df: pd.DataFrame, locations: list[dict] | None = None) -> pd.DataFrame:
    """Final per-probe, per-CPU event counts of a trace frame.

    :param df: an events frame (:data:`tracer.schema.COLUMNS`).
    :param locations: ``locations.json``'s entries; maps each (pc, site) to its probe. Without it, rows are
        event categories.
    :returns: one row per probe (index ``probe``), one column per guest CPU (``cpu0``, ``cpu1``, ...) and
        ``total``; rows sorted by total, descending. Empty frame with a ``total`` column for an empty trace.
    """
    if locations:
        key = {(int(loc["pc"]), loc["site"]): loc["probe"] for loc in locations}
        probe = pd.Series([key.get((int(pc), site), "?") for pc, site in zip(df["pc"], df["site"], strict=True)],
                          index=df.index, name="probe")
    else:
        probe = df["event"].astype("string").rename("probe")
    if df.empty:
        return pd.DataFrame({"total": pd.Series([], dtype="int64")}, index=pd.Index([], name="probe"))
    table = pd.crosstab(probe, df["cpu"])
    table.columns = [f"cpu{c}" for c in table.columns]
    table["total"] = table.sum(axis=1)
    return table.sort_values("total", ascending=False)
