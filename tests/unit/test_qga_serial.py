"""QGA on a serial stream (a pty in raw mode stands in for the virtio-serial port): the stream
outlives its clients, so what one client left half-sent must not spoil the next one's
request. The agent is a plain process here (not PID 1)."""

import os
import pty
import socket
import select
import time
import tty

import agent

from helpers import start_agent, wait_for


def read_line(fd, timeout=10.0):
    data, deadline = b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, "no answer on the serial stream (have %r)" % data
        if select.select([fd], [], [], left)[0]:
            data += os.read(fd, 4096)
    return data


def test_a_partial_request_left_on_the_serial_stream_is_dropped_and_the_next_is_answered(
        pyz, tmp_path):
    master, slave = pty.openpty()
    tty.setraw(slave)                          # no echo, no line editing: a byte pipe
    port = os.ttyname(slave)
    proc = start_agent(pyz, tmp_path, "--qga", "serial:" + port)
    try:
        wait_for(lambda: "listening on serial:%s" % port in proc.log(), 15, "the QGA port")
        os.write(master, b'{"execute": "guest-sync", "arguments": {"id": "unfinished')
        time.sleep(1.0)                        # the client went away; the bytes are stale
        os.write(master, b'{"execute":"guest-sync","arguments":{"id":77}}')
        assert read_line(master) == b'{"return": 77}\n'
        os.write(master, b'\xff{"execute":"guest-sync-delimited","arguments":{"id":78}}')
        assert read_line(master) == b'\xff{"return": 78}\n'
        assert "internal error" not in proc.log()
        assert "dropping a partial frame" in proc.log()
    finally:
        proc.stop()
        os.close(master)
        os.close(slave)


def test_a_serial_port_with_no_host_is_looked_at_again_every_serial_recheck_not_spun_on(
        monkeypatch):
    """docs/guest.md: while no host is connected the port reports POLLHUP and reads EOF; the
    agent looks at it again every SERIAL_RECHECK (0.1 s) rather than spinning. On a fake
    port (a socketpair whose other end is closed: POLLHUP and EOF, as a virtio-serial port
    without a host gives), through the real loop for one second: each read of the port is
    timed."""
    from test_fuzz_connections import Harness
    h = Harness(0)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.close()                                   # no host on the other side
    peer = ("serial", "fake")
    conn = agent.SerialStream(ours.fileno(), peer, time.monotonic(), h.protocol(peer, True),
                              on_closed=lambda: None)
    h.server.add_connection(conn)
    reads, real_read = [], os.read

    def timed_read(fd, n):
        if fd == conn.fd:
            reads.append(time.monotonic())
        return real_read(fd, n)
    monkeypatch.setattr(agent.os, "read", timed_read)
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            h.agent.loop.run_once(end - time.monotonic())
    finally:
        monkeypatch.undo()
        h.server.conns.pop(conn.fd, None)
        ours.close()
        h.close()
    gaps = [b - a for a, b in zip(reads, reads[1:])]
    assert 5 <= len(reads) <= 11, reads              # ~10 looks in a second, not thousands
    assert min(gaps) >= agent.SERIAL_RECHECK - 0.002, gaps   # poll() rounds to milliseconds
