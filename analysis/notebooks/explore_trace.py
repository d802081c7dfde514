# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exploring a lazytrace trace
#
# Loads one trace directory (`trace.parquet` + `run.json`), checks it against the invariant catalogue
# and shows the lazy MMU regions, the `preempt_count` seen per site, the per-CPU timeline and the
# violations. Set `LAZYTRACE_TRACE=/path/to/run-dir` to pick the trace; by default the first fixture
# trace under `tests/fixtures/` is used.
#
# Open with `jupytext --to notebook analysis/notebooks/explore_trace.py` or any Jupyter with jupytext.

# %%
import io
import os
from pathlib import Path

import pandas as pd
from IPython.display import Image

from analysis.check import check_trace
from analysis.expectations import UPSTREAM_KNOWN
from analysis.load import load_trace
from analysis.plot import plot_timeline
from analysis.regions import df_preempt_by_site, df_switches

pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 30)


def find_trace() -> Path:
    env = os.environ.get("LAZYTRACE_TRACE")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for root in (here, *here.parents):
        fixtures = root / "tests" / "fixtures"
        if fixtures.is_dir():
            found = sorted(p.parent for p in fixtures.glob("*/trace.parquet") if (p.parent / "run.json").exists())
            if found:
                return found[0]
    raise SystemExit("no trace: set LAZYTRACE_TRACE to a trace directory")


trace = load_trace(find_trace())
df = trace.df
print(trace.name, "|", trace.kernel, "|", len(df), "events",
      "| partial: " + trace.partial_reason if trace.partial else "| complete",
      "| windowed" if trace.windowed else "| from boot")
df["event"].value_counts().to_frame("events")

# %% [markdown]
# ## The invariants
# `FAIL (expected)` is a violation the shipped `analysis/expect/upstream-known.toml` accepts
# (LAZY-PREEMPT at `__apply_to_page_range`, upstream 691ee97e1a9d).

# %%
report = check_trace(trace, UPSTREAM_KNOWN)
pd.DataFrame(
    [{"invariant": r.id, "status": "FAIL (expected)" if r.expected else r.status, "checked": r.checked,
      "violations": r.n_violations, "unexpected": r.n_unexpected, "why": r.reason or r.note}
     for r in report.results]
)

# %% [markdown]
# ## Lazy regions
# One row per region (`analysis.regions.df_lazy_regions`): CPU, task, the function that entered lazy
# mode, `preempt_count` at the enter, set_pte and switches inside, kernel or user mm.

# %%
regions = report.regions
regions.head(10)

# %%
(regions.groupby(["site", "mm"], observed=True)
 .agg(regions=("region", "size"), set_pte=("n_set_pte", "sum"), max_set_pte=("n_set_pte", "max"),
      preempt0=("preempt_count", lambda s: int((s == 0).sum())), switches=("n_switch", "sum"))
 .sort_values("regions", ascending=False))

# %% [markdown]
# ## preempt_count per site
# User page-table walkers hold the PTE lock, so their lazy enters show `preempt_count >= 1`;
# `__apply_to_page_range` on `init_mm` takes no lock and can show 0 under `preempt=full`.

# %%
by_site = df_preempt_by_site(df)
by_site.pivot_table(index=["event", "site"], columns="preempt_count", values="count", fill_value=0,
                    aggfunc="sum")

# %% [markdown]
# ## Timeline
# Lazy regions as bars per CPU (colour: mm), context switches as ticks, violations as crosses.

# %%
fig = plot_timeline(regions, df_switches(df), report.df_violations(), title=trace.name)
buf = io.BytesIO()
fig.savefig(buf, format="png", dpi=100)  # plot_* use matplotlib's object API: no pyplot state
Image(buf.getvalue())

# %% [markdown]
# ## Violations
# De-duplicated by title (stable per invariant and site), with how often and where each was seen.

# %%
viol = report.df_violations()
if len(viol):
    summary = (viol.groupby(["invariant", "title", "expected"], observed=True)
               .agg(count=("seq", "size"), first_seq=("seq", "min"), cpus=("cpu", lambda c: sorted(set(c))))
               .reset_index().sort_values("count", ascending=False))
else:
    summary = pd.DataFrame(columns=["invariant", "title", "expected", "count", "first_seq", "cpus"])
summary

# %%
viol.head(20)
