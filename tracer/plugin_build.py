"""Build the lazytrace TCG plugin (``tracer/plugin/lazytrace.c``) against the installed QEMU.

The plugin reads registers and guest memory from an instruction callback, which needs QEMU's plugin API
version 4 (``qemu_plugin_read_register`` since v2, ``qemu_plugin_read_memory_vaddr`` since v4, QEMU 10.0).
Debian 12's own QEMU 7.2 has neither, and Debian ships no ``qemu-plugin.h`` in any binary package, so:

1. :func:`qemu_version` asks the installed ``qemu-system-x86_64`` for its version;
2. :func:`ensure_header` takes ``include/qemu/qemu-plugin.h`` from QEMU's Debian *source* package for exactly
   the installed version (``apt-get source --download-only qemu=<version>``; only the orig tarball is
   needed: its ``.dsc`` has answered 404 on this machine while the tarball came down), checks the tarball
   against the checksum apt publishes, and caches the header under
   ``cache_dir()/qemu-plugin/<qemu-version>/qemu-plugin.h``;
3. :func:`ensure_plugin` compiles the plugin with gcc and glib's cflags into
   ``cache_dir()/plugin/<qemu-version>/lazytrace-<hash>.so``, keyed by the source, header and flags, so a
   changed source rebuilds and an unchanged one never does.

:func:`plugin_supported` says whether all of that can work here, and :func:`select_backend` picks the
recorder: the plugin where the QEMU supports it, else gdb (the CLI's ``--backend`` default).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .errors import ConfigError, ToolMissingError

log = logging.getLogger(__name__)

PLUGIN_SOURCE = Path(__file__).resolve().parent / "plugin" / "lazytrace.c"
QEMU_BINARY = "qemu-system-x86_64"
#: The Debian binary package whose source package carries the plugin header.
QEMU_DEB_PACKAGE = "qemu-system-x86"

#: First plugin API that reads registers and guest memory from a callback.
MIN_PLUGIN_API = 4
#: First QEMU release with plugin API 4.
MIN_QEMU = (10, 0)

#: Timeouts (s) for the host tools this module runs.
QEMU_VERSION_TIMEOUT_S = 15.0
APT_TIMEOUT_S = 300.0
GCC_TIMEOUT_S = 120.0
TOOL_QUERY_TIMEOUT_S = 30.0

CFLAGS = ("-O2", "-g", "-Wall", "-Wextra", "-fPIC", "-shared", "-fvisibility=hidden", "-std=gnu11")
HEADER_MEMBER_SUFFIX = "/include/qemu/qemu-plugin.h"

_FIX_OLD_QEMU = (
    "install QEMU >= 10.0: on Debian 12 add 'deb http://deb.debian.org/debian bookworm-backports main' "
    "(and its deb-src line) to apt's sources and run "
    "'apt-get install -t bookworm-backports qemu-system-x86'; Debian 13 ships QEMU 10"
)


@dataclass(frozen=True)
class QemuVersion:
    """The installed QEMU, as ``qemu-system-x86_64 --version`` reports it.

    :ivar release: upstream release, e.g. ``(10, 0, 2)``.
    :ivar text: the first line of ``--version``.
    :ivar package: the Debian package version in parentheses, e.g. ``1:10.0.2+ds-2+deb13u1~bpo12+1``
        ("" for a QEMU not built by Debian).
    """

    release: tuple[int, ...]
    text: str
    package: str

    @property
    def release_str(self) -> str:
        return ".".join(map(str, self.release))

    @property
    def cache_key(self) -> str:
        """Directory name for per-version caches (the package version where there is one)."""
        key = self.package or self.release_str
        return re.sub(r"[^A-Za-z0-9.+_-]", "_", key)


def parse_qemu_version(text: str) -> QemuVersion:
    """Parse ``qemu-system-x86_64 --version`` output.

    >>> parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)").release
    (10, 0, 2)

    :raises ConfigError: no version in the text.
    """
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = re.search(r"version\s+(\d+)\.(\d+)(?:\.(\d+))?", first)
    if not m:
        raise ConfigError(f"cannot parse the QEMU version from {first!r}")
    release = tuple(int(x) for x in m.groups() if x is not None)
    pkg = re.search(r"\(Debian ([^)\s]+)\)", first)
    return QemuVersion(release=release, text=first, package=pkg.group(1) if pkg else "")


def qemu_version(qemu: str = QEMU_BINARY) -> QemuVersion:
    """Ask the installed QEMU for its version.

    :raises ToolMissingError: QEMU is not installed or does not answer.
    """
    exe = shutil.which(qemu)
    if exe is None:
        raise ToolMissingError(f"{qemu} not found: apt-get install qemu-system-x86")
    argv = [exe, "--version"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_VERSION_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolMissingError(f"{qemu} --version failed: {exc}", argv=argv) from exc
    if proc.returncode != 0:
        raise ToolMissingError(f"{qemu} --version failed", argv=argv, returncode=proc.returncode,
                               log_tail=proc.stderr[-2000:])
    try:
        return parse_qemu_version(proc.stdout)
    except ConfigError as exc:
        raise ToolMissingError(str(exc), argv=argv) from exc


def plugin_api_of_header(text: str) -> int:
    """``QEMU_PLUGIN_VERSION`` declared by a ``qemu-plugin.h`` (0 if absent)."""
    m = re.search(r"^#define\s+QEMU_PLUGIN_VERSION\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def check_qemu(ver: QemuVersion) -> None:
    """:raises ToolMissingError: this QEMU's plugin API cannot read registers and memory."""
    if ver.release[:2] < MIN_QEMU:
        raise ToolMissingError(
            f"QEMU {ver.release_str} ({ver.text}) is too old for the lazytrace plugin: its plugin API "
            f"cannot read registers and guest memory (needs API {MIN_PLUGIN_API}, QEMU >= "
            f"{'.'.join(map(str, MIN_QEMU))}); use --backend gdb, or {_FIX_OLD_QEMU}")


