"""The gdb process, driven over MI with pygdbmi: one :class:`GdbSession` context manager per gdb.

gdb is spawned by us (not by :class:`pygdbmi.gdbcontroller.GdbController`) so that it dies with lazytrace
(``PR_SET_PDEATHSIG``) and its stderr goes straight to ``gdb.log``. A reader thread splits gdb's stdout into
lines as soon as they arrive and parses them with pygdbmi's parser (:func:`pygdbmi.gdbmiparser.parse_response`),
writing every record to ``gdb.log``: the pipe is always drained, so a busy in-gdb collector never blocks on a
full stdout pipe. pygdbmi's :class:`IoManager` is not used: it waits out its whole read slice even when the
answer is already there (with the defaults 0.2 s / 1 s per read, a per-stop MI loop runs at a few events/s).
Every blocking call has a timeout named below, multiplied by ``scale``.

States (:class:`GdbState`)::

    CREATED -> LOADED (vmlinux) -> STOPPED (attached, target halted) <-> RUNNING
                                          \\-> DETACHED -> EXITED

:meth:`GdbSession.shutdown` is idempotent and always ends gdb: interrupt if running, detach (QEMU's stub then
resumes the guest with no breakpoints left), ``-gdb-exit``, SIGTERM, SIGKILL.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import queue
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from pygdbmi import gdbmiparser

from .errors import GdbError, ToolMissingError

log = logging.getLogger(__name__)

GDB_BINARY = "gdb"

# Timeouts (seconds); all multiplied by GdbSession.scale.
#: Loading the 6.1 vmlinux (590 MB of DWARF): ~2 s for the index, up to ~17 s on a cold page cache.
LOAD_TIMEOUT_S = 120.0
#: Connecting to the QEMU stub's unix socket (the socket appears as soon as QEMU starts).
ATTACH_TIMEOUT_S = 30.0
#: An ordinary MI command (register/memory reads, breakpoint inserts, python one-liners).
COMMAND_TIMEOUT_S = 30.0
#: From -exec-interrupt to *stopped: one TCG translation block, plus a collector stop() in flight.
INTERRUPT_TIMEOUT_S = 20.0
#: Detach, then -gdb-exit, then SIGTERM before SIGKILL.
DETACH_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 5.0
TERM_TIMEOUT_S = 5.0
#: The reader thread's select() slice: bounds how late a dead gdb is noticed, costs nothing when idle.
READ_SLICE_S = 0.05

PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 25


class GdbState(enum.Enum):
    CREATED = "created"
    LOADED = "loaded"
    STOPPED = "stopped"
    RUNNING = "running"
    DETACHED = "detached"
    EXITED = "exited"


def _die_with_parent() -> None:
    """preexec_fn: gdb gets SIGKILL when lazytrace dies; its own process group keeps Ctrl-C away from it."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgrp()


