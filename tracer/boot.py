"""``lazytrace boot``: boot the guest, run the workload, power off; no tracing."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import schema
from .errors import GuestError, Interrupted, LazytraceError
from .manifest import Manifest
from .qemu import Guest, qemu_version
from .runspec import Resolved

log = logging.getLogger(__name__)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the duration, so both stop a run the same careful way."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def managed_run(manifest: Manifest) -> Iterator[None]:
    """Record how a run ended in its manifest, whatever happens; re-raise errors as lazytrace errors."""
    try:
        with sigterm_as_interrupt():
            yield
    except KeyboardInterrupt:
        exc = Interrupted("interrupted (Ctrl-C / SIGTERM): what was recorded so far is kept")
        manifest.finish(status="partial", exit_status=exc.exit_status, partial_reason="interrupted",
                        error=exc.message)
        raise exc from None
    except LazytraceError as exc:
        manifest.finish(status="partial" if manifest.data.get("events_recorded") else "failed",
                        exit_status=exc.exit_status, partial_reason=type(exc).__name__, error=exc.message,
                        error_details=exc.details())
        raise


@dataclass
class BootResult:
    run_dir: Path
    boot_s: float
    window_s: float
    workload_status: int


def boot(resolved: Resolved, run_dir: Path, status=None) -> BootResult:
    """Boot, run the workload, power off cleanly; write run.json.

    :param status: optional callable(str) for progress messages.
    :raises GuestError: no boot, panic, hang, or a non-zero workload status.
    """
    say = status or (lambda msg: None)
    cfg = resolved.guest
    m = Manifest(run_dir, command="boot", qemu={"version": qemu_version()}, backend=None, **resolved.manifest())
    with managed_run(m):
        say(f"booting {cfg.kernel.release} on {cfg.profile.name} ({cfg.accel})")
        with Guest(run_dir, cfg) as g:
            m.update(qemu={"version": qemu_version(), "argv": g.argv})
            st = g.run_workload(
                workload_timeout=resolved.workload_timeout,
                on_start=lambda: say(f"booted in {g.boot_s:.1f} s; running workload {resolved.workload.name}"))
            say("workload done; powering off")
            g.wait_poweroff()
        m.finish(status="complete", exit_status=0 if st == 0 else GuestError.exit_status,
                 boot_s=round(g.boot_s, 3), window_s=round(g.window_s, 3), workload_status=st,
                 qemu_exit_code=g.exit_code)
        if st != 0:
            raise GuestError(f"workload {resolved.workload.name} exited with status {st}",
                             log_tail=g.console_tail(), logs=[str(run_dir / schema.CONSOLE_LOG)])
    return BootResult(run_dir, g.boot_s, g.window_s, st)
