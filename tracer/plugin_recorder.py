"""The TCG plugin recorder: the probe table of :mod:`tracer.probes`, recorded at guest speed by a QEMU plugin.

The gdb recorder stops the machine at every event (a few hundred events/s, the guest slowed ~500x); this one
hands the resolved probe locations (:func:`tracer.symbols.resolve`) to ``tracer/plugin/lazytrace.c``, which
registers an instruction callback at each probe pc and reads registers and guest memory from inside it while
the guest runs. The plugin writes ``events.raw`` (:mod:`tracer.rawformat`) itself, flushing every
:data:`DEFAULT_FLUSH_MS`, so a killed QEMU leaves a readable partial trace; :mod:`tracer.rawtrace` converts it.

Use (the lead's ``Guest`` takes ``extra_args``)::

    rec = PluginRecorder(symbols, trace_dir, arm="marker")
    guest = Guest(..., extra_args=rec.qemu_args())   # writes plugin.cfg and locations.json
    ... rec.poll() ...                               # progress: events so far
    stats = rec.finish()                             # after QEMU exited: stats for run.json

The plugin's config file (``plugin.cfg`` in the trace directory) is the whole interface between Python and
C: one directive per line, documented at the top of ``lazytrace.c`` and produced by :func:`render_config`
from the ``reads`` vocabulary of :mod:`tracer.symbols`. Reads the plugin cannot express raise
:class:`tracer.errors.ConfigError` rather than silently recording less.

Xen PV (``irq="xen"``) needs three extras beyond :attr:`tracer.symbols.Symbols.offsets`, read from the
vmlinux symbol table and cached per build-id: ``xen_vcpu`` (a PV guest's interrupt state is
``evtchn_upcall_mask``, u8 at ``*(gs_base + xen_vcpu) + 1``; eflags.IF means nothing there), the per-CPU
lazy mode (``paravirt_lazy_mode`` in 6.1, ``xen_lazy_mode`` from 6.2) into the ``lazy_mode``/``lazy_mmu``
columns, and the per-CPU multicall buffer ``mc_buffer`` (its first field ``mcidx`` into ``mc_pending``).
On a native guest the lazy ops are NOP-patched, ``paravirt_lazy_mode`` stays 0 (measured: 0 of 42,590
set_pte on 6.1), so none of them is read there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import paths, probes, schema
from . import rawformat as rf
from .errors import ConfigError, GuestBootError, GuestHangError, QemuError, TraceFormatError
from .plugin_build import QEMU_BINARY, ensure_plugin, qemu_version
from .symbols import Symbols

log = logging.getLogger(__name__)

CONFIG_FILE = "plugin.cfg"
STATS_FILE = "plugin-stats.json"
CONFIG_VERSION = 1
#: How often the plugin's flusher thread writes its buffer: a SIGKILLed QEMU loses at most this much.
DEFAULT_FLUSH_MS = 200
ARM_MODES = ("marker", "boot")
IRQ_MODES = ("eflags", "xen")


#: Read keys of :mod:`tracer.symbols` locations, and how each becomes plugin config text.
_OPERAND_KEYS = ("ptep", "pteval", "next_task", "mm")
_MARKER_ROLES = {probes.MARKERS[0][0]: "start", probes.MARKERS[1][0]: "end"}

#: Per-CPU variables looked up in the vmlinux symbol table (optional: absent in some kernels).
#: Each key lists its candidate symbols, first found wins.
EXTRA_PERCPU_SYMBOLS: dict[str, tuple[str, ...]] = {
    "pcpu_lazy_mode": ("paravirt_lazy_mode", "xen_lazy_mode"),
    "pcpu_xen_vcpu": ("xen_vcpu",),
    "pcpu_mc_buffer": ("mc_buffer",),
}


# -- config ------------------------------------------------------------------------------------------------


def _operand(key: str, value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: bad {key} read {value!r}: want a register name or an integer")
    if isinstance(value, int):
        return str(value & 0xFFFF_FFFF_FFFF_FFFF)
    if not value.isidentifier():
        raise ConfigError(f"{where}: bad {key} read {value!r}: want a register name or an integer")
    return value


def loc_directive(loc: dict) -> str:
    """One ``loc`` line of the plugin config for a :attr:`Symbols.locations` entry.

    :raises ConfigError: an unknown event or a read the plugin cannot do.
    """
    where = f"location {loc.get('loc')} ({loc.get('probe')} in {loc.get('site')})"
    try:
        code = schema.EVENT_CODE[loc["event"]]
    except KeyError as exc:
        raise ConfigError(f"{where}: unknown event {loc.get('event')!r}") from exc
    parts = ["loc", str(int(loc["loc"])), f"{int(loc['pc']):#x}", str(code)]
    reads = dict(loc.get("reads") or {})
    for key in _OPERAND_KEYS:
        if key in reads:
            parts.append(f"{key}={_operand(key, reads.pop(key), where)}")
    if "mm_slot" in reads:
        slot = str(reads.pop("mm_slot"))
        if not slot.isidentifier():
            raise ConfigError(f"{where}: bad mm_slot {slot!r}")
        parts.append(f"mm_slot={slot}")
    if "marker" in reads:
        length = reads.pop("len", None)
        if not isinstance(length, int) or length <= 0:
            raise ConfigError(f"{where}: a marker read needs a positive 'len', got {length!r}")
        role = _MARKER_ROLES.get(loc.get("site"), "none")
        parts += [f"marker={_operand('marker', reads.pop('marker'), where)}", f"len={length}", f"role={role}"]
    if reads:
        raise ConfigError(f"{where}: the plugin cannot do read(s) {sorted(reads)} "
                          f"(tracer/plugin/lazytrace.c and tracer/plugin_recorder.py know {_OPERAND_KEYS}, "
                          "mm_slot, marker+len)")
    return " ".join(parts)


def hook_directive(hook: dict) -> str:
    """One ``hook`` line for a :attr:`Symbols.hooks` entry (sets a per-task slot, records nothing)."""
    where = f"hook {hook.get('probe')} at {hook.get('site')}"
    reads = dict(hook.get("reads") or {})
    slot = str(hook.get("slot", ""))
    if not slot.isidentifier() or set(reads) != {"value"}:
        raise ConfigError(f"{where}: want a slot name and reads {{'value': REG}}, got {slot!r} {reads!r}")
    return f"hook {int(hook['pc']):#x} {slot} value={_operand('value', reads['value'], where)}"


def render_config(symbols: Symbols, *, out: Path, stats: Path, arm: str = "marker", irq: str = "eflags",
                  flush_ms: int = DEFAULT_FLUSH_MS, extra_offsets: dict[str, int] | None = None,
                  only_probes: set[str] | None = None) -> str:
    """The plugin config text (see the top of ``tracer/plugin/lazytrace.c``).

    :param only_probes: record only these probes (markers always included): the benchmark's untraced run.
    :raises ConfigError: a bad arm/irq mode, or a location whose reads the plugin cannot do.
    """
    if arm not in ARM_MODES:
        raise ConfigError(f"bad arm: got {arm!r}, want one of {', '.join(ARM_MODES)}")
    if irq not in IRQ_MODES:
        raise ConfigError(f"bad irq: got {irq!r}, want one of {', '.join(IRQ_MODES)}")
    if not 1 <= flush_ms <= 60000:
        raise ConfigError(f"bad flush_ms: got {flush_ms}, want 1-60000")
    for p in (out, stats):
        if any(c in str(p) for c in "\n\r\t "):
            raise ConfigError(f"plugin output path {str(p)!r} contains whitespace")
    offsets = {**symbols.offsets, **(extra_offsets or {})}
    if irq == "xen" and "pcpu_xen_vcpu" not in offsets:
        raise ConfigError("irq='xen' needs the per-CPU xen_vcpu offset: this vmlinux has no xen_vcpu symbol")
    lines = [
        f"lazytrace-plugin-config {CONFIG_VERSION}",
        f"# vmlinux build-id {symbols.build_id}",
        f"out {out}",
        f"stats {stats}",
        f"arm {arm}",
        f"flush_ms {flush_ms}",
        f"irq {irq}",
    ]
    for name in sorted(offsets):
        value = offsets[name]
        if isinstance(value, int) and not isinstance(value, bool):
            lines.append(f"offset {name} {value & 0xFFFF_FFFF_FFFF_FFFF:#x}")
    for loc in symbols.locations:
        if only_probes is not None and loc["event"] != "marker" and loc["probe"] not in only_probes:
            continue
        lines.append(loc_directive(loc))
    for hook in symbols.hooks:
        if only_probes is None or hook.get("probe") in only_probes:
            lines.append(hook_directive(hook))
    return "\n".join(lines) + "\n"


def extra_percpu_offsets(symbols: Symbols) -> dict[str, int]:
    """Per-CPU offsets of :data:`EXTRA_PERCPU_SYMBOLS` from the vmlinux symbol table, cached per build-id.

    Returns only the ones the kernel has; ``{}`` if the vmlinux is not at hand.
    """
    cache = paths.cache_dir() / "plugin" / "percpu" / f"{symbols.build_id}.json"
    try:
        doc = json.loads(cache.read_text())
        if doc.get("looked_up") == EXTRA_PERCPU_SYMBOLS:  # else written for another symbol list: redo
            return {k: int(v) for k, v in doc["found"].items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    vmlinux = Path(symbols.vmlinux) if symbols.vmlinux else None
    if vmlinux is None or not vmlinux.is_file():
        return {}
    from elftools.elf.elffile import ELFFile  # a few seconds on a 600 MB vmlinux: hence the cache

    found: dict[str, int] = {}
    with vmlinux.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        if symtab is not None:
            for key, names in EXTRA_PERCPU_SYMBOLS.items():
                for name in names:
                    syms = symtab.get_symbol_by_name(name)
                    if syms:
                        found[key] = int(syms[0]["st_value"])
                        break
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"looked_up": {k: list(v) for k, v in EXTRA_PERCPU_SYMBOLS.items()},
                               "found": found}))
    tmp.replace(cache)
    return found


def _qemu_opt_escape(value: str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return value.replace(",", ",,")


# -- the recorder ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """What :meth:`PluginRecorder.poll` saw: records in ``events.raw`` so far."""

    events: int
    bytes: int
    elapsed_s: float


class PluginRecorder:
    """Record a run with the TCG plugin. One instance per run (per trace directory).

    :param symbols: resolved probes (:func:`tracer.symbols.resolve`).
    :param trace_dir: the run's trace directory (created if needed).
    :param arm: ``marker``: record between the workload markers; ``boot``: from the first event.
    :param plugin: the plugin ``.so`` (default: :func:`tracer.plugin_build.ensure_plugin`).
    :param irq: ``eflags`` (native/KVM guests) or ``xen`` (Xen PV: the virtual interrupt mask).
    :param only_probes: record only these probe names (plus the markers); ``None``: all.
    """

    def __init__(self, symbols: Symbols, trace_dir: Path, arm: str = "marker", *, plugin: Path | None = None,
                 irq: str = "eflags", flush_ms: int = DEFAULT_FLUSH_MS, qemu: str = QEMU_BINARY,
                 only_probes: set[str] | None = None) -> None:
        if arm not in ARM_MODES:
            raise ConfigError(f"bad arm: got {arm!r}, want one of {', '.join(ARM_MODES)}")
        self.symbols = symbols
        self.trace_dir = Path(trace_dir)
        self.arm = arm
        self.irq = irq
        self.flush_ms = flush_ms
        self.qemu = qemu
        self.only_probes = only_probes
        self._plugin = Path(plugin) if plugin else None
        self._started: float | None = None
        self._finished: dict | None = None

    @property
    def raw_path(self) -> Path:
        return self.trace_dir / schema.RAW_FILE

    @property
    def config_path(self) -> Path:
        return self.trace_dir / CONFIG_FILE

    @property
    def stats_path(self) -> Path:
        return self.trace_dir / STATS_FILE

    @property
    def plugin(self) -> Path:
        if self._plugin is None:
            self._plugin = ensure_plugin(self.qemu)
        return self._plugin

    def write_config(self) -> Path:
        """Write ``plugin.cfg`` and ``locations.json`` into the trace directory; remove stale outputs."""
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        text = render_config(self.symbols, out=self.raw_path.resolve(), stats=self.stats_path.resolve(),
                             arm=self.arm, irq=self.irq, flush_ms=self.flush_ms,
                             extra_offsets=self._extra_offsets(), only_probes=self.only_probes)
        for stale in (self.raw_path, self.stats_path):
            stale.unlink(missing_ok=True)
        self.config_path.write_text(text)
        self.symbols.write_locations(self.trace_dir)
        return self.config_path

    def _extra_offsets(self) -> dict[str, int]:
        # paravirt_lazy_mode is only maintained where the lazy ops are not NOP-patched (Xen PV): on a
        # native guest it stays 0, and recording it as "known" would mislead.
        if self.irq != "xen":
            return {}
        return extra_percpu_offsets(self.symbols)

    def qemu_args(self) -> list[str]:
        """QEMU argv to load the plugin (``-plugin <so>,cfg=<file>``); writes the config first."""
        cfg = self.write_config()
        self._started = time.monotonic()
        return ["-plugin", f"{_qemu_opt_escape(str(self.plugin))},cfg={_qemu_opt_escape(str(cfg.resolve()))}"]

    def poll(self) -> Progress:
        """Progress so far, from the size of ``events.raw`` (the plugin flushes every ``flush_ms``)."""
        try:
            size = self.raw_path.stat().st_size
        except FileNotFoundError:
            size = 0
        events = max(0, size - len(rf.MAGIC)) // rf.RECORD.size
        elapsed = time.monotonic() - self._started if self._started is not None else 0.0
        return Progress(events=events, bytes=size, elapsed_s=elapsed)

    def finish(self) -> dict:
        """Statistics for the run manifest, after QEMU exited (or was killed).

        ``complete`` is False when the plugin wrote no exit statistics (QEMU was killed): the trace is then a
        valid partial one, ending at most ``flush_ms`` before the kill.

        :raises TraceFormatError: no ``events.raw`` at all (the plugin never loaded).
        """
        if self._finished is not None:
            return self._finished
        if not self.raw_path.exists():
            raise TraceFormatError(f"{self.raw_path}: the plugin wrote no trace (did QEMU load it? see "
                                   f"{self.trace_dir / schema.QEMU_LOG})")
        size = self.raw_path.stat().st_size
        body = max(0, size - len(rf.MAGIC))
        in_file, torn = divmod(body, rf.RECORD.size)
        try:
            pstats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            pstats = None
        try:
            qver = qemu_version(self.qemu)
            qemu_info = {"qemu_version": qver.release_str, "qemu_version_text": qver.text,
                         "qemu_package": qver.package}
        except Exception as exc:  # the manifest says what went wrong instead of failing the run
            qemu_info = {"qemu_version": None, "qemu_version_error": str(exc)}
        out = {
            "backend": "plugin",
            **qemu_info,
            "plugin": str(self.plugin),
            "plugin_sha256": hashlib.sha256(self.plugin.read_bytes()).hexdigest()[:16],
            "plugin_config": str(self.config_path),
            "arm": self.arm,
            "irq": self.irq,
            "flush_ms": self.flush_ms,
            "complete": pstats is not None,
            "events_in_file": in_file,
            "torn_bytes": torn,
        }
        if pstats is None:
            out.update(events_recorded=in_file, events_lost=None, partial_reason="QEMU exited without the "
                       "plugin's exit callback (killed?): events after the last flush are missing")
        else:
            window_ns = (pstats["t_disarmed_ns"] or pstats["t_last_ns"]) - pstats["t_armed_ns"] \
                if pstats.get("t_armed_ns") else 0
            out.update(
                plugin_api={"min": pstats["plugin_api_min"], "cur": pstats["plugin_api_cur"],
                            "built": pstats["plugin_api_built"]},
                events_recorded=pstats["events_recorded"],
                events_lost=pstats["events_lost"] + max(0, pstats["events_written"] - in_file),
                read_failures=pstats["read_failures"],
                hook_hits=pstats.get("hook_hits", 0),
                arm_windows=pstats["arm_windows"],
                armed_at_exit=pstats["armed_at_exit"],
                window_s=window_ns / 1e9,
                window_vcpu_cpu_s=pstats.get("window_vcpu_cpu_ns", 0) / 1e9,
                events_per_s=(pstats["events_recorded"] / (window_ns / 1e9)) if window_ns > 0 else None,
                loc_counts={int(k): v for k, v in pstats["loc_counts"].items()},
                probe_counts=self._probe_counts(pstats["loc_counts"]),
                error=pstats.get("broken"),
            )
        self._finished = out
        return out

    def _probe_counts(self, loc_counts: dict) -> dict[str, int]:
        probe_of = {loc["loc"]: loc["probe"] for loc in self.symbols.locations}
        c: Counter[str] = Counter()
        for k, v in loc_counts.items():
            c[probe_of.get(int(k), "?")] += v
        return dict(c)


# -- a standalone run (benchmark, tests): QEMU + plugin, no gdb --------------------------------------------

#: Timeouts of :func:`run_standalone` (seconds, TCG on a loaded 2-core host).
BOOT_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 15.0
START_SENTINEL = "@@LAZYTRACE:START@@"
END_SENTINEL = "@@LAZYTRACE:END@@"
INIT_SENTINEL = "@@LAZYTRACE:INIT@@"
KERNEL_ARGS = ("console=ttyS0", "nokaslr", "preempt=full", "panic=-1", "oops=panic")


@dataclass(frozen=True)
class StandaloneRun:
    """What :func:`run_standalone` measured: the recorder's stats, host-side times, QEMU's exit status."""

    stats: dict
    returncode: int
    wall_s: float
    argv: list[str]
    #: QEMU's CPU time (user + system, all threads), from wait4: a load-independent cost measure.
    cpu_s: float | None = None


def run_standalone(recorder: PluginRecorder, *, bzimage: Path, initramfs: Path, append: str = "",
                   smp: int = 2, memory: str = "512M", accel: str = "tcg", timeout_s: float = 600.0,
                   kill_after_events: int | None = None) -> StandaloneRun:
    """Boot QEMU with the plugin, wait for the guest to power off, and finish the recorder.

    A minimal launcher for the benchmark and the plugin's own tests (the CLI uses the lead's ``Guest``).
    Console output goes to ``console.log``, QEMU's stderr (plugin messages) to ``qemu.log``.

    :param kill_after_events: SIGKILL QEMU once ``events.raw`` holds this many records (partial-trace test).
    :raises QemuError: QEMU failed to start or exited non-zero.
    :raises GuestBootError: QEMU exited before the guest's /init ran.
    :raises GuestHangError: no poweroff within ``timeout_s``.
    """
    td = recorder.trace_dir
    td.mkdir(parents=True, exist_ok=True)
    argv = [
        recorder.qemu, "-accel", accel, "-smp", str(smp), "-m", memory,
        "-display", "none", "-no-reboot", "-nodefaults", "-serial", "stdio", "-monitor", "none",
        "-kernel", str(bzimage), "-initrd", str(initramfs),
        "-append", " ".join([*KERNEL_ARGS, append]).strip(),
        *recorder.qemu_args(),
    ]
    console = td / schema.CONSOLE_LOG
    qlog = td / schema.QEMU_LOG
    t0 = time.monotonic()
    with console.open("wb") as out, qlog.open("wb") as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        except OSError as exc:
            raise QemuError(f"cannot start QEMU: {exc}", argv=argv) from exc
        cpu_s = None
        try:
            while proc.returncode is None:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    cpu_s = ru.ru_utime + ru.ru_stime
                    break
                if time.monotonic() - t0 > timeout_s:
                    raise GuestHangError(f"guest did not power off within {timeout_s:.0f} s", argv=argv,
                                         log_tail=_tail_file(console), logs=[str(console), str(qlog)])
                if kill_after_events is not None and recorder.poll().events >= kill_after_events:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(SHUTDOWN_TIMEOUT_S)
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(SHUTDOWN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    wall = time.monotonic() - t0
    text = console.read_text(errors="replace")
    if kill_after_events is None:
        if proc.returncode != 0:
            raise QemuError(f"QEMU exited with status {proc.returncode}", argv=argv, returncode=proc.returncode,
                            log_tail=_tail_file(qlog) + "\n" + _tail_file(console), logs=[str(console), str(qlog)])
        if INIT_SENTINEL not in text:
            raise GuestBootError("the guest never reached /init", argv=argv, log_tail=_tail_file(console),
                                 logs=[str(console), str(qlog)])
    return StandaloneRun(stats=recorder.finish(), returncode=proc.returncode, wall_s=wall, argv=argv, cpu_s=cpu_s)


def _tail_file(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
