"""The invariant registry and what every check receives and returns.

An invariant is one small module in :mod:`analysis.invariants` that decorates its check function with
:func:`invariant`; importing the package imports every module in it, so adding a file is enough to add
a rule (docs/adding-an-invariant.md). A check is vectorised over the whole trace: it reads the shared
:class:`~analysis.lazystate.LazyState` from its :class:`CheckContext` and returns a :class:`CheckResult`
with the rows that break the rule and how many events it tested.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from tracer import schema

from ..lazystate import LazyState

#: Columns of every violations frame (in order), and their dtypes.
VIOLATION_COLUMNS: dict[str, object] = {
    "invariant": "string",
    "title": "string",
    "seq": "uint64",
    "t_ns": "int64",
    "cpu": "int16",
    "site": "string",
    "pid": "int32",
    "comm": "string",
    "preempt_count": "uint32",
    "irqs_on": "bool",
    "event": "string",
    "event_site": "string",
    "pc": "uint64",
    "related_seq": "UInt64",
    "detail": "string",
}


@dataclass
class CheckContext:
    """What a check reads: the events, the lazy state derived from them, and how the trace was cut.

    :param df: events with the schema's dtypes.
    :param windowed: the trace is a marker-armed window (regions may be open at either edge).
    :param partial: the trace may end early or miss events (regions open at the end are not evidence).
    """

    df: pd.DataFrame
    windowed: bool = False
    partial: bool = False
    state: LazyState = field(init=False)

    def __post_init__(self) -> None:
        self.state = LazyState(self.df, windowed=self.windowed)

    @property
    def strict_end(self) -> bool:
        """Whether a region still open at the end of the trace is a violation (complete boot traces)."""
        return not (self.windowed or self.partial)

    @cached_property
    def event_counts(self) -> dict[str, int]:
        return self.state.event_counts()

    def violations(self, invariant_id: str, pos: np.ndarray, what: str, *, site: np.ndarray | None = None,
                   related_pos: np.ndarray | None = None, detail: Any = "") -> pd.DataFrame:
        """Build the violations frame for the events at sorted positions ``pos``.

        :param what: the title after ``"lazytrace ID: "``, with ``{site}`` where the blamed function goes
            (e.g. ``"lazy_enter with preemption enabled in {site}"``). Titles must not contain
            per-occurrence values: they are stable per (invariant, site) so repeats de-duplicate.
        :param site: the function to blame per row (default: the event's own site), e.g. the function
            that entered the lazy region a bad set_pte sits in.
        :param related_pos: sorted position of a related event per row (-1 for none), e.g. that enter.
        :param detail: per-occurrence explanation (a string, or one per row).
        """
        st = self.state
        pos = np.asarray(pos, dtype=np.int64)
        if not len(pos):
            return empty_violations()
        rows = st.rows(pos)
        df = self.df
        event_site = st.site_names(rows)
        blame = event_site if site is None else np.asarray(site, dtype=object)
        titles = pd.Series(blame, dtype=object).map(
            lambda s, w=what: f"lazytrace {invariant_id}: " + w.format(site=s))
        rel = pd.array([pd.NA] * len(pos), dtype="UInt64")
        if related_pos is not None:
            related_pos = np.asarray(related_pos, dtype=np.int64)
            ok = related_pos >= 0
            vals = np.zeros(len(pos), np.uint64)
            vals[ok] = st.column("seq")[st.rows(related_pos[ok])]
            rel = pd.arrays.IntegerArray(vals, ~ok)
        out = pd.DataFrame(
            {
                "invariant": pd.array([invariant_id] * len(pos), dtype="string"),
                "title": pd.array(titles.to_numpy(), dtype="string"),
                "seq": st.column("seq")[rows],
                "t_ns": st.column("t_ns")[rows],
                "cpu": st.cpu_of_pos(pos).astype(np.int16),
                "site": pd.array(blame, dtype="string"),
                "pid": st.column("pid")[rows],
                "comm": pd.array(df["comm"].array.take(rows), dtype="string"),
                "preempt_count": st.column("preempt_count")[rows],
                "irqs_on": st.column("irqs_on")[rows],
                "event": pd.array(np.asarray(schema.EVENTS, dtype=object)[st.ev[rows]], dtype="string"),
                "event_site": pd.array(event_site, dtype="string"),
                "pc": st.column("pc")[rows],
                "related_seq": rel,
                "detail": pd.array(np.broadcast_to(np.asarray(detail, dtype=object), len(pos)), dtype="string"),
            }
        )
        return out.astype(VIOLATION_COLUMNS).sort_values("seq", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class CheckResult:
    """What one check found.

    :param violations: rows with :data:`VIOLATION_COLUMNS`.
    :param checked: events the rule was tested on (see each invariant's ``tested`` text).
    :param note: something a reader should know about this run of the rule (boundary effects, subsets).
    :param idle: why nothing was tested, when ``checked`` is 0 (overrides the invariant's generic reason).
    """

    violations: pd.DataFrame
    checked: int
    note: str = ""
    idle: str = ""


@dataclass(frozen=True)
class Invariant:
    """One rule of the catalogue (DESIGN.md, "Invariant catalogue").

    :param id: the stable id (``LAZY-PREEMPT``).
    :param title: a short name.
    :param rule: the rule in one sentence.
    :param source: what it encodes: the 2007 paravirt rule or the kernel commit.
    :param requires: event categories that must all be present for the rule to be exercised.
    :param tested: what ``checked`` counts (plural noun phrase: "lazy_enter events").
    :param idle_reason: why a trace typically does not exercise the rule (shown with NOT-EXERCISED).
    :param check: the vectorised check.
    :param order: position in the catalogue (reports list invariants in this order).
    """

    id: str
    title: str
    rule: str
    source: str
    requires: tuple[str, ...]
    tested: str
    idle_reason: str
    check: Callable[[CheckContext], CheckResult]
    order: int = 100


#: id -> Invariant, filled by the modules of :mod:`analysis.invariants` as they are imported.
REGISTRY: dict[str, Invariant] = {}


def invariant(*, id: str, title: str, rule: str, source: str, requires: tuple[str, ...], tested: str,
              idle_reason: str, order: int = 100) -> Callable[[Callable[[CheckContext], CheckResult]],
                                                             Callable[[CheckContext], CheckResult]]:
    """Register the decorated function as the check of invariant ``id``.

    :raises ValueError: a duplicate id, or a required event that is not a schema category.
    """
    bad = [e for e in requires if e not in schema.EVENT_CODE]
    if bad:
        raise ValueError(f"invariant {id}: unknown required event(s) {', '.join(bad)}; "
                         f"known: {', '.join(schema.EVENTS)}")

    def register(fn: Callable[[CheckContext], CheckResult]) -> Callable[[CheckContext], CheckResult]:
        if id in REGISTRY and REGISTRY[id].check is not fn:
            raise ValueError(f"invariant {id} registered twice ({REGISTRY[id].check.__module__} and "
                             f"{fn.__module__})")
        REGISTRY[id] = Invariant(id=id, title=title, rule=rule, source=source, requires=tuple(requires),
                                 tested=tested, idle_reason=idle_reason, check=fn, order=order)
        return fn

    return register


_EMPTY: pd.DataFrame | None = None


def empty_violations() -> pd.DataFrame:
    """A violations frame with no rows (a copy of one built once: checks call this a lot)."""
    global _EMPTY
    if _EMPTY is None:
        _EMPTY = pd.DataFrame({c: pd.Series([], dtype=t) for c, t in VIOLATION_COLUMNS.items()})
    return _EMPTY.copy()


def concat_violations(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate violations frames in ``seq`` order."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_violations()
    return pd.concat(parts, ignore_index=True).sort_values("seq", kind="stable").reset_index(drop=True)


#: What a violation blames when its region began before the window (no enter was recorded).
WINDOW_START_SITE = "<open at window start>"


def region_sites(st: LazyState, reg: np.ndarray) -> np.ndarray:
    """The entering function of each region index (:data:`WINDOW_START_SITE` for a virtual region)."""
    reg = np.asarray(reg, dtype=np.int64)
    enter = st.r_enter[reg]
    out = np.full(len(reg), WINDOW_START_SITE, dtype=object)
    real = enter >= 0
    out[real] = st.site_names(st.rows(enter[real]))
    return out


def describe_counts(counts: Mapping[str, int]) -> str:
    """``"set_pte=12, lazy_enter=3"`` for the non-zero categories (``"no events"`` if none)."""
    return ", ".join(f"{k}={v}" for k, v in counts.items() if v) or "no events"
