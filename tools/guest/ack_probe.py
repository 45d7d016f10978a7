"""Runs inside the namespace, started before the agent: connects to it, asks for Shutdown and,
when SIGTERM arrives, records whether the ShutdownResponse was already waiting in its socket.
For a Unix stream socket a completed send() is already in the peer's receive queue, so
"ack-first" proves the agent flushed the reply before it signalled anyone.

usage: ack_probe.py SOCKET RESULT_FILE
"""

import os
import select
import signal
import socket
import sys
import time

sock_path, result_path = sys.argv[1], sys.argv[2]


def on_term(signum, frame):
    readable, _, _ = select.select([s], [], [], 0)
    data = s.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT) if readable else b""
    with open(result_path, "w") as f:
        f.write("ack-first %s" % data.hex() if data else "term-first")
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
deadline = time.monotonic() + 20
while True:
    try:
        s.connect(sock_path)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.01)
# Shutdown, timeout_seconds = 30: only SIGTERM ends this probe.
s.sendall(bytes.fromhex("00000008 0000000a 0000 081e"))
while True:
    time.sleep(1)
