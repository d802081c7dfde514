"""``lazytrace record``: boot the guest under a recorder and turn the run into a trace directory.

One way through the data: resolved run spec -> Guest + recorder (gdb stub or TCG plugin) -> ``events.raw``
(streamed while the guest runs) -> ``trace.parquet`` + ``run.json``. Whatever stops the run (guest panic, gdb or
QEMU dying, Ctrl-C), the raw records already on disk are converted and the manifest says why it is partial.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.live import Live

from . import rawformat as rf
from . import rawtrace, schema, symbols
from .boot import managed_run
from .errors import GuestError, LazytraceError
from .manifest import Manifest
from .progress import RawTail
from .qemu import Guest, qemu_version
from .runspec import Resolved

log = logging.getLogger(__name__)

BACKENDS = ("plugin", "gdb")
ARM_MODES = ("marker", "boot")
#: Stop-based tracing runs the traced code ~500x slower: scale the workload timeout by this for gdb.
GDB_WINDOW_SLOWDOWN = 4.0
#: With ``--arm boot`` the whole boot is traced through the stub.
GDB_BOOT_SLOWDOWN = 30.0
#: Instruction-counted virtual time for the gdb backend. Without it the guest clock runs on host time while
#: every stop costs ~3 ms, so timer ticks pile up inside the traced code: measured on fork-exec (2 vCPUs,
#: 2 iterations) the plugin saw 349 lazy regions and 130 switches; gdb with icount 360 and 138; gdb without
#: icount over 3,000 regions and 26,000 switches before it was stopped (README, "observer effect").
GDB_ICOUNT_ARGS = ("-icount", "shift=3,sleep=on")


def default_backend() -> tuple[str, str]:
    """The plugin when this QEMU can run it, else gdb; and why."""
    try:
        from .plugin_build import plugin_supported
    except ImportError:
        return "gdb", "the TCG plugin recorder is not available in this build"
    ok, why = plugin_supported()
    return ("plugin", why) if ok else ("gdb", why)


@dataclass
class RecordResult:
    run_dir: Path
    backend: str
    events: int
    events_lost: int
    boot_s: float | None
    window_s: float | None
    workload_status: int | None
    stats: dict


def record(resolved: Resolved, run_dir: Path, *, backend: str, arm: str = "marker", emulate: bool | None = None,
           icount: bool = True, console: Console | None = None) -> RecordResult:
    """Record one guest run into ``run_dir``.

    :raises GuestError: no boot, panic, hang, or a non-zero workload status (the trace is kept).
    :raises InfraError: QEMU or gdb missing or died (the trace is kept).
    """
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    cfg = resolved.guest
    m = Manifest(run_dir, command="record", backend=backend, arm=arm, qemu={"version": qemu_version()},
                 **resolved.manifest())
    tail = RawTail(run_dir / schema.RAW_FILE)
    result = RecordResult(run_dir, backend, 0, 0, None, None, None, {})
    with managed_run(m):
        try:
            with console.status(f"resolving probes for build-id {cfg.kernel.build_id[:12]} (cached after the first run)"):
                syms = symbols.resolve(cfg.kernel.vmlinux)
            syms.write_locations(run_dir)
            m.update(probes={"locations": syms.probe_counts(), "absent_optional": syms.absent_optional()},
                     symbols={"pcpu_layout": syms.pcpu_layout, "build_id": syms.build_id})
            with Live(tail.table("starting"), console=console, refresh_per_second=4, transient=False) as live:
                phase = ["booting"]

                def tick() -> None:
                    tail.update()
                    live.update(tail.table(phase[0]))

                if backend == "gdb":
                    _record_gdb(resolved, run_dir, syms, arm, emulate, icount, m, result, tick, phase)
                elif backend == "plugin":
                    _record_plugin(resolved, run_dir, syms, arm, m, result, tick, phase)
                else:
                    raise ValueError(backend)
                phase[0] = "done"
                tick()
        finally:
            _finalise_trace(run_dir, m, result)
        status = "complete"
        reason = None
        if result.events_lost:
            status, reason = "partial", f"{result.events_lost} events lost"
        m.finish(status=status, exit_status=0, partial_reason=reason)
        if result.workload_status:
            raise GuestError(f"workload {resolved.workload.name} exited with status {result.workload_status}")
    return result


def _watchers(rec, tick, phase, arm):
    """The callbacks a guest run calls: ``poll`` (recorder health + live progress) and ``on_start`` (the
    workload-start sentinel was seen: the progress line says what is being traced)."""

    def poll() -> None:
        rec.poll()
        tick()

    def on_start() -> None:
        phase[0] = "tracing the workload window" if arm == "marker" else "tracing"

    return poll, on_start


def _record_gdb(resolved, run_dir, syms, arm, emulate, icount, m, result, tick, phase) -> None:
    from .gdb_recorder import GdbRecorder
    from .gdb_session import GdbSession
    from .plugin_recorder import extra_percpu_offsets

    cfg = replace(resolved.guest, gdb=True, paused=True, single_thread_tcg=True)
    has_icount = cfg.replay is not None or "-icount" in cfg.profile.extra_args
    if icount and not has_icount:
        cfg = replace(cfg, extra_args=(*cfg.extra_args, *GDB_ICOUNT_ARGS))
    irq = plugin_irq_mode(cfg.profile.kind)
    m.update(gdb_icount=icount or has_icount, irq_source=IRQ_SOURCES[irq])
    xen = extra_percpu_offsets(syms) if irq == "xen" else None
    if cfg.replay is not None:
        # Emulating a probe's instruction writes guest memory and the pc from gdb: an input the icount
        # record/replay log does not hold, so the replay diverges (measured: it stalls after the first event).
        if emulate:
            log.warning("record/replay: probe emulation is off (it would make the replay diverge)")
        emulate = False
        m.update(gdb_emulate=False)
    slowdown = GDB_BOOT_SLOWDOWN if arm == "boot" else 1.0
    with contextlib.ExitStack() as stack:
        guest = stack.enter_context(Guest(run_dir, cfg, slowdown=slowdown))
        m.update(qemu={"version": qemu_version(), "argv": guest.argv})
        gdb = stack.enter_context(GdbSession(cfg.kernel.vmlinux, guest.gdb_socket, run_dir / schema.GDB_LOG))
        m.update(gdb={"version": gdb.version})
        kwargs = {} if emulate is None else {"emulate": emulate}
        rec = GdbRecorder(gdb, syms, run_dir, arm=arm, xen=xen, **kwargs)
        rec.start(watch=guest.watch_console)

        poll, on_start = _watchers(rec, tick, phase, arm)

        try:
            result.workload_status = guest.run_workload(
                workload_timeout=resolved.workload_timeout * GDB_WINDOW_SLOWDOWN, poll=poll, on_start=on_start,
                boot_timeout=60.0)
        finally:
            result.boot_s, result.window_s = guest.boot_s, guest.window_s
            if gdb.alive():
                with contextlib.suppress(LazytraceError):
                    result.stats = rec.stop()
        phase[0] = "powering off"
        guest.wait_poweroff()


def _record_plugin(resolved, run_dir, syms, arm, m, result, tick, phase) -> None:
    from .plugin_build import ensure_plugin
    from .plugin_recorder import PluginRecorder

    so = ensure_plugin()
    irq = plugin_irq_mode(resolved.guest.profile.kind)
    m.update(irq_source=IRQ_SOURCES[irq])
    rec = PluginRecorder(syms, run_dir, arm=arm, plugin=so, irq=irq)
    cfg = replace(resolved.guest, extra_args=tuple(resolved.guest.extra_args) + tuple(rec.qemu_args()))
    with Guest(run_dir, cfg) as guest:
        m.update(qemu={"version": qemu_version(), "argv": guest.argv})

        poll, on_start = _watchers(rec, tick, phase, arm)

        try:
            result.workload_status = guest.run_workload(
                workload_timeout=resolved.workload_timeout, poll=poll, on_start=on_start)
            phase[0] = "powering off"
            guest.wait_poweroff()
        finally:
            result.boot_s, result.window_s = guest.boot_s, guest.window_s
    result.stats = rec.finish()


#: Where the plugin reads a record's interrupt state, per plugin ``irq`` mode (recorded in the manifest).
IRQ_SOURCES = {
    "eflags": "eflags.IF",
    "xen": "evtchn_upcall_mask (u8 at *(gs_base + &xen_vcpu) + 1); per-CPU paravirt_lazy_mode and "
           "mc_buffer.mcidx read too",
}


def plugin_irq_mode(profile_kind: str) -> str:
    """The plugin's ``irq`` mode for a profile kind.

    A Xen PV guest runs in ring 3 with eflags.IF always set: its interrupt mask is the event-channel upcall
    mask in its ``vcpu_info`` (``arch/x86/xen/irq.c``, ``xen_save_fl``), so ``xen-pv`` reads that instead.
    """
    return "xen" if profile_kind == "xen-pv" else "eflags"


def _finalise_trace(run_dir: Path, m: Manifest, result: RecordResult) -> None:
    """Convert whatever raw records exist into trace.parquet and put the counts in the manifest."""
    raw = run_dir / schema.RAW_FILE
    if not raw.exists() or not (run_dir / schema.LOCATIONS_FILE).exists():
        return
    try:
        n, torn = rawtrace.convert_dir(run_dir)
    except LazytraceError as exc:
        m.update(trace_error=exc.message)
        return
    lost = int(result.stats.get("events_lost", 0) or 0)
    result.events, result.events_lost = n, lost
    m.update(events_recorded=n, events_lost=lost, torn_bytes=torn, recorder=result.stats,
             boot_s=result.boot_s, window_s=result.window_s, workload_status=result.workload_status,
             raw_record_size=rf.RECORD.size)


def replay_resolved(src_dir: Path, progress=None) -> Resolved:
    """Rebuild the exact guest of a ``--replayable`` run, in QEMU replay mode over its ``replay.bin``.

    :raises TraceFormatError: the directory is not a replayable run.
    :raises KernelError: the cached kernel is not the recorded build (the replay would diverge).
    """
    import json

    from .errors import KernelError, TraceFormatError
    from .runspec import RunSpec
    from .runspec import resolve as resolve_spec

    src_dir = Path(src_dir)
    try:
        man = json.loads((src_dir / schema.MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise TraceFormatError(f"{src_dir}: no readable run.json: {exc}") from exc
    rr = src_dir / "replay.bin"
    if not man.get("profile", {}).get("record_replay") or not rr.exists():
        raise TraceFormatError(f"{src_dir}: not a replayable run (record it with --replayable)")
    wl = man["workload"]
    spec = RunSpec(kernel=man["kernel"]["recipe"], profile=man["profile"]["name"], workload=wl["path"],
                   iterations=wl["iterations"], cpus=wl["cpus"], timeout_s=wl.get("timeout_s"))
    res = resolve_spec(spec, progress=progress)
    if res.guest.kernel.build_id != man["kernel"].get("build_id"):
        raise KernelError(f"{src_dir} was recorded with kernel build-id {man['kernel'].get('build_id')}, "
                          f"the cache has {res.guest.kernel.build_id}: the replay would diverge")
    if str(res.guest.initramfs) != man.get("initramfs"):
        raise TraceFormatError(f"{src_dir}: the workload's initramfs changed since the recording "
                               f"({man.get('initramfs')} -> {res.guest.initramfs}): the replay would diverge")
    guest = replace(res.guest, replay="replay", replay_file=rr.resolve())
    return replace(res, guest=guest)
