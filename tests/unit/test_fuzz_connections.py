"""Fuzzing the connection state machine in-process: the real Agent loop over socketpairs,
with arbitrary chunking of each byte stream and arbitrary interleaving of connections.

Runs ARCBOX_FUZZ_EXAMPLES examples per property (default 400: about a minute in all);
set it to 5000 or more for a soak. Any failure hypothesis finds is shrunk and printed; add it
below as an @example so it stays a regression test."""

import os
import socket
import struct
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent

EXAMPLES = int(os.environ.get("ARCBOX_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Harness:
    """An Agent (not PID 1, no listeners, no signal handlers) with socketpair peers."""

    def __init__(self, peers, **config):
        self.agent = agent.Agent(dict(agent.default_config(), listen=[], **config),
                                 is_init=False)  # not started: no signal handlers installed
        self.agent.reaper.reap = lambda: None   # pytest's children are not ours to reap
        self.server = self.agent.server
        self.peers, self.conn_fds = [], []
        for _ in range(peers):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            theirs.setblocking(False)
            peer = ("unix", 1, 0, 0)
            conn = agent.SocketConnection(ours, peer, time.monotonic(), self.protocol(peer))
            self.server.add_connection(conn)
            self.peers.append(theirs)
            self.conn_fds.append(conn.fd)
        self.received = [bytearray() for _ in range(peers)]

    def protocol(self, peer, shared=False):
        return agent.ArcBoxProtocol(self.server.policy, self.server.limits.max_frame, peer,
                                    shared)

    def send(self, i, data):
        self.peers[i].sendall(data)
        self.agent.loop.run_once(0)
        self.collect()

    def collect(self):
        for i, peer in enumerate(self.peers):
            while True:
                try:
                    chunk = peer.recv(65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                self.received[i] += chunk

    def settle(self):
        for _ in range(20):
            self.agent.loop.run_once(0)
            self.collect()

    def frames(self, i):
        buf, out = bytes(self.received[i]), []
        while True:
            got = agent.decode_frame(buf, 1 << 24)
            if got is None:
                assert not buf, "a partial answer frame was left: %r" % buf[:40]
                return out
            out.append(got[:3])
            buf = buf[got[3]:]

    def close(self):
        for peer in self.peers:
            peer.close()
        for conn in list(self.server.conns.values()):
            self.server.close_conn(conn)


def well_framed(draw_kind, n):
    """n well-framed requests: Pings (answered with a pong), bad payloads, unknown types,
    trace overruns: all stay in step, each gets exactly one answer."""
    return st.lists(st.tuples(draw_kind, st.binary(max_size=20)), min_size=1, max_size=n)


KINDS = st.sampled_from(["ping", "bad-payload", "unknown-type", "response-type", "info"])


def encode(kind, blob, trace):
    if kind == "ping":
        return agent.encode_frame(agent.MSG_PING, agent.encode_message(
            agent.PING_REQUEST, {"message": blob.hex()}), trace)
    if kind == "bad-payload":
        return agent.encode_frame(agent.MSG_PING, b"\x0a\xff" + blob, trace)
    if kind == "unknown-type":
        return agent.encode_frame(0x0400 + len(blob), blob, trace)
    if kind == "response-type":
        return agent.encode_frame(0x1001, blob, trace)
    return agent.encode_frame(agent.MSG_GET_SYSTEM_INFO, b"", trace)


@FUZZ
@given(st.lists(well_framed(KINDS, 8), min_size=1, max_size=4), st.data())
def test_every_well_framed_request_gets_one_answer_in_order(streams, data):
    h = Harness(len(streams))
    try:
        expected, pending = [], []
        for i, requests in enumerate(streams):
            raw = b""
            traces = []
            for n, (kind, blob) in enumerate(requests):
                trace = b"c%dr%d" % (i, n)
                traces.append((trace, kind))
                raw += encode(kind, blob, trace)
            expected.append(traces)
            cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
            pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)]) if b > a]
            pending.append(pieces)
        # interleave the connections' chunks in an arbitrary order, each stream in order
        while any(pending):
            i = data.draw(st.sampled_from([k for k, p in enumerate(pending) if p]))
            h.send(i, pending[i].pop(0))
        h.settle()
        for i, traces in enumerate(expected):
            answers = h.frames(i)
            assert [t for _, t, _ in answers] == [t for t, _ in traces]
            for (rtype, _, payload), (_, kind) in zip(answers, traces):
                if kind == "ping":
                    assert rtype == 0x1001
                elif kind == "info":
                    assert rtype == 0x1002
                else:
                    assert rtype == agent.MSG_ERROR
                    assert agent.decode_error(payload)[0] in (400, 501)
        assert len(h.server.conns) == len(streams)       # nobody was closed
    finally:
        h.close()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 2), st.binary(min_size=1, max_size=300)),
                min_size=1, max_size=30))
