"""Workloads: what runs in the guest between the two marker syscalls.

A workload is a directory (built-in ones live in ``tracer/workloads/``; ``--workload`` also takes a path)::

    run.sh          required; run by the guest's /init with $LT_ITERATIONS, $LT_CPUS ("0,1"), $LT_WORKLOAD
    workload.toml   optional:
        description = "..."
        iterations = 10                 # default for --iterations
        c_programs = ["mmstress.c"]     # compiled statically with gcc into /usr/local/bin/<stem>
        programs = ["/usr/bin/stress-ng"]  # host binaries copied to /usr/local/bin, shared libraries too (ldd)
        timeout_s = 600                 # default workload timeout (scaled by the profile)
        modules = ["lazyviolate"]       # guest-kernels/modules/NAME, built for the run's kernel (tracer.modules)
                                        # and shipped as /lib/modules/NAME.ko
    files/          optional; copied to the initramfs root as is (files/etc/foo -> /etc/foo)

The workload's exit status is reported in the end sentinel; a non-zero status is a guest fault.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, UnknownNameError
from .paths import WORKLOADS_DIR

DEFAULT_WORKLOAD = "fork-exec"
_KEYS = {"description", "iterations", "c_programs", "programs", "timeout_s", "modules"}


@dataclass(frozen=True)
class Workload:
    name: str
    directory: Path
    description: str = ""
    iterations: int = 10
    c_programs: tuple[str, ...] = ()
    programs: tuple[str, ...] = ()
    timeout_s: float = 600.0
    modules: tuple[str, ...] = ()

    @property
    def script(self) -> Path:
        return self.directory / "run.sh"

    @property
    def files_dir(self) -> Path:
        return self.directory / "files"


def available() -> list[str]:
    return sorted(p.name for p in WORKLOADS_DIR.iterdir() if (p / "run.sh").exists())


def load_workload(name_or_path: str) -> Workload:
    """A built-in workload by name, or a workload directory by path.

    :raises UnknownNameError: neither a built-in name nor a directory with a run.sh.
    :raises ConfigError: bad workload.toml.
    """
    p = Path(name_or_path)
    if ("/" in name_or_path or p.is_dir()) and p.is_dir():
        directory = p.resolve()
    else:
        directory = WORKLOADS_DIR / name_or_path
        if not (directory / "run.sh").exists():
            raise UnknownNameError(f"unknown workload {name_or_path!r} (built-in: {', '.join(available())}; "
                                   "or give a path to a directory with a run.sh)")
    if not (directory / "run.sh").exists():
        raise ConfigError(f"workload {directory}: no run.sh")
    meta: dict = {}
    toml = directory / "workload.toml"
    if toml.exists():
        try:
            meta = tomllib.loads(toml.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{toml}: {exc}") from exc
        unknown = sorted(set(meta) - _KEYS)
        if unknown:
            raise ConfigError(f"{toml}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    it = meta.get("iterations", 10)
    if not isinstance(it, int) or isinstance(it, bool) or not 1 <= it <= 1_000_000:
        raise ConfigError(f"{toml}: bad iterations: got {it!r}, want 1-1000000")
    for key in ("c_programs", "programs", "modules"):
        v = meta.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{toml}: bad {key}: got {v!r}, want a list of strings")
    for c in meta.get("c_programs", []):
        if not (directory / c).exists():
            raise ConfigError(f"{toml}: c_programs: {directory / c} does not exist")
    for prog in meta.get("programs", []):
        if not Path(prog).exists():
            raise ConfigError(f"{toml}: programs: {prog} does not exist on this host")
    if meta.get("modules"):
        from .modules import module_dir
        for name in meta["modules"]:
            try:
                module_dir(name)
            except UnknownNameError as exc:
                raise ConfigError(f"{toml}: modules: {exc}") from exc
    timeout = meta.get("timeout_s", 600.0)
    if not isinstance(timeout, (int, float)) or not 1 <= timeout <= 86400:
        raise ConfigError(f"{toml}: bad timeout_s: got {timeout!r}, want 1-86400")
    return Workload(
        name=directory.name, directory=directory, description=meta.get("description", ""), iterations=it,
        c_programs=tuple(meta.get("c_programs", [])), programs=tuple(meta.get("programs", [])),
        timeout_s=float(timeout), modules=tuple(meta.get("modules", [])),
    )
