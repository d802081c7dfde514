"""The plugin config: what tracer.plugin_recorder writes, and what the C plugin accepts or refuses.

The rendering tests need nothing. The loading tests start the real QEMU with the real plugin on a machine with
no guest (``-M none -S``): the plugin parses the config at install time and either refuses it (QEMU exits 1
with the plugin's message) or creates ``events.raw`` and, on SIGTERM, writes its exit statistics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tracer import plugin_build as pb
from tracer import plugin_recorder as pr
from tracer import rawformat as rf
from tracer.errors import ConfigError, ToolMissingError
from tracer.symbols import Symbols

#: Shapes copied from the resolved Debian 6.1 cloud kernel (tracer.symbols.resolve on build-id 3b43fad5).
LOCATIONS = [
    {"loc": 0, "probe": "native_set_pte", "event": "set_pte", "site": "native_set_pte",
     "pc": 0xFFFFFFFF810735D0, "reads": {"ptep": "rdi", "pteval": "rsi"}},
    {"loc": 1, "probe": "native_set_pte", "event": "set_pte", "site": "unmap_page_range",
     "pc": 0xFFFFFFFF812BB289, "reads": {"ptep": "rbx", "pteval": 0}},
    {"loc": 2, "probe": "arch_enter_lazy_mmu_mode", "event": "lazy_enter", "site": "__apply_to_page_range",
     "pc": 0xFFFFFFFF812BF753, "reads": {"mm_slot": "apply_mm"}},
    {"loc": 3, "probe": "arch_leave_lazy_mmu_mode", "event": "lazy_leave", "site": "__apply_to_page_range",
     "pc": 0xFFFFFFFF812BF7AA, "reads": {}},
    {"loc": 4, "probe": "__switch_to", "event": "switch", "site": "__switch_to",
     "pc": 0xFFFFFFFF8102F280, "reads": {"next_task": "rsi"}},
    {"loc": 5, "probe": "sethostname_marker", "event": "marker", "site": "workload-start",
     "pc": 0xFFFFFFFF810B18F0, "reads": {"marker": "rdi", "len": 15}},
    {"loc": 6, "probe": "sethostname_marker", "event": "marker", "site": "workload-end",
     "pc": 0xFFFFFFFF810B18F0, "reads": {"marker": "rdi", "len": 13}},
]
HOOKS = [{"probe": "apply_to_page_range_mm", "site": "__apply_to_page_range", "pc": 0xFFFFFFFF812BF390,
          "reads": {"value": "rdi"}, "slot": "apply_mm", "hook": 0}]
OFFSETS = {"pcpu_preempt_count": 0x1FB40, "pcpu_cpu_number": 0x19160, "pcpu_current_task": 0x1FB80,
           "task_pid": 0x970, "task_comm": 0xBA0, "task_comm_len": 16, "task_mm": 0x8E0, "pt_regs_si": 0x68,
           "pt_regs_di": 0x70, "init_mm": 0xFFFFFFFF82B5A740, "linux_banner": 0xFFFFFFFF8211FFE0,
           "per_cpu_offset": 0xFFFFFFFF8239EB60}


def make_symbols(locations=LOCATIONS, hooks=HOOKS, offsets=OFFSETS) -> Symbols:
    probes = sorted({loc["probe"] for loc in locations})
    return Symbols(build_id="3b43fad5", banner="Linux version test", locations=[dict(x) for x in locations],
                   probes=[{"name": p, "event": None, "required": True, "count": 1} for p in probes],
                   offsets=dict(offsets), hooks=[dict(h) for h in hooks])


def render(tmp_path: Path, syms: Symbols | None = None, **kw) -> str:
    return pr.render_config(syms or make_symbols(), out=tmp_path / "events.raw", stats=tmp_path / "stats.json",
                            **kw)


def test_render_config_lines(tmp_path):
    text = render(tmp_path, arm="boot", flush_ms=50)
    lines = text.splitlines()
    assert lines[0] == "lazytrace-plugin-config 1"
    assert f"out {tmp_path / 'events.raw'}" in lines
    assert "arm boot" in lines and "flush_ms 50" in lines and "irq eflags" in lines
    assert "offset pcpu_preempt_count 0x1fb40" in lines
    assert "offset init_mm 0xffffffff82b5a740" in lines
    assert "loc 0 0xffffffff810735d0 0 ptep=rdi pteval=rsi" in lines
    assert "loc 1 0xffffffff812bb289 0 ptep=rbx pteval=0" in lines
    assert "loc 2 0xffffffff812bf753 1 mm_slot=apply_mm" in lines
    assert "loc 3 0xffffffff812bf7aa 2" in lines
    assert "loc 4 0xffffffff8102f280 7 next_task=rsi" in lines
    assert "loc 5 0xffffffff810b18f0 8 marker=rdi len=15 role=start" in lines
    assert "loc 6 0xffffffff810b18f0 8 marker=rdi len=13 role=end" in lines
    assert "hook 0xffffffff812bf390 apply_mm value=rdi" in lines


def test_only_probes_keeps_markers(tmp_path):
    text = render(tmp_path, only_probes={"__switch_to"})
    locs = [ln for ln in text.splitlines() if ln.startswith("loc ")]
    assert [ln.split()[1] for ln in locs] == ["4", "5", "6"]
    assert "hook " not in text


def test_negative_immediate_is_masked(tmp_path):
    loc = dict(LOCATIONS[1], reads={"ptep": "rbx", "pteval": -1})
    assert pr.loc_directive(loc).endswith("pteval=18446744073709551615")


@pytest.mark.parametrize(
    ("reads", "match"),
    [
        ({"ptep": "rdi", "frobnicate": "rsi"}, "cannot do read"),
        ({"ptep": "(%rdi)"}, "bad ptep read"),
        ({"ptep": 1.5}, "bad ptep read"),
        ({"marker": "rdi"}, "needs a positive 'len'"),
        ({"mm_slot": "not a slot"}, "bad mm_slot"),
    ],
)
def test_unsupported_reads_are_refused(reads, match):
    with pytest.raises(ConfigError, match=match):
        pr.loc_directive(dict(LOCATIONS[0], reads=reads))


def test_bad_modes_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="bad arm"):
        render(tmp_path, arm="later")
    with pytest.raises(ConfigError, match="bad irq"):
        render(tmp_path, irq="pic")
    with pytest.raises(ConfigError, match="xen_vcpu"):
        render(tmp_path, irq="xen")
    with pytest.raises(ConfigError, match="whitespace"):
        pr.render_config(make_symbols(), out=tmp_path / "a b.raw", stats=tmp_path / "s.json")
    with pytest.raises(ConfigError, match="unknown event"):
        pr.loc_directive(dict(LOCATIONS[0], event="page_fault"))


def test_recorder_writes_config_and_locations(tmp_path):
    rec = pr.PluginRecorder(make_symbols(), tmp_path / "run", arm="marker", plugin=tmp_path / "fake.so")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "events.raw").write_bytes(b"stale")
    args = rec.qemu_args()
    assert args[0] == "-plugin"
    assert args[1] == f"{tmp_path / 'fake.so'},cfg={(tmp_path / 'run' / 'plugin.cfg').resolve()}"
    assert (tmp_path / "run" / "plugin.cfg").read_text().startswith("lazytrace-plugin-config 1\n")
    locs = json.loads((tmp_path / "run" / "locations.json").read_text())["locations"]
    assert [x["loc"] for x in locs] == [x["loc"] for x in LOCATIONS]
    assert not (tmp_path / "run" / "events.raw").exists()  # a stale trace never survives into a new run
    assert rec.poll().events == 0


def test_qemu_option_commas_are_escaped(tmp_path):
    d = tmp_path / "a,b"
    rec = pr.PluginRecorder(make_symbols(), d, plugin=tmp_path / "x,y.so")
    assert rec.qemu_args()[1].startswith(f"{tmp_path}/x,,y.so,cfg={tmp_path}/a,,b/")


def test_poll_and_finish_on_a_partial_file(tmp_path):
    """A QEMU killed before the plugin's exit callback: stats come from the file, marked incomplete."""
    rec = pr.PluginRecorder(make_symbols(), tmp_path, plugin=Path(pb.__file__))
    rec.write_config()
    rec.raw_path.write_bytes(rf.MAGIC + bytes(rf.RECORD.size * 3) + b"\x01\x02")
    assert rec.poll().events == 3
    stats = rec.finish()
    assert stats["backend"] == "plugin"
    assert stats["complete"] is False and stats["events_recorded"] == 3 and stats["events_lost"] is None
    assert stats["torn_bytes"] == 2 and "killed" in stats["partial_reason"]


