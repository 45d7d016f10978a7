"""Host-side commands: exit statuses, --json, and hybrid vsock (Firecracker/Cloud Hypervisor)
against a fake VMM socket that does the CONNECT/OK handshake."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

import agent
from helpers import start_agent


def run(pyz, *args, timeout=30):
    return subprocess.run([sys.executable, pyz] + list(args), capture_output=True, text=True,
                          timeout=timeout)


class FakeVMM:
    """A hybrid-vsock Unix socket: reads 'CONNECT <port>\\n', then behaves as `mode` says."""

    def __init__(self, path, mode):
        self.path, self.mode, self.seen = path, mode, []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.server.accept()
        with conn:
            buf = b""
            while b"\n" not in buf:
                chunk = conn.recv(100)
                if not chunk:
                    return
                buf += chunk
            line, _, rest = buf.partition(b"\n")
            self.seen.append(line)
            if self.mode == "close":
                return
            if self.mode == "refuse":
                conn.sendall(b"ERR no listener\n")
                return
            if self.mode == "silent":
                conn.sendall(b"OK 1073741824\n")
                conn.recv(100)
                threading.Event().wait(10)
                return
            conn.sendall(b"OK 1073741824\n")     # then answer one Ping like a guest
            while agent.decode_frame(rest, 1 << 20) is None:
                rest += conn.recv(100)
            msg_type, trace, payload, _ = agent.decode_frame(rest, 1 << 20)
            self.seen.append(msg_type)
            conn.sendall(agent.encode_frame(0x1001, agent.encode_message(
                agent.PING_RESPONSE, {"message": "pong", "version": "fake"}), trace))

    def close(self):
        self.server.close()


@pytest.fixture
def vmm(tmp_path):
    made = []

    def make(mode):
        v = FakeVMM(str(tmp_path / ("vmm-%s.sock" % mode)), mode)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


def test_hybrid_vsock_handshake_then_protocol(pyz, vmm):
    v = vmm("ok")
    out = run(pyz, "ping", "--to", "hvsock:%s:1024" % v.path, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["message"] == "pong"
    assert v.seen == [b"CONNECT 1024", agent.MSG_PING]


@pytest.mark.parametrize("mode,text", [("close", "closed the connection instead of OK"),
                                       ("refuse", "answered 'ERR no listener' instead of OK")])
def test_hybrid_vsock_without_ok_is_unreachable(pyz, vmm, mode, text):
    v = vmm(mode)
    out = run(pyz, "ping", "--to", "hvsock:" + v.path)
    assert out.returncode == agent.EXIT_UNREACHABLE
    assert text in out.stderr and "listening on vsock port 1024" in out.stderr
    assert out.stderr.count("\n") == 1                  # a one-line reason


def test_silence_is_a_timeout(pyz, vmm):
    v = vmm("silent")
    out = run(pyz, "info", "--to", "hvsock:" + v.path, "--timeout", "0.5")
    assert out.returncode == agent.EXIT_TIMEOUT and "within 0.5s" in out.stderr


def test_nobody_listening_is_unreachable(pyz, tmp_path):
    out = run(pyz, "ping", "--to", "unix:%s/none.sock" % tmp_path)
    assert out.returncode == agent.EXIT_UNREACHABLE and "cannot connect" in out.stderr


def test_usage_errors_exit_2(pyz):
    assert run(pyz, "ping").returncode == agent.EXIT_USAGE
    out = run(pyz, "ping", "--to", "tcp:1.2.3.4")
    assert out.returncode == agent.EXIT_USAGE and "unknown address kind" in out.stderr


def test_commands_against_a_real_agent(pyz, tmp_path):
    proc = start_agent(pyz, tmp_path)
    try:
        to = "unix:" + proc.sock
        out = run(pyz, "ping", "--to", to, "--message", "hello")
        assert out.returncode == 0 and out.stdout.startswith("pong: hello (agent %s)"
                                                             % agent.__version__)
        info = json.loads(run(pyz, "info", "--to", to, "--json").stdout)
        assert info["kernel_version"] == os.uname().release and info["cpu_count"] > 0
        human = run(pyz, "info", "--to", to).stdout
        assert "hostname      %s" % socket.gethostname() in human
        out = run(pyz, "shutdown", "--to", to, "--grace", "3", "--json")
        assert out.returncode == agent.EXIT_REFUSED            # not PID 1: an Error frame
        assert "agent error 503: shutdown refused: this agent is not PID 1" in out.stderr
        assert json.loads(out.stdout)["exit_status"] == agent.EXIT_REFUSED
    finally:
        proc.stop()


def test_a_full_backlog_is_waited_for_not_unreachable(tmp_path):
    """A busy agent's Unix listen backlog can be full: connect() then says EAGAIN at once.
    The client waits for room within its timeout instead of calling the agent unreachable."""
    import time
    path = str(tmp_path / "busy.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    queued = []
    while True:                                  # fill the backlog
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
            queued.append(s)
        except BlockingIOError:
            s.close()
            break
    client = agent.Client(("unix", path), 0.4)
    started = time.monotonic()
    with pytest.raises(agent.ClientError) as err:
        client.connect()                        # nobody accepts: the timeout, not at once
    client.close()
    assert err.value.code == agent.EXIT_TIMEOUT
    assert time.monotonic() - started >= 0.35
    timer = threading.Timer(0.2, lambda: server.accept())    # room comes after 0.2 s
    timer.start()
    client = agent.Client(("unix", path), 5)
    client.connect()
    client.close()
    timer.join()
    for s in queued + [server]:
        s.close()
