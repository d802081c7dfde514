"""GdbSession against a real gdb (no guest): MI round trips, errors with evidence, shutdown in every state."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tracer.errors import GdbError
from tracer.gdb_session import GdbSession, GdbState, mi_quote

pytestmark = pytest.mark.skipif(not (shutil.which("gdb") and shutil.which("gcc")),
                                reason="needs gdb and gcc (apt-get install gdb gcc)")

# Spins until SIGALRM: GdbSession.shutdown detaches (as from a guest, which must run on), so the program
# ends by itself rather than outliving the test.
LOOP_C = """
#include <unistd.h>
volatile long counter;
int main(void) { alarm(10); for (;;) { counter++; if ((counter & 0xfffff) == 0) usleep(1000); } }
"""


@pytest.fixture(scope="module")
def loop_exe(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("loop")
    (d / "loop.c").write_text(LOOP_C)
    subprocess.run(["gcc", "-g", "-O0", "-o", str(d / "loop"), str(d / "loop.c")], check=True)
    return d / "loop"


def test_mi_quote():
    assert mi_quote('a "b" \\c\n') == '"a \\"b\\" \\\\c\\n"'


def test_session_commands_and_log(tmp_path, loop_exe):
    log = tmp_path / "gdb.log"
    with GdbSession(loop_exe, None, log) as gdb:
        assert gdb.state is GdbState.LOADED
        assert gdb.version.startswith("GNU gdb")
        assert gdb.python("print(6 * 7)").strip() == "42"
        assert "counter" in gdb.console("info variables counter")
        rec = gdb.mi("-data-evaluate-expression sizeof(counter)")
        assert rec["payload"]["value"] == "8"
        with pytest.raises(GdbError, match="no_such_symbol") as err:
            gdb.mi("-data-evaluate-expression no_such_symbol")
        assert str(log) in err.value.logs
        gdb.run()
        assert gdb.state is GdbState.RUNNING
        time.sleep(0.2)
        stop = gdb.interrupt()
        assert stop["payload"]["reason"] == "signal-received"
        assert gdb.state is GdbState.STOPPED
        gdb.cont()
        assert gdb.state is GdbState.RUNNING
        pid = gdb.proc.pid
    # shutdown from RUNNING: interrupt, detach, exit; no gdb left
    assert gdb.state is GdbState.EXITED
    assert gdb.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    text = log.read_text()
    assert "-data-evaluate-expression sizeof(counter)" in text and "gdb exited" in text
    gdb.shutdown()  # idempotent


def test_gdb_death_is_reported(tmp_path, loop_exe):
    with GdbSession(loop_exe, None, tmp_path / "gdb.log") as gdb:
        os.kill(gdb.proc.pid, signal.SIGKILL)
        gdb.proc.wait(timeout=10)
        with pytest.raises(GdbError, match="gdb") as err:
            gdb.poll()
        assert err.value.returncode == -signal.SIGKILL
        with pytest.raises(GdbError):
            gdb.mi("-gdb-version")


def test_missing_socket_times_out_with_evidence(tmp_path, loop_exe, monkeypatch):
    import tracer.gdb_session as gs

    monkeypatch.setattr(gs, "ATTACH_TIMEOUT_S", 0.3)
    with pytest.raises(GdbError, match="did not appear"):
        with GdbSession(loop_exe, tmp_path / "no.sock", tmp_path / "gdb.log"):
            pass


def test_gdb_dies_with_its_parent(tmp_path, loop_exe):
    """PR_SET_PDEATHSIG: a SIGKILLed lazytrace leaves no gdb behind."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tracer.gdb_session import GdbSession\n"
        f"g = GdbSession(Path({str(loop_exe)!r}), None, Path({str(tmp_path / 'gdb.log')!r}))\n"
        "g.start()\n"
        "print(g.proc.pid, flush=True)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([os.sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    gdb_pid = int(parent.stdout.readline())
    os.kill(gdb_pid, 0)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(gdb_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"gdb {gdb_pid} outlived its parent")
