"""Load trace directories into events frames with the schema's dtypes (:mod:`tracer.schema`).

A trace directory holds ``trace.parquet`` and the manifest ``run.json``. A recorder killed hard may leave
only ``events.raw`` + ``locations.json``: the raw records are converted first (:func:`tracer.rawtrace.convert_dir`)
and the trace is marked partial. Anything that cannot be read as a trace is refused with
:class:`tracer.errors.TraceFormatError` naming what *is* there (the columns, the types, the files, the keys).

Columns: :data:`tracer.schema.COLUMNS`. Extra columns in a file are kept; a missing one or one of a
different type is an error, except a missing :data:`tracer.schema.OPTIONAL_COLUMNS` column (``lazy_mmu``, ``lazy_mode``, ``mc_pending``,
added for Xen PV after the first traces were written), which is added all-null. ``site``/``comm`` are loaded as pandas ``string`` backed by Arrow
(``string[pyarrow]``, equal to the schema's ``"string"``): one buffer instead of a Python object per row.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracer import schema
from tracer.errors import TraceFormatError

log = logging.getLogger(__name__)

#: Manifest ``status`` values (tracer/manifest.py; ``failed``: the run stopped on an error, tracer/boot.py).
STATUSES = ("complete", "partial", "running", "failed")

#: Manifest keys whose type is checked when present: key -> (accepted types, human name).
_MANIFEST_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "partial_reason": ((str, type(None)), "a string or null"),
    "kernel": ((dict, str, type(None)), "an object"),
    "backend": ((str, type(None)), "a string"),
    "events_recorded": ((int, type(None)), "an integer"),
    "events_lost": ((int, type(None)), "an integer"),
    "arm": ((str, type(None)), "a string"),
}

#: Arrow types accepted per column beyond :data:`tracer.schema.ARROW_SCHEMA` (same values, other encoding).
_STRING_TYPES = (pa.string(), pa.large_string())


@dataclass(frozen=True)
class Trace:
    """One loaded trace.

    :param df: events with :data:`tracer.schema.COLUMNS` dtypes, in file order (recording order).
    :param manifest: ``run.json`` as a dict (``{}`` for traces built in memory).
    :param path: the trace directory (``None`` for traces built in memory).
    :param partial_reasons: why the trace is partial (empty: complete). Partial means the recording did not
        finish cleanly: manifest status ``partial`` or a dead ``running``, events lost, or ``trace.parquet``
        rebuilt from ``events.raw``.
    :param windowed: the recording was armed at the workload marker, not at boot, so a CPU may already be
        in a lazy region when the trace starts and still be in one when it stops. Traces from a
        directory are windowed unless the manifest says ``arm = "boot"``; in-memory traces are not.
    :param notes: what loading noticed (conversions, torn records, count mismatches), for the report.
    """

    df: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    partial_reasons: tuple[str, ...] = ()
    windowed: bool = False
    notes: tuple[str, ...] = ()

    @property
    def partial(self) -> bool:
        return bool(self.partial_reasons)

    @property
    def partial_reason(self) -> str | None:
        return "; ".join(self.partial_reasons) if self.partial_reasons else None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<memory>"

    @property
    def arm(self) -> str | None:
        """How the recording was armed (manifest ``arm``): ``"marker"``, ``"boot"``, or None if unknown."""
        arm = self.manifest.get("arm")
        if isinstance(arm, dict):
            arm = arm.get("mode")
        return arm if isinstance(arm, str) else None

    @property
    def kernel(self) -> str:
        """One line naming the guest kernel (recipe, package version, build-id) from the manifest."""
        k = self.manifest.get("kernel")
        if isinstance(k, str):
            return k
        if not isinstance(k, dict) or not k:
            return "unknown"
        parts = [str(k[key]) for key in ("recipe", "version", "release") if k.get(key)]
        if k.get("build_id"):
            parts.append(f"build-id {str(k['build_id'])[:12]}")
        return " ".join(parts) or "unknown"

    @classmethod
    def from_frame(cls, df: pd.DataFrame, *, manifest: dict[str, Any] | None = None,
                   partial_reasons: tuple[str, ...] = (), windowed: bool = False) -> Trace:
        """A trace built in memory (tests, notebooks, synthetic data), validated like a file."""
        return cls(df=validate_frame(df, where="<memory>"), manifest=dict(manifest or {}),
                   partial_reasons=tuple(partial_reasons), windowed=windowed)


def _files(d: Path) -> str:
    try:
        names = sorted(p.name for p in d.iterdir())
    except OSError as exc:
        return f"(unlistable: {exc.strerror})"
    return ", ".join(names) if names else "(empty)"


def read_manifest(trace_dir: Path) -> dict[str, Any]:
    """Read and validate ``run.json``.

    :raises TraceFormatError: missing, not JSON, not an object, bad ``status`` or a key of the wrong type.
    """
    path = Path(trace_dir) / schema.MANIFEST_FILE
    if not path.exists():
        raise TraceFormatError(f"{trace_dir}: no {schema.MANIFEST_FILE} manifest (directory has: {_files(Path(trace_dir))})")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceFormatError(f"{path}: unreadable manifest: {exc}") from exc
    except ValueError as exc:
        raise TraceFormatError(f"{path}: broken manifest, not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise TraceFormatError(f"{path}: broken manifest: top level is {type(doc).__name__}, want an object")
    status = doc.get("status")
    if status not in STATUSES:
        raise TraceFormatError(f"{path}: broken manifest: status {status!r}, want one of {', '.join(STATUSES)} "
                               f"(keys: {', '.join(sorted(doc)) or 'none'})")
    for key, (types, what) in _MANIFEST_TYPES.items():
        if key in doc and (not isinstance(doc[key], types) or isinstance(doc[key], bool)):
            raise TraceFormatError(f"{path}: broken manifest: {key} is {doc[key]!r} "
                                   f"({type(doc[key]).__name__}), want {what}")
    return doc


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_arrow_schema(path: Path, sch: pa.Schema) -> None:
    """Refuse a parquet file whose columns or types differ from :data:`tracer.schema.ARROW_SCHEMA`."""
    present = {f.name: f.type for f in sch}
    have = ", ".join(f"{n}:{t}" for n, t in present.items())
    missing = [c for c in schema.COLUMNS if c not in present and c not in schema.OPTIONAL_COLUMNS]
    if missing:
        raise TraceFormatError(f"{path}: missing column(s) {', '.join(missing)} (file has: {have})")
    for want in schema.ARROW_SCHEMA:
        if want.name not in present:  # an optional column an older trace lacks: added all-null on read
            continue
        got = present[want.name]
        if want.name == "event":
            ok = (pa.types.is_dictionary(got) and got.value_type in _STRING_TYPES) or got in _STRING_TYPES
        elif want.type == pa.string():
            ok = got in _STRING_TYPES
        else:
            ok = got == want.type
        if not ok:
            raise TraceFormatError(f"{path}: column {want.name} has type {got}, want {want.type} (file has: {have})")


def _column(name: str, arr: pa.ChunkedArray) -> pd.Series | pd.api.extensions.ExtensionArray | np.ndarray:
    """One Arrow column as the schema's pandas dtype, without a lossy detour (uint64 with nulls -> float)."""
    dtype = schema.COLUMNS[name]
    if name == "event":
        return _event_column(arr)
    if dtype == "string":
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(pa.large_string())
        return pd.StringDtype("pyarrow").__from_arrow__(arr)
    if dtype in ("UInt64", "Int32", "UInt8", "boolean"):
        return pd.api.types.pandas_dtype(dtype).__from_arrow__(arr)
    if arr.null_count:
        raise TraceFormatError(f"column {name} has {arr.null_count} nulls, but {dtype} is not nullable")
    return arr.to_numpy().astype(dtype, copy=False)


