"""lazytrace analysis side: trace loading, invariant checks, reports, plots and exports.

Only :mod:`tracer.schema` is imported from the tracer package: the trace format is the contract.
"""
