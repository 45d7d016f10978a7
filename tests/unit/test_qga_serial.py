"""QGA on a serial stream (a pty in raw mode stands in for the virtio-serial port): the stream
outlives its clients, so what one client left half-sent must not spoil the next one's
request. The agent is a plain process here (not PID 1)."""

import os
import pty
import select
import time
import tty

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
