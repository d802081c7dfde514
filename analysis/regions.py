"""Lazy regions and other per-CPU views of a trace as DataFrames (LISA-style ``df_*`` functions).

Each function takes an events frame with the schema's dtypes and returns a new frame whose columns its
docstring lists. Plots (:mod:`analysis.plot`) and exports (:mod:`analysis.perfetto`) consume only these.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracer import schema

from .errors import MissingEventsError
from .lazystate import (
    ENTER,
    FLUSH,
    LEAVE,
    MM_DTYPE,
    MM_KINDS,
    SET_PTE,
    SWITCH,
    LazyState,
    cpu_key,
    event_codes,
)

#: Columns of :func:`df_lazy_regions`, in order.
REGION_COLUMNS: tuple[str, ...] = (
    "region", "cpu", "start_seq", "end_seq", "first_seq", "last_seq", "first_t_ns", "last_t_ns",
    "duration_ns", "pid", "comm", "end_pid", "site", "end_site", "preempt_count", "irqs_on", "mm_is_init",
    "mm", "n_set_pte", "n_switch", "n_flush", "n_nested_enter", "closed", "open_at_start", "open_at_end",
)


def df_lazy_regions(df: pd.DataFrame, *, windowed: bool = False, state: LazyState | None = None,
                    require: bool = True) -> pd.DataFrame:
    """The lazy MMU regions of every CPU, one row per region (see :mod:`analysis.lazystate` for the rules).

    :param df: events with the schema's dtypes.
    :param windowed: the trace is a marker-armed window: a CPU whose first enter/leave is a leave gets
        a region open at the window start (``open_at_start``); pass :attr:`analysis.load.Trace.windowed`.
    :param state: a :class:`~analysis.lazystate.LazyState` already computed for ``df`` (reused by checks).
    :param require: raise when the trace has no lazy events (else return an empty frame).
    :returns: columns

        ============== ======== ================================================================
        region         int64    0.. in (cpu, start) order; ids match the checks' region indices
        cpu            int16    the CPU stream
        start_seq      UInt64   seq of the lazy_enter (NA if open at window start)
        end_seq        UInt64   seq of the lazy_leave (NA if still open at the end)
        first_seq      uint64   first event inside (the enter, or the CPU's first event)
        last_seq       uint64   last event inside (the leave, or the CPU's last event)
        first_t_ns     int64    host time of ``first_seq``
        last_t_ns      int64    host time of ``last_seq``
        duration_ns    int64    ``last_t_ns - first_t_ns``
        pid, comm      Int32/string  task at the enter (NA if unknown); for a region re-opened by a Xen
                                 restore (paravirt_end_context_switch) pid is the task switched in, and
                                 comm the enter's (the previous task's)
        end_pid        Int32    task at the leave
        site           string   function that entered lazy mode
        end_site       string   function that left it
        preempt_count  UInt32   at the enter
        irqs_on        boolean  at the enter
        mm_is_init     boolean  read at the enter, when the recorder could
        mm             category ``kernel``/``user``/``unknown`` (mm_is_init, else the enter's site)
        n_set_pte      int64    set_pte events inside
        n_switch       int64    switch events inside (should be 0)
        n_flush        int64    lazy_flush events inside
        n_nested_enter int64    lazy_enter events inside after the first (should be 0)
        closed         bool     a lazy_leave ended it
        open_at_start  bool     it began before the window
        open_at_end    bool     no leave before the CPU's events end
        ============== ======== ================================================================

    :raises MissingEventsError: the trace has neither lazy_enter nor lazy_leave events.
    """
    st = state if state is not None else LazyState(df, windowed=windowed)
    if require and len(df) and not (len(st.positions(ENTER)) or len(st.positions(LEAVE))):
        raise MissingEventsError(("lazy_enter", "lazy_leave"), st.event_counts(), "df_lazy_regions()")
    R = st.n_regions
    seq, t_ns, pid = st.column("seq"), st.column("t_ns"), st.column("pid")
    r_pid, r_known = st.r_task  # the enter's task, or for a Xen restore the task switched in
    has_enter, has_leave = st.r_enter >= 0, st.r_leave >= 0
    e_rows = st.rows(np.maximum(st.r_enter, 0)) if R else np.zeros(0, np.int64)
    l_rows = st.rows(np.maximum(st.r_leave, 0)) if R else np.zeros(0, np.int64)
    f_rows, z_rows = st.rows(st.r_start), st.rows(st.r_end)

    def masked(values: np.ndarray, valid: np.ndarray, dtype: str) -> pd.api.extensions.ExtensionArray:
        dt = pd.api.types.pandas_dtype(dtype)
        vals = np.where(valid, values, 0).astype(dt.numpy_dtype)
        if dtype == "boolean":
            return pd.arrays.BooleanArray(vals, ~valid)
        return pd.arrays.IntegerArray(vals, ~valid)

    mm_vals, mm_valid = st.masked("mm_is_init")
    sites = st.site_names(e_rows)
    end_sites = st.site_names(l_rows)
    comm = np.asarray(df["comm"].array.take(e_rows), dtype=object)
    out = pd.DataFrame(
        {
            "region": np.arange(R, dtype=np.int64),
            "cpu": st.cpus[st.r_grp].astype(np.int16) if R else np.zeros(0, np.int16),
            "start_seq": masked(seq[e_rows], has_enter, "UInt64"),
            "end_seq": masked(seq[l_rows], has_leave, "UInt64"),
            "first_seq": seq[f_rows],
            "last_seq": seq[z_rows],
            "first_t_ns": t_ns[f_rows],
            "last_t_ns": t_ns[z_rows],
            "duration_ns": t_ns[z_rows] - t_ns[f_rows],
            "pid": masked(r_pid, r_known, "Int32"),
            "comm": pd.array(np.where(has_enter, comm, None), dtype="string"),
            "end_pid": masked(pid[l_rows], has_leave, "Int32"),
            "site": pd.array(np.where(has_enter, sites, None), dtype="string"),
            "end_site": pd.array(np.where(has_leave, end_sites, None), dtype="string"),
            "preempt_count": masked(st.column("preempt_count")[e_rows], has_enter, "UInt32"),
            "irqs_on": masked(st.column("irqs_on")[e_rows], has_enter, "boolean"),
            "mm_is_init": masked(mm_vals[e_rows], has_enter & mm_valid[e_rows], "boolean"),
            "mm": pd.Categorical.from_codes(st.r_mm, dtype=MM_DTYPE),
            "n_set_pte": st.region_counts(SET_PTE),
            "n_switch": st.region_counts(SWITCH),
            "n_flush": st.region_counts(FLUSH),
            "n_nested_enter": st.region_counts(ENTER) - has_enter,
            "closed": st.r_closed,
            "open_at_start": st.r_virtual,
            "open_at_end": ~st.r_closed,
        }
    )
    return out[list(REGION_COLUMNS)]


def df_switches(df: pd.DataFrame) -> pd.DataFrame:
    """Context switches: ``seq``, ``t_ns``, ``cpu``, ``pid`` (prev), ``next_pid``, ``comm`` (prev's)."""
    sw = df.loc[event_codes(df) == SWITCH, ["seq", "t_ns", "cpu", "vcpu", "pid", "next_pid", "comm"]]
    sw = sw.assign(cpu=np.where(sw["cpu"].to_numpy() >= 0, sw["cpu"].to_numpy(), sw["vcpu"].to_numpy())
                   .astype(np.int16))
    return sw.drop(columns="vcpu").reset_index(drop=True)


def df_preempt_by_site(df: pd.DataFrame, events: tuple[str, ...] = ("lazy_enter", "set_pte")) -> pd.DataFrame:
    """How often each ``preempt_count`` value is seen per (event, site).

    :returns: columns ``event``, ``site``, ``preempt_count``, ``count`` (sorted by event, site, count desc);
        ``preempt_count`` is the full masked count, so interrupt context shows as 0x10000 and above.
    """
    sub = df.loc[df["event"].isin(events), ["event", "site", "preempt_count"]]
    sub = sub.assign(event=sub["event"].astype(str))
    out = sub.value_counts(["event", "site", "preempt_count"]).rename("count").reset_index()
    return out.sort_values(["event", "site", "count"], ascending=[True, True, False], kind="stable",
                           ignore_index=True)


def df_preempt_count(df: pd.DataFrame) -> pd.DataFrame:
    """``preempt_count`` per CPU as a step function: the events where it differs from the CPU's previous event.

    :returns: columns ``cpu``, ``seq``, ``t_ns``, ``preempt_count`` (in (cpu, seq) order); the first event
        of each CPU is always included.
    """
    key = cpu_key(df)
    seq = df["seq"].to_numpy()
    if len(seq) > 1 and not (seq[1:] > seq[:-1]).all():
        order = np.lexsort((seq, key))
    else:
        order = np.argsort(key, kind="stable")
    k = key[order]
    pcnt = df["preempt_count"].to_numpy()[order]
    change = np.ones(len(order), bool)
    change[1:] = (pcnt[1:] != pcnt[:-1]) | (k[1:] != k[:-1])
    rows = order[change]
    return pd.DataFrame({"cpu": k[change].astype(np.int16), "seq": df["seq"].to_numpy()[rows],
                         "t_ns": df["t_ns"].to_numpy()[rows], "preempt_count": pcnt[change]})


def df_event_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Events per CPU and category: index ``cpu``, one column per schema event category."""
    ct = pd.crosstab(df["cpu"], df["event"], dropna=False)
    return ct.reindex(columns=list(schema.EVENTS), fill_value=0)


def mm_kinds() -> tuple[str, ...]:
    """The values of the region ``mm`` column."""
    return MM_KINDS
