"""The QEMU process: one :class:`Guest` context manager per guest, composed by callers with ExitStack.

QEMU gets its gdbstub, QMP and serial console on unix sockets inside the run directory (never TCP on every
interface, so two guests never clash); it dies with its parent (``PR_SET_PDEATHSIG``); the kernel fails fast
(``-no-reboot panic=-1 oops=panic``) and /init reports through sentinel lines (:mod:`tracer.guest`).
Shutdown is soft first (QMP ``quit``), then SIGTERM, then SIGKILL, and always leaves nothing running.
"""

from __future__ import annotations

import ctypes
import enum
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from . import schema, xen
from .errors import (
    ConfigError,
    GuestBootError,
    GuestError,
    GuestHangError,
    GuestPanicError,
    QemuError,
    ToolMissingError,
)
from .kernels import Kernel
from .profiles import MachineProfile

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
#: Kernel arguments lazytrace always passes: serial console, fixed addresses for the DWARF, fail fast.
BASE_CMDLINE = ("console=ttyS0", "nokaslr", "panic=-1", "oops=panic", "quiet", "loglevel=4")

# Timeouts (seconds) for a TCG guest on a 2-core host; every one is multiplied by the profile's
# timeout_scale and by the caller's slowdown factor (a gdb-traced boot runs far slower).
SOCKET_APPEAR_TIMEOUT_S = 10.0
BOOT_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30.0
POWEROFF_TIMEOUT_S = 30.0
QMP_TIMEOUT_S = 5.0
TERM_TIMEOUT_S = 5.0
CONSOLE_TAIL_LINES = 30

SENTINEL_INIT = "@@LAZYTRACE:INIT@@"
SENTINEL_START = "@@LAZYTRACE:START@@"
SENTINEL_END = "@@LAZYTRACE:END@@"
#: Every console pattern ends at a line end: the console arrives in arbitrary chunks (under Xen, as its serial
#: driver flushes), and "[^\r\n]*" alone would match half a line ("status=1" of "status=127").
LINE_REST = r"[^\r\n]*(?=[\r\n])"
PANIC_PATTERNS = (r"Kernel panic - not syncing" + LINE_REST, r"BUG: unable to handle" + LINE_REST,
                  r"general protection fault" + LINE_REST,
                  # xen-pv: the hypervisor itself (xen/drivers/char/console.c, panic()) and its reason line
                  r"\(XEN\) Panic on CPU \d+:\r*\n\(XEN\) " + LINE_REST)

PR_SET_PDEATHSIG = 1


class GuestState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


@lru_cache(maxsize=1)
def qemu_version() -> str:
    """``qemu-system-x86_64 --version``'s first line, e.g. ``QEMU emulator version 10.0.2 (Debian ...)``."""
    exe = shutil.which(QEMU_BINARY)
    if exe is None:
        raise ToolMissingError(f"{QEMU_BINARY} not found: install QEMU (make setup installs QEMU 10 from "
                               "bookworm-backports on Debian 12)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def qemu_version_tuple() -> tuple[int, int, int]:
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", qemu_version())
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)  # type: ignore[return-value]


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when lazytrace dies, so no QEMU outlives its run."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgrp()  # Ctrl-C in the terminal reaches lazytrace only; lazytrace stops QEMU in order


@dataclass(frozen=True)
class GuestConfig:
    """Everything a guest boot needs, resolved: the result of recipe + profile + workload."""

    kernel: Kernel
    profile: MachineProfile
    initramfs: Path
    workload: str
    iterations: int
    cpus: str = "all"
    accel: str = "tcg"          # resolved accelerator (never "auto" here)
    gdb: bool = False           # open a gdbstub socket
    paused: bool = False        # -S: start stopped (gdb continues it)
    single_thread_tcg: bool = False
    replay: str | None = None   # None | "record" | "replay" (QEMU icount record/replay)
    replay_file: Path | None = None  # default: <run_dir>/replay.bin
    extra_args: tuple[str, ...] = ()
    extra_cmdline: tuple[str, ...] = ()
    hypervisor: xen.Hypervisor | None = None  # profile kind xen-pv: the verified Xen image


def kernel_cmdline(cfg: GuestConfig) -> str:
    """The (dom0) kernel's command line: lazytrace's base, the recipe's, the run config for /init."""
    base = list(BASE_CMDLINE)
    if cfg.profile.kind == "xen-pv":  # dom0's console is Xen's hvc0, which Xen copies to the serial port
        base = [*xen.DOM0_CMDLINE, *(a for a in BASE_CMDLINE if a != "console=ttyS0")]
    parts = [*base, *cfg.kernel.recipe.cmdline, f"lt.workload={cfg.workload}",
             f"lt.iterations={cfg.iterations}", f"lt.cpus={cfg.cpus}", *cfg.extra_cmdline]
    return " ".join(parts)


