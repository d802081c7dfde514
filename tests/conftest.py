"""Test tiers: unit (no VM) always run; ``vm`` tests boot real QEMU guests.

LAZYTRACE_VM_TESTS (drgn's rule): unset -> run vm tests if QEMU and the default kernel are present, else skip
with the reason; "1" -> run them, and fail (never skip) if something is missing; "0" -> skip them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
TEST_WORKLOADS = TESTS_DIR / "workloads"


def _vm_prereqs() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (run `make setup`)"
    from tracer import kernels
    try:
        if kernels.cached(kernels.load_recipe(kernels.DEFAULT_KERNEL)) is None:
            return f"kernel {kernels.DEFAULT_KERNEL} not fetched (run `lazytrace kernels fetch`)"
    except Exception as exc:
        return f"kernel recipe problem: {exc}"
    return None


def pytest_collection_modifyitems(config, items):
    mode = os.environ.get("LAZYTRACE_VM_TESTS")
    if mode == "1":
        return
    reason = "LAZYTRACE_VM_TESTS=0" if mode == "0" else _vm_prereqs()
    if reason:
        skip = pytest.mark.skip(reason=f"vm test skipped: {reason}")
        for item in items:
            if "vm" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d
