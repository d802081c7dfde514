"""The analysis end to end on the small real traces committed under tests/fixtures/ (recorded from a guest)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from rich.console import Console

from analysis.check import check_dirs, check_trace
from analysis.expectations import UPSTREAM_KNOWN
from analysis.invariants import all_invariants
from analysis.load import load_trace
from analysis.sites import KERNEL_LAZY_SITES
from tracer import schema

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracle import check_oracle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TRACES = sorted(p.parent for p in FIXTURES.glob("*/trace.parquet") if (p.parent / schema.MANIFEST_FILE).exists())

pytestmark = pytest.mark.skipif(
    not TRACES, reason=f"no fixture trace (trace.parquet + run.json) under {FIXTURES}: record a small one with "
    "`lazytrace record --out tests/fixtures/<name>` and commit it")


@pytest.fixture(params=TRACES, ids=lambda p: p.name)
def trace_copy(request, tmp_path):
    """A copy of the fixture (check_dirs writes its reports into the trace directory)."""
    d = tmp_path / request.param.name
    shutil.copytree(request.param, d, ignore=shutil.ignore_patterns("report.*", "timeline.png", "perfetto.json"))
    return d


def test_check_dirs_writes_every_output(trace_copy):
    con = Console(file=io.StringIO(), width=120)
    status = check_dirs([trace_copy], expect_file=UPSTREAM_KNOWN, console=con)
    rep = json.loads((trace_copy / schema.REPORT_JSON).read_text())
    assert status == rep["exit_status"] in (0, 1)
    assert rep["events"] > 0 and len(rep["invariants"]) == len(all_invariants())
    assert (trace_copy / schema.REPORT_MD).read_text().startswith("# lazytrace report")
    assert (trace_copy / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((trace_copy / "perfetto.json").read_text())["traceEvents"]


def test_vectorised_checks_agree_with_the_oracle(trace_copy):
    trace = load_trace(trace_copy)
    rep = check_trace(trace)
    ref = check_oracle(trace.df, windowed=trace.windowed, partial=trace.partial)
    found = {(str(v.invariant), int(v.seq), str(v.site), str(v.title)) for v in rep.df_violations().itertuples()}
    assert found == ref.violations
    assert {r.id: r.checked for r in rep.results} == ref.checked


def test_only_kernel_mapping_callers_enter_lazy_mode_preemptible(trace_copy):
    """Known truth (DESIGN.md): user page-table paths hold the PTE lock, so preempt_count >= 1 at their enter."""
    trace = load_trace(trace_copy)
    rep = check_trace(trace)
    regions = rep.regions
    assert len(regions), "a fixture trace should contain lazy regions"
    bad = rep.result("LAZY-PREEMPT").violations
    assert set(bad["site"]) <= KERNEL_LAZY_SITES, bad[["seq", "site", "comm", "preempt_count"]].to_string()
    assert int(regions["n_set_pte"].sum()) <= int((trace.df["event"] == "set_pte").sum())


def test_findings_row_summarises_the_report(trace_copy):
    from analysis.findings import row

    check_dirs([trace_copy], expect_file=UPSTREAM_KNOWN, console=Console(file=io.StringIO(), width=120))
    rep = json.loads((trace_copy / schema.REPORT_JSON).read_text())
    ids = [i["id"] for i in rep["invariants"]]
    cells = row(trace_copy, ids).strip("| ").split(" | ")
    assert cells[1] == f"{rep['events']:,}" and cells[2] == str(rep["regions"]["count"])
    for inv, c in zip(rep["invariants"], cells[3:], strict=True):
        want = {"PASS": f"PASS 0/{inv['checked']}", "NOT-EXERCISED": "n/e"}.get(inv["status"])
        assert c == want if want else c.startswith(f"**FAIL** {inv['violation_count']}/{inv['checked']} "), (inv["id"], c)