# -- the real plugin in a real QEMU, no guest --------------------------------------------------------------

LOAD_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def plugin_so() -> Path:
    try:
        return pb.ensure_plugin()
    except ToolMissingError as exc:
        if os.environ.get("LAZYTRACE_VM_TESTS") == "1":
            pytest.fail(f"plugin not buildable: {exc.message}")
        pytest.skip(f"plugin not buildable here: {exc.message}")


def qemu_no_guest(so: Path, cfg: Path) -> list[str]:
    return [pb.QEMU_BINARY, "-M", "none", "-display", "none", "-monitor", "none", "-serial", "none", "-S",
            "-plugin", f"{so},cfg={cfg}"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("out /x\n", "first directive must be 'lazytrace-plugin-config 1'"),
        ("lazytrace-plugin-config 2\n", "bad directive: lazytrace-plugin-config 2"),
        ("lazytrace-plugin-config 1\nout /tmp/x.raw\n", "missing 'offset pcpu_preempt_count'"),
        ("lazytrace-plugin-config 1\nloc 1 0x10 99\n", "out of range"),
        ("lazytrace-plugin-config 1\nloc 1 0x10 0 ptep=(%rdi)\n", "bad operand"),
        ("lazytrace-plugin-config 1\nloc 1 0x10 8 marker=rdi role=start\n", "needs len="),
        ("lazytrace-plugin-config 1\narm sometimes\n", "bad directive: arm sometimes"),
    ],
)
def test_plugin_refuses_bad_config(plugin_so, tmp_path, text, message):
    cfg = tmp_path / "plugin.cfg"
    cfg.write_text(text)
    proc = subprocess.run(qemu_no_guest(plugin_so, cfg), capture_output=True, text=True, timeout=LOAD_TIMEOUT_S)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "qemu_plugin_install returned error" in proc.stderr


def test_plugin_loads_and_writes_stats_on_sigterm(plugin_so, tmp_path):
    rec = pr.PluginRecorder(make_symbols(), tmp_path, arm="boot", plugin=plugin_so)
    argv = [pb.QEMU_BINARY, "-M", "none", "-display", "none", "-monitor", "none", "-serial", "none", "-S",
            *rec.qemu_args()]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not rec.raw_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.raw_path.read_bytes() == rf.MAGIC
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=LOAD_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "7 locations and 1 hooks at 7 pcs, arm=boot" in err
    stats = rec.finish()
    assert stats["complete"] is True
    assert stats["plugin_api"]["cur"] >= pb.MIN_PLUGIN_API
    assert stats["events_recorded"] == 0 and stats["events_lost"] == 0 and stats["error"] is None
