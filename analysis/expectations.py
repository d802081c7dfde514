"""Accepted known violations (``--expect FILE``): TOML, one ``[[expect]]`` table per (invariant, site).

::

    [[expect]]
    id = "LAZY-PREEMPT"                 # an invariant id (required)
    site = "__apply_to_page_range"      # the function the violation blames; "*" = any (required)
    reason = "apply_to_page_range() on init_mm enters lazy mode without the PTE lock"   # required
    commit = "691ee97e1a9d (\\"mm: fix lazy mmu docs and usage\\") in v6.15"             # optional

A violation that matches an entry is still reported, with the reason, but does not make ``lazytrace
check`` exit 1. Entries that matched nothing are listed in the report, so a fixed bug is noticed.
The project ships :data:`UPSTREAM_KNOWN` (analysis/expect/upstream-known.toml).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ExpectFileError

#: The expectations that hold on every kernel this project traces (upstream behaviour, not bugs).
UPSTREAM_KNOWN = Path(__file__).resolve().parent / "expect" / "upstream-known.toml"

_KEYS = {"id", "site", "reason", "commit"}


@dataclass(frozen=True)
class Expectation:
    """One accepted (invariant, site) violation and why it is accepted."""

    id: str
    site: str
    reason: str
    commit: str = ""
    origin: str = ""

    def matches(self, invariant_id: str, site: str) -> bool:
        return invariant_id == self.id and (self.site == "*" or site == self.site)

    @property
    def explanation(self) -> str:
        return self.reason + (f" [{self.commit}]" if self.commit else "")


def load_expect(path: str | os.PathLike[str], known_ids: Iterable[str] | None = None) -> list[Expectation]:
    """Read an expect file.

    :param known_ids: invariant ids an entry may name (default: the registry).
    :raises ExpectFileError: unreadable file, invalid TOML, a missing/empty required key, an unknown key,
        or an unknown invariant id -- naming the entry.
    """
    if known_ids is None:
        from .invariants import REGISTRY

        known_ids = REGISTRY
    known = set(known_ids)
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ExpectFileError(f"{p}: cannot read expect file: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ExpectFileError(f"{p}: not valid TOML: {exc}") from exc
    extra = set(doc) - {"expect"}
    if extra:
        raise ExpectFileError(f"{p}: unknown top-level key(s) {', '.join(sorted(extra))}; want [[expect]] tables")
    entries = doc.get("expect", [])
    if not isinstance(entries, list):
        raise ExpectFileError(f"{p}: 'expect' must be an array of tables ([[expect]]), got {type(entries).__name__}")
    out = []
    for i, e in enumerate(entries, 1):
        where = f"{p}: [[expect]] #{i}"
        if not isinstance(e, dict):
            raise ExpectFileError(f"{where}: want a table, got {type(e).__name__}")
        bad = set(e) - _KEYS
        if bad:
            raise ExpectFileError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; allowed: {', '.join(sorted(_KEYS))}")
        for key in ("id", "site", "reason"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise ExpectFileError(f"{where}: '{key}' must be a non-empty string, got {e.get(key)!r}")
        if e["id"] not in known:
            raise ExpectFileError(f"{where}: unknown invariant {e['id']!r}; known: {', '.join(sorted(known))}")
        commit = e.get("commit", "")
        if not isinstance(commit, str):
            raise ExpectFileError(f"{where}: 'commit' must be a string, got {commit!r}")
        out.append(Expectation(e["id"], e["site"], e["reason"].strip(), commit.strip(), origin=str(p)))
    return out


def mark_expected(violations: pd.DataFrame, expectations: Iterable[Expectation]) -> pd.DataFrame:
    """Add ``expected`` (bool) and ``expect_reason`` (string) columns to a violations frame."""
    exp = list(expectations)
    n = len(violations)
    expected = np.zeros(n, bool)
    reason = np.full(n, None, dtype=object)
    if n and exp:
        inv = violations["invariant"].to_numpy(dtype=object)
        site = violations["site"].to_numpy(dtype=object)
        for e in exp:
            m = (inv == e.id) & ~expected
            if e.site != "*":
                m &= site == e.site
            expected |= m
            reason[m] = e.explanation
    return violations.assign(expected=expected, expect_reason=pd.array(reason, dtype="string"))


def unused(expectations: Iterable[Expectation], violations: pd.DataFrame) -> list[Expectation]:
    """Expectations that matched none of the violations."""
    pairs = set(zip(violations["invariant"].astype(str), violations["site"].astype(str), strict=False))
    return [e for e in expectations if not any(e.matches(i, s) for i, s in pairs)]
