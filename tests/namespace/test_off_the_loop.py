"""PID 1's loop never waits on a disk or a device: every call that can (the inventory in the
README's "PID 1 never wedged") runs as an errand, a child with a deadline. Here each errand is
made to block for seconds before its work, the way a freeze flushing a slow disk or a thaw on a
suspended device does; meanwhile the real .pyz, PID 1 of a PID namespace, must keep answering
ArcBox Pings within 0.5 s, reaping orphans, and honouring a Shutdown -- whose own thaw before
SIGTERM then hangs past its budget too."""

import os
import shlex
import subprocess
import sys
import threading
import time

import pytest

import agent
import storagecheck
from guestctl import request
from helpers import wait_for
from nsguest import POWER_OFF_RETURNCODE
from qgaclient import connect

pytestmark = pytest.mark.namespace
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOW = 3.0                         # seconds every errand blocks before its work

SLOW_ERRANDS = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import agent
real = agent.Errands._child
def blocked(errand, r, w):
    time.sleep(%r)                 # a call that waits on a disk that does not answer
    return real(errand, r, w)
agent.Errands._child = staticmethod(blocked)
thaw = agent.thaw_filesystems
def blocked_thaw(*args):
    time.sleep(%r)                 # the thaw before SIGTERM: a thread of PID 1's
    return thaw(*args)
agent.thaw_filesystems = blocked_thaw
real_thread = agent.Errands._in_thread
def blocked_thread(errand, w, box):
    time.sleep(%r)                 # guest-file-*: a thread of PID 1's on a slow disk
    return real_thread(errand, w, box)
agent.Errands._in_thread = staticmethod(blocked_thread)
sys.argv = ["arcbox-agent"] + sys.argv[2:]
agent.run_as_init()
""" % (SLOW, SLOW, SLOW)


def timed_pings(sock, stop, out):
    """Ping every 0.1 s until stop: each answer's time, or ("error", why)."""
    while not stop.is_set():
        began = time.monotonic()
        try:
            request(sock, agent.MSG_PING, b"", 5.0)
            out.append(time.monotonic() - began)
        except Exception as exc:   # a missed answer is a figure too: recorded, asserted below
            out.append(("error", str(exc)))
        time.sleep(0.1)


def test_blocking_calls_run_off_the_loop_which_keeps_answering_reaping_and_stopping(
        guest, tmp_path):
    image = str(tmp_path / "data.img")
    storagecheck.mkfs(image, 32 << 20)
    mnt = str(tmp_path / "data")
    os.makedirs(mnt)
    # the workload: a disk of its own (mounted after the agent started: the guest's), a
    # counter written on it, and an orphan every 50 ms for PID 1 to reap
    workload = """
set -e
mount -o loop {img} {m}
echo data > {m}/before
while :; do (sleep 0.01 &); sleep 0.05; done
""".format(img=shlex.quote(image), m=shlex.quote(mnt))
    script = tmp_path / "slow_errands.py"
    script.write_text(SLOW_ERRANDS)
    sock, qga = str(tmp_path / "agent.sock"), str(tmp_path / "qga.sock")
    g = guest(wait_ready=False, init=" ".join(shlex.quote(a) for a in [
        sys.executable, str(script), REPO, "--listen", "unix:" + sock, "--qga", "unix:" + qga,
        "--log", "debug", "--allow", "any", "--qga-allow", "default,guest-file-open",
        "--exec", "sh", "-c", workload]))
    g.wait_ready(30)
    inside = "/proc/%d/root%s" % (g.init_pid(), mnt)
    wait_for(lambda: os.path.exists(inside + "/before"), timeout=30, what="the workload")

    # five blocking commands at once, on five connections, while Pings go on
    answers, stop, pings = {}, threading.Event(), []

    def ask(name, arguments=None):
        arguments = arguments or ({"path": mnt + "/before"} if name == "guest-file-open"
                                  else None)
        c = connect(qga, timeout=30)
        began = time.monotonic()
        try:
            answers[name] = (c.call(name, arguments, timeout=30), time.monotonic() - began)
        except EOFError as exc:    # the guest went down first (the thaw below)
            answers[name] = ({"eof": str(exc)}, time.monotonic() - began)
        c.close()
    pinger = threading.Thread(target=timed_pings, args=(sock, stop, pings))
    pinger.start()
    askers = [threading.Thread(target=ask, args=(name,)) for name in (
        "guest-fsfreeze-freeze", "guest-get-fsinfo", "guest-network-get-interfaces",
        "guest-get-disks", "guest-file-open")]
    zombies_seen = []
    try:
        for t in askers:
            t.start()
        sample_end = time.monotonic() + SLOW - 0.5
        while time.monotonic() < sample_end:   # orphans are reaped while the errands block
            zombies_seen.append({pid for pid, state in g.processes().items() if state == "Z"})
            time.sleep(0.25)
        for t in askers:
            t.join(30)
    finally:
        stop.set()
        pinger.join(10)
    for name, (answer, took) in answers.items():
        assert "return" in answer, (name, answer)
        assert took >= SLOW - 0.1, "%s answered in %.2fs: not through an errand" % (name, took)
    assert answers["guest-fsfreeze-freeze"][0]["return"] == 1
    assert [f["mountpoint"] for f in answers["guest-get-fsinfo"][0]["return"]] == [mnt]
    assert len(pings) >= 10 and all(isinstance(p, float) for p in pings), pings
    assert max(pings) < 0.5, "a Ping waited %.3fs while the errands blocked" % max(pings)
    for before, after in zip(zombies_seen, zombies_seen[1:]):
        assert not before & after, "a zombie outlived 0.25s while the errands blocked"

    # a thaw under way (blocked), then a Shutdown: the stop goes on in order all the same
    thawing = threading.Thread(target=ask, args=("guest-fsfreeze-thaw",))
    thawing.start()
    time.sleep(0.5)
    assert g.shutdown(grace=1) is True
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    thawing.join(30)
    msgs = g.messages()
    stuck = [m for m in msgs if m.startswith("shutdown: the thaw before SIGTERM did not finish "
                                             "within %gs" % agent.THAW_BUDGET)]
    assert stuck, msgs
    assert msgs.index(stuck[0]) < next(i for i, m in enumerate(msgs) if "SIGTERM sent" in m)
    assert any("filesystems synced and read-only" in m for m in msgs), msgs
    fsck = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
