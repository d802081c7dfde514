"""Errors raised by the analysis side.

Invariant violations are data (rows of a violations frame), never exceptions. What is raised here is
about *inputs*: a trace, an expect file or a frame that cannot be analysed as asked. Everything derives
from :class:`tracer.errors.TraceFormatError` (an input error, exit status 2), the only tracer error the
analysis side may import::

    TraceFormatError (tracer.errors)        exit status 2
    ├── MissingEventsError                  a df_* function needs events the trace does not have
    └── ExpectFileError                     an --expect file that cannot be used
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tracer.errors import TraceFormatError

__all__ = ["TraceFormatError", "MissingEventsError", "ExpectFileError"]


class MissingEventsError(TraceFormatError):
    """A ``df_*`` function needs event categories the trace does not contain.

    The message names what was needed and what the trace does have, so the user can tell a probe that
    was never armed from a workload that never exercised it.
    """

    def __init__(self, needed: Iterable[str], present: Mapping[str, int], what: str) -> None:
        self.needed = tuple(needed)
        self.present = dict(present)
        have = ", ".join(f"{k}={v}" for k, v in self.present.items() if v) or "no events at all"
        super().__init__(f"{what} needs {' or '.join(self.needed)} events; the trace has: {have}")


class ExpectFileError(TraceFormatError):
    """An ``--expect`` file that is unreadable or names unknown invariants (an input error, exit 2)."""
