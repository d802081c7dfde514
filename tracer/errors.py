"""lazytrace's exceptions. Invariant violations are data (analysis results), never exceptions.

::

    LazytraceError                      exit_status
    ├── InputError                      2   the user asked for something wrong
    │   ├── ConfigError                     bad profile/recipe/run-config value ("bad smp: got 0, want 1-64")
    │   ├── UnknownNameError                no such kernel recipe / profile / workload
    │   ├── KernelError                     kernel missing, not fetched, or bzImage and vmlinux don't match
    │   └── TraceFormatError                a trace directory/file that cannot be read as a trace
    ├── GuestError                      3   the guest misbehaved (syzkaller's BootError family)
    │   ├── GuestBootError                  never reached /init or the workload start sentinel
    │   ├── GuestPanicError                 kernel panic / oops on the console
    │   └── GuestHangError                  no progress within the (accel-scaled) timeout
    └── InfraError                      4   the host side failed (syzkaller's InfraError family)
        ├── ToolMissingError                qemu / gdb / busybox / apt tool not installed
        ├── QemuError                       QEMU failed to start or died
        └── GdbError                        gdb failed to start, attach, or died
    Interrupted                         130 Ctrl-C / SIGTERM: whatever was recorded is kept

Errors that come from a process carry its argv, exit code and the tail of its logs.
"""

from __future__ import annotations

from collections.abc import Sequence


class LazytraceError(Exception):
    """Base of all lazytrace errors; ``exit_status`` is the CLI's exit code for it."""

    exit_status = 1

    def __init__(self, message: str, *, argv: Sequence[str] | None = None, returncode: int | None = None,
                 log_tail: str | None = None, logs: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.argv = list(argv) if argv is not None else None
        self.returncode = returncode
        self.log_tail = log_tail
        self.logs = list(logs)

    def details(self) -> str:
        """Multi-line evidence: argv, exit code, log tail and where the logs are."""
        out = []
        if self.argv:
            out.append("argv: " + " ".join(self.argv))
        if self.returncode is not None:
            out.append(f"exit code: {self.returncode}")
        if self.log_tail:
            out.append("log tail:\n" + "\n".join("    " + ln for ln in self.log_tail.splitlines()))
        if self.logs:
            out.append("logs: " + ", ".join(self.logs))
        return "\n".join(out)


class InputError(LazytraceError):
    exit_status = 2


class ConfigError(InputError):
    pass


class UnknownNameError(InputError):
    pass


class KernelError(InputError):
    pass


class TraceFormatError(InputError):
    pass


class GuestError(LazytraceError):
    exit_status = 3


class GuestBootError(GuestError):
    pass


class GuestPanicError(GuestError):
    pass


class GuestHangError(GuestError):
    pass


class InfraError(LazytraceError):
    exit_status = 4


class ToolMissingError(InfraError):
    pass


class QemuError(InfraError):
    pass


class GdbError(InfraError):
    pass


class Interrupted(LazytraceError):
    exit_status = 130
