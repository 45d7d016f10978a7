"""The end of the shutdown sequence when reboot() does not end the guest: the paths a VM
almost never takes, driven here with fakes (nothing is signalled, nothing rebooted)."""

import errno
import os
import subprocess
import time

import pytest

import agent

TIMEOUTS = agent.ShutdownTimeouts(kill_wait=0.5, sync_timeout=1.0, power_timeout=0.2)


def final_phase(monkeypatch, helper_pid, reboot_result=0):
    failures = []
    monkeypatch.setattr(agent, "spawn_helper", lambda body: helper_pid)
    monkeypatch.setattr(agent, "call_reboot", lambda command: reboot_result)
    seq = agent.ShutdownSequence(agent.Reaper(), TIMEOUTS, on_failure=failures.append)
    seq.action, seq.started = "poweroff", time.monotonic()
    seq._start_final(time.monotonic())
    return seq, failures


def test_reboot_still_running_after_the_power_timeout_is_a_failure(monkeypatch):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        seq, failures = final_phase(monkeypatch, sleeper.pid)
        seq.step(time.monotonic())
        assert seq.phase == "final" and failures == []        # within --power-timeout
        seq.step(time.monotonic() + 0.3)
        assert seq.phase == "failed"
        assert failures == ["the guest is still up 0.2s after reboot()"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_reboot_that_returns_is_a_failure(monkeypatch):
    seq, failures = final_phase(monkeypatch, 4242)
    seq._helper_done(4242, 0)                                 # the child exited 0
    seq.step(time.monotonic())
    assert failures == ["reboot() returned without powering off (exit status 0)"]


def test_reboot_that_fails_without_a_child_reports_the_errno(monkeypatch):
    seq, failures = final_phase(monkeypatch, None, reboot_result=errno.EPERM)
    seq.step(time.monotonic())
    assert failures == ["reboot() failed: Operation not permitted"]


def test_the_timeouts_record_is_frozen():
    with pytest.raises(AttributeError):
        TIMEOUTS.kill_wait = 9
    assert TIMEOUTS.kill_wait == 0.5
    assert agent.ShutdownTimeouts.from_config(agent.default_config()).power_timeout == 10.0


def sync_phase(monkeypatch):
    """A sequence in the sync phase whose helper children are recorded, not forked."""
    forks = []

    def fake_fork(self, wait_for_go):
        forks.append(wait_for_go)
        self.helper = 5000 + len(forks)
        return (-1, -1)

    monkeypatch.setattr(agent.ShutdownSequence, "_fork_sync_helper", fake_fork)
    finals = []
    monkeypatch.setattr(agent.ShutdownSequence, "_start_final",
                        lambda self, now: finals.append(now))
    seq = agent.ShutdownSequence(agent.Reaper(), TIMEOUTS, on_failure=lambda why: None)
    seq.action, seq.started = "poweroff", time.monotonic()
    return seq, forks, finals


def test_a_prepared_helper_that_is_gone_is_replaced_at_sync(monkeypatch):
    seq, forks, finals = sync_phase(monkeypatch)
    r, w = os.pipe()
    seq.prepared = (4242, r, w)              # forked early, then killed: helper is no longer it
    seq.helper = None
    seq._start_sync(time.monotonic())
    assert forks == [False] and seq.phase == "sync" and seq.prepared is None
    with pytest.raises(OSError):
        os.fstat(w)                          # its pipes are closed


def test_a_sync_child_killed_before_its_report_is_synced_again_once(monkeypatch):
    seq, forks, finals = sync_phase(monkeypatch)
    seq._start_sync(time.monotonic())
    assert forks == [False]
    seq.sync_report, seq.helper, seq.helper_code = -1, None, -9   # died before reporting
    seq.step(time.monotonic())
    assert forks == [False, False] and finals == [], "nothing may be lost: sync again"
    seq.sync_report, seq.helper, seq.helper_code = -1, None, -9   # and again
    seq.step(time.monotonic())
    assert forks == [False, False] and len(finals) == 1            # then reboot() anyway
