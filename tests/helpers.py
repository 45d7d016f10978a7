"""Test helpers (importable: tests never import from conftest): a raw frame client, a
polling wait, and the agent started as a plain process (tools/guestctl.py drives it)."""

import socket
import time

import agent
from guestctl import AgentProcess


def start_agent(pyz, workdir, *args):
    """The agent as a plain process (not PID 1) on workdir/agent.sock, serving."""
    return AgentProcess(pyz, workdir, *args).start()


def wait_for(predicate, timeout=15, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.02)


# A log line's stamp is taken just after the event it reports (the signal is sent, then
# the line is formatted and written), so the gap between two stamps can fall short of the
# gap between the events by the time one write takes. 20 ms is far above that, far below
# any grace a test uses.
LOG_STAMP_SLACK = 0.02


def assert_grace_kept(events, grace, most=2.0):
    """SIGKILL came after the whole grace (counted from SIGTERM), and not much later."""
    term = next(t for t, _, m in events if "SIGTERM sent" in m)
    kill = next(t for t, _, m in events if "SIGKILL sent" in m)
    assert grace - LOG_STAMP_SLACK <= kill - term < grace + most, (
        "SIGKILL %.3fs after SIGTERM, grace %gs" % (kill - term, grace))


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
