"""Kernel modules (ModuleLoader), with a fake finit_module: all in the loader thread, never in
the loop's -- the transports first, one at a time, each reported; then the rest in order; the host is
answered while the rest still loads; what needs the modules (the workload) starts only after
all are in; a stop during the load starts nothing. The agent here is a plain process (not PID 1): a driver script gives
it the fake."""

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


def run_loader(names, optional=(), loads=None, stop_after=None):
    """Run a ModuleLoader in an event loop until it is done; returns the events seen."""
    events = []
    record = os.pipe()

    def fake_load(group, opt):
        os.write(record[1], (" ".join(["load"] + list(group) + ["|"] + list(opt)
                                      + ["in", str(_thread.get_ident())]) + "\n").encode())
        time.sleep(0.05 * len(group))
        return [n for n in group if n == "broken"]
    loader = agent.ModuleLoader(names, optional, lambda: events.append("transports"),
                                lambda: events.append("done"), load=loads or fake_load,
                                on_transport=lambda: events.append("one transport"))
    loop = agent.EventLoop()
    loop.add(loader)
    loader.start()
    deadline = time.monotonic() + 10
    while "done" not in events and time.monotonic() < deadline:
        loop.run_once(0.05)
        if stop_after and stop_after in events:
            loader.stop()
            break
    os.close(record[1])
    with os.fdopen(record[0]) as f:
        calls = f.read().splitlines()
    assert all(not c.endswith(" in %d" % _thread.get_ident()) for c in calls), \
        "loaded by the loop's own thread"
    return events, [c.rsplit(" in ", 1)[0] for c in calls], loader


def test_the_child_loads_transports_then_the_rest_and_reports_each_step():
    events, calls, loader = run_loader(["ext4", "virtio_console", "broken", "virtio_pci"],
                                       optional=["evdev"])
    assert events == ["one transport", "one transport", "transports", "done"]
    assert calls == ["load virtio_console |", "load virtio_pci |", "load ext4 broken | evdev"]
    assert loader.thread is not None and loader.state == "done"


def test_a_transport_module_whose_init_hangs_never_stops_the_loop():
    """finit_module runs a module's init in the caller: one that waits on its device for
    good must not hold PID 1 (which would then miss every signal and the host)."""
    events, never = [], threading.Event()
    loader = agent.ModuleLoader(["virtio_pci", "virtio_console"], [],
                                lambda: events.append("transports"), lambda: None,
                                load=lambda group, opt: never.wait(30) and [],
                                on_transport=lambda: events.append("one transport"))
    loop = agent.EventLoop()
    loop.add(loader)
    began = time.monotonic()
    loader.start()
    for _ in range(5):
        loop.run_once(0.05)
    assert time.monotonic() - began < 2 and events == [] and loader.state == "transports"
    loader.stop()                                  # a stop meanwhile: nothing more is called
    never.set()
    time.sleep(0.2)
    assert events == []


def test_nothing_to_load_still_says_transports_then_done_at_once():
    events, calls, loader = run_loader([])
    assert events == ["transports", "done"] and calls == [] and loader.thread is None


def test_a_stop_while_loading_calls_nothing_more():
    events, _, loader = run_loader(["virtio_console", "ext4", "xfs", "btrfs"],
                                   stop_after="transports")
    assert events == ["one transport", "transports"] and loader.state == "stopped"


def test_a_loader_that_fails_does_not_keep_the_workload_waiting():
    def crash(group, opt):
        if "ext4" in group:            # the rest, after the transports
            raise RuntimeError("a bug")
        return []
    events, _, loader = run_loader(["virtio_console", "ext4"], loads=crash)
    assert events == ["one transport", "transports", "done"]

    def crash_at_once(group, opt):
        raise RuntimeError("a bug")
    events, _, loader = run_loader(["virtio_console", "ext4"], loads=crash_at_once)
    assert events == ["transports", "done"]        # failed in the transports: ready all the same


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
