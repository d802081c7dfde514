"""Machine profiles: one TOML file per profile in ``qemu-configs/``, loaded into a frozen dataclass.

A profile says what machine QEMU emulates (accelerator, vCPUs, memory, CPU model) and how, not what runs
in it. Bad values are refused with a message of the form ``bad smp: got 0, want 1-64``.

Example (``qemu-configs/tcg-smp2.toml``)::

    description = "TCG, 2 vCPUs, 512 MiB (default)"
    accel = "tcg"          # tcg | kvm | auto
    smp = 2
    memory_mib = 512
    cpu = "qemu64"
    timeout_scale = 1.0    # multiplies every boot/hang timeout
    record_replay = false  # icount record/replay (QEMU refuses it with smp > 1)

A ``kind = "xen-pv"`` profile boots Debian's Xen hypervisor with the kernel as its PV dom0
(``qemu-configs/xen-pv-smp2.toml``): ``smp`` and ``memory_mib`` are the machine Xen runs on, ``dom0_vcpus``
and ``dom0_memory_mib`` what Xen gives dom0, ``xen_package`` / ``xen_version_prefix`` which Debian package
provides the hypervisor (or ``xen_image``: a self-built 32-bit multiboot Xen image), ``xen_cmdline`` extra
hypervisor arguments (see :mod:`tracer.xen`).
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError, UnknownNameError
from .paths import PROFILES_DIR

ACCELS = ("tcg", "kvm", "auto")
KINDS = ("plain", "xen-pv")
#: RAM a xen-pv machine keeps outside dom0, for Xen itself (heap, frame table, per-domain structures).
XEN_RESERVED_MIB = 128
#: The fields that only mean something for ``kind = "xen-pv"``.
XEN_FIELDS = ("xen_package", "xen_version_prefix", "xen_image", "xen_cmdline", "dom0_vcpus", "dom0_memory_mib")


@dataclass(frozen=True)
class MachineProfile:
    """A QEMU machine profile.

    :param name: file stem in ``qemu-configs/``.
    :param accel: ``tcg``, ``kvm`` or ``auto`` (decided by a short probe boot, see :mod:`tracer.accel`).
    :param smp: vCPUs, 1-64.
    :param memory_mib: guest RAM, 128-16384 MiB.
    :param cpu: QEMU ``-cpu`` model.
    :param timeout_scale: multiplies boot and hang timeouts (slow accelerators, loaded hosts).
    :param record_replay: run under ``-icount shift=auto,rr=record`` so the run can be replayed exactly.
    :param kind: ``plain`` (Linux directly) or ``xen-pv`` (Linux as dom0 on Xen).
    :param extra_args: extra QEMU arguments appended verbatim (a list, never a shell string).
    :param xen_package: xen-pv: the Debian package providing the hypervisor, either
        ``xen-hypervisor-<ver>-amd64`` itself or a meta package depending on one (``xen-system-amd64``).
    :param xen_version_prefix: xen-pv: accept only package versions starting with this (``""``: apt's candidate).
    :param xen_image: xen-pv: a local 32-bit multiboot Xen image to boot instead of the package (``""``: none).
    :param xen_cmdline: xen-pv: extra hypervisor arguments, after lazytrace's own (the last one wins in Xen).
    :param dom0_vcpus: xen-pv: dom0's vCPUs (``dom0_max_vcpus``), 1-smp; 0 means ``smp``.
    :param dom0_memory_mib: xen-pv: dom0's memory (``dom0_mem``), at least 128 MiB and
        :data:`XEN_RESERVED_MIB` below ``memory_mib``.
    """

    name: str
    description: str = ""
    accel: str = "tcg"
    smp: int = 2
    memory_mib: int = 512
    cpu: str = "qemu64"
    timeout_scale: float = 1.0
    record_replay: bool = False
    kind: str = "plain"
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    xen_package: str = "xen-system-amd64"
    xen_version_prefix: str = ""
    xen_image: str = ""
    xen_cmdline: tuple[str, ...] = field(default_factory=tuple)
    dom0_vcpus: int = 0
    dom0_memory_mib: int = 512

    def __post_init__(self) -> None:
        _check_choice("accel", self.accel, ACCELS)
        _check_choice("kind", self.kind, KINDS)
        _check_int("smp", self.smp, 1, 64)
        _check_int("memory_mib", self.memory_mib, 128, 16384)
        if not isinstance(self.timeout_scale, (int, float)) or isinstance(self.timeout_scale, bool) \
                or not 0.1 <= self.timeout_scale <= 100:
            raise ConfigError(f"bad timeout_scale: got {self.timeout_scale!r}, want 0.1-100")
        if not isinstance(self.cpu, str) or not self.cpu:
            raise ConfigError(f"bad cpu: got {self.cpu!r}, want a QEMU -cpu model name")
        if not isinstance(self.record_replay, bool):
            raise ConfigError(f"bad record_replay: got {self.record_replay!r}, want true or false")
        if self.record_replay and self.smp != 1:
            raise ConfigError(f"bad smp: got {self.smp}, want 1 with record_replay "
                              "(QEMU: 'Record/replay is not supported with multiple CPUs')")
        if not all(isinstance(a, str) for a in self.extra_args):
            raise ConfigError(f"bad extra_args: got {self.extra_args!r}, want a list of strings")
        self._check_xen()

    def _check_xen(self) -> None:
        if self.kind != "xen-pv":
            defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                        for f in fields(self) if f.name in XEN_FIELDS}
            changed = [n for n in XEN_FIELDS if getattr(self, n) != defaults[n]]
            if changed:
                raise ConfigError(f"bad {changed[0]}: only meaningful with kind = 'xen-pv' (got kind {self.kind!r})")
            return
        for name in ("xen_package", "xen_version_prefix", "xen_image"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"bad {name}: got {getattr(self, name)!r}, want a string")
        if not self.xen_image and not self.xen_package:
            raise ConfigError("bad xen_package: got '', want a Debian package name (or set xen_image)")
        if not all(isinstance(a, str) and a and " " not in a for a in self.xen_cmdline):
            raise ConfigError(f"bad xen_cmdline: got {self.xen_cmdline!r}, want a list of single arguments")
        _check_int("dom0_vcpus", self.dom0_vcpus, 0, self.smp)
        hi = self.memory_mib - XEN_RESERVED_MIB  # Xen keeps the rest
        if hi < 128:
            raise ConfigError(f"bad memory_mib: got {self.memory_mib}, want at least {128 + XEN_RESERVED_MIB} "
                              f"with kind = 'xen-pv' (dom0 128 MiB + Xen {XEN_RESERVED_MIB} MiB)")
        _check_int("dom0_memory_mib", self.dom0_memory_mib, 128, hi)

    @property
    def dom0_vcpu_count(self) -> int:
        """dom0's vCPUs: ``dom0_vcpus``, or every machine CPU when it is 0."""
        return self.dom0_vcpus or self.smp

    @property
    def guest_cpus(self) -> int:
        """CPUs the workload's kernel sees: the machine's, or dom0's under Xen."""
        return self.dom0_vcpu_count if self.kind == "xen-pv" else self.smp

    @classmethod
    def from_toml(cls, path: Path) -> MachineProfile:
        """Load and validate one profile file.

        :raises ConfigError: unreadable TOML, unknown key, or a value out of range (names the file).
        """
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read profile: {exc}") from exc
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        for key in ("extra_args", "xen_cmdline"):
            if key in data:
                if not isinstance(data[key], list):
                    raise ConfigError(f"{path}: bad {key}: got {data[key]!r}, want a list of strings")
                data[key] = tuple(data[key])
        try:
            return cls(name=path.stem, **data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def with_overrides(self, **kw) -> MachineProfile:
        """A copy with some fields changed (validated again)."""
        from dataclasses import replace
        return replace(self, **kw)


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"bad {name}: got {value!r}, want {lo}-{hi}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"bad {name}: got {value!r}, want one of {', '.join(choices)}")


DEFAULT_PROFILE = "tcg-smp2"


def available(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.toml"))


def load_profile(name_or_path: str, directory: Path = PROFILES_DIR) -> MachineProfile:
    """Load a profile by name (``qemu-configs/NAME.toml``) or by path to a TOML file.

    :raises UnknownNameError: no such profile (lists the known ones).
    """
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return MachineProfile.from_toml(p)
    path = Path(directory) / f"{name_or_path}.toml"
    if not path.exists():
        raise UnknownNameError(f"unknown profile {name_or_path!r} (known: {', '.join(available(directory))})")
    return MachineProfile.from_toml(path)
