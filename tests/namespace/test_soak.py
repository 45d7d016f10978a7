"""Hostile input, floods and faults against the real .pyz as PID 1 of a PID namespace. Each
test records its figures (printed at the end of the run, and in dist/soak-figures.json)."""

import os
import random
import resource
import select
import signal
import socket
import statistics
import subprocess
import threading
import time

import pytest

import agent
from guestctl import log_events
from nsguest import POWER_OFF_RETURNCODE

pytestmark = pytest.mark.namespace
PING = agent.encode_frame(agent.MSG_PING)


def pid1_state(g):
    pid = g.init_pid()
    with open("/proc/%d/status" % pid) as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return {"fds": len(os.listdir("/proc/%d/fd" % pid)), "rss_kib": rss}


def ping_ms(g, count=20):
    times = []
    for _ in range(count):
        started = time.perf_counter()
        g.request(agent.MSG_PING, timeout=5)
        times.append((time.perf_counter() - started) * 1000)
    return times


def edit(rnd, data, op, flip, cut, extend):
    """One edit of a bytearray by the draw `op`: below `flip` a byte flipped (if any), below
    `cut` cut short, below `extend` random bytes added; None above (the caller's own edit)."""
    if op < flip and data:
        data[rnd.randrange(len(data))] = rnd.getrandbits(8)
    elif op < cut:
        data = data[:rnd.randrange(len(data) + 1)]
    elif op < extend:
        data += bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 16)))
    else:
        return None
    return data


def mutate(rnd, frame):
    """Arbitrary bytes from a frame: flipped, cut, extended or replaced. The framing is
    usually lost, so the stream ends after it (BREAKING_SHARE of the batches)."""
    data = bytearray(frame)
    for _ in range(rnd.randint(1, 4)):
        edited = edit(rnd, data, rnd.random(), 0.4, 0.6, 0.8)
        data = edited if edited is not None else bytearray(
            rnd.getrandbits(8) for _ in range(rnd.randint(1, 40)))
    return bytes(data)


def mutate_framed(rnd, msg_type, trace, payload):
    """A mutation that keeps the frame's length right, so that the agent decodes it: the type
    (a known request, an unknown one, a response type, 0), the trace, the payload's bytes, or
    a trace length that overruns the frame (a non-fatal error)."""
    payload = bytearray(payload)
    for _ in range(rnd.randint(1, 3)):
        op = rnd.random()
        if op < 0.2:
            msg_type = rnd.choice([1, 2, 3, 0x000A, 0, rnd.getrandbits(16),
                                   0x1001, 0xFFFF, rnd.getrandbits(32)])
        elif op < 0.35:
            trace = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 24)))
        else:
            edited = edit(rnd, payload, op, 0.6, 0.75, 0.9)
            if edited is None:     # a trace length that overruns the frame
                body = msg_type.to_bytes(4, "big") + (len(trace) + 1 + rnd.randrange(
                    200)).to_bytes(2, "big") + trace + bytes(payload)
                return len(body).to_bytes(4, "big") + body
            payload = edited
    body = msg_type.to_bytes(4, "big") + len(trace).to_bytes(2, "big") + trace + bytes(payload)
    return len(body).to_bytes(4, "big") + body


def read_replies(sock, want, deadline):
    """Read reply frames until `want` have come (None: until EOF); returns their types."""
    buf, types = bytearray(), []
    while want is None or len(types) < want:
        timeout = deadline - time.monotonic()
        if timeout <= 0 or not select.select([sock], [], [], timeout)[0]:
            raise AssertionError("the agent did not answer: %d of %s replies" % (len(types), want))
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            break
        buf += data
        while True:
            frame = agent.decode_frame(buf, 1 << 24)
            if frame is None:
                break
            types.append(frame[0])
            del buf[:frame[3]]
    return types