def _null_column(name: str, n: int) -> pd.api.extensions.ExtensionArray:
    """An all-null optional column (:data:`tracer.schema.OPTIONAL_COLUMNS`) for a trace recorded before it existed."""
    return pd.array([pd.NA] * n, dtype=schema.COLUMNS[name])


def _event_column(arr: pa.ChunkedArray) -> pd.Categorical:
    """The ``event`` column as :data:`tracer.schema.EVENT_DTYPE`, mapped through the Arrow dictionary
    (no per-row Python objects: 10M rows take milliseconds)."""
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    arr = arr.unify_dictionaries() if arr.num_chunks > 1 else arr
    chunks = arr.chunks or [pa.DictionaryArray.from_arrays(pa.array([], pa.int32()), pa.array([], pa.string()))]
    names = chunks[0].dictionary.to_pylist()
    unknown = sorted({str(v) for v in names if v not in schema.EVENT_CODE})
    lut = np.array([schema.EVENT_CODE.get(v, -1) for v in names] + [-1], dtype=np.int8)
    nulls = arr.null_count
    idx = np.concatenate([c.indices.fill_null(len(names)).to_numpy(zero_copy_only=False).astype(np.int64)
                          for c in chunks]) if len(arr) else np.zeros(0, np.int64)
    codes = lut[idx]
    if unknown and (codes < 0).sum() > nulls:
        raise TraceFormatError(f"unknown event categories {unknown[:10]}, want {', '.join(schema.EVENTS)}")
    if nulls:
        raise TraceFormatError(f"{nulls} events without an event category")
    return pd.Categorical.from_codes(codes, dtype=schema.EVENT_DTYPE)


