"""The start-up (StartUp), step by step, with a fake finit_module: the modules load in a
thread, never in the loop's -- the transports first, one at a time, the listeners retried
after each; "ready" when they are in; the held lines out after that turn (or a first answer,
or START_HOLD); the host answered while the rest still loads; what needs the modules (the
workload) only after all are in; a stop during the load starts nothing. The last test runs a
plain agent process (not PID 1), given the fake by a driver script."""

import _thread
import os
import subprocess
import sys
import threading
import time

import agent
from helpers import wait_for

REPO = os.path.dirname(os.path.abspath(agent.__file__))


def test_transports_go_first_and_each_group_keeps_its_order():
    assert agent.split_transports(["ext4", "virtio-pci", "loop", "virtio_console", "vsock",
                                   "vmw_vsock_virtio_transport", "overlay"]) == (
        ["virtio_pci", "virtio_console", "vsock", "vmw_vsock_virtio_transport"],
        ["ext4", "loop", "overlay"])


class FakeServer:
    """What StartUp asks of the Server: open, retry at once, the first answer's time."""

    def __init__(self, events):
        self.events, self.listeners, self.first_answer_at = events, [], None

    def open(self):
        self.events.append("open")

    def retry_now(self):
        self.events.append("one transport")


class Part:
    def __init__(self, events, name):
        self.events, self.name = events, name

    def start(self):
        self.events.append(self.name)


def start_up(events, names, optional=(), load=None):
    return agent.StartUp((names, list(optional)), FakeServer(events), agent.ListenerGate(),
                         agent.NoNotifier(), None, False, workload=Part(events, "workload"),
                         load=load)


def run_start_up(names, optional=(), loads=None, stop_after=None):
    """Run a StartUp in an event loop until the workload starts; returns the events seen
    ("open", "one transport" for each retry, "workload") with "ready" where it was said."""
    events = []
    record = os.pipe()

    def fake_load(group, opt):
        os.write(record[1], (" ".join(["load"] + list(group) + ["|"] + list(opt)
                                      + ["in", str(_thread.get_ident())]) + "\n").encode())
        time.sleep(0.05 * len(group))
        return [n for n in group if n == "broken"]
    start = start_up(events, names, optional, loads or fake_load)
    real_ready = start.ready

    def ready():
        if start.stage == "transports":
            events.append("ready")
        real_ready()
    start.ready = ready
    loop = agent.EventLoop()
    loop.add(start)
    start.begin()
    deadline = time.monotonic() + 10
    while "workload" not in events and time.monotonic() < deadline:
        loop.run_once(0.05)
        if stop_after and stop_after in events:
            start.stop()
            break
    os.close(record[1])
    with os.fdopen(record[0]) as f:
        calls = f.read().splitlines()
    assert all(not c.endswith(" in %d" % _thread.get_ident()) for c in calls), \
        "loaded by the loop's own thread"
    return events, [c.rsplit(" in ", 1)[0] for c in calls], start


def test_the_thread_loads_transports_then_the_rest_and_each_step_follows_in_order():
    events, calls, start = run_start_up(["ext4", "virtio_console", "broken", "virtio_pci"],
                                        optional=["evdev"])
    assert events == ["open", "one transport", "one transport", "ready", "one transport",
                      "workload"]
    assert calls == ["load virtio_console |", "load virtio_pci |", "load ext4 broken | evdev"]
    assert start.thread is not None and start.stage == "started" and start.released


def test_a_transport_module_whose_init_hangs_never_stops_the_loop():
    """finit_module runs a module's init in the caller: one that waits on its device for
    good must not hold PID 1 (which would then miss every signal and the host)."""
    events, never = [], threading.Event()
    start = start_up(events, ["virtio_pci", "virtio_console"],
                     load=lambda group, opt: never.wait(30) and [])
    loop = agent.EventLoop()
    loop.add(start)
    began = time.monotonic()
    start.begin()
    for _ in range(5):
        loop.run_once(0.05)
    assert time.monotonic() - began < 2 and events == ["open"] and start.stage == "transports"
    start.stop()                                   # a stop meanwhile: nothing more is called
    never.set()
    time.sleep(0.2)
    loop.run_once(0.05)
    assert events == ["open"] and start.stage == "stopped"


def test_nothing_to_load_is_ready_and_starts_the_rest_at_once():
    events, calls, start = run_start_up([])
    assert events == ["ready", "open", "workload"] and calls == [] and start.thread is None


def test_a_stop_while_loading_starts_nothing_more():
    events, _, start = run_start_up(["virtio_console", "ext4", "xfs", "btrfs"],
                                    stop_after="ready")
    assert "workload" not in events and start.stage == "stopped"


def test_a_loader_that_fails_does_not_keep_the_workload_waiting():
    def crash(group, opt):
        if "ext4" in group:            # the rest, after the transports
            raise RuntimeError("a bug")
        return []
    events, _, start = run_start_up(["virtio_console", "ext4"], loads=crash)
    assert events == ["open", "one transport", "ready", "one transport", "workload"]

    def crash_at_once(group, opt):
        raise RuntimeError("a bug")
    events, _, start = run_start_up(["virtio_console", "ext4"], loads=crash_at_once)
    assert events == ["open", "ready", "one transport", "workload"]   # ready all the same


