"""Run the invariant catalogue over traces and write the reports (``lazytrace check``, ``lazytrace run``).

Status per invariant:

``FAIL``
    at least one violation. It is *expected* when every violation matches an ``--expect`` entry; only
    unexpected violations make :func:`check_dirs` return 1.
``NOT-EXERCISED``
    no violation, and either an event category the rule needs is absent from the trace or no event
    was tested; the reason says which and what the trace does have.
``PASS``
    no violation, and ``checked`` events were tested.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tracer import schema

from .expectations import Expectation, load_expect, mark_expected, unused
from .invariants import CheckContext, Invariant, all_invariants, empty_violations
from .invariants import get as get_invariant
from .invariants.base import describe_counts
from .load import Trace, load_trace
from .regions import df_lazy_regions

log = logging.getLogger(__name__)

PASS, FAIL, NOT_EXERCISED = "PASS", "FAIL", "NOT-EXERCISED"
STATUSES = (PASS, FAIL, NOT_EXERCISED)

#: Files :func:`check_dirs` writes into each trace directory (besides report.json / report.md).
TIMELINE_PNG = "timeline.png"
PERFETTO_JSON = "perfetto.json"


@dataclass(frozen=True)
class InvariantResult:
    """The outcome of one invariant on one trace.

    ``violations`` has :data:`analysis.invariants.VIOLATION_COLUMNS` plus ``expected`` and
    ``expect_reason``.
    """

    invariant: Invariant
    status: str
    checked: int
    violations: pd.DataFrame
    reason: str = ""
    note: str = ""
    seconds: float = 0.0

    @property
    def id(self) -> str:
        return self.invariant.id

    @property
    def n_violations(self) -> int:
        return len(self.violations)

    @property
    def n_unexpected(self) -> int:
        return int((~self.violations["expected"]).sum()) if len(self.violations) else 0

    @property
    def expected(self) -> bool:
        """A FAIL whose violations are all accepted by the expect file."""
        return self.status == FAIL and self.n_unexpected == 0


@dataclass
class Report:
    """Every invariant's result on one trace, with what the reports need."""

    trace: Trace
    results: list[InvariantResult]
    regions: pd.DataFrame
    event_counts: dict[str, int]
    expectations: list[Expectation] = field(default_factory=list)
    unused_expectations: list[Expectation] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_status(self) -> int:
        """0 when every FAIL is expected, 1 otherwise (the CLI contract)."""
        return 1 if any(r.status == FAIL and r.n_unexpected for r in self.results) else 0

    def result(self, invariant_id: str) -> InvariantResult:
        for r in self.results:
            if r.id == invariant_id:
                return r
        raise KeyError(f"no result for {invariant_id!r}; have: {', '.join(r.id for r in self.results)}")

    def df_violations(self) -> pd.DataFrame:
        """All violations of all invariants, in ``seq`` order."""
        parts = [r.violations for r in self.results if len(r.violations)]
        if not parts:
            return mark_expected(empty_violations(), [])
        return pd.concat(parts, ignore_index=True).sort_values("seq", kind="stable", ignore_index=True)

    def to_dict(self) -> dict[str, Any]:
        from .report import report_dict

        return report_dict(self)

    def to_markdown(self) -> str:
        from .report import report_markdown

        return report_markdown(self)