def qemu_argv(cfg: GuestConfig, run_dir: Path) -> list[str]:
    """The QEMU command line for a guest, as a list (never a shell string)."""
    p = cfg.profile
    accel = cfg.accel
    if accel == "tcg" and cfg.single_thread_tcg:
        # The gdb path needs it: with MTTCG QEMU 10's stub can answer the step over a breakpoint before the
        # vCPU ran it, and gdb then reports the same hit twice (DESIGN.md, "gdb path caveat").
        accel = "tcg,thread=single"
    argv = [
        QEMU_BINARY,
        "-name", f"lazytrace-{run_dir.name},debug-threads=on",
        # machine
        "-machine", "pc", "-accel", accel, "-cpu", p.cpu, "-smp", str(p.smp), "-m", f"{p.memory_mib}M",
        # no display, no default devices we do not need
        "-display", "none", "-vga", "none", "-nodefaults", "-no-user-config",
        # kernel, initramfs (or Xen with both as multiboot modules), fail fast
        *_boot_args(cfg), "-no-reboot",
        # serial console on a unix socket; QEMU waits for lazytrace to connect, so no output is lost
        "-chardev", f"socket,id=con0,path={run_dir / 'console.sock'},server=on,wait=on",
        "-serial", "chardev:con0",
        # QMP for soft shutdown
        "-chardev", f"socket,id=qmp0,path={run_dir / 'qmp.sock'},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-D", str(run_dir / schema.QEMU_LOG),
    ]
    if cfg.gdb:
        argv += ["-chardev", f"socket,id=gdb0,path={run_dir / 'gdb.sock'},server=on,wait=off",
                 "-gdb", "chardev:gdb0"]
    if cfg.paused:
        argv += ["-S"]
    if cfg.replay:
        rrfile = cfg.replay_file or run_dir / "replay.bin"
        argv += ["-icount", f"shift=auto,rr={cfg.replay},rrfile={rrfile}"]
    argv += [*p.extra_args, *cfg.extra_args]
    return argv


def _boot_args(cfg: GuestConfig) -> list[str]:
    if cfg.profile.kind == "xen-pv":
        if cfg.hypervisor is None:
            raise ConfigError(f"profile {cfg.profile.name} is kind xen-pv but no hypervisor was resolved "
                              "(tracer.runspec.resolve does it)")
        return xen.multiboot_args(cfg.hypervisor, cfg.profile, cfg.kernel.bzimage, kernel_cmdline(cfg),
                                  cfg.initramfs)
    return ["-kernel", str(cfg.kernel.bzimage), "-initrd", str(cfg.initramfs), "-append", kernel_cmdline(cfg)]


