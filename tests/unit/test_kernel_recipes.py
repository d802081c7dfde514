from pathlib import Path

import pytest

from tracer import kernels
from tracer.errors import ConfigError, KernelError, UnknownNameError


def test_shipped_recipes_load():
    names = kernels.available()
    assert {"debian-cloud", "debian-6.1-cloud", "debian-6.12-cloud"} <= set(names)
    for n in names:
        r = kernels.load_recipe(n)
        assert "{abi}" in r.image_package and "{abi}" in r.dbg_package
        assert "preempt=full" in r.cmdline


def test_unknown_kernel_lists_known():
    with pytest.raises(UnknownNameError, match="unknown kernel 'linux-99' .*debian-cloud"):
        kernels.load_recipe("linux-99")


@pytest.mark.parametrize("body, message", [
    ('image_package = "linux-image-6.1.0-56-cloud-amd64-unsigned"', "want a name containing '{abi}'"),
    ("meta_packages = []", "bad meta_packages"),
    ('cmdline = "preempt=full"', "bad cmdline"),
    ('flavour = "cloud"', "unknown key 'flavour'"),
])
def test_bad_recipes_are_refused(tmp_path: Path, body: str, message: str):
    (tmp_path / "bad.toml").write_text(body + "\n")
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        kernels.load_recipe("bad", directory=tmp_path)


def test_not_fetched_kernel_is_a_specific_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYTRACE_CACHE", str(tmp_path))
    with pytest.raises(KernelError, match="not fetched: run `lazytrace kernels fetch debian-6.12-cloud`"):
        kernels.get_kernel("debian-6.12-cloud", fetch_missing=False)
