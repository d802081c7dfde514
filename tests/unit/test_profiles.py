from pathlib import Path

import pytest

from tracer import profiles
from tracer.errors import ConfigError, UnknownNameError


def test_all_shipped_profiles_load():
    names = profiles.available()
    assert {"tcg-smp2", "tcg-smp4", "tcg-up", "kvm-smp2"} <= set(names)
    for n in names:
        p = profiles.load_profile(n)
        assert p.name == n and 1 <= p.smp <= 64


def test_default_profile_values():
    p = profiles.load_profile(profiles.DEFAULT_PROFILE)
    assert (p.accel, p.smp, p.memory_mib) == ("tcg", 2, 512)


@pytest.mark.parametrize("body, message", [
    ("smp = 0", "bad smp: got 0, want 1-64"),
    ("smp = 65", "bad smp: got 65, want 1-64"),
    ('smp = "2"', "bad smp: got '2', want 1-64"),
    ("memory_mib = 64", "bad memory_mib: got 64, want 128-16384"),
    ('accel = "hvf"', "bad accel: got 'hvf', want one of tcg, kvm, auto"),
    ("smp = 2\nrecord_replay = true", "bad smp: got 2, want 1 with record_replay"),
    ("smpp = 2", "unknown key 'smpp'"),
    ("smp = [", "cannot read profile"),
    ('extra_args = "-foo"', "bad extra_args"),
])
def test_bad_values_are_refused_specifically(tmp_path: Path, body: str, message: str):
    f = tmp_path / "bad.toml"
    f.write_text(body + "\n")
    with pytest.raises(ConfigError) as ei:
        profiles.load_profile(str(f))
    assert message in str(ei.value)
    assert str(f) in str(ei.value)


def test_unknown_profile_lists_known():
    with pytest.raises(UnknownNameError, match="unknown profile 'nope' .*tcg-smp2"):
        profiles.load_profile("nope")
