"""Loading trace directories: the good path, partial traces, and every refusal with its evidence."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.load import Trace, concat_traces, load_trace, load_traces, validate_frame
from analysis.synth import SynthConfig, events_frame, synth_events
from tracer import rawformat, rawtrace, schema
from tracer.errors import InputError, TraceFormatError

MANIFEST = {"status": "complete", "partial_reason": None, "arm": "marker", "backend": "plugin",
            "kernel": {"recipe": "debian-6.1", "version": "6.1.192-2", "build_id": "abcdef0123456789"},
            "events_recorded": 0, "events_lost": 0}


def make_dir(path, df=None, manifest=None, *, parquet=True):
    path.mkdir(parents=True, exist_ok=True)
    df = synth_events(SynthConfig(n_events=2_000, seed=1)) if df is None else df
    m = dict(MANIFEST, events_recorded=len(df), **(manifest or {}))
    (path / schema.MANIFEST_FILE).write_text(json.dumps(m))
    if parquet:
        rawtrace.write_parquet(df, path / schema.TRACE_FILE)
    return path


def test_roundtrip_keeps_schema_dtypes_and_values(tmp_path):
    df = events_frame([{"event": "set_pte", "ptep": 0xFFFF888000001008, "pteval": (1 << 63) | 0x8000000000067},
                       {"event": "switch", "pid": 5, "next_pid": 6, "mm_is_init": True}])
    t = load_trace(make_dir(tmp_path / "t", df))
    for col, dtype in schema.COLUMNS.items():
        assert t.df[col].dtype == dtype, col
    assert int(t.df["pteval"].iloc[0]) == (1 << 63) | 0x8000000000067  # no float detour for uint64 + nulls
    assert t.df["pteval"].isna().tolist() == [False, True]
    assert t.df["next_pid"].iloc[1] == 6 and pd.isna(t.df["next_pid"].iloc[0])
    assert not t.partial and t.windowed and t.kernel.startswith("debian-6.1 6.1.192-2")


def test_boot_armed_trace_is_not_windowed(tmp_path):
    assert not load_trace(make_dir(tmp_path / "t", manifest={"arm": "boot"})).windowed


@pytest.mark.parametrize("manifest,why", [
    ({"status": "partial", "partial_reason": "qemu died"}, "qemu died"),
    ({"status": "failed", "partial_reason": "GdbError", "error": "gdb died"}, "the run failed: gdb died (GdbError)"),
    ({"status": "running", "pid": 2 ** 22 + 12345}, "never finished"),
    ({"events_lost": 17}, "17 events lost"),
])
def test_partial_traces_are_loaded_and_marked(tmp_path, manifest, why):
    t = load_trace(make_dir(tmp_path / "t", manifest=manifest))
    assert t.partial and why in t.partial_reason
    assert len(t.df) > 0


def test_raw_only_directory_is_converted_and_partial(tmp_path):
    d = make_dir(tmp_path / "t", manifest={"status": "running", "pid": os.getpid()}, parquet=False)
    locs = [{"loc": 0, "probe": "native_set_pte", "event": "set_pte", "pc": 0xFFFFFFFF81001000,
             "site": "zap_pte_range"}]
    (d / schema.LOCATIONS_FILE).write_text(json.dumps({"locations": locs}))
    rec = np.zeros(3, rawtrace.RAW_DTYPE)
    rec["seq"] = [1, 2, 3]
    rec["event"] = schema.EVENT_CODE["set_pte"]
    rec["preempt_raw"] = 0x80000001  # need-resched bit clear = no resched pending... masked to 1
    rec["flags"] = rawformat.F_IRQS_ON
    rec["comm"] = b"sh"
    (d / schema.RAW_FILE).write_bytes(rawformat.MAGIC + rec.tobytes() + b"\x01\x02")  # a torn tail
    t = load_trace(d)  # our own pid: a live recorder, so nothing is written into its directory
    assert len(t.df) == 3 and t.partial
    assert "read from events.raw" in t.partial_reason and "still alive" in t.partial_reason
    assert any("torn" in n and "in memory" in n for n in t.notes)
    assert (t.df["site"] == "zap_pte_range").all() and (t.df["preempt_count"] == 1).all()
    assert not (d / schema.TRACE_FILE).exists()
    # the recorder is gone (a pid that cannot exist): convert for good, like `lazytrace check` after a kill
    m = json.loads((d / schema.MANIFEST_FILE).read_text())
    (d / schema.MANIFEST_FILE).write_text(json.dumps(dict(m, pid=2 ** 22 + 12345)))
    t = load_trace(d)
    assert (d / schema.TRACE_FILE).exists() and len(t.df) == 3
    assert "stopped before converting" in t.partial_reason


def _expect_error(path, *needles):
    with pytest.raises(TraceFormatError) as ei:
        load_trace(path)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    assert isinstance(ei.value, InputError) and ei.value.exit_status == 2
    return msg


def test_missing_directory_and_file_instead_of_directory(tmp_path):
    _expect_error(tmp_path / "nope", "does not exist")
    (tmp_path / "f").write_text("x")
    _expect_error(tmp_path / "f", "a file")


def test_no_manifest_names_the_files_present(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "console.log").write_text("")
    _expect_error(d, "no run.json", "console.log")


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not JSON"),
    ("[1, 2]", "top level is list"),
    (json.dumps({"kernel": "x"}), "status None"),
    (json.dumps({"status": "done"}), "status 'done'"),
    (json.dumps({"status": "complete", "events_lost": "many"}), "events_lost is 'many'"),
    (json.dumps({"status": "complete", "events_recorded": True}), "events_recorded is True"),
])
def test_broken_manifest(tmp_path, text, needle):
    d = make_dir(tmp_path / "t")
    (d / schema.MANIFEST_FILE).write_text(text)
    _expect_error(d, needle)


def test_no_events_file(tmp_path):
    d = make_dir(tmp_path / "t", parquet=False)
    _expect_error(d, "no trace.parquet", "run.json")


def test_not_parquet(tmp_path):
    d = make_dir(tmp_path / "t", parquet=False)
    (d / schema.TRACE_FILE).write_bytes(b"PAR1 garbage")
    _expect_error(d, "not a readable parquet file")


def _write_table(d, table):
    pq.write_table(table, d / schema.TRACE_FILE)


def test_missing_column_names_what_is_there(tmp_path):
    d = make_dir(tmp_path / "t")
    table = pq.read_table(d / schema.TRACE_FILE).drop_columns(["preempt_count", "irqs_on"])
    _write_table(d, table)
    _expect_error(d, "missing column(s) preempt_count, irqs_on", "file has: seq:uint64")


def test_wrong_dtype_names_column_and_types(tmp_path):
    d = make_dir(tmp_path / "t")
    table = pq.read_table(d / schema.TRACE_FILE)
    i = table.schema.get_field_index("pteval")
    _write_table(d, table.set_column(i, "pteval", table.column("pteval").cast(pa.int64(), safe=False)))
    _expect_error(d, "column pteval has type int64, want uint64")


def test_unknown_event_category(tmp_path):
    d = make_dir(tmp_path / "t")
    table = pq.read_table(d / schema.TRACE_FILE)
    ev = pa.array(["set_pte"] * (table.num_rows - 1) + ["teleport"])
    _write_table(d, table.set_column(table.schema.get_field_index("event"), "event", ev))
    _expect_error(d, "unknown event categories ['teleport']")


def test_nulls_in_non_nullable_column(tmp_path):
    d = make_dir(tmp_path / "t")
    table = pq.read_table(d / schema.TRACE_FILE)
    col = pa.array([None] + [1] * (table.num_rows - 1), pa.int32())
    _write_table(d, table.set_column(table.schema.get_field_index("pid"), "pid", col))
    _expect_error(d, "column pid has 1 nulls")


def test_validate_frame_refuses_wrong_width_and_missing():
    df = events_frame([{"event": "set_pte"}])
    with pytest.raises(TraceFormatError, match="column cpu has dtype int64, want int16"):
        validate_frame(df.astype({"cpu": "int64"}))
    with pytest.raises(TraceFormatError, match="missing column.s. seq .frame has: t_ns"):
        validate_frame(df.drop(columns="seq"))
    with pytest.raises(TraceFormatError, match="column event has dtype object"):
        validate_frame(df.astype({"event": object}))
    ok = validate_frame(df.astype({"site": object}))  # plain str columns are fine
    assert ok["site"].dtype == "string"


def test_load_traces_and_concat(tmp_path):
    a = make_dir(tmp_path / "a")
    b = make_dir(tmp_path / "b", synth_events(SynthConfig(n_events=1_000, seed=2)))
    traces = load_traces([a, b])
    assert [t.path for t in traces] == [a, b]
    both = concat_traces(traces)
    assert len(both) == sum(len(t.df) for t in traces)
    assert set(both["trace"].cat.categories) == {str(a), str(b)}
    assert both["event"].dtype == schema.EVENT_DTYPE


def test_trace_from_frame_is_strict_by_default():
    t = Trace.from_frame(events_frame([{"event": "lazy_enter"}]))
    assert not t.windowed and not t.partial and t.name == "<memory>"