def test_held_lines_go_out_after_the_turn_of_ready_or_a_first_answer_or_at_the_hold(
        monkeypatch):
    """Step 4: once, at the end of the turn in which "ready" was said, or a first answer
    was written before it, or at START_HOLD; and before the rest starts in any case."""
    released = []
    monkeypatch.setattr(agent, "loopback_up", lambda: released.append("lo"))
    monkeypatch.setattr(agent.sys, "platform", "linux")
    events = []

    def fresh():
        start = agent.StartUp((["virtio_console"], []), FakeServer(events),
                              agent.ListenerGate(), agent.NoNotifier(), None, True,
                              workload=Part(events, "workload"), load=lambda g, o: [])
        start.began, start.stage, start.release_at = time.monotonic(), "transports", 100.0
        return start
    start = fresh()
    assert start.deadline() == 100.0
    start.tick(50.0)
    assert released == [] and not start.released
    start.server.first_answer_at = 49.0            # a Unix-socket host answered early
    start.tick(50.0)
    assert released == ["lo"] and start.deadline() == start.began + agent.MODULES_TIMEOUT
    start.tick(60.0)
    assert released == ["lo"]                      # once

    for when in ("ready", "hold"):
        released.clear()
        start = fresh()
        if when == "ready":
            start.ready()
            assert released == []                  # not in the turn: at its end
            start.tick(50.0)
        else:
            start.tick(100.0)
        assert released == ["lo"], when

    released.clear()
    start = fresh()
    start.stage = "modules"
    monkeypatch.setattr(agent, "mount_filesystems", lambda table: events.append("mounts"))
    monkeypatch.setattr(agent, "configure_network", lambda net: events.append("network"))
    start.start_the_rest()                         # the workload is about to start
    assert released == ["lo"] and events[-3:] == ["mounts", "network", "workload"]


def test_a_listener_whose_transport_came_in_is_retried_steadily_then_with_back_off():
    listener = agent.Listener(("serial", "org.arcbox.agent"), None)
    listener.backoff, listener.steady = agent.TRANSPORT_RETRY_FIRST, agent.TRANSPORT_RETRIES
    now, waits = 0.0, []
    for _ in range(agent.TRANSPORT_RETRIES + 3):
        listener.failed(now)
        waits.append(round(listener.retry_at - now, 3))
        now = listener.retry_at
    assert waits[:agent.TRANSPORT_RETRIES + 1] == [0.01] * (agent.TRANSPORT_RETRIES + 1)
    assert waits[-2:] == [0.02, 0.04]
    listener.opened()
    assert listener.steady == 0 and listener.backoff == agent.BIND_RETRY_FIRST


def test_the_gate_holds_a_named_port_back_only_while_transports_load(monkeypatch):
    gate = agent.ListenerGate()
    port, path = agent.Listener(("serial", "org.qemu.guest_agent.0"), None), \
        agent.Listener(("serial", "/dev/hvc1"), None)
    monkeypatch.setattr(agent, "VIRTIO_PORTS", "/nonexistent/virtio-ports")
    gate.loading = True
    assert not gate.may_try(port) and gate.may_try(path) and gate.expecting_failures
    gate.loading = False
    assert gate.may_try(port) and not gate.expecting_failures


DRIVER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import agent
def slow_load(group, optional):
    for name in group:
        agent.log("info", "fake module %s loading" % name)
        time.sleep(2.0 if name == "big" else 0.01)
        agent.log("info", "fake module %s loaded" % name)
    return []
argv = sys.argv[2:]
config, _ = agent.read_configuration(argv, "", False)
a = agent.Agent(config, False, modules=(["big", "virtio_console"], []), load=slow_load)
sys.exit(a.run())
"""


def start_driver(tmp_path, *args):
    sock = str(tmp_path / "agent.sock")
    log = open(str(tmp_path / "agent.log"), "w")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, REPO, "--listen", "unix:" + sock,
                             "--log", "debug"] + list(args), stdout=log, stderr=log)
    return proc, sock, str(tmp_path / "agent.log")


def test_the_host_is_answered_while_a_big_module_loads_and_the_workload_waits_for_it(
        tmp_path):
    marker = str(tmp_path / "workload-ran")
    proc, sock, log_path = start_driver(tmp_path, "--exec", "touch", marker)
    try:
        client = None

        def log_text():
            with open(log_path) as f:
                return f.read()
        wait_for(lambda: "fake module big loading" in log_text(), 10, "the big module's load")
        client = agent.Client(("unix", sock), 5.0)
        client.connect()
        client.request(agent.MSG_PING)
        assert "fake module big loaded" not in log_text()
        assert not os.path.exists(marker), "the workload started before every module was in"
        wait_for(lambda: os.path.exists(marker), 10, "the workload")
        with open(log_path) as f:
            lines = f.read().splitlines()
        order = [next(i for i, l in enumerate(lines) if needle in l) for needle in (
            "fake module virtio_console loaded", "ready (pid", "fake module big loaded",
            "modules: all in after", "started touch")]
        assert order == sorted(order), lines
    finally:
        if client is not None:
            client.close()
        proc.terminate()
        proc.wait(10)
