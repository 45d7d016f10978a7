"""PID 1 duties in a PID namespace: busybox signals, the workload, the hostname, delegate
mode, a missing console. The real .pyz is PID 1 (or, for delegate mode,
a child of a fake PID 1)."""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

import agent
from helpers import wait_for
from nsguest import POWER_OFF_RETURNCODE, REBOOT_RETURNCODE

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_PROGRAMS = os.path.join(HERE, "..", "..", "tools", "guest")
pytestmark = pytest.mark.namespace


@pytest.mark.parametrize("sig,action,returncode", [
    (signal.SIGUSR2, "poweroff", POWER_OFF_RETURNCODE),     # busybox poweroff
    (signal.SIGUSR1, "halt", POWER_OFF_RETURNCODE),         # busybox halt (ns: also SIGINT)
    (signal.SIGTERM, "reboot", REBOOT_RETURNCODE),          # busybox reboot
    (signal.SIGPWR, "poweroff", POWER_OFF_RETURNCODE),
    (signal.SIGINT, "halt", POWER_OFF_RETURNCODE),          # Ctrl-Alt-Del: the configured one
], ids=["USR2", "USR1", "TERM", "PWR", "INT"])
def test_busybox_signals_run_the_orderly_sequence(guest, sig, action, returncode):
    g = guest("sleep 1000 &", agent_args=["--grace", "30", "--action", "halt"])
    os.kill(g.init_pid(), sig)
    assert g.wait(timeout=60) == returncode
    log = g.messages()
    assert any("shutdown requested (signal %d): action %s" % (sig, action) in m for m in log)
    assert any("SIGTERM sent to all processes" in m for m in log)
    assert any("all processes gone after" in m for m in log)
    assert any("calling reboot(%s)" % action in m for m in log)


def test_a_poweroff_sent_while_modules_load_is_honoured_at_once_and_starts_nothing(
        guest, tmp_path):
    """Modules load in a child while PID 1 serves, so a stop that comes meanwhile is acted on
    at once, not after the load; the loader is TERMed like everyone else, and the workload,
    which waits for every module, never starts. The load is slowed on purpose: a module that
    modules.dep does not know goes to modprobe, here a fake (bind-mounted over /bin/busybox
    in the namespace only) that sleeps."""
    started, fake = tmp_path / "modprobe-started", tmp_path / "fake-modprobe"
    marker = tmp_path / "workload-ran"
    fake.write_text("#!/bin/sh\ntouch %s\nsleep 5\nexit 1\n" % shlex.quote(str(started)))
    fake.chmod(0o755)
    g = guest("mount --bind %s /bin/busybox\nsleep 1000 &" % shlex.quote(str(fake)),
              agent_args=["--modules", "arcbox_no_such_module", "--exec", "touch",
                          str(marker)], wait_ready=False)
    wait_for(started.exists, what="the fake modprobe to start")
    assert b"pong" in g.request(agent.MSG_PING)     # serving while the module loads
    t0 = time.monotonic()
    os.kill(g.init_pid(), signal.SIGUSR2)
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE, g.log()
    assert time.monotonic() - t0 < 4, "the stop waited for the module load"
    log = g.messages()
    assert any("shutdown requested (signal %d): action poweroff" % signal.SIGUSR2 in m
               for m in log)
    assert not any("modules: all in" in m for m in log), log
    assert any("all processes gone after" in m for m in log)
    assert not marker.exists(), "the workload started although a module was still loading"


def test_sighup_and_sigquit_do_nothing_harmful(guest):
    g = guest("sleep 1000 &")
    for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGHUP):
        os.kill(g.init_pid(), sig)
    time.sleep(0.3)
    assert g.proc.poll() is None and len(g.processes()) == 1
    assert g.request(agent.MSG_PING)
    assert not any("shutdown" in m for m in g.messages())


def test_signals_during_a_shutdown_do_not_start_a_second_one(guest):
    g = guest("(trap '' TERM; exec sleep 1000) &", agent_args=["--grace", "1"])
    for _ in range(5):
        os.kill(g.init_pid(), signal.SIGUSR2)
        time.sleep(0.05)
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    assert sum(1 for m in g.messages() if "SIGTERM sent" in m) == 1


