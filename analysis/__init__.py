"""lazytrace analysis side: trace loading, invariant checks, reports, plots and exports.

Only :mod:`tracer.schema` and :mod:`tracer.errors` are imported from the tracer package (plus
:mod:`tracer.rawtrace` to convert the raw records a killed recorder leaves): the trace format is the contract.

Public API (import from the modules; nothing heavy is imported here):

* :func:`analysis.load.load_trace` / :func:`~analysis.load.load_traces` -> :class:`~analysis.load.Trace`
* :func:`analysis.check.check_trace` -> :class:`~analysis.check.Report`; :func:`analysis.check.check_dirs`
  (``lazytrace check``/``run``: reports, timeline.png, perfetto.json, terminal summary, exit status)
* :func:`analysis.regions.df_lazy_regions` and the other ``df_*`` views
* :func:`analysis.plot.plot_timeline`, :func:`analysis.perfetto.write_perfetto`
* the catalogue: :func:`analysis.invariants.all_invariants` (one module per rule, docs/adding-an-invariant.md)
* expect files: :func:`analysis.expectations.load_expect`, :data:`analysis.expectations.UPSTREAM_KNOWN`
* synthetic and hand-built traces: :func:`analysis.synth.synth_events`, :func:`analysis.synth.events_frame`
"""
