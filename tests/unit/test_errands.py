"""Errands: a call that may block runs in a forked child with a deadline, its outcome back on
a pipe; and a connection owed an errand's answer goes on being read (a guest-shutdown behind
a hung freeze acts at once) while its answers keep their order."""

import json
import os
import signal
import socket
import time

import agent


class Watching:
    """A reaper stand-in: remembers the pids (pytest's other children are not ours)."""

    def __init__(self):
        self.pids = []

    def watch(self, pid, callback, uncounted=False):
        assert uncounted, "an errand's child must not count as a process left at shutdown"
        self.pids.append(pid)


def run_errands(errands, until, limit=10.0):
    loop = agent.EventLoop()
    loop.add(errands)
    deadline = time.monotonic() + limit
    while not until() and time.monotonic() < deadline:
        loop.run_once(0.05)


def test_an_errand_runs_in_a_child_and_its_outcome_comes_back():
    reaper, got = Watching(), []
    errands = agent.Errands(reaper)

    def body():
        return {"pid": os.getpid(), "list": [1, "two", None, 3.5, True]}

    def raises():
        raise agent.QgaError("no such thing", "CommandNotFound")
    errands.run(agent.Errand("a value", body, 5.0, None), got.append)
    errands.run(agent.Errand("an error", raises, 5.0, None), got.append)
    run_errands(errands, lambda: len(got) == 2)
    for pid in reaper.pids:
        os.waitpid(pid, 0)
    value = next(o for o in got if o[0] == "ok")[1]
    assert value["list"] == [1, "two", None, 3.5, True]
    assert value["pid"] != os.getpid() and value["pid"] in reaper.pids   # not in this process
    assert ("error", "CommandNotFound", "no such thing") in got


def test_an_errand_past_its_deadline_is_told_and_left_behind(logged):
    reaper, got = Watching(), []
    errands = agent.Errands(reaper)
    began = time.monotonic()
    errands.run(agent.Errand("the stuck call", lambda: time.sleep(30), 0.3, None), got.append)
    run_errands(errands, lambda: got)
    took = time.monotonic() - began
    assert got and got[0][0] == "timeout" and "the stuck call did not finish within 0.3s" \
        in got[0][1]
    assert took < 2.0
    assert "the stuck call did not finish within 0.3s: pid %d (" % reaper.pids[0] \
        in "\n".join(logged)                      # who, and where the kernel holds it
    os.kill(reaper.pids[0], signal.SIGKILL)
    os.waitpid(reaper.pids[0], 0)


def test_an_errand_in_a_thread_answers_through_the_same_pipe_and_deadline(logged):
    import threading
    reaper, got, never = Watching(), [], threading.Event()
    errands = agent.Errands(reaper)
    errands.run(agent.Errand("quick", lambda: [1, {"a": os.getpid()}], 5.0, None,
                             thread=True), got.append)
    errands.run(agent.Errand("stuck", lambda: never.wait(30), 0.3, None, thread=True),
                got.append)
    began = time.monotonic()
    run_errands(errands, lambda: len(got) == 2)
    never.set()
    assert reaper.pids == []                      # no child: a thread of this process
    assert ("ok", [1, {"a": os.getpid()}]) in got
    stuck = next(o for o in got if o[0] == "timeout")
    assert "stuck did not finish within 0.3s" in stuck[1] and time.monotonic() - began < 2
    assert "stuck did not finish within 0.3s: a thread of PID 1's, pid " in \
        "\n".join(logged)


def test_past_the_limit_an_errand_is_refused_at_the_next_tick():
    reaper, got = Watching(), []
    errands = agent.Errands(reaper)
    for _ in range(agent.ERRANDS_MAX + 1):
        errands.run(agent.Errand("sleeper", lambda: time.sleep(30), 30.0, None), got.append)
    assert got == []                              # never from within run()
    errands.tick(time.monotonic())
    assert len(got) == 1 and got[0][0] == "error" and "under way" in got[0][2]
    for pid in reaper.pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    errands.close()


class Held:
    """Errands that wait until the test lets them go."""

    def __init__(self):
        self.started = []

    def run(self, errand, on_done):
        self.started.append((errand, on_done))


def test_requests_behind_a_pending_errand_are_taken_and_answered_in_order():
    a = agent.Agent(dict(agent.default_config(), listen=[], allow=agent._parse_allow("any"),
                         delegate=True), is_init=False)
    a.reaper.reap = lambda: None
    held, effects = Held(), []
    a.server.errands = held
    a.server.on_effect = lambda effect, conn: effects.append(effect)
    machine = agent.QgaMachine(a.server.policy, a.freezer)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    peer = ("unix", 1, 0, 0)
    a.server.add_connection(agent.SocketConnection(
        ours, peer, time.monotonic(), agent.QgaProtocol(machine, 65536, peer)))
    theirs.sendall(b'{"execute": "guest-get-fsinfo", "id": 1}\n'
                   b'{"execute": "guest-ping", "id": 2}\n'
                   b'{"execute": "guest-shutdown", "arguments": {"mode": "reboot"}}\n')
    for _ in range(5):
        a.loop.run_once(0)
    assert [e.what for e, _ in held.started] == ["guest-get-fsinfo"]
    assert effects == [("guest-shutdown", 0, "reboot")]  # taken while the errand is still out
    theirs.setblocking(False)
    try:
        early = theirs.recv(65536)
    except BlockingIOError:
        early = b""
    assert early == b""                           # guest-ping's answer waits for fsinfo's
    errand, on_done = held.started[0]
    on_done(("ok", [{"name": "vda", "mountpoint": "/data"}]))
    for _ in range(5):
        a.loop.run_once(0)
    lines = [json.loads(line) for line in theirs.recv(65536).splitlines()]
    assert lines == [{"return": [{"name": "vda", "mountpoint": "/data"}], "id": 1},
                     {"return": {}, "id": 2}]
    theirs.close()


def test_a_child_reaped_before_anyone_watches_it_is_told_when_watched():
    # guest-exec's child is spawned from a thread of PID 1's: it may exit, and be reaped by
    # the loop, before the thread's answer lets anyone watch() it
    reaper = agent.Reaper()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    deadline = time.monotonic() + 10
    while pid not in reaper.unclaimed and time.monotonic() < deadline:
        reaper.reap()
        time.sleep(0.01)
    told = []
    reaper.watch(pid, lambda p, status: told.append((p, os.WEXITSTATUS(status))))
    assert told == [(pid, 7)] and pid not in reaper.unclaimed and pid not in reaper.watched
