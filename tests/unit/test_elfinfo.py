"""Kernel image checks on the real cached kernels (skipped with a reason when they are not fetched)."""

import pytest

from tracer import elfinfo, kernels
from tracer.errors import KernelError


def _kernel(name):
    k = kernels.cached(kernels.load_recipe(name))
    if k is None:
        pytest.skip(f"kernel {name} not fetched (lazytrace kernels fetch {name})")
    return k


def test_pair_matches_and_mismatch_is_refused():
    k = _kernel("debian-6.1-cloud")
    bz, banner = elfinfo.check_pair(k.bzimage, k.vmlinux)
    assert elfinfo.release_of(bz) == k.release == elfinfo.release_of(banner)
    other = kernels.cached(kernels.load_recipe("debian-6.12-cloud"))
    if other is None:
        pytest.skip("second kernel not fetched")
    with pytest.raises(KernelError, match="bzImage and vmlinux are different builds"):
        elfinfo.check_pair(k.bzimage, other.vmlinux)


def test_not_a_bzimage(tmp_path):
    f = tmp_path / "bzImage"
    f.write_bytes(b"\0" * 4096)
    with pytest.raises(KernelError, match="not an x86 bzImage"):
        elfinfo.bzimage_version(f)


def test_not_an_elf(tmp_path):
    f = tmp_path / "vmlinux"
    f.write_bytes(b"garbage" * 100)
    with pytest.raises(KernelError, match="not a readable ELF"):
        elfinfo.build_id(f)
