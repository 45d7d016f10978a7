"""Test helpers: an agent subprocess (not PID 1) on a Unix socket, and a raw frame client."""

import os
import socket
import subprocess
import sys
import time

import agent


class AgentProcess:
    def __init__(self, pyz, workdir, *args):
        self.sock = os.path.join(str(workdir), "agent.sock")
        self.log_path = os.path.join(str(workdir), "agent.log")
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, pyz, "--listen", "unix:" + self.sock, "--log", "debug"] + list(args),
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not start:\n" + self.log())
            time.sleep(0.01)

    def connect(self, timeout=5.0):
        return RawClient(self.sock, timeout)

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


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
