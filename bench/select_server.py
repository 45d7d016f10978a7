#!/usr/bin/python3 -S
"""Throughput baseline, the fair one: the best simple Python server a user could write to
answer the same frames. One thread, non-blocking sockets, selectors (epoll); each complete
frame is answered with a Ping response of the same shape the agent sends (framing and trace
id echoed, payload fixed). No limits, no logging, no timeouts, no authorisation.

usage: select_server.py SOCKET_PATH
"""

import os
import selectors
import socket
import struct
import sys

PONG = b"\x0a\x04pong\x12\x050.1.0"
HEAD = struct.Struct(">IIH")


def main():
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(256)
    server.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ, None)
    pending = {}                                  # conn -> bytes not yet written

    def close(conn):
        sel.unregister(conn)
        pending.pop(conn, None)
        conn.close()

    while True:
        for key, events in sel.select():
            if key.data is None:
                conn, _ = server.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, bytearray())
                continue
            conn, buf = key.fileobj, key.data
            if events & selectors.EVENT_WRITE:
                out = pending.pop(conn)
                try:
                    sent = conn.send(out)
                except OSError:                   # the client went away
                    close(conn)
                    continue
                if sent < len(out):
                    pending[conn] = out[sent:]
                else:
                    sel.modify(conn, selectors.EVENT_READ, buf)
                continue
            try:
                chunk = conn.recv(65536)
            except ConnectionError:
                chunk = b""
            if not chunk:
                close(conn)
                continue
            buf += chunk
            out = []
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                length, msg_type, trace_len = HEAD.unpack_from(buf)
                trace = bytes(buf[10:10 + trace_len])
                del buf[:4 + length]
                out.append(HEAD.pack(6 + len(trace) + len(PONG), msg_type | 0x1000,
                                     len(trace)) + trace + PONG)
            if out:
                data = b"".join(out)
                try:
                    sent = conn.send(data)
                except OSError:
                    close(conn)
                    continue
                if sent < len(data):
                    pending[conn] = data[sent:]
                    sel.modify(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, buf)


main()