def test_arbitrary_bytes_never_break_the_loop(chunks):
    """Any bytes, any chunking, three connections: the loop never raises, answers are whole
    frames, a connection is closed only after an Error frame, and no fd is leaked."""
    h = Harness(3, max_frame=4096)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        for i, chunk in chunks:
            try:
                h.send(i, chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass                                    # the agent closed it: allowed
        h.settle()
        for i in range(3):
            answers = h.frames(i)
            for rtype, _, payload in answers:
                # 0x100A would mean a Shutdown was accepted: never, this agent is not PID 1
                assert rtype in (0x1001, 0x1002, agent.MSG_ERROR), hex(rtype)
                if rtype == agent.MSG_ERROR:
                    agent.decode_error(payload)
            if h.conn_fds[i] not in h.server.conns:      # closed by the agent: it said why
                assert answers and answers[-1][0] == agent.MSG_ERROR
                assert "invalid request" in agent.decode_error(answers[-1][2])[1]
    finally:
        h.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def serial_harness():
    h = Harness(0)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    peer = ("serial", "fuzz")
    conn = agent.SerialStream(ours.fileno(), peer, time.monotonic(), h.protocol(peer, True),
                              on_closed=lambda: None)
    h.server.add_connection(conn)
    h.peers.append(theirs)
    h.received.append(bytearray())
    return h, conn, ours, theirs


def send_chunked(h, stream, sizes):
    """Feed stream to the agent in the given chunk sizes (cycled), one loop turn each."""
    pos = 0
    for size in sizes * (len(stream) // max(1, sum(sizes)) + 1):
        if pos >= len(stream):
            break
        h.send(0, stream[pos:pos + size])
        pos += size


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(1, 64), min_size=1, max_size=50))
def test_a_serial_stream_resynchronises_after_garbage(garbage, sizes):
    """A persistent (serial) stream: garbage that holds no plausible header, in any chunking,
    then a good request: the request is answered and no Error frame is sent for garbage."""
    garbage = bytes(b for b in garbage if b not in (0x00,))   # no zero: no plausible header
    h, conn, ours, theirs = serial_harness()
    try:
        send_chunked(h, garbage + agent.encode_frame(agent.MSG_PING, b"", b"good"), sizes)
        h.settle()
        answers = h.frames(0)
        assert [(t, tr) for t, tr, _ in answers] == [(0x1001, b"good")]
    finally:
        theirs.close()
        h.server.conns.pop(conn.fd, None)
        ours.close()
        h.close()


@FUZZ
@given(st.binary(max_size=300), st.integers(6, 65536), st.integers(1, agent.REQUEST_MAX),
       st.binary(max_size=400), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_a_plausible_partial_frame_on_a_serial_stream_is_dropped_after_silence(
        garbage, length, msg_type, partial, sizes):
    """Garbage, then a header that looks like a request (a request type, a length that fits)
    whose body never comes, then silence: after SERIAL_STALE_FRAME the partial frame is
    dropped, and the next good request is answered. Time passes through the server's tick."""
    partial = partial[:max(0, length - 4 - 1)]           # always short of the declared length
    garbage = bytes(b for b in garbage if b not in (0x00,))
    header = struct.pack(">II", length, msg_type)
    h, conn, ours, theirs = serial_harness()
    try:
        send_chunked(h, garbage + header + partial, sizes)
        h.settle()
        assert h.frames(0) == []                          # nothing answered yet
        h.server.tick(time.monotonic() + agent.SERIAL_STALE_FRAME + 0.01)   # silence
        assert not conn.inbuf
        h.send(0, agent.encode_frame(agent.MSG_PING, b"", b"good"))
        h.settle()
        assert [(t, tr) for t, tr, _ in h.frames(0)] == [(0x1001, b"good")]
    finally:
        theirs.close()
        h.server.conns.pop(conn.fd, None)
        ours.close()
        h.close()
