#!/usr/bin/python3 -S
"""Throughput baseline, second row: a minimal blocking server, one thread per connection, that answers
every frame with a fixed Ping response of the same shape the agent sends. No protocol beyond
framing, no limits, no logging: what "answering the same frames" costs at the least.

usage: echo_server.py SOCKET_PATH
"""

import os
import socket
import struct
import sys
import threading

PONG = b"\x0a\x04pong\x12\x050.1.0"
HEAD = struct.Struct(">IIH")


def serve(conn):
    buf = b""
    with conn:
        while True:
            while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            length, msg_type, trace_len = HEAD.unpack_from(buf)
            trace = buf[10:10 + trace_len]
            buf = buf[4 + length:]
            conn.sendall(HEAD.pack(6 + len(trace) + len(PONG), msg_type | 0x1000,
                                   len(trace)) + trace + PONG)


def main():
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(256)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


main()
