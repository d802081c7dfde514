import gzip
import io
import subprocess
from pathlib import Path

import pytest

from tracer import initramfs, workloads
from tracer.errors import ConfigError, UnknownNameError


def test_builtin_workloads():
    assert {"fork-exec", "mm-syscalls", "idle"} <= set(workloads.available())
    w = workloads.load_workload("mm-syscalls")
    assert w.c_programs == ("mmstress.c",)


def test_unknown_workload():
    with pytest.raises(UnknownNameError, match="unknown workload 'nope'"):
        workloads.load_workload("nope")


def test_bad_workload_toml(tmp_path: Path):
    (tmp_path / "run.sh").write_text("true\n")
    (tmp_path / "workload.toml").write_text("iterations = 0\n")
    with pytest.raises(ConfigError, match="bad iterations: got 0"):
        workloads.load_workload(str(tmp_path))


def test_user_workload_with_dynamic_program(tmp_path: Path, monkeypatch):
    """A user workload that brings a dynamically linked host program gets its shared libraries."""
    monkeypatch.setenv("LAZYTRACE_CACHE", str(tmp_path / "cache"))
    wl = tmp_path / "mywl"
    wl.mkdir()
    (wl / "run.sh").write_text("/usr/local/bin/true\n")
    (wl / "workload.toml").write_text('programs = ["/usr/bin/true"]\n')
    (wl / "files" / "etc").mkdir(parents=True)
    (wl / "files" / "etc" / "motd").write_text("hi\n")
    img = initramfs.build_initramfs(workloads.load_workload(str(wl)))
    names = _cpio_names(img)
    assert "usr/local/bin/true" in names and "etc/motd" in names and "init" in names
    libs = [str(p).lstrip("/") for p in initramfs.shared_libraries(Path("/usr/bin/true"))]
    assert libs and all(lib in names for lib in libs)
    # Rebuilding the same inputs reuses the cached archive.
    assert initramfs.build_initramfs(workloads.load_workload(str(wl))) == img


def _cpio_names(img: Path) -> set[str]:
    """List the archive with busybox's own cpio: an independent reader of the newc format."""
    data = gzip.decompress(img.read_bytes())
    out = subprocess.run(["busybox", "cpio", "-t"], input=data, capture_output=True, check=True).stdout
    return set(out.decode().split())


def test_cpio_writer_roundtrip():
    buf = io.BytesIO()
    w = initramfs.CpioWriter(buf)
    w.file("a/b/c.txt", b"hello")
    w.symlink("a/link", "b/c.txt")
    w.close()
    out = subprocess.run(["busybox", "cpio", "-t"], input=buf.getvalue(), capture_output=True, check=True)
    assert out.stdout.decode().split() == ["a", "a/b", "a/b/c.txt", "a/link"]
