"""The invariant catalogue: one module per rule, each registering itself on import.

Importing this package imports every module in it (so dropping a new module here adds a rule; see
docs/adding-an-invariant.md). :func:`all_invariants` lists them in catalogue order.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    REGISTRY,
    VIOLATION_COLUMNS,
    CheckContext,
    CheckResult,
    Invariant,
    empty_violations,
    invariant,
)

__all__ = [
    "REGISTRY",
    "VIOLATION_COLUMNS",
    "CheckContext",
    "CheckResult",
    "Invariant",
    "all_invariants",
    "empty_violations",
    "get",
    "invariant",
]

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")


def all_invariants() -> list[Invariant]:
    """Every registered invariant, in catalogue order."""
    return sorted(REGISTRY.values(), key=lambda inv: (inv.order, inv.id))


def get(invariant_id: str) -> Invariant:
    """The invariant with this id.

    :raises KeyError: naming the known ids.
    """
    try:
        return REGISTRY[invariant_id]
    except KeyError:
        raise KeyError(f"no invariant {invariant_id!r}; known: {', '.join(sorted(REGISTRY))}") from None