# -- the header --------------------------------------------------------------------------------------------


def header_path(ver: QemuVersion) -> Path:
    return paths.cache_dir() / "qemu-plugin" / ver.cache_key / "qemu-plugin.h"


def _run(argv: list[str], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              stdin=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    except FileNotFoundError as exc:
        raise ToolMissingError(f"{argv[0]} not found", argv=argv) from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolMissingError(f"{argv[0]} timed out after {timeout:.0f} s", argv=argv,
                               log_tail=_tail(exc.stderr)) from exc


def _tail(text: str | bytes | None, n: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-n:])


def source_version(ver: QemuVersion) -> str:
    """The Debian source version of the installed QEMU package (falls back to ``ver.package``)."""
    if shutil.which("dpkg-query"):
        proc = _run(["dpkg-query", "-W", "-f", "${source:Version}", QEMU_DEB_PACKAGE],
                    timeout=TOOL_QUERY_TIMEOUT_S)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    if ver.package:
        return ver.package
    raise ToolMissingError(f"QEMU {ver.text} is not a Debian package: put its include/qemu/qemu-plugin.h "
                           f"at {header_path(ver)} by hand")


def parse_showsrc(text: str) -> dict[str, dict[str, str]]:
    """``apt-cache showsrc`` output -> ``{source version: {file name: sha256}}``."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    in_sha256 = False
    for line in text.splitlines():
        if line.startswith("Version:"):
            current = out.setdefault(line.split(":", 1)[1].strip(), {})
        if line and not line[0].isspace():
            in_sha256 = line.startswith("Checksums-Sha256:")
            continue
        m = re.match(r"^\s+([0-9a-f]{64})\s+\d+\s+(\S+)$", line)
        if m and in_sha256 and current is not None:
            current[m.group(2)] = m.group(1)
    return out


def source_versions() -> dict[str, dict[str, str]]:
    """The ``qemu`` source package versions apt knows (needs a deb-src entry), with their files' sha256."""
    proc = _run(["apt-cache", "showsrc", "qemu"], timeout=TOOL_QUERY_TIMEOUT_S)  # no "=version" form
    return parse_showsrc(proc.stdout) if proc.returncode == 0 else {}


