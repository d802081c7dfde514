"""Export a trace as Chrome trace-event JSON, which ui.perfetto.dev and chrome://tracing open.

Layout (Trace Event Format, "JSON Object Format"):

* one process ``lazytrace <trace>`` (pid 1) with one thread per guest CPU (tid ``cpu + 1``, named
  ``CPU n``);
* each lazy region is a complete slice (``ph: "X"``) on its CPU's thread, named after the function
  that entered lazy mode, args: seqs, pid/comm, preempt_count, mm, set_pte count;
* each context switch is a thread-scoped instant (``ph: "i"``), each violation an instant named after
  its invariant with the kernel-style title in its args;
* ``preempt_count`` is a counter per CPU (``ph: "C"``, track ``preempt_count cpu n``), one sample
  where it changes;
* under Xen PV (where the trace knows them) two more counters per CPU: ``xen lazy_mode cpu n`` (0 none,
  1 MMU, 2 CPU, the guest's own per-CPU state) and ``xen mc_pending cpu n`` (multicall entries queued, not
  yet issued to the hypervisor): the batch filling inside a region and emptying at its leave.

Times are host ``t_ns`` relative to the first event, in microseconds (the format's unit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .regions import df_preempt_count, df_switches

PID = 1
#: Counter samples written at most (the rest are thinned evenly; the metadata says how many).
MAX_COUNTER_SAMPLES = 400_000


def _us(t_ns: Any, t0: int) -> Any:
    return (np.asarray(t_ns, dtype=np.int64) - t0) / 1000.0


def perfetto_events(df: pd.DataFrame, regions: pd.DataFrame, violations: pd.DataFrame, *,
                    name: str = "trace") -> dict[str, Any]:
    """Build the trace-event document (a dict ready for :func:`json.dump`).

    :param df: events (for switches and preempt_count).
    :param regions: :func:`analysis.regions.df_lazy_regions`.
    :param violations: a violations frame.
    """
    t0 = int(df["t_ns"].min()) if len(df) else 0
    cpus = sorted({int(c) for c in pd.unique(df["cpu"])}) if len(df) else []
    if len(regions):
        cpus = sorted(set(cpus) | {int(c) for c in pd.unique(regions["cpu"])})
    ev: list[dict[str, Any]] = [
        {"ph": "M", "pid": PID, "tid": 0, "name": "process_name", "args": {"name": f"lazytrace {name}"}},
    ]
    for c in cpus:
        ev.append({"ph": "M", "pid": PID, "tid": c + 1, "name": "thread_name", "args": {"name": f"CPU {c}"}})
        ev.append({"ph": "M", "pid": PID, "tid": c + 1, "name": "thread_sort_index", "args": {"sort_index": c}})

    if len(regions):
        ts = _us(regions["first_t_ns"], t0)
        dur = np.maximum(_us(regions["last_t_ns"], t0) - ts, 0.0)
        r = regions
        for i, row in enumerate(r.itertuples(index=False)):
            ev.append({
                "ph": "X", "pid": PID, "tid": int(row.cpu) + 1, "ts": float(ts[i]), "dur": float(dur[i]),
                "name": str(row.site) if not pd.isna(row.site) else "lazy (open at window start)",
                "cat": f"lazy,{row.mm}",
                "args": {
                    "region": int(row.region), "first_seq": int(row.first_seq), "last_seq": int(row.last_seq),
                    "pid": None if pd.isna(row.pid) else int(row.pid),
                    "comm": None if pd.isna(row.comm) else str(row.comm),
                    "preempt_count": None if pd.isna(row.preempt_count) else int(row.preempt_count),
                    "mm": str(row.mm), "n_set_pte": int(row.n_set_pte), "n_switch": int(row.n_switch),
                    "closed": bool(row.closed),
                },
            })

    sw = df_switches(df)
    if len(sw):
        ts = _us(sw["t_ns"], t0)
        for i, row in enumerate(sw.itertuples(index=False)):
            ev.append({"ph": "i", "s": "t", "pid": PID, "tid": int(row.cpu) + 1, "ts": float(ts[i]),
                       "name": "switch", "cat": "sched",
                       "args": {"seq": int(row.seq), "prev_pid": int(row.pid),
                                "next_pid": None if pd.isna(row.next_pid) else int(row.next_pid),
                                "prev_comm": str(row.comm)}})

    if len(violations):
        ts = _us(violations["t_ns"], t0)
        for i, row in enumerate(violations.itertuples(index=False)):
            ev.append({"ph": "i", "s": "t", "pid": PID, "tid": int(row.cpu) + 1, "ts": float(ts[i]),
                       "name": str(row.invariant), "cat": "violation",
                       "args": {"title": str(row.title), "seq": int(row.seq), "site": str(row.site),
                                "pid": int(row.pid), "comm": str(row.comm),
                                "preempt_count": int(row.preempt_count),
                                "expected": bool(getattr(row, "expected", False))}})

    pcnt = df_preempt_count(df)
    total, written = len(pcnt), _counter(ev, pcnt, "preempt_count", "preempt_count", t0)
    for col in ("lazy_mode", "mc_pending"):
        if col in df.columns and df[col].notna().any():
            _counter(ev, _changes(df, col), col, f"xen {col}", t0)
    return {
        "traceEvents": ev,
        "displayTimeUnit": "ns",
        "otherData": {"trace": name, "t0_ns": t0, "counter_samples": total,
                      "counter_samples_written": written},
    }


def _changes(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """Rows (t_ns, cpu, col) where ``col`` changes on its CPU, in ``seq`` order (unknown values dropped)."""
    d = df.loc[df[col].notna(), ["seq", "t_ns", "cpu", col]].sort_values(["cpu", "seq"], kind="stable")
    vals = d[col].to_numpy(dtype=np.int64)
    cpu = d["cpu"].to_numpy()
    keep = np.ones(len(d), bool)
    keep[1:] = (vals[1:] != vals[:-1]) | (cpu[1:] != cpu[:-1])
    return d[keep]


def _counter(ev: list[dict[str, Any]], samples: pd.DataFrame, col: str, track: str, t0: int) -> int:
    """Append one counter sample per row (at most :data:`MAX_COUNTER_SAMPLES`, thinned evenly); how many."""
    if len(samples) > MAX_COUNTER_SAMPLES:
        keep = np.unique(np.linspace(0, len(samples) - 1, MAX_COUNTER_SAMPLES).astype(np.int64))
        samples = samples.iloc[keep]
    ts = _us(samples["t_ns"], t0)
    for i, (cpu, val) in enumerate(zip(samples["cpu"].to_numpy(), samples[col].to_numpy(), strict=False)):
        ev.append({"ph": "C", "pid": PID, "ts": float(ts[i]), "name": f"{track} cpu {int(cpu)}",
                   "args": {"value": int(val)}})
    return len(samples)


def write_perfetto(df: pd.DataFrame, regions: pd.DataFrame, violations: pd.DataFrame,
                   path: str | os.PathLike[str], *, name: str = "trace") -> Path:
    """Write :func:`perfetto_events` to ``path`` (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(perfetto_events(df, regions, violations, name=name), f, separators=(",", ":"))
    os.replace(tmp, path)
    return path
