"""check_dirs end to end on trace directories: exit status, --expect, report.json/.md, pictures, regions."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from rich.console import Console

from analysis.check import check_dirs, check_trace
from analysis.errors import ExpectFileError, MissingEventsError
from analysis.expectations import UPSTREAM_KNOWN, load_expect
from analysis.load import Trace, load_trace
from analysis.regions import REGION_COLUMNS, df_lazy_regions, df_preempt_by_site, df_preempt_count
from analysis.synth import SynthConfig, events_frame, synth_events
from tracer import rawtrace, schema
from tracer.errors import TraceFormatError


def make_dir(path, df, **manifest):
    path.mkdir(parents=True)
    m = {"status": "complete", "arm": "marker", "backend": "plugin", "events_lost": 0,
         "kernel": {"recipe": "debian-6.1", "version": "6.1.192-2"}, **manifest}
    (path / schema.MANIFEST_FILE).write_text(json.dumps(m))
    rawtrace.write_parquet(df, path / schema.TRACE_FILE)
    return path


@pytest.fixture(scope="module")
def synth_df():
    return synth_events(SynthConfig(n_events=20_000, seed=5))


def console():
    return Console(file=io.StringIO(), width=120)


def test_known_upstream_violation_fails_without_expect_and_passes_with_it(tmp_path, synth_df):
    d = make_dir(tmp_path / "t", synth_df)
    con = console()
    assert check_dirs([d], console=con, plots=False) == 1
    out = con.file.getvalue()
    assert "BUG: lazytrace LAZY-PREEMPT: lazy_enter with preemption enabled in __apply_to_page_range" in out
    assert check_dirs([d], expect_file=UPSTREAM_KNOWN, console=console(), plots=False) == 0
    rep = json.loads((d / schema.REPORT_JSON).read_text())
    by_id = {r["id"]: r for r in rep["invariants"]}
    assert by_id["LAZY-PREEMPT"]["status"] == "FAIL" and by_id["LAZY-PREEMPT"]["expected"]
    assert "691ee97e1a9d" in by_id["LAZY-PREEMPT"]["groups"][0]["expect_reason"]
    assert rep["exit_status"] == 0


def test_report_json_has_the_design_keys(tmp_path, synth_df):
    d = make_dir(tmp_path / "t", synth_df)
    check_dirs([d], console=console(), plots=False)
    rep = json.loads((d / schema.REPORT_JSON).read_text())
    assert {"trace", "kernel", "invariants"} <= set(rep)
    assert rep["kernel"]["recipe"] == "debian-6.1" and rep["trace"] == str(d)
    for inv in rep["invariants"]:
        assert {"id", "status", "checked", "violations", "reason"} <= set(inv)
        assert inv["status"] in ("PASS", "FAIL", "NOT-EXERCISED")
        for v in inv["violations"]:
            assert {"title", "seq", "cpu", "site", "pid", "comm", "preempt_count"} <= set(v)
    idle = {r["id"]: r for r in rep["invariants"]}["SYNC-IRQS-OFF"]
    assert idle["status"] == "NOT-EXERCISED" and "pre-allocates" in idle["reason"]


def test_report_md_deduplicates_by_invariant_and_site(tmp_path):
    ev = []
    for _i in range(5):  # five preemptible enters at one site, one at another
        ev += [{"event": "lazy_enter", "site": "__apply_to_page_range", "preempt_count": 0, "pid": 112,
                "comm": "insmod", "cpu": 1}, {"event": "lazy_leave", "pid": 112, "cpu": 1}]
    ev += [{"event": "lazy_enter", "site": "zap_pte_range", "preempt_count": 0}, {"event": "lazy_leave"}]
    d = make_dir(tmp_path / "t", events_frame(ev))
    check_dirs([d], console=console(), plots=False)
    md = (d / schema.REPORT_MD).read_text()
    line = ("BUG: lazytrace LAZY-PREEMPT: lazy_enter with preemption enabled in __apply_to_page_range "
            "[preempt_count=0] cpu=1 comm=insmod/112")
    assert md.count(line) == 1
    assert "seen 5 time(s) on cpu 1; seq 0 2 4 6 8" in md
    assert "BUG: lazytrace LAZY-PREEMPT: lazy_enter with preemption enabled in zap_pte_range" in md
    assert "known upstream" in md  # the hint to use the shipped expect file
    assert "caller: __apply_to_page_range pc=0xffffffff81000000" in md


def test_partial_trace_is_checked_and_marked(tmp_path, synth_df):
    d = make_dir(tmp_path / "t", synth_df, status="partial", partial_reason="QEMU killed by signal 9")
    check_dirs([d], expect_file=UPSTREAM_KNOWN, console=console(), plots=False)
    rep = json.loads((d / schema.REPORT_JSON).read_text())
    assert rep["partial"] and "QEMU killed" in rep["partial_reasons"][0]
    assert "**partial**" in (d / schema.REPORT_MD).read_text()


def test_several_dirs_worst_status_wins(tmp_path, synth_df):
    good = make_dir(tmp_path / "good", events_frame([{"event": "lazy_enter"}, {"event": "lazy_leave"}]))
    bad = make_dir(tmp_path / "bad", synth_df)
    assert check_dirs([good, bad], console=console(), plots=False) == 1
    assert (good / schema.REPORT_JSON).exists() and (bad / schema.REPORT_JSON).exists()


def test_bad_dir_raises_trace_format_error(tmp_path):
    with pytest.raises(TraceFormatError):
        check_dirs([tmp_path / "missing"], console=console())


@pytest.mark.parametrize("text,needle", [
    ("[[expect]]\nid = 'LAZY-PREEMPT'\nsite = 'x'\n", "'reason' must be a non-empty string"),
    ("[[expect]]\nid = 'NOPE'\nsite = 'x'\nreason = 'r'\n", "unknown invariant 'NOPE'"),
    ("[[expect]]\nid = 'LAZY-PREEMPT'\nsite = 'x'\nreason = 'r'\nwhen = 1\n", "unknown key(s) when"),
    ("expect = 3\n", "must be an array of tables"),
    ("[[expect]\n", "not valid TOML"),
])
def test_bad_expect_files(tmp_path, text, needle):
    f = tmp_path / "e.toml"
    f.write_text(text)
    with pytest.raises(ExpectFileError) as ei:
        load_expect(f)
    assert needle in str(ei.value) and ei.value.exit_status == 2
    with pytest.raises(ExpectFileError):
        check_dirs([], expect_file=tmp_path / "absent.toml", console=console())


def test_expect_matches_only_its_site_and_reports_unused(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text("[[expect]]\nid = 'LAZY-PREEMPT'\nsite = '__apply_to_page_range'\nreason = 'upstream'\n"
                 "[[expect]]\nid = 'SYNC-IRQS-OFF'\nsite = '*'\nreason = 'never seen'\n")
    ev = [{"event": "lazy_enter", "site": "zap_pte_range", "preempt_count": 0}, {"event": "lazy_leave"}]
    rep = check_trace(Trace.from_frame(events_frame(ev)), f)
    assert rep.exit_status == 1 and not rep.result("LAZY-PREEMPT").expected
    assert [e.id for e in rep.unused_expectations] == ["LAZY-PREEMPT", "SYNC-IRQS-OFF"]


def test_upstream_known_file_cites_the_commit():
    entries = load_expect(UPSTREAM_KNOWN)
    pre = [e for e in entries if e.id == "LAZY-PREEMPT"]
    assert pre and pre[0].site == "__apply_to_page_range" and "691ee97e1a9d" in pre[0].commit


def test_pictures_are_written_and_perfetto_is_trace_event_json(tmp_path, synth_df):
    d = make_dir(tmp_path / "t", synth_df)
    check_dirs([d], console=console(), plots=True)
    assert (d / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((d / "perfetto.json").read_text())
    ev = doc["traceEvents"]
    phases = {e["ph"] for e in ev}
    assert {"M", "X", "C", "i"} <= phases
    cpus = sorted(int(c) for c in synth_df["cpu"].unique())
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {f"CPU {c}" for c in cpus}
    slices = [e for e in ev if e["ph"] == "X"]
    assert len(slices) == len(df_lazy_regions(synth_df))
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in slices)
    assert any(e["ph"] == "C" and e["name"].startswith("preempt_count cpu") for e in ev)
    assert any(e["ph"] == "i" and e["cat"] == "violation" for e in ev)


def test_regions_frame(synth_df):
    ev = [{"event": "lazy_enter", "site": "__apply_to_page_range", "preempt_count": 0, "pid": 7, "mm_is_init": True},
          {"event": "set_pte", "pid": 7}, {"event": "set_pte", "pid": 7}, {"event": "switch", "pid": 7},
          {"event": "lazy_leave", "pid": 8}, {"event": "lazy_enter", "cpu": 1, "site": "zap_pte_range"}]
    r = df_lazy_regions(events_frame(ev))
    assert list(r.columns) == list(REGION_COLUMNS)
    first = r.iloc[0]
    assert (first["cpu"], first["start_seq"], first["end_seq"], first["pid"], first["preempt_count"]) == (0, 0, 4, 7, 0)
    assert (first["n_set_pte"], first["n_switch"], first["mm"], first["closed"]) == (2, 1, "kernel", True)
    second = r.iloc[1]
    assert second["mm"] == "user" and not second["closed"] and pd.isna(second["end_seq"])
    big = df_lazy_regions(synth_df)
    assert big["n_set_pte"].sum() > 0 and (big["n_switch"] == 0).all()
    with pytest.raises(MissingEventsError, match="needs lazy_enter or lazy_leave events; the trace has: set_pte=1"):
        df_lazy_regions(events_frame([{"event": "set_pte"}]))


def test_preempt_views(synth_df):
    by_site = df_preempt_by_site(synth_df)
    apply = by_site[(by_site["event"] == "lazy_enter") & (by_site["site"] == "__apply_to_page_range")]
    assert apply["preempt_count"].tolist() == [0]
    steps = df_preempt_count(synth_df)
    assert set(steps["cpu"]) == set(synth_df["cpu"])


def test_fixture_like_trace_from_disk_matches_in_memory(tmp_path, synth_df):
    d = make_dir(tmp_path / "t", synth_df)
    a = check_trace(load_trace(d))
    b = check_trace(Trace.from_frame(synth_df, windowed=True))
    assert [(r.id, r.status, r.checked, r.n_violations) for r in a.results] == \
           [(r.id, r.status, r.checked, r.n_violations) for r in b.results]


def test_shipped_expect_files_load_and_rt_never_accepts_pairing():
    shipped = sorted(UPSTREAM_KNOWN.parent.glob("*.toml"))
    assert {p.name for p in shipped} >= {"upstream-known.toml", "preempt-rt.toml"}
    for p in shipped:
        entries = load_expect(p)  # valid TOML, keys and invariant ids
        assert entries and all(e.reason for e in entries), p
    rt = load_expect(UPSTREAM_KNOWN.parent / "preempt-rt.toml")
    # RT's design makes regions preemptible; it does not make enter/leave mispair or kernel updates unflushed
    assert {e.id for e in rt} == {"LAZY-PREEMPT", "LAZY-SETPTE-ATOMIC", "LAZY-NO-SWITCH"}
    assert all(e.site != "*" for e in rt if e.id == "LAZY-NO-SWITCH")
