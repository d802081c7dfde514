"""The per-CPU timeline picture: lazy regions as bars, context switches as ticks, violations as crosses.

``plot_*`` functions consume only ``df_*`` frames (:mod:`analysis.regions`, the report's violations)
and draw with matplotlib's object API (no pyplot, no global backend), so they are safe in a CLI, a
test and a notebook alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

#: Bar colours by region ``mm`` (drawn in this order: kernel regions, rarer, end up on top).
MM_COLOURS = {"user": "#1b9e77", "unknown": "#7570b3", "kernel": "#d95f02"}
#: Violations: unexpected ones stand out, the ones an --expect file accepts are muted.
VIOLATION_COLOUR = "#e7298a"
EXPECTED_COLOUR = "#999999"


def draw_timeline(ax: Axes, regions: pd.DataFrame, switches: pd.DataFrame, violations: pd.DataFrame, *,
                  t0_ns: int | None = None, cpus: list[int] | None = None) -> None:
    """Draw the timeline on ``ax``: one row per CPU, x = host time in ms since ``t0_ns``.

    :param regions: :func:`analysis.regions.df_lazy_regions`.
    :param switches: :func:`analysis.regions.df_switches`.
    :param violations: a violations frame (``t_ns``, ``cpu``, ``invariant`` columns).
    :param t0_ns: time origin (default: the earliest time in the three frames).
    :param cpus: rows to draw (default: every CPU in the frames).
    """
    if t0_ns is None:
        starts = [f[c].min() for f, c in ((regions, "first_t_ns"), (switches, "t_ns"), (violations, "t_ns"))
                  if len(f)]
        t0_ns = int(min(starts)) if starts else 0
    if cpus is None:
        cpus = sorted({int(c) for f in (regions, switches, violations) if len(f) for c in pd.unique(f["cpu"])})
    row = {c: i for i, c in enumerate(cpus)}

    def ms(t: pd.Series | np.ndarray) -> np.ndarray:
        return (np.asarray(t, dtype=np.int64) - t0_ns) / 1e6

    for mm, colour in MM_COLOURS.items():
        sub = regions[regions["mm"] == mm] if len(regions) else regions
        for cpu, g in sub.groupby("cpu", observed=True) if len(sub) else ():
            if int(cpu) not in row:
                continue
            x = ms(g["first_t_ns"])
            w = np.maximum(ms(g["last_t_ns"]) - x, 0)
            ax.broken_barh(np.column_stack([x, w]), (row[int(cpu)] - 0.35, 0.7), facecolors=colour,
                           edgecolors=colour, linewidth=0.3)
    if len(switches):
        y = switches["cpu"].map(row)
        ok = y.notna().to_numpy()
        ax.vlines(ms(switches["t_ns"])[ok], y[ok] - 0.45, y[ok] + 0.45, colors="black", linewidth=0.4)
    if len(violations):
        y = violations["cpu"].astype(int).map(row)
        ok = y.notna().to_numpy()
        expected = (violations["expected"].to_numpy(dtype=bool) if "expected" in violations
                    else np.zeros(len(violations), bool))
        for sel, colour in ((ok & expected, EXPECTED_COLOUR), (ok & ~expected, VIOLATION_COLOUR)):
            if sel.any():
                ax.scatter(ms(violations["t_ns"])[sel], y[sel], marker="x", s=28, c=colour, linewidths=1.2,
                           zorder=3)
    ax.set_yticks(range(len(cpus)), [f"CPU {c}" for c in cpus])
    ax.set_ylim(-0.6, len(cpus) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("host time since trace start (ms)")
    handles = [Patch(color=c, label=f"lazy region ({mm} mm)") for mm, c in MM_COLOURS.items()]
    handles.append(Line2D([], [], color="black", linewidth=0.8, label="context switch"))
    handles.append(Line2D([], [], color=VIOLATION_COLOUR, marker="x", linestyle="", label="violation"))
    handles.append(Line2D([], [], color=EXPECTED_COLOUR, marker="x", linestyle="", label="expected violation"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)


def plot_timeline(regions: pd.DataFrame, switches: pd.DataFrame, violations: pd.DataFrame,
                  path: str | os.PathLike[str] | None = None, *, title: str = "", t0_ns: int | None = None,
                  dpi: int = 120) -> Figure | Path:
    """The per-CPU timeline as a figure, or written to ``path`` as PNG.

    :returns: the :class:`~matplotlib.figure.Figure` when ``path`` is None (notebooks), else ``path``.
    """
    ncpu = max(len({int(c) for f in (regions, switches, violations) if len(f) for c in pd.unique(f["cpu"])}), 1)
    fig = Figure(figsize=(13, 1.2 + 0.55 * ncpu), layout="constrained")
    ax = fig.add_subplot()
    draw_timeline(ax, regions, switches, violations, t0_ns=t0_ns)
    n_v = len(violations)
    ax.set_title(f"{title}  {len(regions)} lazy regions, {len(switches)} switches, {n_v} violations".strip(),
                 fontsize="medium", loc="left")
    if path is None:
        return fig
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)
    return path
