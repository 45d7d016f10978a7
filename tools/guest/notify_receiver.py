"""Runs inside the guest, started before the agent (see /notify-init): a receiver for
systemd's notify protocol on AF_VSOCK seqpacket port PORT through vsock_loopback, standing in
for the host (this machine has no vhost-vsock). Prints every message on the console as one
"NOTIFY-RECEIVED at BOOTTIME from cid N: ..." line. Ignores SIGTERM so that it still hears the shutdown message."""

import signal
import socket
import sys
import time

port, ready_file = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
server = socket.socket(socket.AF_VSOCK, socket.SOCK_SEQPACKET)
server.bind((0xFFFFFFFF, port))
server.listen(8)
open(ready_file, "w").close()
while True:
    conn, peer = server.accept()
    message = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        message += chunk
    conn.close()
    print("NOTIFY-RECEIVED at %.6f from cid %d: %s" % (
        time.clock_gettime(time.CLOCK_BOOTTIME), peer[0], message.decode().replace("\n", " | ")),
        flush=True)
