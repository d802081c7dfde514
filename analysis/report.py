"""Render a :class:`~analysis.check.Report`: ``report.json``, ``report.md`` and the terminal summary.

Violations are grouped by their title, which is stable per (invariant, site), and printed once per
group the way the kernel prints a bug::

    BUG: lazytrace LAZY-PREEMPT: lazy_enter with preemption enabled in __apply_to_page_range [preempt_count=0] cpu=1 comm=insmod/112
      caller: __apply_to_page_range pc=0xffffffff8123abcd
      seen 14 times on cpu 0,1; seq 1234 5678 ...

The values in brackets and the caller are those of the first occurrence.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .expectations import UPSTREAM_KNOWN, Expectation, load_expect
from .invariants.base import describe_counts

if TYPE_CHECKING:
    from .check import InvariantResult, Report

#: Violations listed one by one per invariant in report.json (all are counted and grouped).
MAX_JSON_VIOLATIONS = 1000
#: seq ids listed per de-duplicated group.
MAX_GROUP_SEQS = 20
#: Groups printed on the terminal.
MAX_TERMINAL_BUGS = 8

REPORT_FORMAT = 1


def bug_line(title: str, preempt_count: int, cpu: int, comm: str, pid: int) -> str:
    """The kernel-style line of one violation."""
    pcnt = str(preempt_count) if preempt_count < 0x100 else hex(preempt_count)
    return f"BUG: {title} [preempt_count={pcnt}] cpu={cpu} comm={comm}/{pid}"


def violation_groups(v: pd.DataFrame) -> list[dict[str, Any]]:
    """De-duplicate a violations frame by title, in order of first occurrence."""
    if not len(v):
        return []
    out = []
    for title, g in v.groupby("title", sort=False, observed=True):
        first = g.iloc[0]
        seqs = g["seq"].to_numpy()
        out.append(
            {
                "title": str(title),
                "invariant": str(first["invariant"]),
                "site": str(first["site"]),
                "count": len(g),
                "cpus": sorted({int(c) for c in g["cpu"].to_numpy()}),
                "first_seq": int(seqs[0]),
                "seqs": [int(s) for s in seqs[:MAX_GROUP_SEQS]],
                "bug": bug_line(str(title), int(first["preempt_count"]), int(first["cpu"]), str(first["comm"]),
                                int(first["pid"])),
                "caller": f"{first['event_site']} pc={int(first['pc']):#x}",
                "event": str(first["event"]),
                "detail": str(first["detail"]),
                "related_seq": None if pd.isna(first["related_seq"]) else int(first["related_seq"]),
                "expected": bool(g["expected"].all()),
                "expect_reason": None if pd.isna(first["expect_reason"]) else str(first["expect_reason"]),
            }
        )
    return out


def _violation_dict(row: Any) -> dict[str, Any]:
    return {
        "title": str(row.title),
        "seq": int(row.seq),
        "cpu": int(row.cpu),
        "site": str(row.site),
        "pid": int(row.pid),
        "comm": str(row.comm),
        "preempt_count": int(row.preempt_count),
        "irqs_on": bool(row.irqs_on),
        "event": str(row.event),
        "event_site": str(row.event_site),
        "pc": f"{int(row.pc):#x}",
        "related_seq": None if pd.isna(row.related_seq) else int(row.related_seq),
        "detail": str(row.detail),
        "expected": bool(row.expected),
        "expect_reason": None if pd.isna(row.expect_reason) else str(row.expect_reason),
    }


def _result_dict(r: InvariantResult) -> dict[str, Any]:
    inv = r.invariant
    v = r.violations
    listed = v.head(MAX_JSON_VIOLATIONS)
    return {
        "id": inv.id,
        "title": inv.title,
        "rule": inv.rule,
        "source": inv.source,
        "status": r.status,
        "expected": r.expected,
        "checked": r.checked,
        "tested": inv.tested,
        "violation_count": r.n_violations,
        "unexpected": r.n_unexpected,
        "violations": [_violation_dict(row) for row in listed.itertuples(index=False)],
        "violations_truncated": len(v) > len(listed),
        "groups": violation_groups(v),
        "reason": r.reason,
        "note": r.note,
        "seconds": round(r.seconds, 4),
    }


def report_dict(report: Report) -> dict[str, Any]:
    """The ``report.json`` document (keys: DESIGN.md "report.json", plus context)."""
    t = report.trace
    df = t.df
    regions = report.regions
    mm = regions["mm"].value_counts().to_dict() if len(regions) else {}
    return {
        "format": REPORT_FORMAT,
        "trace": str(t.path) if t.path is not None else t.name,
        "kernel": t.manifest.get("kernel"),
        "backend": t.manifest.get("backend"),
        "status": t.manifest.get("status"),
        "partial": t.partial,
        "partial_reasons": list(t.partial_reasons),
        "load_notes": list(t.notes),
        "windowed": t.windowed,
        "events": len(df),
        "events_by_type": report.event_counts,
        "cpus": sorted(int(c) for c in pd.unique(df["cpu"])) if len(df) else [],
        "seq_range": [int(df["seq"].iloc[0]), int(df["seq"].iloc[-1])] if len(df) else None,
        "regions": {
            "count": len(regions),
            **{k: int(mm.get(k, 0)) for k in ("kernel", "user", "unknown")},
            "open_at_start": int(regions["open_at_start"].sum()) if len(regions) else 0,
            "open_at_end": int(regions["open_at_end"].sum()) if len(regions) else 0,
        },
        "exit_status": report.exit_status,
        "expectations": [_expect_dict(e) for e in report.expectations],
        "unused_expectations": [_expect_dict(e) for e in report.unused_expectations],
        "invariants": [_result_dict(r) for r in report.results],
        "analysis_seconds": round(report.seconds, 3),
    }


def _expect_dict(e: Expectation) -> dict[str, str]:
    return {"id": e.id, "site": e.site, "reason": e.reason, "commit": e.commit, "file": e.origin}


def _upstream_hints() -> list[Expectation]:
    try:
        return load_expect(UPSTREAM_KNOWN)
    except Exception:
        return []


def _status_text(r: InvariantResult) -> str:
    return "FAIL (expected)" if r.expected else r.status


def report_markdown(report: Report) -> str:
    """The ``report.md`` text: context, a status table, then each violation group kernel-style."""
    t = report.trace
    d = report_dict(report)
    lines = [f"# lazytrace report: {t.name}", ""]
    lines.append(f"- trace: `{d['trace']}`")
    lines.append(f"- kernel: {t.kernel}")
    if d["backend"]:
        lines.append(f"- backend: {d['backend']}")
    state = "partial" if t.partial else "complete"
    lines.append(f"- trace status: **{state}**" + ("; " + "; ".join(t.partial_reasons) if t.partial else "")
                 + ("; a marker-armed window" if t.windowed else "; recorded from boot"))
    rng = f", seq {d['seq_range'][0]}..{d['seq_range'][1]}" if d["seq_range"] else ""
    lines.append(f"- events: {d['events']} ({describe_counts(report.event_counts)}) on cpu "
                 f"{', '.join(map(str, d['cpus'])) or '-'}{rng}")
    rg = d["regions"]
    lines.append(f"- lazy regions: {rg['count']} (kernel {rg['kernel']}, user {rg['user']}, unknown "
                 f"{rg['unknown']}; open at start {rg['open_at_start']}, open at end {rg['open_at_end']})")
    verdict = "FAIL" if report.exit_status else "PASS"
    n_bad = sum(1 for r in report.results if r.status == "FAIL" and r.n_unexpected)
    lines.append(f"- result: **{verdict}**" + (f" ({n_bad} invariant(s) failed unexpectedly)" if n_bad else ""))
    lines += ["", "| invariant | status | checked | violations | notes |", "|---|---|---|---|---|"]
    for r in report.results:
        viol = f"{r.n_violations} ({r.n_unexpected} unexpected)" if r.n_violations else "0"
        notes = r.reason or r.note
        lines.append(f"| {r.id} | {_status_text(r)} | {r.checked} {r.invariant.tested} | {viol} | "
                     f"{notes.replace('|', '/')} |")

    hints = _upstream_hints()
    failed = [r for r in report.results if r.status == "FAIL"]
    if failed:
        lines += ["", "## Violations"]
    for r in failed:
        inv = r.invariant
        lines += ["", f"### {inv.id}: {inv.title}", "", f"Rule: {inv.rule}.  ", f"Source: {inv.source}.", "",
                  "```"]
        for g in violation_groups(r.violations):
            more = f" (+{g['count'] - len(g['seqs'])} more)" if g["count"] > len(g["seqs"]) else ""
            lines.append(g["bug"])
            lines.append(f"  caller: {g['caller']}  ({g['event']}; {g['detail']})")
            lines.append(f"  seen {g['count']} time(s) on cpu {','.join(map(str, g['cpus']))}; seq "
                         f"{' '.join(map(str, g['seqs']))}{more}"
                         + (f"; related seq {g['related_seq']}" if g["related_seq"] is not None else ""))
            if g["expected"]:
                lines.append(f"  expected: {g['expect_reason']}")
            else:
                known = [h for h in hints if h.matches(g["invariant"], g["site"])]
                if known:
                    lines.append(f"  known upstream: {known[0].explanation} (accept with --expect "
                                 f"analysis/expect/{UPSTREAM_KNOWN.name})")
            lines.append("")
        lines[-1] = "```"
    idle = [r for r in report.results if r.status == "NOT-EXERCISED"]
    if idle:
        lines += ["", "## Not exercised", ""]
        lines += [f"- {r.id}: {r.reason}" for r in idle]
    notes = [r for r in report.results if r.note]
    if notes or report.unused_expectations or t.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- loading: {n}" for n in t.notes]
        lines += [f"- {r.id}: {r.note}" for r in notes]
        lines += [f"- expectation not seen: {e.id} at {e.site} ({e.origin})" for e in report.unused_expectations]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(report: Report, path: str | os.PathLike[str]) -> Path:
    return _atomic_write(Path(path), json.dumps(report_dict(report), indent=2) + "\n")


def write_markdown(report: Report, path: str | os.PathLike[str]) -> Path:
    return _atomic_write(Path(path), report_markdown(report))


_STYLE = {"PASS": "green", "FAIL": "bold red", "NOT-EXERCISED": "yellow"}


def print_summary(report: Report, console: Any, *, written: list[Path] | None = None) -> None:
    """Print a rich table of the results, the unexpected BUG lines, and where the reports are."""
    from rich.markup import escape
    from rich.table import Table

    t = report.trace
    head = f"{t.name}: {len(t.df)} events, {len(report.regions)} lazy regions, kernel {t.kernel}"
    if t.partial:
        head += " [bold yellow](partial: " + escape("; ".join(t.partial_reasons)) + ")[/]"
    table = Table(title=head, title_justify="left", show_lines=False)
    for col, kw in (("invariant", {"no_wrap": True}), ("status", {"no_wrap": True}),
                    ("checked", {"justify": "right"}), ("violations", {"justify": "right"})):
        table.add_column(col, **kw)
    for r in report.results:
        style = "green" if r.expected else _STYLE[r.status]
        viol = f"{r.n_violations}" + (f" ({r.n_unexpected} new)" if r.n_violations else "")
        table.add_row(r.id, f"[{style}]{_status_text(r)}[/]", str(r.checked), viol)
    console.print(table)
    for r in report.results:
        if r.reason:
            console.print(f"[yellow]{r.id}[/] not exercised: {escape(r.reason)}", highlight=False)
        if r.note:
            console.print(f"{r.id}: {escape(r.note)}", highlight=False)
    bugs = [g for r in report.results for g in violation_groups(r.violations) if not g["expected"]]
    for g in bugs[:MAX_TERMINAL_BUGS]:
        console.print(f"[red]{escape(g['bug'])}[/]")
        console.print(f"  caller: {escape(g['caller'])}; seen {g['count']}x; seq "
                      f"{' '.join(map(str, g['seqs'][:5]))}", highlight=False)
    if len(bugs) > MAX_TERMINAL_BUGS:
        console.print(f"... and {len(bugs) - MAX_TERMINAL_BUGS} more violation groups in report.md")
    if written:
        console.print("reports: " + ", ".join(str(p) for p in written), highlight=False)
    verdict = "[bold red]FAIL[/]" if report.exit_status else "[bold green]PASS[/]"
    console.print(f"{escape(t.name)}: {verdict} (exit {report.exit_status}, {report.seconds:.2f} s)")


def summary_counts(report: Report) -> dict[str, int]:
    """Number of invariants per status (``FAIL`` counts only unexpected ones)."""
    out = {"PASS": 0, "FAIL": 0, "EXPECTED": 0, "NOT-EXERCISED": 0}
    for r in report.results:
        out["EXPECTED" if r.expected else r.status] += 1
    return out


__all__ = ["bug_line", "violation_groups", "report_dict", "report_markdown", "write_json", "write_markdown",
           "print_summary", "summary_counts"]
