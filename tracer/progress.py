"""Live recording progress, read from the growing ``events.raw`` (whatever backend writes it).

Reading the file the recorder streams costs the recorder nothing, and shows exactly what is safe on disk.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.table import Table

from . import rawformat as rf
from . import schema
from .rawtrace import RAW_DTYPE


class RawTail:
    """Incrementally count the records of a growing raw trace, per CPU and per event."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = len(rf.MAGIC)
        self.events = 0
        self.per_cpu: Counter[int] = Counter()
        self.per_event: Counter[str] = Counter()
        self.t0 = time.monotonic()
        self._last = (self.t0, 0)
        self.rate = 0.0

    def update(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        whole = (size - self.offset) // rf.RECORD.size * rf.RECORD.size
        if whole > 0:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                buf = f.read(whole)
            recs = np.frombuffer(buf, dtype=RAW_DTYPE)
            self.offset += len(buf)
            self.events += len(recs)
            cpus, counts = np.unique(recs["cpu"], return_counts=True)
            self.per_cpu.update(dict(zip(cpus.tolist(), counts.tolist(), strict=True)))
            evs, counts = np.unique(recs["event"], return_counts=True)
            self.per_event.update({schema.EVENTS[e]: c for e, c in zip(evs.tolist(), counts.tolist(), strict=True)
                                   if e < len(schema.EVENTS)})
        now = time.monotonic()
        t_last, n_last = self._last
        if now - t_last >= 1.0:
            self.rate = (self.events - n_last) / (now - t_last)
            self._last = (now, self.events)

    def table(self, phase: str) -> Table:
        t = Table(title=f"lazytrace: {phase}", title_justify="left", show_edge=False)
        t.add_column("events")
        t.add_column("events/s")
        t.add_column("per CPU")
        t.add_column("per event")
        t.add_row(f"{self.events:,}", f"{self.rate:,.0f}",
                  " ".join(f"cpu{c}:{n:,}" for c, n in sorted(self.per_cpu.items())),
                  " ".join(f"{e}:{n:,}" for e, n in self.per_event.most_common(5)))
        return t