def read_parquet(path: Path) -> pd.DataFrame:
    """Read a ``trace.parquet`` into the schema's dtypes.

    :raises TraceFormatError: unreadable file, missing column, wrong type, unknown event category.
    """
    path = Path(path)
    try:
        sch = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise TraceFormatError(f"{path}: not a readable parquet file: {exc}") from exc
    _check_arrow_schema(path, sch)
    try:
        # Dictionary-decode the repetitive string columns: no per-row string is built (3x faster).
        table = pq.read_table(path, read_dictionary=["event", "site", "comm"])
    except (OSError, pa.ArrowException) as exc:
        raise TraceFormatError(f"{path}: unreadable parquet data: {exc}") from exc
    cols: dict[str, Any] = {}
    try:
        for name in schema.COLUMNS:
            cols[name] = _column(name, table.column(name)) if name in table.column_names else \
                _null_column(name, table.num_rows)
    except TraceFormatError as exc:
        raise TraceFormatError(f"{path}: {exc.message}") from exc
    df = pd.DataFrame(cols, copy=False)
    for extra in (n for n in table.column_names if n not in schema.COLUMNS):
        df[extra] = table.column(extra).to_pandas()
    return df


def validate_frame(df: pd.DataFrame, *, where: str = "<frame>") -> pd.DataFrame:
    """Check an in-memory events frame against the schema and return it with exactly the schema's dtypes.

    Integer columns of another width are refused rather than cast (a wrong width means a wrong producer);
    object/``str`` columns for ``site``/``comm`` and an equivalent categorical for ``event`` are accepted.

    :raises TraceFormatError: a column is missing or has an incompatible dtype.
    """
    absent = [c for c in schema.OPTIONAL_COLUMNS if c not in df.columns]
    if absent:
        df = df.assign(**{c: _null_column(c, len(df)) for c in absent})
    missing = [c for c in schema.COLUMNS if c not in df.columns]
    have = ", ".join(f"{c}:{df[c].dtype}" for c in df.columns)
    if missing:
        raise TraceFormatError(f"{where}: missing column(s) {', '.join(missing)} (frame has: {have})")
    out = {}
    for name, want in schema.COLUMNS.items():
        col = df[name]
        got = col.dtype
        if name == "event":
            if isinstance(got, pd.CategoricalDtype) and set(got.categories) <= set(schema.EVENTS):
                col = col.astype(schema.EVENT_DTYPE) if got != schema.EVENT_DTYPE else col
            else:
                raise TraceFormatError(f"{where}: column event has dtype {got}, want category of "
                                       f"{', '.join(schema.EVENTS)} (frame has: {have})")
            if col.isna().any():
                raise TraceFormatError(f"{where}: {int(col.isna().sum())} events without an event category")
        elif want == "string":
            if isinstance(got, pd.StringDtype):
                pass
            elif pd.api.types.is_object_dtype(got):
                col = col.astype("string")
            else:
                raise TraceFormatError(f"{where}: column {name} has dtype {got}, want string (frame has: {have})")
        elif got != pd.api.types.pandas_dtype(want):
            raise TraceFormatError(f"{where}: column {name} has dtype {got}, want {want} (frame has: {have})")
        out[name] = col
    extra = {c: df[c] for c in df.columns if c not in schema.COLUMNS}
    return pd.DataFrame({**out, **extra}, copy=False)


