"""Where lazytrace keeps things: the project tree, the download cache, run directories."""

from __future__ import annotations

import os
import time
from pathlib import Path

#: The project checkout (tracer/ lives directly under it).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
KERNEL_RECIPES_DIR = PROJECT_ROOT / "guest-kernels"
PROFILES_DIR = PROJECT_ROOT / "qemu-configs"
WORKLOADS_DIR = Path(__file__).resolve().parent / "workloads"


def cache_dir() -> Path:
    """``$LAZYTRACE_CACHE``, else ``$XDG_CACHE_HOME/lazytrace``, else ``~/.cache/lazytrace``."""
    env = os.environ.get("LAZYTRACE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lazytrace"


def runs_dir() -> Path:
    return Path(os.environ.get("LAZYTRACE_RUNS", PROJECT_ROOT / "runs"))


def new_run_dir(prefix: str = "run") -> Path:
    """A new, empty, timestamped directory under :func:`runs_dir`."""
    base = runs_dir()
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = base / (f"{prefix}-{stamp}" + (f"-{i}" if i else ""))
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError("could not create a run directory")
