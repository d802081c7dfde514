"""Build the guest's initramfs: busybox-static, lazytrace's /init and one workload, as a newc cpio (gzip).

The archive is written directly (no host ``cpio``, no root-owned staging tree): every entry is owned by root
and ``/dev/console`` exists before devtmpfs is mounted, which the kernel needs to give /init a console.
Archives are cached by a hash of everything that goes in, so repeated runs reuse them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, ToolMissingError
from .paths import cache_dir
from .workloads import Workload

log = logging.getLogger(__name__)

INIT_SCRIPT = Path(__file__).resolve().parent / "guest" / "init"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
GCC_TIMEOUT_S = 120


@dataclass
class CpioWriter:
    """Minimal SVR4 "newc" cpio writer (the format the kernel unpacks: Documentation/driver-api/early-userspace)."""

    out: io.BufferedIOBase
    _ino: int = 1
    _dirs: set = field(default_factory=set)

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.encode() + b"\x00"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self._ino += 1
        self.out.write(hdr.encode() + name_b)
        self.out.write(b"\x00" * (-(110 + len(name_b)) % 4))
        self.out.write(data)
        self.out.write(b"\x00" * (-len(data) % 4))

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        if "/" in path:
            self.mkdir(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        if "/" in path:
            self.mkdir(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(path.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def find_busybox() -> Path:
    for c in BUSYBOX_CANDIDATES:
        p = Path(c)
        if p.exists():
            out = subprocess.run(["file", "-L", str(p)], capture_output=True, text=True).stdout \
                if shutil.which("file") else "statically linked"
            if "dynamically linked" in out:
                continue
            return p
    raise ToolMissingError("busybox-static is not installed (apt-get install busybox-static)")


def busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    # `busybox --list` names busybox itself: linking /bin/busybox to itself would loop.
    return [a for a in out.split() if a and a != "busybox"]


def _compile_c(src: Path, out_dir: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ToolMissingError(f"gcc is needed to build {src.name} for the guest (apt-get install gcc libc6-dev)")
    out = out_dir / src.stem
    argv = [gcc, "-O2", "-static", "-Wall", "-o", str(out), str(src)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=GCC_TIMEOUT_S)
    if proc.returncode != 0:
        raise ConfigError(f"cannot compile workload program {src}", argv=argv, returncode=proc.returncode,
                          log_tail=proc.stderr[-2000:])
    return out


def shared_libraries(program: Path) -> list[Path]:
    """The shared libraries (and ELF interpreter) a dynamically linked program needs, from ``ldd``."""
    proc = subprocess.run(["ldd", str(program)], capture_output=True, text=True)
    if proc.returncode != 0 or "not a dynamic executable" in (proc.stdout + proc.stderr):
        return []
    libs = []
    for line in proc.stdout.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
        if "not found" in line:
            raise ConfigError(f"{program}: ldd cannot find {line.split()[0]}")
    return libs


def _hash_inputs(workload: Workload, busybox: Path) -> str:
    h = hashlib.sha256()
    h.update(INIT_SCRIPT.read_bytes())
    h.update(Path(__file__).read_bytes())
    st = busybox.stat()
    h.update(f"{busybox}:{st.st_size}:{st.st_mtime_ns}".encode())
    for p in sorted(workload.directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(workload.directory)).encode())
            h.update(p.read_bytes())
    for prog in workload.programs:
        st = Path(prog).stat()
        h.update(f"{prog}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_initramfs(workload: Workload, extra_files: dict[str, bytes] | None = None) -> Path:
    """Build (or reuse from the cache) the initramfs for a workload.

    :param extra_files: guest path -> contents, added after the workload (e.g. a kernel module).
    :returns: path of the gzip'd cpio archive.
    """
    busybox = find_busybox()
    key = _hash_inputs(workload, busybox)
    if extra_files:
        key += "-" + hashlib.sha256(b"".join(k.encode() + v for k, v in sorted(extra_files.items()))).hexdigest()[:8]
    out_dir = cache_dir() / "initramfs"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{workload.name}-{key}.cpio.gz"
    if out.exists():
        return out
    buf = io.BytesIO()
    w = CpioWriter(buf)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "dev", "proc", "sys", "tmp", "root",
              "etc", "workload", "lib", "lib64"):
        w.mkdir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        w.symlink(f"bin/{applet}", "busybox")
    w.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    w.file("etc/hostname", b"lazytrace\n")
    for p in sorted(workload.directory.iterdir()):
        if p.is_file() and not p.name.endswith(".c"):
            w.file(f"workload/{p.name}", p.read_bytes(), 0o755 if p.suffix == ".sh" else 0o644)
    if workload.files_dir.is_dir():
        for p in sorted(workload.files_dir.rglob("*")):
            rel = p.relative_to(workload.files_dir).as_posix()
            if p.is_dir():
                w.mkdir(rel)
            elif p.is_file():
                w.file(rel, p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    with tempfile.TemporaryDirectory() as tmp:
        for c in workload.c_programs:
            exe = _compile_c(workload.directory / c, Path(tmp))
            w.file(f"usr/local/bin/{exe.name}", exe.read_bytes(), 0o755)
    seen: set[str] = set()
    for prog in workload.programs:
        w.file(f"usr/local/bin/{Path(prog).name}", Path(prog).read_bytes(), 0o755)
        for lib in shared_libraries(Path(prog)):
            if str(lib) not in seen:
                seen.add(str(lib))
                w.file(str(lib), lib.resolve().read_bytes(), 0o755)
    for path, data in (extra_files or {}).items():
        w.file(path, data, 0o644)
    w.close()
    tmp_out = out.with_suffix(f".tmp{os.getpid()}")
    with gzip.open(tmp_out, "wb", compresslevel=6) as f:
        f.write(buf.getvalue())
    tmp_out.replace(out)
    log.info("built initramfs %s (%d KiB)", out, out.stat().st_size // 1024)
    return out
