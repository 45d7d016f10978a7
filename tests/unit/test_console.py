"""The console: start-up lines are held until released (StartUp releases them; an alarm at
START_HOLD if the start hangs), with their true stamps; warnings and errors are never held
and keep the order; a forked child never writes the parent's held lines; a console nobody
drains never blocks PID 1."""

import os
import signal
import subprocess
import sys
import time

import pytest

import agent


@pytest.fixture
def console(monkeypatch):
    """The log's fd is a pipe; returns a function that reads what was written so far."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    monkeypatch.setattr(agent, "_log_fd", w)
    monkeypatch.setattr(agent, "_log_level", agent.LOG_LEVELS["debug"])
    monkeypatch.setattr(agent, "_held_lines", None)
    writes = []

    def read():
        try:
            data = os.read(r, 65536)
        except BlockingIOError:
            return writes
        writes.append(data.decode())
        return writes
    yield read
    signal.setitimer(signal.ITIMER_REAL, 0)        # a hold's alarm must not outlive the test
    os.close(r)
    os.close(w)


def messages(writes):
    return [line.split(": ", 1)[1] for chunk in writes for line in chunk.splitlines()]


def test_info_lines_wait_for_the_release_and_go_out_in_one_write(console):
    agent.hold_console()
    agent.log("info", "listening on serial:org.arcbox.agent")
    agent.log("debug", "module virtio_pci loaded")
    assert console() == []
    agent.release_console()
    writes = console()
    assert len(writes) == 1
    assert messages(writes) == ["listening on serial:org.arcbox.agent",
                                "module virtio_pci loaded"]
    agent.log("info", "after")                 # no longer held
    assert messages(console())[-1] == "after"


def test_the_stamp_is_when_it_was_logged_not_when_it_was_written(console, monkeypatch):
    clock = iter([1.25, 9.5])
    monkeypatch.setattr(agent, "_since_boot", lambda: next(clock))
    agent.hold_console()
    agent.log("info", "early")
    agent.release_console()
    agent.log("info", "late")
    lines = "".join(console()).splitlines()
    assert lines[0].startswith("[   1.250000]") and lines[1].startswith("[   9.500000]")


def test_a_warning_writes_what_is_held_first_then_itself(console):
    agent.hold_console()
    agent.log("info", "one")
    agent.log("warn", "two")
    agent.log("info", "three")
    assert messages(console()) == ["one", "two", "three"]


def test_a_forked_child_does_not_write_the_parents_held_lines(console):
    agent.hold_console()
    agent.log("info", "held in the parent")
    pid = os.fork()
    if pid == 0:
        try:
            agent.log("warn", "from the child")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    agent.release_console()
    assert messages(console()) == ["from the child", "held in the parent"]


HANGING_START = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import agent
def hang(self):
    agent.log("info", "the start goes on")
    time.sleep(30)                 # a start that hangs before its loop ever turns
agent.Agent.run = hang
agent.main(["--listen", "unix:" + sys.argv[2], "--log", "info"])
"""


def test_held_lines_reach_the_console_when_the_start_hangs(tmp_path):
    """The loop ends the hold; a start that hangs before the loop turns would keep the lines
    forever, so an alarm at START_HOLD writes them (without it: nothing in 6 s, checked)."""
    proc = subprocess.Popen([sys.executable, "-c", HANGING_START, agent.__file__.rsplit("/", 1)[0],
                             str(tmp_path / "agent.sock")], stderr=subprocess.PIPE)
    try:
        os.set_blocking(proc.stderr.fileno(), False)
        began, seen = time.monotonic(), b""
        while b"the start goes on" not in seen and time.monotonic() - began < 6:
            seen += proc.stderr.read() or b""
            time.sleep(0.05)
        took = time.monotonic() - began
    finally:
        proc.kill()
        proc.wait()
    assert b"the start goes on" in seen, seen
    assert took >= agent.START_HOLD - 0.5      # held until the alarm, not written at once


def test_a_console_nobody_drains_never_blocks_pid1_and_loses_no_line_unsaid(monkeypatch):
    """PID 1 logs through a non-blocking console descriptor: what the console cannot take
    waits in a backlog the loop writes when it can, in order; past CONSOLE_BACKLOG the newest
    lines are dropped and the count said. (A blocking write here hung: checked.)"""
    r, w = os.pipe()
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    monkeypatch.setattr(agent, "_log_fd", w)
    monkeypatch.setattr(agent, "_held_lines", None)
    try:
        began = time.monotonic()
        for i in range(4000):                    # ~400 KB: more than the pipe and backlog
            agent.log("warn", "line %04d %s" % (i, "x" * 60))
        assert time.monotonic() - began < 5      # never waited for the reader
        assert len(agent._console_backlog) <= agent.CONSOLE_BACKLOG
        assert agent.ConsoleBacklog().wants(0)[0][:2] == (w, agent._POLLOUT)
        got = bytearray()
        while True:                              # the reader drains; the loop's flush
            try:
                got += os.read(r, 1 << 20)
            except BlockingIOError:
                if agent.flush_console_backlog():
                    try:
                        got += os.read(r, 1 << 20)
                    except BlockingIOError:
                        pass
                    break
        text = got.decode()
        numbers = [int(line.split("line ")[1][:4]) for line in text.splitlines()
                   if "warn: line " in line]
        assert numbers == list(range(len(numbers)))          # in order, none skipped
        assert 3000 < len(numbers) < 4000
        dropped = int(text.split(" bytes of log dropped")[0].rsplit(" ", 1)[1])
        assert dropped == sum(len(line) + 1 for line in [
            "[%11.6f] arcbox-agent warn: line %04d %s" % (agent._since_boot(), i, "x" * 60)
            for i in range(len(numbers), 4000)])
    finally:
        del agent._console_backlog[:]
        monkeypatch.setattr(agent, "_console_dropped", 0)
        os.close(r)
        os.close(w)