def check_trace(trace: Trace, expect: str | os.PathLike[str] | Iterable[Expectation] | None = None, *,
                invariants: Sequence[str] | None = None) -> Report:
    """Check one trace against the catalogue.

    :param expect: accepted violations: an expect file path, or :class:`Expectation` objects.
    :param invariants: ids to run (default: all, in catalogue order).
    :raises KeyError: an unknown invariant id.
    :raises analysis.errors.ExpectFileError: a bad expect file.
    """
    t0 = time.perf_counter()
    if expect is None:
        expectations: list[Expectation] = []
    elif isinstance(expect, (str, os.PathLike)):
        expectations = load_expect(expect)
    else:
        expectations = list(expect)
    selected = [get_invariant(i) for i in invariants] if invariants is not None else all_invariants()
    ctx = CheckContext(trace.df, windowed=trace.windowed, partial=trace.partial)
    counts = ctx.event_counts
    results = [_run(inv, ctx, counts, expectations) for inv in selected]
    regions = df_lazy_regions(trace.df, state=ctx.state, require=False)
    all_v = pd.concat([r.violations for r in results], ignore_index=True) if results else empty_violations()
    report = Report(trace=trace, results=results, regions=regions, event_counts=counts,
                    expectations=expectations, unused_expectations=unused(expectations, all_v),
                    seconds=time.perf_counter() - t0)
    log.info("%s: checked %d events in %.2f s", trace.name, len(trace.df), report.seconds)
    return report


def _run(inv: Invariant, ctx: CheckContext, counts: dict[str, int],
         expectations: list[Expectation]) -> InvariantResult:
    t0 = time.perf_counter()
    res = inv.check(ctx)
    v = mark_expected(res.violations, expectations)
    missing = [e for e in inv.requires if not counts.get(e)]
    reason = ""
    if len(v):
        status = FAIL
    elif missing:
        status = NOT_EXERCISED
        reason = (f"{inv.idle_reason} (no {', '.join(missing)} event in the trace; it has: "
                  f"{describe_counts(counts)})")
    elif res.checked == 0:
        status = NOT_EXERCISED
        reason = res.idle or inv.idle_reason
    else:
        status = PASS
    return InvariantResult(inv, status, int(res.checked), v, reason=reason, note=res.note,
                           seconds=time.perf_counter() - t0)


def write_reports(report: Report, out_dir: str | os.PathLike[str], *, plots: bool = True) -> list[Path]:
    """Write ``report.json``, ``report.md`` and (with ``plots``) ``timeline.png`` and ``perfetto.json``.

    :returns: the paths written.
    """
    from .report import write_json, write_markdown

    out = Path(out_dir)
    written = [write_json(report, out / schema.REPORT_JSON), write_markdown(report, out / schema.REPORT_MD)]
    if plots:
        from .perfetto import write_perfetto
        from .plot import plot_timeline
        from .regions import df_switches

        df = report.trace.df
        viol = report.df_violations()
        t0 = int(df["t_ns"].min()) if len(df) else 0
        written.append(plot_timeline(report.regions, df_switches(df), viol, out / TIMELINE_PNG,
                                     title=report.trace.name, t0_ns=t0))
        written.append(write_perfetto(df, report.regions, viol, out / PERFETTO_JSON, name=report.trace.name))
    return written


def check_dirs(dirs: Iterable[str | os.PathLike[str]], expect_file: str | os.PathLike[str] | None = None,
               console: Any = None, plots: bool = True) -> int:
    """``lazytrace check DIR...``: check each trace directory, write its reports, print a summary.

    Each directory is loaded, checked and reported before the next is read (a 10M-event trace takes
    ~1 GB in memory). Per directory it writes ``report.json``, ``report.md`` and, with ``plots``,
    ``timeline.png`` and ``perfetto.json``.

    :param console: a :class:`rich.console.Console` (default: a new one on stdout).
    :returns: 0 if every invariant passed, was not exercised or failed only as expected; 1 if any
        failed unexpectedly.
    :raises TraceFormatError: a directory that is not a readable trace (exit status 2), or a bad expect
        file (:class:`~analysis.errors.ExpectFileError`).
    """
    from rich.console import Console

    from .report import print_summary

    console = console if console is not None else Console()
    expectations = load_expect(expect_file) if expect_file is not None else []
    status = 0
    for d in dirs:
        trace = load_trace(d)
        report = check_trace(trace, expectations)
        written = write_reports(report, trace.path, plots=plots)
        print_summary(report, console, written=written)
        status = max(status, report.exit_status)
    return status
