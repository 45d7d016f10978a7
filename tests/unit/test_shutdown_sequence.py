"""The end of the shutdown sequence when reboot() does not end the guest: the paths a VM
almost never takes, driven here with fakes (nothing is signalled, nothing rebooted)."""

import errno
import os
import time

import pytest

import agent

TIMEOUTS = agent.ShutdownTimeouts(kill_wait=0.5, sync_timeout=1.0, power_timeout=0.2)


class FakeFork:
    """Stands in for run_in_child: records each body, forks nothing, hands out pids (or None:
    fork failed)."""

    def __init__(self, *pids):
        self.pids = list(pids)
        self.bodies = []

    def __call__(self, body):
        self.bodies.append(body)
        return self.pids.pop(0) if self.pids else None


def sequence(fork, monkeypatch, reboot_result=0):
    failures = []
    monkeypatch.setattr(agent, "call_reboot", lambda command: reboot_result)
    reaper = agent.Reaper()
    child = agent.PowerOffChild(reaper, agent.GuestMounts(), 0.5, fork=fork)
    seq = agent.ShutdownSequence(reaper, TIMEOUTS, on_failure=failures.append, child=child)
    seq.begin("poweroff", 1, "test")
    return seq, reaper, failures


def exited(reaper, pid, status):
    """What the reaper does when waitpid() reports pid."""
    reaper.watched.pop(pid)(pid, status)


def poll_once(source):
    """What the event loop does when the source's fds are ready (here: the report pipe,
    whose writer is gone, so it reads EOF: the child died before reporting)."""
    for fd, mask, handler, data in list(source.wants(time.monotonic())):
        handler(data, mask)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def final_phase(fork, monkeypatch, reboot_result=0):
    seq, reaper, failures = sequence(fork, monkeypatch, reboot_result)
    seq._start_final(time.monotonic())
    return seq, reaper, failures


def test_reboot_still_running_after_the_power_timeout_is_a_failure(monkeypatch):
    seq, _, failures = final_phase(FakeFork(4242), monkeypatch)
    seq.step(time.monotonic())
    assert seq.phase == "final" and failures == []        # within --power-timeout
    seq.step(time.monotonic() + 0.3)
    assert seq.phase == "failed"
    assert failures == ["the guest is still up 0.2s after reboot()"]


def test_reboot_that_returns_is_a_failure(monkeypatch):
    seq, reaper, failures = final_phase(FakeFork(4242), monkeypatch)
    exited(reaper, 4242, 0)                                  # the child exited 0
    seq.step(time.monotonic())
    assert failures == ["reboot() returned without powering off (exit status 0)"]


def test_reboot_that_fails_without_a_child_reports_the_errno(monkeypatch):
    seq, _, failures = final_phase(FakeFork(), monkeypatch, reboot_result=errno.EPERM)
    seq.step(time.monotonic())
    assert failures == ["reboot() failed: Operation not permitted"]


def test_the_timeouts_record_is_frozen():
    with pytest.raises(AttributeError):
        TIMEOUTS.kill_wait = 9
    assert TIMEOUTS.kill_wait == 0.5
    assert agent.shutdown_timeouts(agent.default_config()).power_timeout == 10.0


def test_a_prepared_child_that_is_gone_is_replaced_at_sync(monkeypatch):
    monkeypatch.setattr(agent.Reaper, "children", staticmethod(lambda: set()))
    fork = FakeFork(4242, 4343)
    reaper = agent.Reaper()
    child = agent.PowerOffChild(reaper, agent.GuestMounts(), 0.5, fork=fork)
    before = open_fds()
    child.prepare("poweroff", time.monotonic())
    assert child.pid == 4242 and 4242 in reaper.uncounted       # waiting: not a process left
    child.abandon()                                        # SIGKILL at the end of the grace
    assert 4242 not in reaper.uncounted
    exited(reaper, 4242, 9)                                # killed by it
    assert child.start("poweroff", time.monotonic()) is True
    assert child.pid == 4343 and len(fork.bodies) == 2     # a new one, going at once
    assert open_fds() == before + 1                        # only its result pipe is open


def test_a_teardown_child_killed_before_its_report_is_run_again_once(monkeypatch):
    fork = FakeFork(5001, 5002)
    seq, reaper, failures = sequence(fork, monkeypatch)
    finals = []
    monkeypatch.setattr(agent.ShutdownSequence, "_start_final",
                        lambda self, now: finals.append(now))
    seq._start_teardown(time.monotonic())
    assert len(fork.bodies) == 1 and seq.phase == "teardown"
    exited(reaper, 5001, 9)                                 # killed, no report
    poll_once(seq)                                          # the report pipe's EOF
    seq.step(time.monotonic())
    assert len(fork.bodies) == 2 and finals == [], "nothing may be lost: tear down again"
    exited(reaper, 5002, 9)                                 # and again
    poll_once(seq)
    seq.step(time.monotonic())
    assert len(fork.bodies) == 2 and len(finals) == 1       # then reboot() anyway