def mi_quote(text: str) -> str:
    """Quote a string as an MI c-string argument."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def gdb_version(gdb: str = GDB_BINARY) -> str:
    """``gdb --version``'s first line, e.g. ``GNU gdb (Debian 13.1-3) 13.1``.

    :raises ToolMissingError: gdb is not installed.
    """
    exe = shutil.which(gdb)
    if exe is None:
        raise ToolMissingError(f"gdb not found ({gdb!r}): apt-get install gdb")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0].strip() if out else "unknown"


class GdbSession:
    """gdb with ``vmlinux`` loaded and attached to a QEMU gdbstub socket (context manager).

    :param vmlinux: the kernel image with DWARF, matching the booted bzImage.
    :param socket: QEMU's ``-gdb`` unix socket; ``None`` loads the vmlinux without attaching.
    :param log_path: ``gdb.log``: gdb's stderr and every MI record.
    :param scale: multiplies every timeout (slow accelerators, loaded hosts).
    """

    def __init__(self, vmlinux: Path, socket: Path | None, log_path: Path, *, gdb: str = GDB_BINARY,
                 scale: float = 1.0) -> None:
        self.vmlinux = Path(vmlinux)
        self.socket = Path(socket) if socket is not None else None
        self.log_path = Path(log_path)
        self.gdb = gdb
        self.scale = scale
        self.state = GdbState.CREATED
        self.version = ""
        self.argv: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._stdout_fd = -1
        self._log = None
        self._log_lock = threading.Lock()
        self._token = 100
        self._results: queue.Queue[dict] = queue.Queue()
        self._async: queue.Queue[dict] = queue.Queue()
        self._console: list[str] = []
        self._console_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stop_reader = threading.Event()
        self._reader_error: BaseException | None = None
        self.last_stopped: dict | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> GdbSession:
        try:
            self.start()
            self.load()
            if self.socket is not None:
                self.attach()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self) -> None:
        """Spawn gdb (MI3, no init files, async MI so commands work while the guest runs)."""
        self.version = gdb_version(self.gdb)
        exe = shutil.which(self.gdb)
        self.argv = [exe, "--nx", "--quiet", "--interpreter=mi3"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        self._write_log(f"# lazytrace: {self.version}: {' '.join(self.argv)}\n")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, bufsize=0, preexec_fn=_die_with_parent)
        except OSError as exc:
            raise GdbError(f"cannot start gdb: {exc}", argv=self.argv) from exc
        self._stdout_fd = self.proc.stdout.fileno()
        self._reader = threading.Thread(target=self._read_loop, name="gdb-mi-reader", daemon=True)
        self._reader.start()
        for setting in ("pagination off", "confirm off", "mi-async on", "breakpoint pending off",
                        "print thread-events off", "width 0", "height 0"):
            self.mi(f"-gdb-set {setting}")

    def load(self) -> None:
        """Load the vmlinux's symbols (gdb indexes lazily: struct lookups are paid later, once)."""
        t0 = time.monotonic()
        self.mi(f"-file-exec-and-symbols {mi_quote(str(self.vmlinux))}", timeout=LOAD_TIMEOUT_S)
        self.state = GdbState.LOADED
        log.info("gdb loaded %s in %.1f s", self.vmlinux, time.monotonic() - t0)

    def attach(self) -> None:
        """Connect to the QEMU stub (``target remote`` on its unix socket); the target is halted after it."""
        assert self.socket is not None
        deadline = time.monotonic() + ATTACH_TIMEOUT_S * self.scale
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise GdbError(f"gdb stub socket {self.socket} did not appear within "
                               f"{ATTACH_TIMEOUT_S * self.scale:.0f} s", argv=self.argv, logs=[str(self.log_path)])
            time.sleep(0.05)
        if any(c.isspace() for c in str(self.socket)):
            raise GdbError(f"gdb cannot attach to a socket path with white space: {self.socket}")
        # -target-select hands its arguments to "target remote" verbatim: no MI quoting here.
        self.mi(f"-target-select remote {self.socket}", timeout=ATTACH_TIMEOUT_S)
        self.state = GdbState.STOPPED
        self.drain_async()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def shutdown(self) -> None:
        """End gdb whatever state it is in: interrupt, detach, exit, SIGTERM, SIGKILL. Idempotent."""
        if self.proc is None or self.state is GdbState.EXITED:
            return
        try:
            if self.alive():
                if self.state is GdbState.RUNNING:
                    try:
                        self.interrupt()
                    except GdbError as exc:
                        log.warning("gdb: interrupt before detach failed: %s", exc.message)
                if self.state is GdbState.STOPPED:
                    try:
                        self.mi("-target-detach", timeout=DETACH_TIMEOUT_S)
                        self.state = GdbState.DETACHED
                    except GdbError as exc:
                        log.warning("gdb: detach failed: %s", exc.message)
                try:
                    self.write("-gdb-exit")
                except (OSError, ValueError, GdbError):
                    pass
                try:
                    self.proc.wait(timeout=EXIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
                    try:
                        self.proc.wait(timeout=TERM_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            self._stop_reader.set()
            if self._reader is not None and self._reader is not threading.current_thread():
                self._reader.join(timeout=2.0)
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self.state = GdbState.EXITED
            self._write_log(f"# lazytrace: gdb exited with {self.proc.returncode}\n")
            if self._log is not None:
                self._log.close()
                self._log = None

    # -- the MI stream -----------------------------------------------------------------------------------

    def _write_log(self, text: str) -> None:
        with self._log_lock:
            if self._log is not None:
                self._log.write(text.encode(errors="replace"))

    def _read_loop(self) -> None:
        buf = b""
        try:
            while not self._stop_reader.is_set():
                ready, _, _ = select.select([self._stdout_fd], [], [], READ_SLICE_S)
                if not ready:
                    if self.proc.poll() is not None:
                        break
                    continue
                data = os.read(self._stdout_fd, 1 << 16)
                if not data:
                    break  # EOF: gdb exited
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    text = line.rstrip(b"\r").decode(errors="replace")
                    if text and not gdbmiparser.response_is_finished(text):
                        self._dispatch(gdbmiparser.parse_response(text))
        except BaseException as exc:  # re-raised to the caller by mi()/poll()
            self._reader_error = exc

    def _dispatch(self, rec: dict) -> None:
        kind = rec.get("type")
        if kind in ("console", "target", "log", "output"):
            text = rec.get("payload") or ""
            self._write_log(text if text.endswith("\n") else text + "\n")
            if kind == "console":
                with self._console_lock:
                    self._console.append(text)
            return
        self._write_log(f"[{kind}] {rec.get('token') or ''} {rec.get('message')} {rec.get('payload')}\n")
        if kind == "result":
            self._results.put(rec)
        elif kind in ("notify", "notify_async", "exec_async", "status_async") or kind is None:
            if rec.get("message") in ("stopped", "running", "thread-group-exited"):
                self._async.put(rec)

    def write(self, command: str) -> int:
        """Send one MI command with a fresh token, without waiting. :returns: the token."""
        if not self.alive():
            raise self._died("gdb is not running")
        self._token += 1
        line = f"{self._token}{command}"
        self._write_log(f"> {line}\n")
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise self._died(f"gdb closed its input during {command!r}") from exc
        return self._token

    def mi(self, command: str, timeout: float = COMMAND_TIMEOUT_S, *, check: bool = True) -> dict:
        """Run one MI command and wait for its result record.

        :param timeout: seconds (before scaling) to wait for the result.
        :returns: the result record (``message`` is ``done``/``running``/``connected``/``error``).
        :raises GdbError: ``^error`` (if ``check``), timeout, or gdb died.
        """
        with self._console_lock:
            self._console.clear()
        token = self.write(command)
        limit = timeout * self.scale
        deadline = time.monotonic() + limit
        while True:
            try:
                rec = self._results.get(timeout=min(READ_SLICE_S * 4, max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                rec = None
            if rec is not None:
                if rec.get("token") != token:
                    log.debug("gdb: dropping stale result %s", rec)
                    continue
                if check and rec.get("message") == "error":
                    msg = (rec.get("payload") or {}).get("msg", "")
                    raise GdbError(f"gdb: {command!r} failed: {msg}", argv=self.argv, log_tail=self.log_tail(),
                                   logs=[str(self.log_path)])
                return rec
            if self._reader_error is not None or not self.alive():
                raise self._died(f"gdb died during {command!r}")
            if time.monotonic() > deadline:
                raise GdbError(f"gdb: no answer to {command!r} within {limit:.0f} s", argv=self.argv,
                               log_tail=self.log_tail(), logs=[str(self.log_path)])

    def console(self, command: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        """Run a CLI command through MI and return its console output."""
        self.mi(f"-interpreter-exec console {mi_quote(command)}", timeout=timeout)
        with self._console_lock:
            out = "".join(self._console)
            self._console.clear()
        return out

    def python(self, code: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        """Run one line of Python inside gdb; :returns: what it printed."""
        if "\n" in code:
            raise ValueError("GdbSession.python takes one line; source a file for more")
        return self.console(f"python {code}", timeout=timeout)

    def drain_async(self) -> list[dict]:
        """Async exec records (``*stopped``/``*running``) received so far."""
        out = []
        while True:
            try:
                rec = self._async.get_nowait()
            except queue.Empty:
                return out
            if rec.get("message") == "stopped":
                self.last_stopped = rec
            out.append(rec)

    def wait_stopped(self, timeout: float) -> dict:
        """Wait for a ``*stopped`` record. :raises GdbError: timeout or gdb died."""
        limit = timeout * self.scale
        deadline = time.monotonic() + limit
        while True:
            try:
                rec = self._async.get(timeout=READ_SLICE_S * 4)
            except queue.Empty:
                rec = None
            if rec is not None and rec.get("message") == "stopped":
                self.last_stopped = rec
                self.state = GdbState.STOPPED
                return rec
            if self._reader_error is not None or not self.alive():
                raise self._died("gdb died while the guest ran")
            if time.monotonic() > deadline:
                raise GdbError(f"gdb: target did not stop within {limit:.0f} s", argv=self.argv,
                               log_tail=self.log_tail(), logs=[str(self.log_path)])

    # -- execution control ------------------------------------------------------------------------------

    def cont(self) -> None:
        """Resume the guest (all vCPUs)."""
        self.drain_async()
        self.mi("-exec-continue")
        self.state = GdbState.RUNNING

    def run(self) -> None:
        """Start a native program (``-exec-run``): the tests' fake-kernel backend."""
        self.drain_async()
        self.mi("-exec-run")
        self.state = GdbState.RUNNING

    def interrupt(self, timeout: float = INTERRUPT_TIMEOUT_S) -> dict:
        """Halt the guest; :returns: the ``*stopped`` record."""
        if self.state is not GdbState.RUNNING:
            return self.last_stopped or {}
        self.drain_async()
        self.mi("-exec-interrupt")
        return self.wait_stopped(timeout)

    def poll(self) -> list[dict]:
        """Check gdb is alive; :returns: async records since the last call. :raises GdbError: gdb died."""
        if self._reader_error is not None or not self.alive():
            raise self._died("gdb died")
        recs = self.drain_async()
        for rec in recs:
            if rec.get("message") == "stopped":
                self.state = GdbState.STOPPED
            elif rec.get("message") == "running":
                self.state = GdbState.RUNNING
            elif rec.get("message") == "thread-group-exited":
                self.state = GdbState.DETACHED  # the stub went away: nothing left to interrupt or detach
        return recs

    # -- reads -------------------------------------------------------------------------------------------

    def read_memory(self, addr: int, length: int) -> bytes:
        """Read guest virtual memory through the stub. :raises GdbError: unmapped or unreadable."""
        rec = self.mi(f"-data-read-memory-bytes {addr:#x} {length}")
        blocks = (rec.get("payload") or {}).get("memory") or []
        data = b""
        for b in blocks:
            data += bytes.fromhex(b["contents"])
        if len(data) != length:
            raise GdbError(f"gdb: short read at {addr:#x}: {len(data)} of {length} bytes", argv=self.argv)
        return data

    def read_registers(self, names: Iterable[str]) -> dict[str, int]:
        """Current thread's registers by name (one MI round trip)."""
        names = list(names)
        out = {}
        for name in names:
            text = self.console(f"output/x ${name}")
            out[name] = int(text.strip(), 16) & ((1 << 64) - 1)
        return out

    # -- evidence ------------------------------------------------------------------------------------------

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _died(self, what: str) -> GdbError:
        code = self.proc.poll() if self.proc is not None else None
        cause = f" (reader: {self._reader_error!r})" if self._reader_error is not None else ""
        return GdbError(f"{what}{cause}", argv=self.argv, returncode=code, log_tail=self.log_tail(),
                        logs=[str(self.log_path)])
