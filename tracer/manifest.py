"""The run manifest (``run.json``): what ran, with what, how it ended. Written at start, updated at the end.

Written atomically (write + rename) so a reader never sees half a file. A run that is killed hard keeps
``status: "running"``; readers treat a running manifest whose ``pid`` is gone as partial.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from . import __version__, schema


class Manifest:
    def __init__(self, run_dir: Path, **fields: Any) -> None:
        self.path = Path(run_dir) / schema.MANIFEST_FILE
        self.data: dict[str, Any] = {
            "lazytrace_version": __version__,
            "schema_version": schema.SCHEMA_VERSION,
            "status": "running",
            "partial_reason": None,
            "pid": os.getpid(),
            "host": {"node": platform.node(), "python": platform.python_version(),
                     "debian": _read("/etc/debian_version")},
            "start": _now(),
            "end": None,
            "exit_status": None,
            "events_recorded": 0,
            "events_lost": 0,
        }
        self.data.update(fields)
        self.write()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    def finish(self, *, status: str, exit_status: int, partial_reason: str | None = None, **fields: Any) -> None:
        self.data.update(fields)
        self.data.update(status=status, exit_status=exit_status, partial_reason=partial_reason, end=_now())
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None
