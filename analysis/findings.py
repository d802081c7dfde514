"""Markdown result rows for docs/findings.md, from checked trace directories (their ``report.json``).

    python -m analysis.findings RUN_DIR... [--columns ID,ID,...]

One row per directory: workload, events, lazy regions, then per invariant ``PASS 0/c``, ``**FAIL** v/c`` with
the blamed sites and CPUs, or ``n/e`` (NOT-EXERCISED). A partial trace (guest panic, killed recorder) is
marked after its event count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tracer import schema

#: The catalogue's short column names (docs/findings.md).
SHORT = {
    "LAZY-PREEMPT": "PREEMPT", "LAZY-PAIRING": "PAIRING", "LAZY-NO-SWITCH": "NO-SWITCH",
    "LAZY-SETPTE-ATOMIC": "SETPTE-ATOMIC", "KMAP-ATOMIC-PREEMPT": "KMAP", "SYNC-IRQS-OFF": "SYNC",
    "KERNEL-UPDATE-FLUSHED": "KUPD-FLUSHED", "IRQ-IN-LAZY": "IRQ-IN-LAZY", "XEN-LAZY-STATE": "XEN-STATE",
    "XEN-BATCH-ISSUED": "XEN-BATCH", "XEN-SWITCH-SAVE": "XEN-SWITCH",
}


def cell(inv: dict) -> str:
    status, checked = inv["status"], inv["checked"]
    if status == "NOT-EXERCISED":
        return "n/e"
    n = inv.get("violation_count", 0)
    if status == "PASS":
        return f"PASS 0/{checked}"
    sites = sorted({v["site"] for v in inv.get("violations", [])})
    cpus = sorted({v["cpu"] for v in inv.get("violations", [])})
    where = ", ".join(f"`{s}`" for s in sites)
    return f"**FAIL** {n}/{checked} {where} cpu{','.join(str(c) for c in cpus)}".rstrip()


def row(run_dir: Path, columns: list[str]) -> str:
    rep = json.loads((run_dir / schema.REPORT_JSON).read_text())
    man = json.loads((run_dir / schema.MANIFEST_FILE).read_text())
    by_id = {i["id"]: i for i in rep["invariants"]}
    workload = (man.get("workload") or {}).get("name", run_dir.name)
    events = f"{rep['events']:,}"
    if man.get("status") == "partial":
        events += f" (partial: {man.get('partial_reason')})"
    regions = rep.get("regions", {}).get("count", "")
    cells = [cell(by_id[c]) if c in by_id else "-" for c in columns]
    return "| " + " | ".join([str(workload), events, str(regions), *cells]) + " |"


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--columns", default=",".join(SHORT), show_default=True, help="invariant ids, in column order")
def main(run_dirs: tuple[Path, ...], columns: str) -> None:
    cols = [c for c in columns.split(",") if c]
    click.echo("| workload | events | regions | " + " | ".join(SHORT.get(c, c) for c in cols) + " |")
    click.echo("|" + "---|" * (3 + len(cols)))
    for d in run_dirs:
        click.echo(row(d, cols))


if __name__ == "__main__":
    sys.exit(main())