def raise_fd_limit(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


BREAKING_SHARE = 0.05              # batches that end in a frame whose framing is lost


def test_100k_random_and_mutated_frames_then_ping_and_power_off(guest, figures):
    """100,000 frames, and every one that is framed gets exactly one answer: most mutations
    keep the length right (the agent decodes them and answers a response or an Error); a
    batch in twenty ends with one that breaks the framing, after which the client closes its
    side and reads to the end. Counted: what the agent decoded and answered, by the replies."""
    # Shutdown over the Unix socket is refused (--allow without uids), so that a mutated
    # frame that happens to be a valid Shutdown cannot end the soak early.
    g = guest(agent_args=["--idle-timeout", "5", "--allow", "cid:2"], log_level="info")
    before = pid1_state(g)
    rnd = random.Random(20261127)
    seeds = [(agent.MSG_PING, b"t", b"\x0a\x02hi"), (agent.MSG_GET_SYSTEM_INFO, b"", b""),
             (agent.MSG_SHUTDOWN, b"", b"\x08\x05"), (0x0003, b"", b"")]
    sent = framed = breaking = connections = 0
    answered = {"response": 0, "error": 0, "after the framing broke": 0}
    started = time.perf_counter()
    pool = []
    while sent < 100000:
        if len(pool) < 50:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(g.sock)
            pool.append(s)
            connections += 1
        s = rnd.choice(pool)
        batch = [mutate_framed(rnd, *rnd.choice(seeds)) for _ in range(20)]
        breaks = rnd.random() < BREAKING_SHARE
        if breaks:
            msg_type, trace, payload = rnd.choice(seeds)
            batch[-1] = mutate(rnd, agent.encode_frame(msg_type, payload, trace))
        s.sendall(b"".join(batch))
        sent += len(batch)
        framed += len(batch) - breaks
        if breaks:                   # the client's side ends after it: read to the end
            breaking += 1
            s.shutdown(socket.SHUT_WR)
            types = read_replies(s, None, time.monotonic() + 10)
            pool.remove(s)
            s.close()
        else:
            types = read_replies(s, len(batch), time.monotonic() + 10)
        # one answer per framed frame: exactly, or at least (and in front) before a break
        assert len(types) == len(batch) if not breaks else len(types) >= len(batch) - 1, (
            len(types), len(batch), breaks)
        for t in types[:len(batch) - breaks]:
            answered["error" if t == agent.MSG_ERROR else "response"] += 1
        answered["after the framing broke"] += len(types) - (len(batch) - breaks)
    for s in pool:
        s.close()
    flood_s = time.perf_counter() - started
    time.sleep(0.5)
    after = pid1_state(g)
    latency = ping_ms(g)
    alive = g.proc.poll() is None
    os.kill(g.init_pid(), signal.SIGUSR2)
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    # a crash: PID 1 gone before the power-off signal, or an error escaping to the loop
    crashes = int(not alive) + g.log().count("internal error")
    assert crashes == 0, g.log()[-3000:]
    decoded = answered["response"] + answered["error"]
    assert decoded == framed and framed >= 0.99 * sent, (decoded, framed, sent)
    assert answered["response"] > 1000 and answered["error"] > 10000, answered
    assert statistics.median(latency) < 50
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["rss_kib"] - before["rss_kib"] < 8 * 1024, (before, after)
    figures.update(frames=sent, framed=framed, decoded_and_answered=decoded,
                   answered_response=answered["response"], answered_error=answered["error"],
                   breaking=breaking, breaking_answered=answered["after the framing broke"],
                   connections=connections, seconds=round(flood_s, 2),
                   pid1_before=before, pid1_after=after,
                   ping_ms_median=round(statistics.median(latency), 2),
                   ping_ms_max=round(max(latency), 2), crashes=crashes)


def test_1000_idle_connections_and_slowloris_are_closed_while_pings_stay_fast(guest, figures):
    raise_fd_limit(4096)
    g = guest("ulimit -n 4096", log_level="info",
              agent_args=["--max-conns", "1200", "--idle-timeout", "3", "--frame-timeout", "2"])
    idle = []
    for _ in range(1000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(g.sock)
        idle.append(s)
    slow = []
    for _ in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(g.sock)
        slow.append(s)
    latencies = []
    started = time.monotonic()
    header = agent.encode_frame(agent.MSG_PING, b"\x0a\x20" + b"x" * 32)
    n = 0
    while time.monotonic() - started < 2.5:
        for s in slow:                      # one byte at a time: never idle, never a frame
            try:
                s.send(header[n % len(header):n % len(header) + 1])
            except OSError:
                pass
        n += 1
        latencies.extend(ping_ms(g, 2))
        time.sleep(0.05)
    state = pid1_state(g)
    deadline = time.monotonic() + 15
    closed_idle = 0
    for s in idle:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if s.recv(1) == b"":
                closed_idle += 1
        except OSError:
            pass
        s.close()
    closed_slow = 0
    for s in slow:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while s.recv(4096):
                pass
            closed_slow += 1
        except ConnectionResetError:    # closed with one of our bytes still unread in it:
            closed_slow += 1            # the agent closed it all the same
        except OSError:
            pass
        s.close()
    lat = sorted(latencies)
    figures.update(idle=1000, slowloris=50, pings=len(lat),
                   ping_ms_median=round(statistics.median(lat), 2),
                   ping_ms_p99=round(lat[int(0.99 * (len(lat) - 1))], 2),
                   pid1_with_1050_conns=state, closed_idle=closed_idle, closed_slow=closed_slow)
    assert statistics.median(lat) < 50
    assert closed_idle == 1000 and closed_slow == 50
    after = pid1_state(g)
    assert after["fds"] < 20, after


def test_a_client_that_floods_and_never_reads_cannot_grow_pid1(guest, figures):
    g = guest(agent_args=["--idle-timeout", "3"], log_level="info")
    before = pid1_state(g)
    flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flooder.connect(g.sock)
    flooder.setblocking(False)
    pushed = 0
    blocked_at = None
    started = time.monotonic()
    while time.monotonic() - started < 3:
        try:
            pushed += flooder.send(PING * 4096)
        except BlockingIOError:
            blocked_at = blocked_at or pushed     # the agent stopped reading: back-pressure
            select.select([], [flooder], [], 0.05)
    during = pid1_state(g)
    latency = ping_ms(g)
    flooder.setblocking(True)
    flooder.settimeout(10)
    deadline = time.monotonic() + 10
    closed = False
    while time.monotonic() < deadline:      # read what it owes us: then EOF (idle timeout)
        try:
            if not flooder.recv(1 << 20):
                closed = True
                break
        except OSError:
            closed = True
            break
    flooder.close()
    figures.update(bytes_pushed=pushed, pushed_until_backpressure=blocked_at,
                   pid1_before=before, pid1_during=during,
                   ping_ms_median=round(statistics.median(latency), 2), flooder_closed=closed)
    assert blocked_at is not None, "the agent never pushed back"
    assert during["rss_kib"] - before["rss_kib"] < 8 * 1024, (before, during)
    assert statistics.median(latency) < 50 and closed


def test_5000_orphans_while_pings_keep_being_answered(guest, figures):
    g = guest(log_level="error")
    latencies, errors, stop = [], [], threading.Event()

    def pinger():
        while not stop.is_set():
            try:
                latencies.extend(ping_ms(g, 1))
            except Exception as exc:   # noqa: BLE001 - recorded and asserted below
                errors.append(exc)

    t = threading.Thread(target=pinger)
    t.start()
    started = time.perf_counter()
    burst = "import os\nfor _ in range(5000):\n    pid = os.fork()\n    if pid == 0:\n" \
            "        if os.fork() == 0:\n            os._exit(0)\n        os._exit(0)\n" \
            "    os.waitpid(pid, 0)\n"
    subprocess.run(["nsenter", "-t", str(g.init_pid()), "-p", "-m", "--", "/usr/bin/python3",
                    "-S", "-c", burst], check=True, timeout=300)
    deadline = time.monotonic() + 30
    while g.processes():
        assert time.monotonic() < deadline, "zombies left: %d" % len(g.processes())
        time.sleep(0.01)
    took = time.perf_counter() - started
    stop.set()
    t.join()
    lat = sorted(latencies)
    figures.update(orphans=5000, seconds_to_none_left=round(took, 2), pings=len(lat),
                   ping_ms_median=round(statistics.median(lat), 2),
                   ping_ms_p99=round(lat[int(0.99 * (len(lat) - 1))], 2), ping_errors=len(errors))
    assert not errors and len(lat) > 10
    assert statistics.median(lat) < 50


def test_a_signal_storm_during_the_grace_makes_exactly_one_teardown(guest, figures):
    g = guest("(trap '' TERM; exec sleep 1000) &", agent_args=["--grace", "2"],
              log_level="info")
    pid = g.init_pid()
    os.kill(pid, signal.SIGUSR2)
    sent = 1
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and g.proc.poll() is None:
        for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM,
                    signal.SIGINT, signal.SIGCHLD):
            try:
                os.kill(pid, sig)
                sent += 1
            except ProcessLookupError:
                break
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    msgs = [m for _, _, m in log_events(g.log())]
    figures.update(signals_sent=sent,
                   teardowns=sum(1 for m in msgs if "SIGTERM sent" in m))
    assert sum(1 for m in msgs if "SIGTERM sent" in m) == 1
    assert sum(1 for m in msgs if m.startswith("shutdown requested")) == 1
    assert "internal error" not in g.log()


def test_a_process_forking_during_the_grace_is_gone_by_the_end(guest, figures):
    g = guest("sh -c 'trap \"\" TERM; while :; do sleep 5 & sleep 0.01; done' &",
              agent_args=["--grace", "1"])
    time.sleep(0.5)
    before = len(g.processes())
    assert g.shutdown(grace=1) is True
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    msgs = [m for _, _, m in log_events(g.log())]
    figures.update(processes_at_request=before)
    assert before > 5
    assert "shutdown: all processes gone after SIGKILL" in msgs, msgs


def test_a_busy_mount_does_not_stop_the_power_off(guest, tmp_path, figures):
    """A file on the guest's tmpfs held open for writing from outside the guest: remount
    read-only fails with EBUSY; the agent says why it stays writable (nobody in the guest
    holds it), syncs after the last pass anyway, and powers off."""
    mnt = tmp_path / "busy"
    mnt.mkdir()
    g = guest(agent_args=["--exec", "sh", "-c", "mount -t tmpfs busy %s && touch %s/f && "
                          "exec sleep 1000" % (mnt, mnt)], log_level="debug")
    path = "/proc/%d/root%s/f" % (g.init_pid(), mnt)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    holder = open(path, "w")                  # from outside the guest: never killed
    try:
        assert g.shutdown(grace=2) is True
        assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    finally:
        holder.close()
    msgs = [m for _, _, m in log_events(g.log())]
    figures.update(log=[m for m in msgs if str(mnt) in m])
    said = ("shutdown: %s (tmpfs) stays writable: Device or resource busy: no process in this "
            "guest holds it (one outside it, or the kernel) (its data is synced all the same)"
            % mnt)
    assert said in msgs, msgs
    assert msgs.index(said) < next(i for i, m in enumerate(msgs) if "final sync() took" in m)
    assert not any("unmount %s" % mnt in m for m in msgs)     # still there to be diagnosed


def test_a_slow_sync_is_bounded(guest, tmp_path, figures):
    """300 MB of dirty data on a loop-mounted ext4 and --sync-timeout 0.005: the sync outlives
    the bound, and the agent goes on to reboot() instead of waiting for it."""
    img, mnt = tmp_path / "big.img", tmp_path / "big"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, timeout=60)
    script = ("mount -o loop %s %s && dd if=/dev/zero of=%s/dirty bs=1M count=300 "
              "2>/dev/null && touch %s/.written && exec sleep 1000" % (img, mnt, mnt, mnt))
    g = guest(agent_args=["--sync-timeout", "0.005", "--exec", "sh", "-c", script])
    flag = "/proc/%d/root%s/.written" % (g.init_pid(), mnt)
    deadline = time.monotonic() + 60
    while not os.path.exists(flag):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert g.shutdown(grace=2) is True
    assert g.wait(timeout=120) == POWER_OFF_RETURNCODE
    events = log_events(g.log())
    msgs = [m for _, _, m in events]
    bound = next((t for t, _, m in events if "did not finish within 0.005s" in m), None)
    assert bound is not None, msgs
    start = next(t for t, _, m in events if "all processes gone" in m)
    figures.update(sync_bound_hit_after_s=round(bound - start, 3))
    assert any(m.startswith("shutdown: calling reboot(poweroff)") for m in msgs)
    assert bound - start < 2.0