class Guest:
    """A running QEMU guest (context manager).

    :param run_dir: the run directory; receives console.log, qemu.log and the sockets.
    :param cfg: the resolved guest configuration.
    :param slowdown: multiplies every timeout (gdb tracing from boot slows the guest ~500x).
    """

    def __init__(self, run_dir: Path, cfg: GuestConfig, *, slowdown: float = 1.0) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.scale = cfg.profile.timeout_scale * slowdown
        self.argv = qemu_argv(cfg, self.run_dir)
        self.state = GuestState.CREATED
        self.proc: subprocess.Popen | None = None
        self.console: pexpect.fdpexpect.fdspawn | None = None
        self._con_sock: socket.socket | None = None
        self._console_log = None
        self._qemu_log = None
        self.t_start = 0.0
        self.boot_s: float | None = None
        self.window_s: float | None = None
        self.workload_status: int | None = None
        self.exit_code: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    @property
    def gdb_socket(self) -> Path:
        return self.run_dir / "gdb.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / schema.CONSOLE_LOG

    def start(self) -> Guest:
        qemu_version()  # raises ToolMissingError early
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for s in ("console.sock", "qmp.sock", "gdb.sock"):
            (self.run_dir / s).unlink(missing_ok=True)
        (self.run_dir / "qemu.argv.json").write_text(json.dumps(self.argv, indent=1))
        self._qemu_log = open(self.run_dir / "qemu.stderr.log", "ab")
        log.info("starting %s", " ".join(self.argv))
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._qemu_log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        except OSError as exc:
            raise QemuError(f"cannot start QEMU: {exc}", argv=self.argv) from exc
        self.t_start = time.monotonic()
        self.state = GuestState.RUNNING
        try:
            self._connect_console()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _connect_console(self) -> None:
        path = self.run_dir / "console.sock"
        deadline = time.monotonic() + SOCKET_APPEAR_TIMEOUT_S * self.scale
        while True:
            if self.proc.poll() is not None:
                raise QemuError("QEMU exited before opening its console", argv=self.argv,
                                returncode=self.proc.returncode, log_tail=self._qemu_tail(),
                                logs=[str(self.run_dir / "qemu.stderr.log")])
            if path.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(path))
                    break
                except OSError:
                    s.close()
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU did not open its console socket within "
                                f"{SOCKET_APPEAR_TIMEOUT_S * self.scale:.0f} s", argv=self.argv,
                                log_tail=self._qemu_tail())
            time.sleep(0.02)
        self._con_sock = s
        self._console_log = open(self.console_log, "ab")
        self.console = pexpect.fdpexpect.fdspawn(s.fileno(), timeout=1, maxread=65536,
                                                 searchwindowsize=8192, logfile=self._console_log)

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- console --------------------------------------------------------------------------------------------

    def wait_for(self, pattern: str, timeout: float, *, poll: Callable[[], None] | None = None,
                 what: str = "", boot: bool = False) -> str:
        """Wait for a console line matching ``pattern`` (regex), watching for panics and QEMU exit.

        :param timeout: seconds before the (scale-multiplied) deadline.
        :param poll: called about every 0.5 s while waiting (progress, recorder health checks).
        :param boot: the guest has not reached /init yet (a failure is a boot error, not a hang).
        :returns: the matched line.
        :raises GuestPanicError: a kernel panic/oops was seen.
        :raises GuestHangError / GuestBootError: the deadline passed.
        :raises QemuError: QEMU died (anything but a clean poweroff at the expected time).
        """
        assert self.console is not None
        patterns = [pattern + LINE_REST, *PANIC_PATTERNS, pexpect.EOF, pexpect.TIMEOUT]
        limit = timeout * self.scale
        deadline = time.monotonic() + limit
        while True:
            idx = self.console.expect(patterns, timeout=0.5)
            if idx == 0:
                return self.console.after.decode(errors="replace") if isinstance(self.console.after, bytes) \
                    else str(self.console.after)
            if 1 <= idx <= len(PANIC_PATTERNS):
                line = self.console.after.decode(errors="replace")
                self._drain(2.0)
                raise GuestPanicError(f"guest panic: {' '.join(line.split())}", argv=self.argv, log_tail=self.console_tail(),
                                      logs=[str(self.console_log)])
            if patterns[idx] is pexpect.EOF:
                code = self._wait_exit(2.0)
                raise QemuError(f"QEMU exited while waiting for {what or pattern}", argv=self.argv,
                                returncode=code, log_tail=self.console_tail() + "\n--- qemu ---\n" + self._qemu_tail(),
                                logs=[str(self.console_log), str(self.run_dir / "qemu.stderr.log")])
            if poll is not None:
                poll()
            if time.monotonic() > deadline:
                cls = GuestBootError if boot else GuestHangError
                verb = "did not boot" if boot else "hung"
                raise cls(f"guest {verb}: no {what or pattern} within {limit:.0f} s", argv=self.argv,
                          log_tail=self.console_tail(), logs=[str(self.console_log)])

    def watch_console(self, seconds: float) -> None:
        """Read the console for ``seconds`` while something else drives the guest (the gdb recorder's boot
        phase), watching for panics and QEMU exit.

        The console must be read: QEMU's serial port writes the socket a byte at a time, and an unread unix
        socket fills after a few hundred bytes (each byte costs a whole buffer's accounting), after which the
        guest spins on a full transmit register (measured: Xen stalls at byte 278 of its boot log).

        :raises GuestPanicError: a kernel or Xen panic was seen.
        :raises QemuError: QEMU exited.
        """
        assert self.console is not None
        patterns = [*PANIC_PATTERNS, pexpect.EOF, pexpect.TIMEOUT]
        idx = self.console.expect(patterns, timeout=seconds)
        if idx < len(PANIC_PATTERNS):
            line = self.console.after.decode(errors="replace")
            self._drain(2.0)
            raise GuestPanicError(f"guest panic: {' '.join(line.split())}", argv=self.argv,
                                  log_tail=self.console_tail(), logs=[str(self.console_log)])
        if patterns[idx] is pexpect.EOF:
            code = self._wait_exit(2.0)
            raise QemuError("QEMU exited while the guest was booting under gdb", argv=self.argv, returncode=code,
                            log_tail=self.console_tail() + "\n--- qemu ---\n" + self._qemu_tail(),
                            logs=[str(self.console_log), str(self.run_dir / "qemu.stderr.log")])

    def _drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                self.console.read_nonblocking(65536, timeout=0.2)
            except pexpect.TIMEOUT:
                continue
            except (pexpect.EOF, OSError):
                break

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        if self._console_log:
            self._console_log.flush()
        try:
            # bytes, not read_text(): its newline translation would turn Xen's "\r\r\n" into blank lines
            text = self.console_log.read_bytes().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def _qemu_tail(self) -> str:
        try:
            return "\n".join((self.run_dir / "qemu.stderr.log").read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    # -- the workload protocol ------------------------------------------------------------------------------

    def run_workload(self, *, workload_timeout: float, poll: Callable[[], None] | None = None,
                     boot_timeout: float = BOOT_TIMEOUT_S, on_start: Callable[[], None] | None = None,
                     on_end: Callable[[], None] | None = None) -> int:
        """Wait through boot, workload start and end; then for the guest's poweroff.

        :returns: the workload's exit status (also in :attr:`workload_status`).
        """
        self.wait_for(re.escape(SENTINEL_INIT), boot_timeout, poll=poll, what="/init (boot)", boot=True)
        self.boot_s = time.monotonic() - self.t_start
        self.wait_for(re.escape(SENTINEL_START), START_TIMEOUT_S, poll=poll, what="workload start")
        t0 = time.monotonic()
        if on_start:
            on_start()
        line = self.wait_for(re.escape(SENTINEL_END) + r" status=\d+", workload_timeout, poll=poll,
                             what="workload end")
        self.window_s = time.monotonic() - t0
        self.workload_status = int(re.search(r"status=(\d+)", line).group(1))
        if on_end:
            on_end()
        return self.workload_status

    def wait_poweroff(self, timeout: float = POWEROFF_TIMEOUT_S) -> int:
        """Wait for QEMU to exit after the guest's ``poweroff -f``.

        Under Xen, dom0's ACPI poweroff makes Xen enter S5 and QEMU exits by itself; if Xen halts the
        machine instead (no ACPI: "Hardware Dom0 halted"), nothing would ever exit, so QEMU is quit over QMP.
        """
        halted = [xen.CONSOLE_HALTED] if self.cfg.profile.kind == "xen-pv" else []
        deadline = time.monotonic() + timeout * self.scale
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise GuestHangError(f"guest did not power off within {timeout * self.scale:.0f} s",
                                     argv=self.argv, log_tail=self.console_tail(), logs=[str(self.console_log)])
            try:
                idx = self.console.expect([*halted, pexpect.TIMEOUT, pexpect.EOF], timeout=0.2)
            except OSError:
                idx = -1
            if halted and idx == 0:
                log.info("Xen halted the machine after dom0's poweroff: quitting QEMU over QMP")
                try:
                    self.qmp("quit")
                except (OSError, ValueError) as exc:
                    log.debug("QMP quit failed: %s", exc)
                self._wait_exit(QMP_TIMEOUT_S)
            elif idx != len(halted):  # EOF or a closed socket: QEMU is exiting
                time.sleep(0.05)
        self.exit_code = self.proc.returncode
        self.state = GuestState.STOPPED
        if self.exit_code != 0:
            raise QemuError("QEMU exited with an error after poweroff", argv=self.argv, returncode=self.exit_code,
                            log_tail=self._qemu_tail())
        return self.exit_code

    # -- shutdown ---------------------------------------------------------------------------------------

    def qmp(self, command: str, timeout: float = QMP_TIMEOUT_S) -> dict:
        """Send one QMP command on a fresh connection (capabilities negotiated); returns the response."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(self.run_dir / "qmp.sock"))
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        return {}
                    msg = json.loads(line)
                    if "return" in msg or "error" in msg:
                        break
            return msg
        finally:
            s.close()

    def _wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self) -> None:
        """Stop QEMU if it still runs (QMP quit, SIGTERM, SIGKILL) and close everything. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.qmp("quit")
            except (OSError, ValueError) as exc:
                log.debug("QMP quit failed: %s", exc)
            if self._wait_exit(QMP_TIMEOUT_S) is None:
                self.proc.terminate()
                if self._wait_exit(TERM_TIMEOUT_S) is None:
                    self.proc.kill()
                    self.proc.wait()
        if self.proc is not None:
            self.exit_code = self.proc.returncode
        if self.console is not None:
            try:
                self._drain(0.2)
            except Exception:
                pass
        for f in (self._console_log, self._qemu_log):
            if f:
                f.close()
        if self._con_sock is not None:
            self._con_sock.close()
        self._con_sock = self._console_log = self._qemu_log = None
        for s in ("console.sock", "qmp.sock", "gdb.sock"):
            (self.run_dir / s).unlink(missing_ok=True)
        self.state = GuestState.STOPPED


__all__ = ["Guest", "GuestConfig", "GuestError", "qemu_argv", "qemu_version", "kernel_cmdline"]
