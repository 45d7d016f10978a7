"""Runs inside the guest as the agent's workload: talks to the agent over real AF_VSOCK
through vsock_loopback (CID 1, port 1024), sends Ping then Shutdown, and prints what it got
on the console as 'VSOCK-TEST: ...' lines. Only the modules the guest image carries."""

import signal
import socket
import struct
import time

CID_LOCAL, PORT = 1, 1024


def frame(msg_type, payload=b""):
    return struct.pack(">IIH", 6 + len(payload), msg_type, 0) + payload


def exchange(sock, data):
    sock.sendall(data)
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    length, msg_type, trace_len = struct.unpack(">IIH", buf[:10])
    return msg_type, buf[10 + trace_len:4 + length]


def main():
    deadline = time.monotonic() + 20
    while True:
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.connect((CID_LOCAL, PORT))
            break
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                print("VSOCK-TEST: connect failed: %s" % exc, flush=True)
                return
            time.sleep(0.1)
    print("VSOCK-TEST: connected from cid %d" % sock.getsockname()[0], flush=True)
    msg_type, payload = exchange(sock, frame(0x0001, b"\x0a\x05vsock"))
    print("VSOCK-TEST: ping 0x%04X %r" % (msg_type, payload), flush=True)
    # The answer is in our socket before SIGTERM is sent (the agent flushes it first), but
    # SIGTERM may still arrive before this process has printed it: hold SIGTERM until then.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    msg_type, payload = exchange(sock, frame(0x000A, b"\x08\x02"))
    if msg_type == 0xFFFF:
        code, length = struct.unpack(">iI", payload[:8])
        print("VSOCK-TEST: shutdown error %d %s" % (code, payload[8:8 + length].decode()),
              flush=True)
    else:
        print("VSOCK-TEST: shutdown 0x%04X %r" % (msg_type, payload), flush=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    time.sleep(1000)


main()
