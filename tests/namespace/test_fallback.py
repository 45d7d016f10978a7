"""When the power-off or serving itself fails, on the real .pyz as PID 1 of a PID namespace:
a reboot() that fails is reported and PID 1 exits; serving that fails outright falls back
to a loop that keeps the user's action, grace and listeners and still powers off, also
for a poweroff that came while serving failed."""

import os
import shlex
import signal
import sys
import time

import pytest

from helpers import assert_grace_kept, wait_for
from nsguest import POWER_OFF_RETURNCODE, REBOOT_RETURNCODE

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
pytestmark = pytest.mark.namespace


def test_a_reboot_that_fails_is_reported_and_pid1_exits(guest):
    """Without CAP_SYS_BOOT reboot(2) fails with EPERM: the agent says POWER-OFF FAILED and
    exits, which in a VM hands the decision to the kernel's panic= setting."""
    g = guest("sleep 1000 &", init="sh -c 'exec setpriv --bounding-set=-sys_boot $AGENT'")
    assert g.shutdown(grace=5) is True
    assert g.wait(timeout=30) == 1                        # exited: not killed by reboot()
    log = g.messages()
    assert "POWER-OFF FAILED: reboot() failed: Operation not permitted" in log, log[-10:]
    assert any(m.startswith("exiting PID 1") for m in log)


FAILING_SERVE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import agent
def broken(*args, **kwargs):
    raise RuntimeError("injected: serving failed")
agent.serve_main = broken
agent.run_as_init()
"""


def test_the_fallback_loop_after_serving_fails_still_powers_off(guest, tmp_path):
    script = tmp_path / "failing_serve.py"
    script.write_text(FAILING_SERVE)
    g = guest("sleep 1000 &", wait_ready=False,
              init="%s %s %s" % (shlex.quote(sys.executable), shlex.quote(str(script)),
                                 shlex.quote(REPO)))
    wait_for(lambda: "falling back to reaping" in g.log(), what="the fallback loop")
    time.sleep(0.2)
    os.kill(g.init_pid(), signal.SIGUSR2)                 # busybox poweroff still works
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    log = g.messages()
    assert any("agent failed: RuntimeError: injected: serving failed" in m for m in log), log
    assert any("all processes gone after" in m for m in log)


SIGNAL_THEN_FAIL = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import agent
def broken(argv, is_init, cmdline_path="/proc/cmdline", inbox=None, kept=None):
    inbox = inbox or agent.SignalInbox().install()     # what serve_main does first
    open(sys.argv[2], "w").close()                      # the test may signal now
    deadline = time.monotonic() + 10
    while not inbox.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    raise RuntimeError("injected: serving failed with a signal pending")
agent.serve_main = broken
agent.run_as_init()
"""


def test_a_poweroff_that_comes_while_serving_fails_is_honoured_by_the_fallback(guest, tmp_path):
    """The signal arrives in serve_main, which then fails before its loop turned: the fallback
    loop takes over with the same inbox and powers off. (With an inbox of its own it lost
    the signal and kept running: checked.)"""
    script, marker = tmp_path / "signal_then_fail.py", tmp_path / "serving"
    script.write_text(SIGNAL_THEN_FAIL)
    g = guest("sleep 1000 &", wait_ready=False,
              init="%s %s %s %s" % (shlex.quote(sys.executable), shlex.quote(str(script)),
                                    shlex.quote(REPO), shlex.quote(str(marker))))
    wait_for(marker.exists, what="serve_main")
    os.kill(g.init_pid(), signal.SIGUSR2)                 # busybox poweroff, right then
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    log = g.messages()
    assert any("injected: serving failed with a signal pending" in m for m in log), log
    assert any("all processes gone after" in m for m in log), log


BOOT_DUTIES_FAIL = r"""
import sys
sys.path.insert(0, sys.argv[1])
import agent
def broken(config):
    raise RuntimeError("injected: a boot duty failed")
agent.boot_duties = broken
sys.argv = ["arcbox-agent"] + sys.argv[2:]
agent.run_as_init()
"""


def test_the_fallback_keeps_the_users_action_grace_and_listeners(guest, tmp_path):
    """Serving fails after the configuration was read: the fallback answers on the user's
    listener, and Ctrl-Alt-Del (SIGINT, the configured action) reboots after the user's
    1 s grace -- not a power-off after the default 25 s (it did both before: checked)."""
    script = tmp_path / "boot_duties_fail.py"
    script.write_text(BOOT_DUTIES_FAIL)
    sock = tmp_path / "agent.sock"
    g = guest("trap '' TERM; sleep 1000 &", wait_ready=False, init=" ".join(
        shlex.quote(a) for a in [sys.executable, str(script), REPO, "--listen", "unix:%s" % sock,
                                 "--log", "debug", "--action", "reboot", "--grace", "1"]))
    g.wait_ready(20)                                      # the user's listener answers
    assert any("falling back to reaping, signals and unix:" in m and "action reboot, grace 1s"
               in m for m in g.messages()), g.messages()
    os.kill(g.init_pid(), signal.SIGINT)                  # Ctrl-Alt-Del: the configured action
    assert g.wait(timeout=30) == REBOOT_RETURNCODE
    events = g.events()
    assert_grace_kept(events, 1.0)
