"""Convert raw event records (:mod:`tracer.rawformat`) into the trace schema (:mod:`tracer.schema`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import rawformat as rf
from . import schema
from .errors import TraceFormatError

log = logging.getLogger(__name__)

#: numpy view of :data:`tracer.rawformat.RECORD`.
RAW_DTYPE = np.dtype(
    [
        ("seq", "<u8"),
        ("t_ns", "<i8"),
        ("pc", "<u8"),
        ("ptep", "<u8"),
        ("pteval", "<u8"),
        ("preempt_raw", "<u4"),
        ("pid", "<i4"),
        ("next_pid", "<i4"),
        ("cpu", "<i2"),
        ("vcpu", "<i2"),
        ("event", "u1"),
        ("flags", "u1"),
        ("loc", "<u2"),
        ("comm", "S16"),
        ("lazy_mode", "u1"),
        ("mc_pending", "u1"),
        ("_pad", "V2"),
    ]
)
assert RAW_DTYPE.itemsize == rf.RECORD.size


@dataclass(frozen=True)
class RawRead:
    """What :func:`read_raw` found: the records, and how many trailing bytes were a torn record."""

    records: np.ndarray
    torn_bytes: int


def read_raw(path: Path) -> RawRead:
    """Read an ``events.raw`` file, tolerating a torn last record.

    :raises TraceFormatError: the file does not start with the raw magic.
    """
    data = Path(path).read_bytes()
    if len(data) < len(rf.MAGIC):
        if data and not rf.MAGIC.startswith(data):
            raise TraceFormatError(f"{path}: not a lazytrace raw trace (bad magic {data[:8]!r})")
        return RawRead(np.zeros(0, RAW_DTYPE), len(data))
    if data[: len(rf.MAGIC)] != rf.MAGIC:
        raise TraceFormatError(f"{path}: not a lazytrace raw trace (bad magic {data[:8]!r})")
    body = memoryview(data)[len(rf.MAGIC) :]
    whole = len(body) - len(body) % rf.RECORD.size
    recs = np.frombuffer(body[:whole], dtype=RAW_DTYPE)
    return RawRead(recs, len(body) - whole)


def load_locations(path: Path) -> list[dict]:
    """Load ``locations.json`` (written by the probe resolver): one entry per probe location."""
    try:
        doc = json.loads(Path(path).read_text())
        locs = doc["locations"]
    except (OSError, ValueError, KeyError) as exc:
        raise TraceFormatError(f"{path}: unreadable probe locations: {exc}") from exc
    return locs


def raw_to_frame(recs: np.ndarray, locations: list[dict]) -> pd.DataFrame:
    """Turn raw records into an events frame with the schema's dtypes (vectorised)."""
    n = len(recs)
    sites = np.array([loc["site"] for loc in locations] + ["?"], dtype=object)
    loc_idx = recs["loc"].astype(np.int64)
    loc_idx = np.where(loc_idx < len(locations), loc_idx, len(locations))
    flags = recs["flags"]
    ev = recs["event"].astype(np.int64)
    if n and ev.max() >= len(schema.EVENTS):
        raise TraceFormatError(f"raw event code {int(ev.max())} out of range")
    comm = pd.Series(np.char.decode(recs["comm"], "latin-1"), dtype="string")
    mm_known = (flags & rf.F_MM_KNOWN) != 0
    next_pid = recs["next_pid"]
    is_switch = ev == schema.EVENT_CODE["switch"]
    lazy_known = (flags & rf.F_LAZY_KNOWN) != 0
    # records from before the lazy_mode byte existed hold 0 there: MMU is still known from the flag
    lazy_mode = np.where((flags & rf.F_LAZY_MMU) != 0, schema.LAZY_MMU, recs["lazy_mode"]).astype("uint8")
    df = pd.DataFrame(
        {
            "seq": recs["seq"].astype("uint64"),
            "t_ns": recs["t_ns"].astype("int64"),
            "cpu": recs["cpu"].astype("int16"),
            "vcpu": recs["vcpu"].astype("int16"),
            "event": pd.Categorical.from_codes(ev, dtype=schema.EVENT_DTYPE),
            "site": pd.Series(sites[loc_idx], dtype="string"),
            "pc": recs["pc"].astype("uint64"),
            "preempt_count": (recs["preempt_raw"] & schema.PREEMPT_MASK_BITS).astype("uint32"),
            "need_resched": (recs["preempt_raw"] & schema.PREEMPT_NEED_RESCHED) == 0,
            "irqs_on": (flags & rf.F_IRQS_ON) != 0,
            "pid": recs["pid"].astype("int32"),
            "comm": comm,
            "ptep": pd.arrays.IntegerArray(recs["ptep"].astype("uint64"), (flags & rf.F_PTEP) == 0),
            "pteval": pd.arrays.IntegerArray(recs["pteval"].astype("uint64"), (flags & rf.F_PTEVAL) == 0),
            "mm_is_init": pd.arrays.BooleanArray((flags & rf.F_MM_INIT) != 0, ~mm_known),
            "next_pid": pd.arrays.IntegerArray(next_pid.astype("int32"), ~is_switch),
            "lazy_mmu": pd.arrays.BooleanArray((flags & rf.F_LAZY_MMU) != 0, ~lazy_known),
            "lazy_mode": pd.arrays.IntegerArray(lazy_mode, ~lazy_known),
            "mc_pending": pd.arrays.IntegerArray(recs["mc_pending"].astype("uint8"), (flags & rf.F_MC_KNOWN) == 0),
        }
    )
    return schema.coerce(df)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write an events frame as ``trace.parquet`` with :data:`tracer.schema.ARROW_SCHEMA`.

    A frame without an optional column (:data:`tracer.schema.OPTIONAL_COLUMNS`) gets it all-null.
    """
    absent = [c for c in schema.OPTIONAL_COLUMNS if c not in df.columns]
    if absent:
        df = df.assign(**{c: pd.array([pd.NA] * len(df), dtype=schema.COLUMNS[c]) for c in absent})
    table = pa.Table.from_pandas(df, schema=schema.ARROW_SCHEMA, preserve_index=False)
    tmp = Path(path).with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def convert_dir(trace_dir: Path) -> tuple[int, int]:
    """Convert ``events.raw`` in a trace directory to ``trace.parquet``.

    :returns: (events converted, torn trailing bytes dropped)
    """
    trace_dir = Path(trace_dir)
    raw = read_raw(trace_dir / schema.RAW_FILE)
    locs = load_locations(trace_dir / schema.LOCATIONS_FILE)
    df = raw_to_frame(raw.records, locs)
    write_parquet(df, trace_dir / schema.TRACE_FILE)
    if raw.torn_bytes:
        log.warning("%s: dropped a torn trailing record (%d bytes)", trace_dir, raw.torn_bytes)
    return len(df), raw.torn_bytes
