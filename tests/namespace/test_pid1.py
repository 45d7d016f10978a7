"""The real .pyz as PID 1 of a PID namespace: real kill(-1), real reaping, real reboot(2).

Oracle for the end of every shutdown: unshare's returncode is -SIGINT, which is what the
kernel reports for the namespace's init when reboot(LINUX_REBOOT_CMD_POWER_OFF) is called
inside it. Needs root (CI is root); fails loudly otherwise.
"""

import os
import re
import shlex
import socket
import subprocess
import sys
import time

import pytest

import agent
from guestctl import log_events
from helpers import assert_grace_kept
from nsguest import POWER_OFF_RETURNCODE

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_PROGRAMS = os.path.join(HERE, "..", "..", "tools", "guest")
pytestmark = pytest.mark.namespace



def reaped(g, pid):
    """How the agent reported pid's end, or None."""
    for m in g.messages():
        found = re.match(r"reaped pid %d \((.*)\)$" % pid, m)
        if found:
            return found.group(1)
    return None


def test_ping_and_system_info_as_pid1(guest):
    g = guest()
    pong = agent.decode_message(agent.PING_RESPONSE, g.request(
        agent.MSG_PING, agent.encode_message(agent.PING_REQUEST, {"message": "hi",
                                                                  "timestamp_secs": 1})))
    assert pong == {"message": "pong: hi", "version": agent.__version__}
    assert any("Ping timestamp from unix peer" in m and "ignored" in m for m in g.messages()), \
        "a Unix-socket peer must never set the clock"
    info = agent.decode_message(agent.SYSTEM_INFO, g.request(agent.MSG_GET_SYSTEM_INFO))
    assert info["hostname"] == socket.gethostname()
    assert info["kernel_version"] == os.uname().release and info["arch"] == os.uname().machine
    assert info["cpu_count"] == os.cpu_count() and len(info["load_average"]) == 3
    assert "ready (pid 1," in g.log()


def test_children_that_exit_on_term_end_the_teardown_without_waiting_for_the_grace(guest):
    g = guest("for i in 1 2 3 4 5; do sleep 1000 & done")
    assert len(g.processes()) == 5
    started = time.monotonic()
    assert g.shutdown(grace=60) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    assert time.monotonic() - started < 20, "waited for the 60 s grace although nobody was left"
    log = g.messages()
    assert any(m.startswith("shutdown: all processes gone after") for m in log)
    assert not any("SIGKILL" in m for m in log)
    assert sum(1 for m in log if "killed by signal 15" in m) == 5


def test_a_child_ignoring_term_is_killed_when_the_grace_ends(guest, tmp_path):
    pidfile = tmp_path / "ignorer.pid"
    g = guest("(trap '' TERM; exec sleep 1000) & echo $! > %s\nsleep 1000 &"
              % shlex.quote(str(pidfile)))
    ignorer = int(pidfile.read_text())
    started = time.monotonic()
    assert g.shutdown(grace=1) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    assert time.monotonic() - started >= 1.0, "SIGKILL came before the grace ended"
    assert reaped(g, ignorer) == "killed by signal 9"
    events = log_events(g.log())
    assert_grace_kept(events, 1.0)
    # (the /run the agent mounted itself, where the machine has none, is remounted too)
    order = [m for m in g.messages() if m.startswith("shutdown: ")
             and not m.startswith("shutdown: remounted /run ")]
    # (who got SIGTERM, who held the stop up before SIGKILL, and the summary before reboot())
    assert [m.split(" ")[1] for m in order] == ["SIGTERM", "poweroff,", "SIGTERM", "the",
                                                "grace", "all", "sync()", "final",
                                                "filesystems", "summary:", "calling"], order


def test_a_stopped_child_is_continued_so_its_term_handler_runs(guest, tmp_path):
    ready = tmp_path / "ready"
    pidfile = tmp_path / "stopped.pid"
    g = guest("%s %s %s & pid=$!; echo $pid > %s\n"
              "while [ ! -e %s ]; do sleep 0.02; done; kill -STOP $pid"
              % (shlex.quote(sys.executable), shlex.quote(os.path.join(
                  GUEST_PROGRAMS, "term_handler_child.py")),
                 shlex.quote(str(ready)), shlex.quote(str(pidfile)), shlex.quote(str(ready))))
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while "T" not in g.processes().values():
        assert time.monotonic() < deadline, "the child never stopped"
        time.sleep(0.02)
    assert g.shutdown(grace=60) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    assert reaped(g, pid) == "exited with status 0", g.log()   # its handler ran: SIGCONT
    assert not any("SIGKILL" in m for m in g.messages())


def test_orphans_are_reaped_at_any_time_and_grandchildren_at_shutdown(guest, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    # 50 short-lived orphans, and one long-lived grandchild whose parent exits at once.
    g = guest("for i in $(seq 50); do (sleep 0.2 &) ; done\n"
              "sh -c 'sleep 1000 & echo $! > %s' &" % shlex.quote(str(pidfile)))
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 15
    while True:
        states = g.processes()
        if len(states) == 1:
            break
        assert time.monotonic() < deadline, "orphans not reaped: %s" % states
        time.sleep(0.05)
    assert "Z" not in states.values()
    assert reaped(g, grandchild) is None
    assert g.shutdown(grace=30) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    assert reaped(g, grandchild) == "killed by signal 15"


def test_the_ack_is_flushed_before_any_process_is_signalled(guest, tmp_path):
    result = tmp_path / "ack-result"
    # The probe, a process of the guest, asks for the shutdown itself.
    probe = "%s %s %s %s &" % (shlex.quote(sys.executable),
                               shlex.quote(os.path.join(GUEST_PROGRAMS, "ack_probe.py")),
                               shlex.quote(str(tmp_path / "agent.sock")), shlex.quote(str(result)))
    g = guest(probe, wait_ready=False)   # the probe may power it off before we could ping
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    text = result.read_text()
    assert text.startswith("ack-first"), text
    assert text.split()[1] == "000000080000100a0000" + "0801"   # ShutdownResponse accepted


def test_a_second_shutdown_is_accepted_and_does_not_restart_the_clock(guest):
    g = guest("(trap '' TERM; exec sleep 1000) &")
    started = time.monotonic()
    assert g.shutdown(grace=2) is True
    time.sleep(1.0)
    pong = g.request(agent.MSG_PING)                       # still answering during the grace
    assert agent.decode_message(agent.PING_RESPONSE, pong)["message"] == "pong"
    assert g.shutdown(grace=60) is True                    # accepted, nothing restarted
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    assert time.monotonic() - started < 30, "the second Shutdown restarted the grace"
    log = g.messages()
    assert sum(1 for m in log if "SIGTERM sent" in m) == 1
    assert any("already in progress" in m for m in log)


def test_busybox_poweroff_signal_to_pid1_runs_the_same_sequence(guest):
    g = guest("sleep 1000 &", agent_args=["--grace", "30"])
    os.kill(g.init_pid(), 12)                              # SIGUSR2: busybox poweroff
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    log = g.messages()
    assert any("shutdown requested (signal 12)" in m for m in log)
    assert any("all processes gone after" in m for m in log)


def test_the_main_job_demo_reaches_power_off_in_a_namespace(namespaces, tmp_path):
    out = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "build.py"), "-o",
                          str(tmp_path / "a.pyz"), "--demo", "namespace"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "grace over: SIGKILL sent" in out.stdout and "reboot(POWER_OFF) called" in out.stdout
    assert "outcome: the namespace init was killed by SIGINT" in out.stdout
