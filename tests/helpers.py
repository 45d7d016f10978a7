"""Test helpers (importable: tests never import from conftest): a raw frame client, a
polling wait, the agent started as a plain process (tools/guestctl.py drives it), and the
saved benchmark runs and the README they are quoted in."""

import json
import os
import socket
import time

import agent
from guestctl import AgentProcess


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def saved_result(name):
    """bench/results/NAME: parsed if it is JSON, else its text."""
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f) if name.endswith(".json") else f.read()


def readme(start=None, end="\n\n"):
    """The README, or its part from `start` to the next `end`, with whitespace folded (the
    README is wrapped, the figures are not)."""
    return doc("../README.md", start, end)


def doc(name, start=None, end="\n\n"):
    """docs/NAME, or its part from `start` to the next `end`, with whitespace folded (the
    page is wrapped, the figures are not)."""
    with open(os.path.join(ROOT, "docs", name)) as f:
        text = f.read()
    if start is None:
        return text
    begin = text.index(start)
    return " ".join(text[begin:text.index(end, begin + len(start))].split())


def start_agent(pyz, workdir, *args):
    """The agent as a plain process (not PID 1) on workdir/agent.sock, serving."""
    return AgentProcess(pyz, workdir, *args).start()


def wait_for(predicate, timeout=15, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.02)



def connect_when_listening(path, timeout=20):
    """A connected Unix socket to `path`, once its server listens. A server binds the path
    before it calls listen(): between the two, the file exists and connect() is refused
    (qemu-ga 10 was caught there once in CI), so waiting for the file alone is a race."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            assert time.monotonic() < deadline, "nothing listening on %s after %g s" % (
                path, timeout)
            time.sleep(0.02)

# A log line's stamp is taken just after the event it reports (the signal is sent, the
# deadline set, then the line is formatted), so the gap between two stamps can fall short of
# the gap between the events by the microseconds that takes. 1 ms is far above that, and
# tight enough to catch a grace counted from the loop's wake-up instead of from SIGTERM
# (1.998 s for 2 s, the bug fixed in f3d0ee0).
LOG_STAMP_SLACK = 0.001
# How late SIGKILL may come after the grace: the loop wakes within poll()'s millisecond
# rounding plus scheduling (the bench measures ~2 ms on this machine); 50 ms leaves room for
# a busy CI machine. A TCG guest needs more (VM_LATE).
NAMESPACE_LATE = 0.05
VM_LATE = 0.5


def assert_grace_kept(events, grace, most=NAMESPACE_LATE):
    """SIGKILL came after the whole grace (counted from SIGTERM), and at most `most` later."""
    term = next(t for t, _, m in events if "SIGTERM sent" in m)
    kill = next(t for t, _, m in events if "SIGKILL sent" in m)
    assert grace - LOG_STAMP_SLACK <= kill - term <= grace + most, (
        "SIGKILL %.4fs after SIGTERM, grace %gs" % (kill - term, grace))
    return kill - term


class RawClient:
    """Frames in, frames out, no help: for testing what the agent does with odd input."""

    def __init__(self, path, timeout=5.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = bytearray()

    def send(self, data):
        self.s.sendall(data)

    def frame(self):
        """Next frame (type, trace, payload), or None at EOF."""
        while True:
            got = agent.decode_frame(self.buf, 1 << 24)
            if got is not None:
                del self.buf[:got[3]]
                return got[:3]
            chunk = self.s.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def request(self, msg_type, payload=b"", trace=b""):
        self.send(agent.encode_frame(msg_type, payload, trace))
        return self.frame()

    def close(self):
        self.s.close()


def between_readings(first, ours, second, where):
    """Counters (QGA conformance): ours, read between two readings of qemu-ga's, lie between
    them; every other value, and the shape, is equal in all three."""
    if isinstance(ours, dict):
        assert set(ours) == set(first) == set(second), where
        for key in ours:
            between_readings(first[key], ours[key], second[key], where + "." + key)
    elif isinstance(ours, list):
        assert len(ours) == len(first) == len(second), where
        for i, (a, b, c) in enumerate(zip(first, ours, second)):
            between_readings(a, b, c, "%s[%d]" % (where, i))
    elif isinstance(ours, int) and not isinstance(ours, bool) and where.rsplit(".", 1)[-1] \
            not in ("cpu", "major", "minor", "prefix"):
        assert first <= ours <= second, (where, first, ours, second)
    else:
        assert first == ours == second, (where, first, ours, second)


def utmp_record(user, line, pid, seconds, microseconds, kind=7):
    """One glibc struct utmp (x86_64), packed field by field from <bits/utmp.h>, not with the
    agent's own layout: a wrong layout of ours must not pass."""
    import struct
    record = struct.pack("<h2xi", kind, pid)             # ut_type (7: USER_PROCESS), ut_pid
    record += line.encode().ljust(32, b"\0")             # ut_line[UT_LINESIZE]
    record += b"tty1"                                    # ut_id[4]
    record += user.encode().ljust(32, b"\0")             # ut_user[UT_NAMESIZE]
    record += b"".ljust(256, b"\0")                      # ut_host[UT_HOSTSIZE]
    record += struct.pack("<hh", 0, 0)                   # ut_exit
    record += struct.pack("<i", 1)                       # ut_session
    record += struct.pack("<ii", seconds, microseconds)  # ut_tv (32-bit on x86_64)
    record += b"\0" * 16 + b"\0" * 20                     # ut_addr_v6, __glibc_reserved
    assert len(record) == 384
    return record