@pytest.mark.parametrize("grace", [2**31 - 1, 2**32 - 1])
def test_a_huge_grace_is_the_deadline_the_sequence_uses(monkeypatch, grace):
    """The wire's largest graces (u32 seconds, ~136 years) are kept whole: on a fake clock,
    SIGKILL is not sent a year on, and is sent when the grace is over. (The namespace test
    watches the real agent for 2.5 s only; an agent that cut the grace to 3 s passes that.)"""
    clock = [1000.0]
    signals = []
    monkeypatch.setattr(agent.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(agent, "kill_all", lambda sig: signals.append(sig) or True)
    monkeypatch.setattr(agent, "thaw_filesystems", lambda *args, **kwargs: 0)
    reaper = agent.Reaper()
    monkeypatch.setattr(reaper, "reap", lambda: None)
    reaper.no_children = False             # somebody ignores SIGTERM
    child = agent.PowerOffChild(reaper, agent.GuestMounts(), 0.5, fork=FakeFork(4242))
    seq = agent.ShutdownSequence(reaper, TIMEOUTS, on_failure=lambda why: None, child=child)
    seq.begin("poweroff", grace, "test")
    seq.step(clock[0])
    assert seq.phase == "term" and signals == [agent.signal.SIGTERM, agent.signal.SIGCONT]
    assert seq.deadline() == 1000.0 + grace
    for later in (3.0, 86400.0, 365 * 86400.0, grace - 0.001):
        clock[0] = 1000.0 + later
        seq.step(clock[0])
        assert seq.phase == "term" and agent.signal.SIGKILL not in signals, later
    clock[0] = 1000.0 + grace
    seq.step(clock[0])
    assert seq.phase == "kill" and signals[-1] == agent.signal.SIGKILL
    # and the loop's wait for it fits poll()'s int: at most POLL_MAX_MS
    waits = []

    class Poller:
        def register(self, *args):
            pass

        def poll(self, timeout):
            waits.append(timeout)
            return []
    loop = agent.EventLoop()
    loop.poller = Poller()
    clock[0] = 1000.0
    seq.deadline_at = 1000.0 + grace
    loop.add(seq)
    monkeypatch.setattr(seq, "tick", lambda now: None)
    loop.run_once()
    assert waits == [agent.POLL_MAX_MS]


def test_a_notify_connection_still_in_flight_is_waited_for_20ms_at_most(monkeypatch):
    """The README's promise: at power-off, a stream connect to the notify receiver that is
    still in progress holds the teardown back by NOTIFY_WAIT (20 ms) at most."""
    clock = [500.0]
    monkeypatch.setattr(agent.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(agent, "kill_all", lambda sig: False)
    monkeypatch.setattr(agent, "thaw_filesystems", lambda *args, **kwargs: 0)

    class StuckNotifier(agent.NoNotifier):
        def busy(self):
            return True                    # the connect never completes
    reaper = agent.Reaper()
    monkeypatch.setattr(reaper, "reap", lambda: None)
    reaper.no_children = True
    child = agent.PowerOffChild(reaper, agent.GuestMounts(), 0.5, fork=FakeFork(4242, 4243))
    seq = agent.ShutdownSequence(reaper, TIMEOUTS, on_failure=lambda why: None, child=child,
                                 notifier=StuckNotifier())
    seq.begin("poweroff", 5, "test")
    seq.step(clock[0])                      # ack -> term (nobody to signal)
    seq.step(clock[0])                      # nobody left -> the teardown, which waits
    assert seq.phase == "notify_wait"
    assert agent.NOTIFY_WAIT == 0.02 and seq.deadline() == 500.0 + agent.NOTIFY_WAIT
    clock[0] = 500.0 + agent.NOTIFY_WAIT - 0.001
    seq.step(clock[0])
    assert seq.phase == "notify_wait"
    clock[0] = 500.0 + agent.NOTIFY_WAIT
    seq.step(clock[0])
    assert seq.phase == "teardown"


def test_with_no_fork_possible_a_sync_that_never_returns_is_bounded(monkeypatch, logged):
    """No child can be forked (no memory, no pids): PID 1 syncs itself, from a thread it
    waits for within --sync-timeout -- a dead disk holds the thread, not PID 1 (an unbounded
    os.sync() there wedged it: checked)."""
    import threading
    never = threading.Event()
    monkeypatch.setattr(agent.os, "sync", lambda: never.wait(30))
    seq, reaper, failures = sequence(FakeFork(), monkeypatch)
    began = time.monotonic()
    seq._start_teardown(began)
    took = time.monotonic() - began
    never.set()
    assert TIMEOUTS.sync_timeout - 0.05 <= took < TIMEOUTS.sync_timeout + 1.0
    assert seq.child.left_writable == 0 and seq.phase == "teardown"
    assert "shutdown: sync() did not finish within 1s (no fork possible: not remounted)" \
        in logged
