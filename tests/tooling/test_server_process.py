"""tests/fixtures/server_process.py: readiness wait that fails fast with the log, stop by PID that leaves nothing."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.fixtures.server_process import ServerProcess, free_port

# A parent that ignores SIGTERM and starts a child that ignores it too, then reports the child's PID in its log.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("child", child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped yet
    except OSError:
        return False


def start(tmp_path, code: str, **attributes) -> ServerProcess:
    server = ServerProcess(None, free_port(), tmp_path / "server.log")
    for key, value in attributes.items():
        setattr(server, key, value)
    server.launch([sys.executable, "-c", code], env=dict(os.environ), cwd=tmp_path)
    return server


def test_wait_until_reports_a_dead_process_with_its_log(tmp_path):
    server = start(tmp_path, "import sys; print('no config, giving up', flush=True); sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"(?s)server exited with 3:.*no config, giving up"):
        server.wait_until(lambda: False, timeout=60)


def test_wait_until_times_out_with_the_log_and_returns_the_probe_value(tmp_path):
    server = start(tmp_path, "import time; print('still warming up', flush=True); time.sleep(600)")
    try:
        with pytest.raises(TimeoutError, match=r"(?s)not ready after 0.5 s:.*still warming up"):
            server.wait_until(lambda: "warming" in server.log_text() and None, timeout=0.5)
        assert server.wait_until(lambda: "warming" in server.log_text() and "ready", timeout=30) == "ready"
    finally:
        server.stop()


@pytest.mark.parametrize("own_session", [False, True])
def test_stop_kills_a_server_and_its_children_that_ignore_sigterm(tmp_path, own_session):
    server = start(tmp_path, STUBBORN, own_session=own_session, stop_grace_s=0.5)
    line = server.wait_until(lambda: next((x for x in server.log_text().splitlines() if x.startswith("child")), None),
                             timeout=60)
    child = int(line.split()[1])
    started = time.monotonic()
    server.stop()
    assert server.process.poll() is not None and time.monotonic() - started < 15
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)
    server.stop()  # a second stop is a no-op