def upstream_of(src_version: str) -> str:
    """``1:10.0.2+ds-2+deb13u1~bpo12+1`` -> ``10.0.2+ds`` (what names the orig tarball)."""
    return src_version.split(":", 1)[-1].rsplit("-", 1)[0]


def pick_source_version(src_version: str, known: dict[str, dict[str, str]]) -> str | None:
    """The installed version if apt has its source, else one with the same upstream tarball (its header is
    the same file: Debian revisions change packaging, not QEMU's tree), else None."""
    if src_version in known:
        return src_version
    same = sorted(v for v in known if upstream_of(v) == upstream_of(src_version))
    return same[-1] if same else None


def orig_checksums(src_version: str) -> dict[str, str]:
    """``{file name: sha256}`` of the ``qemu`` source package files apt knows for ``src_version``."""
    known = source_versions()
    picked = pick_source_version(src_version, known)
    return known[picked] if picked else {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_header(tarball: Path, dest: Path) -> Path:
    """Copy ``<top>/include/qemu/qemu-plugin.h`` out of a QEMU source tarball to ``dest`` (atomically).

    :raises ToolMissingError: the tarball has no such member, or its header has plugin API < 4.
    """
    with tarfile.open(tarball) as tar:
        member = None
        for m in tar:  # streams: stops at the header, no need to list 40 MB of xz first
            if m.name.endswith(HEADER_MEMBER_SUFFIX) and m.name.count("/") == 3 and m.isfile():
                member = m
                break
        if member is None:
            raise ToolMissingError(f"{tarball.name} has no include/qemu/qemu-plugin.h")
        f = tar.extractfile(member)
        assert f is not None
        text = f.read().decode()
    api = plugin_api_of_header(text)
    if api < MIN_PLUGIN_API:
        raise ToolMissingError(f"{tarball.name}: qemu-plugin.h declares plugin API {api}, lazytrace needs "
                               f"{MIN_PLUGIN_API}; {_FIX_OLD_QEMU}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".h.tmp")
    tmp.write_text(text)
    tmp.replace(dest)
    return dest


def fetch_header(ver: QemuVersion, dest: Path) -> Path:
    """Download QEMU's Debian source tarball for ``ver`` with apt and extract the plugin header.

    ``apt-get source --download-only`` fails as a whole when any one file 404s (the ``.dsc`` has, here),
    so its exit status is not trusted: what counts is whether the orig tarball arrived and matches apt's
    checksum.

    :raises ToolMissingError: no deb-src entry, no tarball, a checksum mismatch, or no header inside.
    """
    installed = source_version(ver)
    known = source_versions()
    src_version = pick_source_version(installed, known)
    if src_version is None:
        raise ToolMissingError(
            f"apt knows no source package for QEMU {installed} (known: {', '.join(sorted(known)) or 'none'}): add "
            "the deb-src line matching where QEMU came from (e.g. 'deb-src http://deb.debian.org/debian "
            "bookworm-backports main') and run apt-get update")
    if src_version != installed:
        log.info("QEMU %s's source is not in apt; using %s (same upstream tarball)", installed, src_version)
    want = f"qemu_{upstream_of(src_version)}.orig.tar.xz"
    sums = known[src_version]
    with tempfile.TemporaryDirectory(prefix="lazytrace-qemu-src-") as tmp:
        argv = ["apt-get", "source", "--download-only", "-q", f"qemu={src_version}"]
        log.info("fetching QEMU %s's source tarball for qemu-plugin.h (apt-get source, ~40 MB)", src_version)
        proc = _run(argv, timeout=APT_TIMEOUT_S, cwd=Path(tmp))
        tarballs = sorted(Path(tmp).glob("qemu_*.orig.tar.*"))
        if not tarballs:
            hint = ""
            if "You must put some 'deb-src' URIs" in proc.stderr or "Unable to find a source package" in proc.stderr:
                hint = (" (no deb-src entry for this QEMU: add 'deb-src http://deb.debian.org/debian "
                        "bookworm-backports main' to apt's sources and run apt-get update)")
            raise ToolMissingError(f"could not download QEMU {src_version}'s source tarball{hint}", argv=argv,
                                   returncode=proc.returncode, log_tail=_tail(proc.stdout + proc.stderr))
        tarball = tarballs[0]
        if proc.returncode != 0:
            log.info("apt-get source exited %d but the orig tarball arrived (%s)", proc.returncode,
                     _tail(proc.stderr, 3))
        expect = sums.get(tarball.name) or sums.get(want)
        if expect:
            got = _sha256(tarball)
            if got != expect:
                raise ToolMissingError(f"{tarball.name}: sha256 {got} does not match apt's {expect}", argv=argv)
        else:
            log.warning("no published checksum for %s: using it unchecked", tarball.name)
        return extract_header(tarball, dest)


def ensure_header(ver: QemuVersion | None = None) -> Path:
    """The cached ``qemu-plugin.h`` for the installed QEMU, fetching it on first use.

    ``$LAZYTRACE_QEMU_PLUGIN_H`` overrides the lookup (a header you obtained another way).
    """
    override = os.environ.get("LAZYTRACE_QEMU_PLUGIN_H")
    if override:
        p = Path(override)
        if not p.is_file():
            raise ToolMissingError(f"LAZYTRACE_QEMU_PLUGIN_H={override}: no such file")
        return p
    ver = ver or qemu_version()
    dest = header_path(ver)
    if dest.is_file() and plugin_api_of_header(dest.read_text()) >= MIN_PLUGIN_API:
        return dest
    return fetch_header(ver, dest)


# -- the build ---------------------------------------------------------------------------------------------


def glib_cflags() -> list[str]:
    """``pkg-config --cflags glib-2.0``.

    :raises ToolMissingError: pkg-config or glib's development files are missing.
    """
    argv = ["pkg-config", "--cflags", "glib-2.0"]
    proc = _run(argv, timeout=TOOL_QUERY_TIMEOUT_S)
    if proc.returncode != 0:
        raise ToolMissingError("glib's development files are missing: apt-get install libglib2.0-dev pkg-config",
                               argv=argv, returncode=proc.returncode, log_tail=proc.stderr)
    return proc.stdout.split()


def build_key(source: bytes, header: bytes, flags: list[str]) -> str:
    """Hash of everything that makes one plugin build differ from another."""
    h = hashlib.sha256()
    for part in (source, header, " ".join(flags).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def plugin_path(ver: QemuVersion, key: str) -> Path:
    return paths.cache_dir() / "plugin" / ver.cache_key / f"lazytrace-{key}.so"


def compile_plugin(source: Path, header: Path, out: Path, extra_flags: list[str]) -> Path:
    """Compile ``source`` into ``out`` (atomically: a half-built .so never appears at ``out``).

    :raises ToolMissingError: gcc is missing or the compile failed (gcc's messages in ``log_tail``).
    """
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise ToolMissingError("gcc not found: apt-get install gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    argv = [gcc, *CFLAGS, *extra_flags, f"-I{header.parent}", "-o", str(tmp), str(source), "-lpthread"]
    proc = _run(argv, timeout=GCC_TIMEOUT_S)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ToolMissingError(f"building the lazytrace plugin failed (gcc exit {proc.returncode})", argv=argv,
                               returncode=proc.returncode, log_tail=_tail(proc.stderr, 30))
    tmp.replace(out)
    return out


def ensure_plugin(qemu: str = QEMU_BINARY, *, force: bool = False) -> Path:
    """Build the plugin for the installed QEMU if needed (idempotent) and return the ``.so`` path.

    :param force: rebuild even if a build with the same key exists.
    :raises ToolMissingError: QEMU too old or missing, header not obtainable, no gcc/glib, or gcc failed.
    """
    ver = qemu_version(qemu)
    check_qemu(ver)
    header = ensure_header(ver)
    flags = glib_cflags()
    source = PLUGIN_SOURCE.read_bytes()
    key = build_key(source, header.read_bytes(), [*CFLAGS, *flags])
    out = plugin_path(ver, key)
    if out.is_file() and not force:
        return out
    log.info("building the lazytrace plugin for QEMU %s -> %s", ver.release_str, out)
    return compile_plugin(PLUGIN_SOURCE, header, out, flags)


def plugin_supported(qemu: str = QEMU_BINARY) -> tuple[bool, str]:
    """Whether the plugin backend can work here, and why (the reason names the fix when it cannot).

    Cheap: checks the QEMU version and the build tools, and whether the header is cached or fetchable
    (a deb-src entry exists); it does not download or compile (that is :func:`ensure_plugin`).
    """
    try:
        ver = qemu_version(qemu)
        check_qemu(ver)
    except ToolMissingError as exc:
        return False, exc.message
    missing = [t for t in ("gcc", "pkg-config") if shutil.which(t) is None and not (t == "gcc" and shutil.which("cc"))]
    if missing:
        return False, f"missing build tools: {', '.join(missing)} (apt-get install gcc pkg-config libglib2.0-dev)"
    try:
        glib_cflags()
    except ToolMissingError as exc:
        return False, exc.message
    if not (os.environ.get("LAZYTRACE_QEMU_PLUGIN_H") or header_path(ver).is_file()):
        if shutil.which("apt-get") is None or shutil.which("apt-cache") is None:
            return False, f"no cached qemu-plugin.h for QEMU {ver.release_str} and no apt-get to fetch it"
        try:
            src = source_version(ver)
        except ToolMissingError as exc:
            return False, exc.message
        if not orig_checksums(src):
            return False, (f"no cached qemu-plugin.h for QEMU {ver.release_str} and apt knows no source package "
                           f"qemu {src}: add the matching deb-src line (e.g. 'deb-src http://deb.debian.org/debian "
                           "bookworm-backports main') and run apt-get update")
    return True, f"QEMU {ver.release_str} (plugin API >= {MIN_PLUGIN_API})"


@dataclass(frozen=True)
class BackendChoice:
    """Which recorder records a run, and why (the report says it)."""

    backend: str
    reason: str


def select_backend(requested: str | None = None, qemu: str = QEMU_BINARY) -> BackendChoice:
    """Pick the recorder: ``requested`` if given, else the plugin where supported, else gdb.

    :raises ConfigError: ``requested`` is neither ``plugin`` nor ``gdb``.
    :raises ToolMissingError: ``requested == "plugin"`` but this QEMU cannot run it (the message names the fix).
    """
    if requested not in (None, "plugin", "gdb"):
        raise ConfigError(f"bad backend: got {requested!r}, want plugin or gdb")
    if requested == "gdb":
        return BackendChoice("gdb", "requested with --backend gdb")
    ok, why = plugin_supported(qemu)
    if requested == "plugin":
        if not ok:
            raise ToolMissingError(f"--backend plugin is not available: {why}")
        return BackendChoice("plugin", f"requested with --backend plugin; {why}")
    if ok:
        return BackendChoice("plugin", f"default: {why}")
    log.warning("TCG plugin backend unavailable (%s): falling back to the gdb backend", why)
    return BackendChoice("gdb", f"fallback: plugin unavailable: {why}")


def main() -> int:
    """``python -m tracer.plugin_build``: build (or find cached) the plugin for the installed QEMU (set-up step)."""
    ok, why = plugin_supported()
    if not ok:
        print(f"TCG plugin not supported: {why}")
        return 1
    try:
        so = ensure_plugin()
    except ToolMissingError as exc:
        print(f"TCG plugin not built: {exc}")
        return 1
    print(f"TCG plugin: {so} ({why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
