"""Who held the stop up, said by the real .pyz as PID 1 of a PID namespace: when the grace
runs out, each process still alive is named before SIGKILL, with what it did with its SIGTERM
(at most ten named, then "and N more"); and one summary line per stop: how many exited on
SIGTERM and when the last did, who was killed at the grace, the teardown's time and when
reboot() was called."""

import re

import pytest

from nsguest import POWER_OFF_RETURNCODE

pytestmark = pytest.mark.namespace

POLITE = "sleep 1000 & sleep 1000 &"
HOLDERS = ("(trap '' TERM; exec sleep 1001) & "        # ignores it
           "sh -c 'trap \"\" TERM; while :; do sleep 0.1; done' & ")   # ignores it too


def stop_and_name(guest, setup):
    """A guest with `setup` stopped with a grace of 1 s: its line naming who held it up."""
    g = guest(setup)
    assert g.shutdown(grace=1) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    return next(m for m in g.messages() if "is over and" in m)


def summary_of(messages):
    lines = [m for m in messages if m.startswith("shutdown: summary: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_polite_guest_has_nobody_named_and_a_summary_of_exits(guest):
    g = guest(POLITE)
    assert g.shutdown(grace=5) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    log = g.messages()
    assert not any("still run" in m for m in log), log
    line = summary_of(log)
    m = re.match(r"shutdown: summary: (\d+) of (\d+) processes exited on SIGTERM \(the last "
                 r"([0-9.]+)s after it\); teardown ([0-9.]+)s; reboot\(poweroff\) ([0-9.]+)s "
                 r"after the request$", line)
    assert m, line
    assert m.group(1) == m.group(2) and int(m.group(1)) >= 2      # both sleeps, and sh
    assert float(m.group(3)) < 1.0 and float(m.group(5)) < 5.0
    assert log.index(line) < next(i for i, x in enumerate(log) if x.startswith("shutdown: calling reboot"))


def test_the_processes_the_grace_did_not_end_are_named_before_sigkill(guest):
    g = guest(HOLDERS + POLITE)
    assert g.shutdown(grace=1) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    log = g.messages()
    named = [m for m in log if "is over and" in m]
    assert len(named) == 1, log
    held = named[0]
    assert held.startswith("shutdown: the grace (1s) is over and ")
    assert re.search(r"pid \d+ \(sleep\) ignores SIGTERM", held), held
    assert re.search(r"pid \d+ \(sh\) ignores SIGTERM", held), held
    # named before SIGKILL went out
    assert log.index(held) < log.index("shutdown: grace over, SIGKILL sent to the rest")
    line = summary_of(log)
    assert re.search(r"; [2-9] killed at the grace: pid \d+ \((sleep|sh)\)", line), line
    assert "exited on SIGTERM (the last" in line


def test_past_ten_holders_the_rest_are_counted(guest):
    held = stop_and_name(guest, "for i in $(seq 14); do (trap '' TERM; exec sleep 1002) & done")
    assert held.count("ignores SIGTERM") == 10 and held.endswith("; and 4 more"), held
    assert "14 processes still run" in held


def test_a_process_started_after_sigterm_is_said_so(guest):
    # a TERM-ignoring shell forks a new sleep every 0.1 s: those came after the SIGTERM
    held = stop_and_name(guest, "sh -c 'trap \"\" TERM; while :; do sleep 5 & sleep 0.1; done' &")
    assert re.search(r"pid \d+ \(sleep\) started after SIGTERM", held), held