def test_a_burst_of_200_orphans_leaves_no_zombie(guest):
    g = guest()
    cmd = "for i in $(seq 200); do (sleep 0.1 &) ; done"
    subprocess.run(["nsenter", "-t", str(g.init_pid()), "-p", "-m", "--", "sh", "-c", cmd],
                   check=True, timeout=60)
    wait_for(lambda: not g.processes(), what="200 orphans to be reaped: %s" % g.processes())
    assert sum(1 for m in g.messages() if m.startswith("reaped pid")) >= 200
    assert g.request(agent.MSG_PING)


def test_the_workload_starts_with_a_clean_signal_state_in_its_own_session(guest, tmp_path):
    # Read from outside, once the workload has exec'd sleep: a shell reading its own
    # /proc/$$/status through a child it forks can catch itself mid-fork, when dash blocks
    # every signal for a moment.
    out = tmp_path / "session"
    script = ("echo session=$(cut -d' ' -f6 /proc/$$/stat) pid=$$ > {0}.tmp; "
              "mv {0}.tmp {0}; exec sleep 1000").format(shlex.quote(str(out)))
    g = guest(agent_args=["--exec", "sh", "-c", script])
    wait_for(out.exists, what="the workload's report")

    def workload_status():
        for pid in g.processes():
            with open("/proc/%d/comm" % pid) as f:
                if f.read().strip() == "sleep":
                    with open("/proc/%d/status" % pid) as f:
                        return f.read()
        return None
    wait_for(lambda: workload_status() is not None, what="the workload's exec of sleep")
    status = workload_status()
    assert "SigBlk:\t0000000000000000" in status, status
    assert "SigIgn:\t0000000000000000" in status, status   # not Python's SIGPIPE/XFSZ
    session, pid = (w.split("=")[1] for w in out.read_text().split() if "=" in w)
    assert session == pid, "the workload is not a session leader"
    assert any(m.startswith("started sh -c") for m in g.messages())


def test_respawn_backs_off_instead_of_spinning(guest, tmp_path):
    runs = tmp_path / "runs"
    g = guest(agent_args=["--on-exit", "respawn", "--exec", "sh", "-c",
                          "echo run >> %s; exit 3" % shlex.quote(str(runs))])
    time.sleep(3.2)                     # back-off 0.5, 1, 2 s: runs at 0, 0.5, 1.5 (3.5)
    count = len(runs.read_text().split())
    assert 2 <= count <= 5, "%d runs in 3.2 s" % count
    log = g.messages()
    for delay in ("0.5s", "1s", "2s"):
        assert any("exited with status 3" in m and "respawning in " + delay in m for m in log), log


def test_power_off_when_the_workload_exits_logs_its_status(guest):
    g = guest(agent_args=["--on-exit", "poweroff", "--exec", "sh", "-c", "sleep 0.3; exit 7"])
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    assert any("workload exited with status 7" in m and "powering off" in m for m in g.messages())


def test_hostname_is_set_inside_the_guest_only(guest):
    before = socket.gethostname()
    g = guest(agent_args=["--hostname", "arcbox-test"])
    info = agent.decode_message(agent.SYSTEM_INFO, g.request(agent.MSG_GET_SYSTEM_INFO))
    assert info["hostname"] == "arcbox-test"
    assert socket.gethostname() == before


def test_pid1_without_stdio_still_serves_and_powers_off(guest):
    g = guest("sleep 1000 &", log_level="error", redirect="0<&- 1>&- 2>&-")
    assert g.shutdown(grace=5) is True
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE


def test_delegate_mode_signals_pid1_then_forces_power_off(guest, tmp_path):
    signals = tmp_path / "signals"
    init = "%s %s %s" % (shlex.quote(sys.executable), shlex.quote(os.path.join(
        GUEST_PROGRAMS, "fake_init.py")), shlex.quote(str(signals)))
    g = guest(init=init, agent_args=["--delegate", "--grace", "1"])
    started = time.monotonic()
    assert g.shutdown(grace=1) is True
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE    # forced by the agent, not PID 1
    assert time.monotonic() - started >= 1.0
    assert signals.read_text().split() == [str(int(signal.SIGUSR2))]
    log = g.messages()
    assert any("asked PID 1 for poweroff with signal 12" in m for m in log)
    assert any("still up 1s after asking PID 1; forcing it" in m for m in log)
    assert not any("SIGTERM sent" in m for m in log)      # a delegate never broadcasts
