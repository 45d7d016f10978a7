"""A QEMU guest agent client, the two ways management stacks talk to the agent:

- libvirt (src/qemu/qemu_agent.c): `guest-sync` with a fresh id before commands, skipping any
  line that is not {"return": that id} (garbage, stale answers of an earlier client);
- Proxmox VE (PVE/QMPClient.pm): a 0xFF byte, then `guest-sync-delimited`, and only what
  follows the 0xFF its answer starts with is read.

Over a Unix socket: the QEMU chardev of a virtio-serial port, or the agent's --qga unix:PATH.
Used by the tests and the benchmark; never by the agent."""

import json
import os
import random
import socket
import time


class QgaTimeout(Exception):
    pass


class QgaClient:
    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.timeout = timeout
        self.buf = b""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise QgaTimeout("no answer within %gs (have %r)" % (self.timeout, self.buf[-200:]))
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise QgaTimeout("no answer within %gs (have %r)" % (self.timeout, self.buf[-200:]))
        if not chunk:
            raise EOFError("the agent closed the connection")
        self.buf += chunk

    def read_line(self, timeout=None):
        """One answer line, as bytes without the newline."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buf:
            self._fill(deadline)
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def read_answer(self, timeout=None):
        return json.loads(self.read_line(timeout).lstrip(b"\xff").decode())

    def sync(self, timeout=None):
        """libvirt's way: guest-sync with a fresh id; skip every line until its answer."""
        wanted = random.randrange(1, 1 << 31)
        self.send(json.dumps({"execute": "guest-sync", "arguments": {"id": wanted}}) + "\n")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            try:
                answer = json.loads(line.lstrip(b"\xff").decode())
            except ValueError:
                continue
            if isinstance(answer, dict) and answer.get("return") == wanted:
                return wanted

    def sync_delimited(self, timeout=None):
        """Proxmox's way: 0xFF (drop partial input), guest-sync-delimited, then read only
        what follows the 0xFF that starts its answer."""
        wanted = random.randrange(1, 1 << 31)
        self.send(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                        "arguments": {"id": wanted}}).encode() + b"\n")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            while b"\xff" not in self.buf:
                self.buf = b""
                self._fill(deadline)
            self.buf = self.buf[self.buf.rindex(b"\xff") + 1:]
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            try:
                if json.loads(line.decode()).get("return") == wanted:
                    return wanted
            except ValueError:
                continue

    def call(self, name, arguments=None, reply=True, timeout=None, **extra):
        """Send one command and return its answer: {"return": ...} or {"error": ...}."""
        request = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        request.update(extra)
        self.send(json.dumps(request) + "\n")
        return self.read_answer(timeout) if reply else None

    def result(self, name, arguments=None, timeout=None):
        """A command's "return" value; an error answer raises."""
        answer = self.call(name, arguments, timeout=timeout)
        if "return" not in answer:
            raise AssertionError("%s failed: %r" % (name, answer))
        return answer["return"]


def connect(path, timeout=60.0, per_try=3.0, delimited=False):
    """Connect and sync, retrying until the agent answers (a guest still booting, a port not
    open yet): a synced QgaClient."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            client = QgaClient(path, timeout=per_try)
        except OSError as exc:
            last = exc
            time.sleep(0.1)
            continue
        try:
            (client.sync_delimited if delimited else client.sync)()
            client.sock.settimeout(per_try)
            return client
        except (QgaTimeout, EOFError, OSError) as exc:
            last = exc
            client.close()
    raise QgaTimeout("no QGA answer on %s within %gs: %s" % (path, timeout, last))


def shape(value):
    """A reply's shape: keys and JSON types, with lists reduced to their elements' shapes
    (what qemu-ga and this agent are compared on)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        shapes = []
        for item in value:
            s = shape(item)
            if s not in shapes:
                shapes.append(s)
        return shapes
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "int" if isinstance(value, int) else "number"
    return type(value).__name__


if __name__ == "__main__":
    import sys
    c = connect(sys.argv[1])
    for cmd in sys.argv[2:] or ["guest-info"]:
        print(json.dumps(c.call(cmd), indent=1))
    os._exit(0)