def load_trace(trace_dir: str | os.PathLike[str]) -> Trace:
    """Load one trace directory.

    :param trace_dir: a directory with ``run.json`` and ``trace.parquet`` (or ``events.raw`` +
        ``locations.json`` left by a recorder that was killed before converting).
    :returns: the :class:`Trace`; ``partial`` when the manifest says so, when it still says ``running``
        and its recorder process is gone, when events were lost, or when the raw records had to be converted.
    :raises TraceFormatError: not a directory, broken manifest, no events file, bad columns or types.
    """
    d = Path(trace_dir)
    if not d.is_dir():
        raise TraceFormatError(f"{d}: not a trace directory ({'a file' if d.exists() else 'does not exist'})")
    manifest = read_manifest(d)
    notes: list[str] = []
    reasons: list[str] = []
    status = manifest["status"]
    if status == "partial":
        reasons.append(manifest.get("partial_reason") or "the manifest says partial")
    elif status == "failed":
        reasons.append("the run failed" + (f": {manifest['error']}" if manifest.get("error") else "")
                       + (f" ({manifest['partial_reason']})" if manifest.get("partial_reason") else ""))
    live = status == "running" and _pid_alive(manifest.get("pid"))
    if status == "running":
        reasons.append("the recorder never finished (manifest status running"
                       + (f", pid {manifest.get('pid')} still alive: trace may still be growing)" if live else ")"))
    lost = manifest.get("events_lost") or 0
    if lost:
        reasons.append(f"{lost} events lost")
    trace_file = d / schema.TRACE_FILE
    df = None
    if not trace_file.exists():
        if (d / schema.RAW_FILE).exists() and (d / schema.LOCATIONS_FILE).exists():
            from tracer import rawtrace  # the one tracer module analysis may use: raw -> parquet

            try:
                if live:
                    # A recording in progress: read what is there, leave its directory alone.
                    raw = rawtrace.read_raw(d / schema.RAW_FILE)
                    df = rawtrace.raw_to_frame(raw.records, rawtrace.load_locations(d / schema.LOCATIONS_FILE))
                    n, torn = len(df), raw.torn_bytes
                    how = "read in memory (recording in progress)"
                else:
                    n, torn = rawtrace.convert_dir(d)
                    how = f"converted to {schema.TRACE_FILE}"
            except OSError as exc:
                raise TraceFormatError(f"{d}: cannot convert {schema.RAW_FILE} to {schema.TRACE_FILE}: {exc}") from exc
            notes.append(f"{n} events from {schema.RAW_FILE} {how}"
                         + (f" (dropped a torn {torn}-byte record)" if torn else ""))
            reasons.append(f"no {schema.TRACE_FILE}: read from {schema.RAW_FILE}"
                           + ("" if live else " (the recorder stopped before converting)"))
            log.warning("%s: no %s, %d raw events %s", d, schema.TRACE_FILE, n, how)
        else:
            raise TraceFormatError(f"{d}: no {schema.TRACE_FILE} and no {schema.RAW_FILE} + {schema.LOCATIONS_FILE} "
                                   f"(directory has: {_files(d)})")
    if df is None:
        df = read_parquet(trace_file)
    recorded = manifest.get("events_recorded")
    if status == "complete" and isinstance(recorded, int) and recorded and recorded != len(df) and not lost:
        notes.append(f"manifest says {recorded} events recorded, {schema.TRACE_FILE} has {len(df)}")
    arm = manifest.get("arm")
    arm = arm.get("mode") if isinstance(arm, dict) else arm
    return Trace(df=df, manifest=manifest, path=d, partial_reasons=tuple(reasons), windowed=arm != "boot",
                 notes=tuple(notes))


def load_traces(trace_dirs: Iterable[str | os.PathLike[str]]) -> list[Trace]:
    """Load several trace directories (each validated on its own, in the order given)."""
    return [load_trace(d) for d in trace_dirs]


def concat_traces(traces: Iterable[Trace]) -> pd.DataFrame:
    """All traces' events in one frame with an extra categorical ``trace`` column (the directory)."""
    traces = list(traces)
    frames = [t.df.assign(trace=t.name) for t in traces]
    if not frames:
        return schema.empty_frame().assign(trace=pd.Series([], dtype="category"))
    df = pd.concat(frames, ignore_index=True)
    df["trace"] = df["trace"].astype("category")
    df["event"] = df["event"].astype(schema.EVENT_DTYPE)
    return df
