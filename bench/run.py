#!/usr/bin/env python3
"""Benchmarks: arcbox-agent against the strongest simple alternatives, side by side, in one run.

    python3 bench/run.py              # full run (~10 minutes; root; QEMU for the VM rows)
    python3 bench/run.py --quick      # a short run, as CI does so that this cannot rot
    python3 bench/run.py --markdown [FILE]   # docs/performance.md's table, from a saved JSON
    python3 bench/run.py --publish    # full run, then bench/results/: JSON, chart, docs page

Prints a table and writes dist/bench.json. Every figure is a median with min and max (and,
where the figure depends on a race, the whole distribution in the JSON and the chart); every
speed figure is also a ratio against a baseline measured in this same run, because these
machines are noisy. Each target is checked against the numbers just measured and printed as
met or MISSED; benchmarks never fail on speed, only when something does not work at all.

Baselines (each the strongest simple thing a user could run instead):
- shutdown: the seed's algorithm (bench/seed_agent.py), with the Rust handler's 100 ms sleep
  and without it; in the VM also busybox init itself, stopped by its own `poweroff`;
- teardown with every mount kind (tools/guest/mounts.sh): busybox init with its default
  shutdown lines (`swapoff -a`, `umount -a -r`) in the same image, and our simple guest;
- serving: a single-thread non-blocking selectors (epoll) server answering the same frames
  (bench/select_server.py); the thread-per-connection server as a second row;
- start-up and memory: the bare interpreter, `python3 -I -S`;
- reaping: a blocking os.wait() loop as PID 1.
"""

import argparse
import json
import os
import random
import select
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipapp

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import agent  # noqa: E402
import build  # noqa: E402
import guestctl  # noqa: E402
import guestimage  # noqa: E402
import nsguest  # noqa: E402
import storagecheck  # noqa: E402
from startup import vm_rss_kib  # noqa: E402
import provenance  # noqa: E402
import verdict  # noqa: E402

PY = "/usr/bin/python3"
SEED = os.path.join(HERE, "seed_agent.py")
SELECT_SERVER = os.path.join(HERE, "select_server.py")
THREAD_SERVER = os.path.join(HERE, "echo_server.py")
TERM_CHILD = os.path.join(REPO, "tools", "guest", "term_child.py")
RESULTS = os.path.join(HERE, "results")
# what makes this bench's figures, besides agent.py and build.py (their sha256 in each result)
HARNESS = ["bench/run.py", "bench/verdict.py", "bench/provenance.py", "bench/seed_agent.py",
           "bench/select_server.py", "bench/echo_server.py", "bench/startup.py",
           "tools/nsguest.py", "tools/guestctl.py", "tools/guestimage.py", "tools/vm.py",
           "tools/storagecheck.py", "tools/guest/term_child.py", "tools/guest/mounts.sh"]
PING = agent.encode_frame(agent.MSG_PING)
PING_WITH_MESSAGE = agent.encode_frame(
    agent.MSG_PING, agent.encode_message(agent.PING_REQUEST, {"message": "hello"}), b"t1")


def stats(xs):
    xs = sorted(xs)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "n": len(xs)}


def fmt(st, unit="ms", scale=1000.0):
    return "%.2f %s (%.2f-%.2f, n=%d)" % (st["median"] * scale, unit, st["min"] * scale,
                                          st["max"] * scale, st["n"])


def judge_row(raw):
    """A row's target judged from its samples (bench/verdict.py), or None without a target:
    {"verdict", "interval", "text"}; the text is what the table's target column says."""
    target = raw.get("target")
    if raw.get("growth"):
        g = raw["growth"]
        grew = g["kib"][1] - g["kib"][0]
        ok = grew <= g["max_kib"] and g["fds"][0] == g["fds"][1]
        # one reading of a bound, not a statistic: no interval to draw, and none claimed
        return {"verdict": "met" if ok else "missed", "interval": [grew, grew],
                "text": "%s (one reading)" % ("met" if ok else "missed")}
    if not target:
        return None
    limit = {"at_most": target["max"]} if "max" in target else {"at_least": target["min"]}
    if target["on"] == "ratio":
        pair = [raw["value"], raw["baseline"]]
        if raw.get("ratio") == "baseline/value":
            pair.reverse()
        j = verdict.judge("ratio", pair, **limit)
        shown = "%.2f-%.2fx" % tuple(j["interval"])
    else:
        j = verdict.judge("median", [raw["value"]], **limit)
        scale = raw.get("scale", 1)
        shown = "%.2f-%.2f%s" % (j["interval"][0] * scale, j["interval"][1] * scale,
                                 " ms" if scale == 1000 else "")
    return {"verdict": j["verdict"], "interval": j["interval"],
            "text": "%s (90%% CI %s)" % (j["verdict"], shown)}


class Report:
    """Rows for the table, targets checked against this run's numbers, raw data for JSON."""

    HEAD = ("figure", "case", "arcbox-agent", "baseline", "ratio", "target")

    def __init__(self):
        self.rows = []
        self.data = {}

    def add(self, figure, what, value, baseline="", ratio="", target="", raw=None):
        """`raw`: the samples the row was made from, so that a test can make it again:
        {"value": [...], "baseline": [...], "scale": 1000 (s -> ms) or 1, "format": "stats"
        (median and min-max) or "median0" (the median, no decimals), "ratio":
        "value/baseline" or "baseline/value", "target": {"on": "value" or "ratio",
        "max" or "min": limit}, "baseline_shown": False when only the ratio uses it}.
        A target is judged by bench/verdict.py's rule: met, missed or not established by the
        90 % bootstrap interval of its statistic, shown with the verdict."""
        judged = judge_row(raw) if raw else None
        if target and judged:
            target = "%s: %s" % (target, judged["text"])
        self.rows.append([figure, what, value, baseline, ratio, target])
        self.data.setdefault("raw_rows", []).append(raw)
        if judged:
            self.data.setdefault("targets", []).append(
                {"figure": figure, "case": what, "value": value, "target": target,
                 "verdict": judged["verdict"], "interval": judged["interval"]})

    def print(self):
        widths = [max(len(str(r[i])) for r in self.rows + [list(self.HEAD)]) for i in range(6)]
        for row in [list(self.HEAD)] + self.rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


# ---- 1: shutdown overhead (PID namespace) ----------------------------------------------------
#
# What users feel is the time the init adds: request -> reboot() entered, minus the time the
# children themselves take to handle SIGTERM (each child writes when it got the signal and
# when it exits), minus the time spent inside sync() (the disks' time, reported apart). The
# kernel's part after reboot() (here: tearing the namespace down) is reported apart too.

INITS = (("arcbox-agent", None, ()),
         ("seed + Rust 100 ms sleep", SEED, ()),
         ("seed without the sleep", SEED, ("--handler-delay", "0")))
DELAYS = (0.0, 0.05, 0.5)
# The seed looks for exited children every 100 ms from its SIGTERM, so a child that takes
# exactly 0 or 500 ms lands on its grid (its best or worst case, by luck). Each run adds a
# random phase of 0-100 ms (seeded: the same for every init) to the child's time, so the
# seed's rows are its average case over the grid, not one point of it.
PHASE = 0.1


def one_shutdown(target, work, delay, args=(), grace=30):
    """One namespace guest with one child that takes `delay` s to handle SIGTERM; returns
    the figures of its shutdown in seconds."""
    ready, stamp = os.path.join(work, "ready"), os.path.join(work, "stamp")
    for path in (ready, stamp):
        if os.path.exists(path):
            os.unlink(path)
    setup = ("%s -S %s %s %s %g &\nwhile [ ! -e %s ]; do sleep 0.005; done"
             % (PY, TERM_CHILD, shlex.quote(ready), shlex.quote(stamp), delay,
                shlex.quote(ready)))
    g = nsguest.NamespaceGuest(target, work, setup=setup, log_level="info",
                               agent_args=list(args))
    with g:
        g.wait_ready(60)
        client = agent.Client(("unix", g.sock), 10)
        client.connect()
        payload = agent.encode_message(agent.SHUTDOWN_REQUEST, {"timeout_seconds": grace})
        asked = guestctl.boot_clock()
        client.request(agent.MSG_SHUTDOWN, payload)
        code = g.proc.wait(grace + 60)
        gone = guestctl.boot_clock()
        client.close()
        log = g.log()
    if code != nsguest.POWER_OFF_RETURNCODE:
        raise SystemExit("shutdown did not reach power-off (%s):\n%s" % (code, log))
    events = guestctl.log_events(log)
    rebooted = next(t for t, _, m in events if m.startswith("shutdown: calling reboot("))
    # the disks' time inside sync(): the teardown's first and final sync together
    sync_s = sum(float(m.split("took ")[1].split()[0]) / 1000 for _, _, m in events
                 if "sync() took" in m)
    with open(stamp) as f:
        received, exited = map(float, f.read().split())
    own = exited - received
    return {"request_to_reboot": rebooted - asked, "overhead": rebooted - asked - own - sync_s,
            "sync": sync_s, "reboot_to_gone": gone - rebooted, "child_own": own}


def bench_shutdown(report, pyz, runs):
    work = tempfile.mkdtemp(prefix="arcbox-bench-ns-")
    results = {}
    try:
        rnd = random.Random(20261202)
        for delay in DELAYS:
            phases = [rnd.uniform(0, PHASE) for _ in range(runs)]
            for name, target, args in INITS:
                samples = [one_shutdown(target or pyz, work, delay + phase, args)
                           for phase in phases]
                results.setdefault(name, {})["%g" % delay] = {
                    key: [s[key] for s in samples] for key in samples[0]}
        report.data["shutdown_overhead"] = results
        ours = results[INITS[0][0]]
        for delay in DELAYS:
            o = stats(ours["%g" % delay]["overhead"])
            for name, _, _ in INITS[1:]:
                b = stats(results[name]["%g" % delay]["overhead"])
                checked = name == INITS[1][0]
                report.add("1 shutdown overhead", "child takes %g ms + a random 0-%g ms on "
                           "TERM; vs %s" % (delay * 1000, PHASE * 1000, name), fmt(o), fmt(b),
                           "%.0fx less" % (b["median"] / max(o["median"], 1e-6)),
                           "<= 3 ms median" if checked else "",
                           raw={"value": ours["%g" % delay]["overhead"],
                                "baseline": results[name]["%g" % delay]["overhead"],
                                "scale": 1000, "format": "stats", "ratio": "baseline/value",
                                "target": {"on": "value", "max": 0.003} if checked else None})
        every = [x for d in DELAYS for x in ours["%g" % d]["sync"]]
        seed_sync = [x for d in DELAYS for x in results[INITS[1][0]]["%g" % d]["sync"]]
        report.add("1 shutdown overhead", "inside sync() (the disks' time, not counted)",
                   fmt(stats(every)), fmt(stats(seed_sync)),
                   raw={"value": every, "baseline": seed_sync, "scale": 1000, "format": "stats"})
        kern = [x for d in DELAYS for x in ours["%g" % d]["reboot_to_gone"]]
        seed_kern = [x for d in DELAYS for x in results[INITS[1][0]]["%g" % d]["reboot_to_gone"]]
        report.add("1 shutdown overhead", "reboot() to namespace gone (kernel, not counted)",
                   fmt(stats(kern)), fmt(stats(seed_kern)),
                   raw={"value": kern, "baseline": seed_kern, "scale": 1000, "format": "stats"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- 2: grace precision ------------------------------------------------------------------------

def grace_lateness(target, work, args=()):
    g = nsguest.NamespaceGuest(target, work, setup="(trap '' TERM; exec sleep 1000) &",
                               log_level="info", agent_args=list(args))
    with g:
        g.wait_ready(60)
        g.shutdown(grace=1, timeout=10)
        if g.proc.wait(60) != nsguest.POWER_OFF_RETURNCODE:
            raise SystemExit("no power-off:\n" + g.log())
        events = g.events()
    term = next(t for t, _, m in events if "SIGTERM sent" in m)
    kill = next(t for t, _, m in events if "SIGKILL sent" in m)
    return kill - term - 1.0


def bench_grace(report, pyz, runs):
    work = tempfile.mkdtemp(prefix="arcbox-bench-grace-")
    try:
        ours, seed = [], []
        for _ in range(runs):                      # interleaved: both see the same load
            ours.append(grace_lateness(pyz, work))
            seed.append(grace_lateness(SEED, work, ("--handler-delay", "0")))
        o, s = stats(ours), stats(seed)
        report.data["grace_lateness"] = {"ours": o, "seed": s}
        report.add("2 grace precision", "SIGKILL after a 1 s grace: late by", fmt(o),
                   "seed: " + fmt(s), "", "<= 10 ms late",
                   raw={"value": ours, "baseline": seed, "scale": 1000, "format": "stats",
                        "target": {"on": "value", "max": 0.010}})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- 3: start-up to ready ---------------------------------------------------------------------

def time_to_exit(cmd):
    started = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def time_to_first_ping(cmd, sock, env=None):
    if os.path.exists(sock):
        os.unlink(sock)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(sock)
                s.sendall(PING)
                if s.recv(64):
                    return time.perf_counter() - started
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("%s exited before answering" % cmd)
                time.sleep(0.0002)
            finally:
                s.close()
    finally:
        proc.kill()
        proc.wait()


CARD_FLOOR_MAIN = "import os, signal, socket, time, ctypes\n"
STARTUP_TARGET = 1.10             # .pyz --version <= 1.10x the card's floor (issue 19)


def card_floor_pyz(path):
    """The card's floor as a zipapp: a __main__ that only imports the five modules of the
    design card. What any zipapp that keeps to the card pays before its first line."""
    stage = tempfile.mkdtemp(prefix="arcbox-floor-")
    try:
        with open(os.path.join(stage, "__main__.py"), "w") as f:
            f.write(CARD_FLOOR_MAIN)
        zipapp.create_archive(stage, path, interpreter=PY + " -S")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def bench_startup(report, pyz, runs):
    work = tempfile.mkdtemp(prefix="arcbox-bench-start-")
    try:
        nopyc = os.path.join(work, "nopyc.pyz")
        shiv = os.path.join(work, "shiv.pyz")
        floor_pyz = os.path.join(work, "floor.pyz")
        build.build_pyz(nopyc, with_pyc=False)
        build.build_shiv(shiv)
        card_floor_pyz(floor_pyz)
        sock = os.path.join(work, "s.sock")
        serve = ["--listen", "unix:" + sock]
        env = dict(os.environ, SHIV_ROOT=os.path.join(work, "shiv-root"))
        exits = {"bare": [PY, "-I", "-S", "-c", "pass"], "floor": [PY, "-S", floor_pyz],
                 "version": [PY, "-S", pyz, "--version"]}
        samples = {k: [] for k in exits}
        for _ in range(runs):                      # interleaved: all see the same load
            for key, cmd in exits.items():
                samples[key].append(time_to_exit(cmd))
        base, floor, version = (stats(samples[k]) for k in ("bare", "floor", "version"))
        report.add("3 start-up", "python3 -I -S -c pass (bare interpreter)", "", fmt(base),
                   raw={"baseline": samples["bare"], "scale": 1000, "format": "stats"})
        report.add("3 start-up", "the card's floor: a zipapp importing os, signal, socket, time, "
                   "ctypes", "", fmt(floor), "%.2fx bare" % (floor["median"] / base["median"]),
                   raw={"baseline": samples["floor"], "scale": 1000, "format": "stats"})
        report.add("3 start-up", ".pyz --version (runpy, zipimport, the agent module); vs the "
                   "card's floor", fmt(version), fmt(floor), "%.2fx" % (
                       version["median"] / floor["median"]),
                   "<= %.2fx the floor" % STARTUP_TARGET,
                   raw={"value": samples["version"], "baseline": samples["floor"], "scale": 1000,
                        "format": "stats", "ratio": "value/baseline",
                        "target": {"on": "ratio", "max": STARTUP_TARGET}})
        report.add("3 start-up", ".pyz --version vs the bare interpreter (informative)",
                   fmt(version), fmt(base), "%.2fx" % (version["median"] / base["median"]),
                   raw={"value": samples["version"], "baseline": samples["bare"],
                        "scale": 1000, "format": "stats", "ratio": "value/baseline"})
        breakdown = {"python -I -S": base, "card floor zipapp": floor, ".pyz --version": version}
        cases = [(".pyz (pyc, -S): exec to first Ping", [PY, "-S", pyz] + serve, None),
                 (".pyz (pyc, -I -S)", [PY, "-I", "-S", pyz] + serve, None),
                 (".pyz without pyc, -S", [PY, "-S", nopyc] + serve, None),
                 ("shiv (warm ~/.shiv), -S", [PY, "-S", shiv] + serve, env)]
        for name, cmd, cenv in cases:
            xs = [time_to_first_ping(cmd, sock, cenv) for _ in range(runs)]
            st = stats(xs)
            breakdown[name] = st
            report.add("3 start-up", name, fmt(st), "", "%.2fx bare" % (
                st["median"] / base["median"]),
                raw={"value": xs, "baseline": samples["bare"], "baseline_shown": False,
                     "scale": 1000, "format": "stats", "ratio": "value/baseline"})
        report.data["startup"] = breakdown
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- 4 + 5: memory, throughput, latency -------------------------------------------------------

def start_server(cmd, sock):
    """A server process on sock, and one connection to it."""
    proc = guestctl.ServerProcess(cmd, sock).start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    return proc, s


def ping_roundtrips(s, count):
    times = []
    for _ in range(count):
        started = time.perf_counter()
        s.sendall(PING)
        got = b""
        while len(got) < 4 or len(got) < 4 + int.from_bytes(got[:4], "big"):
            got += s.recv(4096)
        times.append(time.perf_counter() - started)
    return times


def concurrent_rate(sock, conns, seconds, frame=PING):
    """conns connections, each keeping one request (a Ping) in flight; answers per second."""
    socks = []
    for _ in range(conns):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        s.setblocking(False)
        socks.append(s)
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for s in socks:
        poller.register(s, select.POLLIN)
        s.send(frame)
    answered = 0
    end = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < end:
        for fd, _ in poller.poll(100):
            s = by_fd[fd]
            data = s.recv(65536)
            if not data:
                raise SystemExit("server closed a connection")
            n = data.count(b"\x00\x00\x10\x01")      # response frames (type 0x1001)
            answered += n
            s.send(frame * n)
    rate = answered / (time.perf_counter() - started)
    for s in socks:
        s.close()
    return rate


def bench_serving(report, pyz, pings, runs, seconds):
    work = tempfile.mkdtemp(prefix="arcbox-bench-serve-")
    try:
        sock = os.path.join(work, "s.sock")
        bare = subprocess.Popen([PY, "-I", "-S", "-c", "import time; time.sleep(60)"])
        time.sleep(0.3)
        bare_kib = vm_rss_kib(bare.pid)
        bare.kill()
        bare.wait()
        ours_cmd = [PY, "-S", pyz, "--listen", "unix:" + sock, "--log", "error",
                    "--max-conns", "1000"]
        proc, s = start_server(ours_cmd, sock)
        try:
            seq = ping_roundtrips(s, pings)
            rss_10k = vm_rss_kib(proc.proc.pid)
            fds_10k = len(os.listdir("/proc/%d/fd" % proc.proc.pid))
            ping_roundtrips(s, pings * 9)
            rss_100k = vm_rss_kib(proc.proc.pid)
            fds_100k = len(os.listdir("/proc/%d/fd" % proc.proc.pid))
            s.close()
        finally:
            proc.close()
        eproc, es = start_server([PY, "-S", SELECT_SERVER, sock], sock)
        try:
            eseq = ping_roundtrips(es, pings)
            es.close()
        finally:
            eproc.close()
        # throughput: the servers take turns, so that drift on a shared machine hits all
        servers = {"ours": ours_cmd, "select": [PY, "-S", SELECT_SERVER, sock],
                   "threads": [PY, "-S", THREAD_SERVER, sock]}
        rates = {(name, kind): [] for name in servers for kind in ("empty", "message")}
        for _ in range(runs):
            for name, cmd in servers.items():
                p = guestctl.ServerProcess(cmd, sock, os.path.join(work, name + ".log")).start()
                try:
                    rates[(name, "empty")].append(concurrent_rate(sock, 100, seconds))
                    rates[(name, "message")].append(
                        concurrent_rate(sock, 100, seconds, PING_WITH_MESSAGE))
                except OSError as exc:
                    raise SystemExit("%s: %s\n%s" % (name, exc, p.tail()))
                finally:
                    p.close()
        rate = {"%s/%s" % key: stats(xs) for key, xs in rates.items()}
        report.data["memory"] = {"bare_kib": bare_kib, "after_%d" % pings: rss_10k,
                                 "after_%d" % (pings * 10): rss_100k, "fds": [fds_10k, fds_100k],
                                 "pyz_bytes": os.path.getsize(pyz)}
        report.add("4 memory", "VmRSS serving, after %d Pings" % pings, "%.1f MiB" % (
            rss_10k / 1024), "bare python3 -I -S: %.1f MiB" % (bare_kib / 1024),
                   "+%.1f MiB" % ((rss_10k - bare_kib) / 1024))
        grew = rss_100k - rss_10k
        report.add("4 memory", "growth %d -> %d Pings" % (pings, pings * 10),
                   "%+d KiB, fds %d -> %d" % (grew, fds_10k, fds_100k), "", "",
                   "no growth (<= 64 KiB, same fds)",
                   raw={"growth": {"kib": [rss_10k, rss_100k], "fds": [fds_10k, fds_100k],
                                   "max_kib": 64}})
        report.add("4 size", "arcbox-agent.pyz", "%d bytes" % os.path.getsize(pyz))
        pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]
        report.data["latency_us"] = {"ours": [pct(seq, .5) * 1e6, pct(seq, .99) * 1e6],
                                     "select": [pct(eseq, .5) * 1e6, pct(eseq, .99) * 1e6]}
        report.add("5 latency", "Ping round trip, one connection, p50/p99",
                   "%.0f/%.0f us" % (pct(seq, .5) * 1e6, pct(seq, .99) * 1e6),
                   "selectors server: %.0f/%.0f us" % (pct(eseq, .5) * 1e6, pct(eseq, .99) * 1e6),
                   "%.2fx" % (pct(seq, .5) / pct(eseq, .5)))
        report.data["throughput"] = rate
        for kind, what in (("empty", "empty Pings"),
                           ("message", "Pings with a message (decoded, answered \"pong: hello\"; "
                            "the baseline still answers a fixed payload)")):
            o, b, t = (rate["%s/%s" % (n, kind)] for n in ("ours", "select", "threads"))
            checked = kind == "empty"
            report.add("5 throughput", "100 connections, %s; vs selectors server" % what,
                       "%.0f req/s" % o["median"], "%.0f req/s" % b["median"],
                       "%.2fx" % (o["median"] / b["median"]), ">= 0.5x" if checked else "",
                       raw={"value": rates[("ours", kind)], "baseline": rates[("select", kind)],
                            "format": "median0", "ratio": "value/baseline",
                            "target": {"on": "ratio", "min": 0.5} if checked else None})
            report.add("5 throughput", "100 connections, %s; vs thread per connection" % what,
                       "%.0f req/s" % o["median"], "%.0f req/s" % t["median"],
                       "%.2fx" % (o["median"] / t["median"]),
                       raw={"value": rates[("ours", kind)], "baseline": rates[("threads", kind)],
                            "format": "median0", "ratio": "value/baseline"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- 6: reaping -----------------------------------------------------------------------------------

ORPHANS = r"""
import os, sys
n = int(sys.argv[1])
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            os._exit(0)          # the grandchild: an orphan of PID 1 at once
        os._exit(0)
    os.waitpid(pid, 0)
"""

MINIMAL_REAPER = ("%s -S -c 'import os, time\nwhile True:\n    try:\n        os.wait()\n"
                  "    except ChildProcessError:\n        time.sleep(0.001)'" % PY)


def orphan_burst(g, count, ready):
    """Run the orphan generator inside g; seconds until no process but PID 1 is left."""
    ready()
    started = time.perf_counter()
    subprocess.run(["nsenter", "-t", str(g.init_pid()), "-p", "-m", "--", PY, "-S", "-c",
                    ORPHANS, str(count)], check=True, timeout=600)
    made = time.perf_counter() - started
    while g.processes():
        time.sleep(0.002)
    return time.perf_counter() - started, made


def bench_reaping(report, pyz, count, runs):
    """The same burst of orphans (each made by a double fork, so the generator is the slow
    part) under our PID 1 and under the fastest possible reaper, a blocking os.wait() loop."""
    work = tempfile.mkdtemp(prefix="arcbox-bench-reap-")
    try:
        ours, base, made = [], [], []
        for _ in range(runs):
            g = nsguest.NamespaceGuest(pyz, work, log_level="error")
            with g:
                took, gen = orphan_burst(g, count, lambda: g.wait_ready(60))
                g.request(agent.MSG_PING)          # still serving afterwards
            ours.append(took)
            made.append(gen)
            g = nsguest.NamespaceGuest(pyz, work, init=MINIMAL_REAPER)
            with g:
                base.append(orphan_burst(g, count, lambda: time.sleep(0.3))[0])
        o, b = stats(ours), stats(base)
        report.data["reaping"] = {"orphans": count, "ours": o, "minimal_reaper": b,
                                  "generator": stats(made)}
        report.add("6 reaping", "%d orphans: burst start to none left (paced by the orphan "
                   "generator, which took %s to make them: its pace, not the reaper's)"
                   % (count, fmt(stats(made), "s", 1)),
                   "%s (%.0f/s)" % (fmt(o, "s", 1), count / o["median"]),
                   "blocking wait() loop: %s" % fmt(b, "s", 1),
                   "%.2fx" % (o["median"] / b["median"]),
                   raw={"value": ours, "baseline": base, "scale": 1, "format": "stats",
                        "ratio": "value/baseline"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- 7: VM: three inits in the same image ------------------------------------------------------
#
# One initramfs, one kernel; rdinit= picks the init. Each init's wrapper starts the same
# workload first (one process that exits on SIGTERM, optionally one that ignores it), so the
# processes are the init's children. Stop request -> QEMU exit, measured on the host:
# - arcbox-agent and the seed: a Shutdown request on the virtio-serial port (grace 1 s);
# - busybox init: a byte on the same port, read by a one-line inittab job that runs
#   busybox's own `poweroff` (busybox's fixed 1 s pauses are its grace).

VM_WORKLOAD = {"exits": "sleep 1000 &\n",
               "ignores": "sleep 1000 &\n(trap '' TERM; exec sleep 1000) &\n"}
LOAD_MODULES = ("import sys; sys.path.insert(0, '/arcbox-agent.pyz'); import agent; "
                "agent.load_modules(sys.argv[1:])")


def vm_image_files(pyz, modules):
    with open(SEED, "rb") as f:
        seed = f.read()
    files = {"/arcbox-agent.pyz": open(pyz, "rb").read(), "/bench/seed_agent.py": seed}
    for name, text in VM_WORKLOAD.items():
        files["/bench/workload-%s.sh" % name] = ("#!/bin/sh\n" + text).encode()
        files["/bench/ours-%s" % name] = ("#!/bin/sh\n/bench/workload-%s.sh\nexec /init\n"
                                          % name).encode()
        files["/bench/seed-%s" % name] = (
            "#!/bin/sh\n/bench/workload-%s.sh\nexec /usr/bin/python3 -S /bench/seed_agent.py "
            "--handler-delay 0.1\n" % name).encode()
        files["/bench/busybox-%s" % name] = (
            "#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sysfs /sys\n"
            "mount -t devtmpfs devtmpfs /dev\n/usr/bin/python3 -S -c \"%s\" %s\n"
            "/bench/workload-%s.sh\nexec /sbin/init\n"
            % (LOAD_MODULES, " ".join(modules), name)).encode()
    # The "mounts" workload (figure 8): the same early mounts and modules for both inits,
    # then tools/guest/mounts.sh (without its freeze: busybox's poweroff would hang on it).
    prepare = ("#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sysfs /sys\n"
               "mount -t devtmpfs devtmpfs /dev\n/usr/bin/python3 -S -c \"%s\" %s\n"
               "/test/mounts.sh nofreeze &\n"
               "while [ ! -e /tmp/mounts-ready ]; do sleep 0.05; done\n"
               % (LOAD_MODULES, " ".join(modules + guestimage.STORAGE_MODULES)))
    files["/bench/ours-mounts"] = (prepare + "exec /init\n").encode()
    files["/bench/busybox-mounts"] = (prepare + "exec /sbin/init\n").encode()
    files.update(storagecheck.guest_files())
    # busybox init's own default shutdown lines (what it runs with no inittab), between two
    # stamps of the guest's clock; it runs them before it signals the processes
    files["/etc/inittab"] = (b"::once:/bench/poweroff-on-request.sh\n"
                             b"::shutdown:/bench/stamp.sh begin\n"
                             b"::shutdown:/sbin/swapoff -a\n"
                             b"::shutdown:/bin/umount -a -r\n"
                             b"::shutdown:/bench/stamp.sh end\n")
    files["/bench/stamp.sh"] = (b"#!/bin/sh\n[ -e /proc/uptime ] || mount -t proc proc /proc\n"
                                b"echo \"BUSYBOX-TEARDOWN-$1 $(cut -d' ' -f1 /proc/uptime)\"\n")
    files["/bench/poweroff-on-request.sh"] = (
        "#!/bin/sh\n"
        "for p in /sys/class/virtio-ports/*; do\n"
        "  [ \"$(cat $p/name)\" = org.arcbox.agent ] && port=/dev/${p##*/}\n"
        "done\n"
        "echo BUSYBOX-READY\n"
        "# a byte from the host; EOF (the host side not connected yet) is not a request\n"
        "until [ -n \"$(head -c 1 < $port)\" ]; do sleep 0.05; done\n"
        "exec poweroff\n").encode()
    return files


def ready_push_vs_poll(vmtool, guestimage, work, image, kernel, boots):
    """When does the host know that the agent serves? In one boot, on the guest's own boot
    clock, from the agent's "ready" line: pushed, the READY=1 message arrives (SMBIOS
    credential; a receiver in the guest stamps it, standing in for the host's vsock
    listener); polled, the agent answers the first Ping of a host that polls the
    virtio-serial port (each try waits 0.1 s for an answer, then 10 ms before the next; its
    request already waits in the port when the agent opens it, the best case for polling)."""
    push, poll = [], []
    for _ in range(boots):
        machine = vmtool.VM(work, image, kernel, cmdline="rdinit=/notify-init",
                            qemu_args=guestimage.notify_smbios_args(), log_level="debug")
        with machine:
            machine.wait_ready(120, try_timeout=0.1)
            machine.wait_log("NOTIFY-RECEIVED", 60)
            line = next(l for l in machine.console().splitlines() if "NOTIFY-RECEIVED at" in l)
            events = machine.events()
        ready = next(t for t, _, m in events if m.startswith("ready (pid"))
        push.append(float(line.split("NOTIFY-RECEIVED at ")[1].split()[0]) - ready)
        poll.append(next(t for t, _, m in events
                         if m.startswith("Ping (0x0001) from serial port")) - ready)
    return {"push": push, "poll": poll}


def arm_figures(vmtool, guestimage, pyz, work, boots):
    """The agent in an aarch64 guest (QEMU -M virt, TCG): QEMU start -> first Ping, and a
    Shutdown -> QEMU exit with a process that exits on SIGTERM."""
    if vmtool.why_vm_unavailable("aarch64"):
        raise SystemExit("bench: " + vmtool.why_vm_unavailable("aarch64"))
    image = os.path.join(work, "guest-arm.cpio")
    guestimage.build_initramfs(pyz, image, arch="aarch64", extra_files={
        "/bench/workload.sh": b"#!/bin/sh\nsleep 1000 &\n"})
    kernel = guestimage.kernel_image(guestimage.fetch_packages("aarch64"), "aarch64")
    ready, stop = [], []
    for _ in range(boots):
        machine = vmtool.VM(work, image, kernel, arch="aarch64",
                            cmdline="arcbox.exec=/bench/workload.sh")
        with machine:
            ready.append(machine.wait_ready(180))
            time.sleep(0.2)
            started = time.perf_counter()
            machine.shutdown(grace=5)
            if machine.wait(60) != 0 or not machine.powered_off():
                raise SystemExit("aarch64: no clean power-off:\n" + machine.console()[-3000:])
            stop.append(time.perf_counter() - started)
    return {"boot_to_ready": ready, "stop_exits": stop}


def boot_and_stop(machine, init, workload):
    """Wait until the guest is up, then ask its init to stop (ours and the seed: a Shutdown
    with grace 1 s; busybox init: a byte on the port its inittab job waits on) and wait for
    QEMU to exit. Returns (seconds to ready or None for busybox, stop request -> QEMU exit,
    the agent's log events)."""
    if init == "busybox":
        # Connected before busybox's job reads the port: a virtio-serial port whose host side
        # is not connected reads EOF at once, and an earlier version of this bench started
        # busybox's poweroff before its request that way (its row came out 0.2 s short).
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 60
        while True:
            try:
                s.connect(machine.sock)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        machine.wait_log("BUSYBOX-READY", 120)
        ready = None
    else:
        ready = machine.wait_ready(120)
        if init == "ours":
            # the agent answers before its other modules are in (they load in the background):
            # stop it once it is as far as the others are at their first answer, fully up
            machine.wait_log("modules: all in", 120)
    time.sleep(0.2)                    # the workload is up
    if init == "busybox" and "BUSYBOX-TEARDOWN-begin" in machine.console():
        raise SystemExit("busybox init began its poweroff before the request")
    started = time.perf_counter()
    if init == "busybox":
        s.sendall(b"x")
    else:
        machine.shutdown(grace=1)
    status = machine.wait(60)
    took = time.perf_counter() - started
    if init == "busybox":
        s.close()
    if status != 0 or not machine.powered_off():
        raise SystemExit("%s/%s: no clean power-off:\n%s"
                         % (init, workload, machine.console()[-3000:]))
    return ready, took, machine.events()


def teardown_seconds(events):
    """The agent's teardown on the guest's clock: all processes gone -> reboot() entered."""
    gone = next(t for t, _, m in events if m.startswith("shutdown: all processes gone"))
    return next(t for t, _, m in events if m.startswith("shutdown: calling reboot")) - gone


def teardown_figures(vmtool, work, image, kernel, boots):
    """Figure 8: tools/guest/mounts.sh's full set of mounts (two disks, nested; a loop image
    on each, one on a hand-made loop device; two swap files, one on a loop filesystem; a
    bind mount; an overlay with its upper directory on a disk; a process that ignores
    SIGTERM still writing), stopped by a request: our agent vs busybox init with its
    default shutdown lines. Per boot: stop request -> QEMU exit (host clock), the teardown
    on the guest's clock, and whether every disk came back clean with every byte."""
    out = {}
    for _ in range(boots):
        for init in ("ours", "busybox"):
            disks = storagecheck.make_disks(tempfile.mkdtemp(dir=work))
            machine = vmtool.VM(work, image, kernel, cmdline="rdinit=/bench/%s-mounts" % init,
                                disk=[disks["vda"], disks["vdb"]],
                                modules=guestimage.STORAGE_MODULES)
            with machine:
                _, took, events = boot_and_stop(machine, init, "mounts")
                if init == "ours":
                    teardown = teardown_seconds(events)
                else:
                    stamps = {}
                    for line in machine.console().splitlines():
                        if "BUSYBOX-TEARDOWN-" in line:
                            word, value = line.split("BUSYBOX-TEARDOWN-", 1)[1].split()[:2]
                            stamps[word] = float(value)
                    teardown = stamps["end"] - stamps["begin"]
            found = storagecheck.problems(disks, os.path.dirname(disks["vda"]), frozen=False)
            entry = out.setdefault(init, {"stop": [], "teardown": [], "problems": []})
            entry["stop"].append(took)
            entry["teardown"].append(teardown)
            entry["problems"].append(found)
    return out


def report_teardown(report, results):
    o, b = results["mounts"]["ours"], results["mounts"]["busybox"]
    simple = stats(results["ours"]["teardown_exits"])
    report.add("8 teardown (TCG)", "all processes gone to reboot(), every mount kind "
               "(guest clock)", fmt(stats(o["teardown"])), "simple guest, no disks: "
               + fmt(simple), "+%.0f ms" % ((stats(o["teardown"])["median"]
                                            - simple["median"]) * 1000))
    report.add("8 teardown (TCG)", "vs busybox init's `swapoff -a; umount -a -r` (guest clock; "
               "it runs them before it signals the processes)", fmt(stats(o["teardown"])),
               fmt(stats(b["teardown"])), "")
    report.add("8 teardown (TCG)", "stop request to QEMU exit, every mount kind (grace 1 s)",
               fmt(stats(o["stop"]), "s", 1), "busybox init: " + fmt(stats(b["stop"]), "s", 1),
               "%.1fx faster" % (stats(b["stop"])["median"] / stats(o["stop"])["median"]))
    clean = lambda e: sum(1 for p in e["problems"] if not p)
    report.add("8 teardown (TCG)", "boots whose disks came back clean with every byte",
               "%d/%d" % (clean(o), len(o["problems"])),
               "busybox init: %d/%d" % (clean(b), len(b["problems"])), "")


def bench_vm(report, pyz, boots):
    import vm as vmtool
    reason = vmtool.why_vm_unavailable()
    if reason:
        report.add("7 VM", "not measured", reason)
        return
    work = tempfile.mkdtemp(prefix="arcbox-bench-vm-")
    try:
        image = os.path.join(work, "guest.cpio")
        files = vm_image_files(pyz, guestimage.GUEST_MODULES)
        files.update(guestimage.notify_receiver_files())
        guestimage.build_initramfs(pyz, image, extra_files=files)
        kernel = guestimage.vmlinux(guestimage.fetch_packages())
        results = {"ready": ready_push_vs_poll(vmtool, guestimage, work, image, kernel, boots)}
        for workload in ("exits", "ignores"):
            for _ in range(boots):
                for init in ("ours", "seed", "busybox"):
                    machine = vmtool.VM(work, image, kernel,
                                        cmdline="rdinit=/bench/%s-%s" % (init, workload))
                    with machine:
                        ready, took, events = boot_and_stop(machine, init, workload)
                    entry = results.setdefault(init, {})
                    entry.setdefault("stop_" + workload, []).append(took)
                    if init == "ours":
                        entry.setdefault("teardown_" + workload, []).append(
                            teardown_seconds(events))
                    if ready is not None:
                        entry.setdefault("boot_to_ready", []).append(ready)
        results["mounts"] = teardown_figures(vmtool, work, image, kernel, boots)
        report.data["vm"] = results
        push, poll = stats(results["ready"]["push"]), stats(results["ready"]["poll"])
        report.add("7 VM (TCG)", "agent ready to READY=1 received (by a receiver in the guest, "
                   "standing in for the host's listener; guest clock)",
                   fmt(push), "a host polling the serial port: first Ping answered: " + fmt(poll),
                   raw={"value": results["ready"]["push"], "baseline": results["ready"]["poll"],
                        "scale": 1000, "format": "stats"})
        o, s, b = results["ours"], results["seed"], results["busybox"]
        report.add("7 VM (TCG)", "QEMU start to first Ping answered",
                   fmt(stats(o["boot_to_ready"]), "s", 1),
                   "seed: " + fmt(stats(s["boot_to_ready"]), "s", 1),
                   raw={"value": o["boot_to_ready"], "baseline": s["boot_to_ready"], "scale": 1,
                        "format": "stats"})
        arm = arm_figures(vmtool, guestimage, pyz, work, boots)
        results["aarch64"] = arm
        report.add("7 VM (TCG)", "aarch64 (-M virt): QEMU start to first Ping answered",
                   fmt(stats(arm["boot_to_ready"]), "s", 1),
                   "x86_64 above: " + fmt(stats(o["boot_to_ready"]), "s", 1),
                   raw={"value": arm["boot_to_ready"], "baseline": o["boot_to_ready"],
                        "scale": 1, "format": "stats"})
        report.add("7 VM (TCG)", "aarch64: Shutdown to QEMU exit (a process exits on TERM)",
                   fmt(stats(arm["stop_exits"]), "s", 1),
                   "x86_64: " + fmt(stats(o["stop_exits"]), "s", 1),
                   raw={"value": arm["stop_exits"], "baseline": o["stop_exits"], "scale": 1,
                        "format": "stats"})
        for workload, what in (("exits", "a process that exits on TERM"),
                               ("ignores", "+ one ignoring TERM (grace 1 s)")):
            ours = stats(o["stop_" + workload])
            for name, base in (("busybox init + poweroff", b), ("seed", s)):
                bs = stats(base["stop_" + workload])
                report.add("7 VM (TCG)", "stop request to QEMU exit, %s; vs %s" % (what, name),
                           fmt(ours, "s", 1), fmt(bs, "s", 1),
                           "%.1fx faster" % (bs["median"] / ours["median"]),
                           raw={"value": o["stop_" + workload],
                                "baseline": base["stop_" + workload], "scale": 1,
                                "format": "stats", "ratio": "baseline/value"})
        report_teardown(report, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the published table (docs/performance.md) and the chart, from a saved run -----------------

def run_metadata():
    """What the run was, read from the run itself: the commit, the interpreters, the machine."""
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return ""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]),
            "dirty": bool(out(["git", "-C", REPO, "status", "--porcelain", "agent.py",
                               "build.py", "bench"])),
            "runner_python": sys.version.split()[0],
            "agent_python": out([PY, "-c", "import sys; print(sys.version.split()[0])"]),
            "agent_python_path": PY, "machine": os.uname().machine,
            "kernel": os.uname().release, "cpus": os.cpu_count(), "cpu_model": model}


def markdown(data):
    """docs/performance.md's table, from a saved run."""
    meta = data["meta"]
    lines = ["Measured by `python3 bench/run.py`%s (%s) on %s, %d CPUs (%s, Linux %s); the "
             "agent and the baselines run on %s %s, the runner on Python %s; medians "
             "(min-max); each target judged by the 90 %% bootstrap interval of its statistic "
             "(bench/verdict.py: met when the whole interval meets it, missed when none of it "
             "does, else not established)." % (
                 " --quick" if meta["quick"] else "", provenance.says(data), meta["cpu_model"],
                 meta["cpus"], meta["machine"], meta["kernel"], meta["agent_python_path"],
                 meta["agent_python"], meta["runner_python"]),
             "", "| " + " | ".join(Report.HEAD) + " |", "|" + "---|" * len(Report.HEAD)]
    for row in data["rows"]:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def teardown_paragraph(data):
    """docs/performance.md's teardown paragraph, from the same saved run as the table's
    figure 8 rows."""
    vm = data["vm"]
    o, b = vm["mounts"]["ours"], vm["mounts"]["busybox"]
    simple = vm["ours"]["teardown_exits"]
    ms = lambda xs: "%.0f ms median (%.0f–%.0f)" % (            # noqa: E731
        statistics.median(xs) * 1000, min(xs) * 1000, max(xs) * 1000)
    clean = lambda e: sum(1 for p in e["problems"] if not p)  # noqa: E731
    journals = sum(1 for p in b["problems"] if any("journal needs recovery" in x for x in p))
    fsck = sum(1 for p in b["problems"] if any("e2fsck -fn exit" in x for x in p))
    lost = sum(1 for p in b["problems"] if any("as written" in x or "not 1..N" in x for x in p))
    return (
        "**What it costs** (figure 8 of the run above, %s, %d boots each, TCG): the teardown, "
        "from \"all processes gone\" to reboot() on the guest's clock, takes %s with every "
        "mount kind of [power-off.md](power-off.md#nothing-lost-whatever-the-guest-mounted), "
        "against %s in a guest with no disks. busybox init's own `swapoff -a; umount -a -r` "
        "(its default shutdown lines) in the same image takes %s (its clock has 10 ms steps), "
        "but busybox runs them before it signals the processes: its disks came back clean "
        "with every byte in %d of %d boots (ours: %d of %d): a journal left to recover in %d, "
        "`e2fsck -fn` finding errors in %d, files written before the stop not as written in "
        "%d. Stop request to QEMU exit (grace 1 s): %.2f s against busybox "
        "init's %.2f s (medians)."
        % (provenance.says(data), len(o["stop"]), ms(o["teardown"]), ms(simple),
           ms(b["teardown"]), clean(b), len(b["problems"]), clean(o), len(o["problems"]),
           journals, fsck, lost, statistics.median(o["stop"]), statistics.median(b["stop"])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    parser.add_argument("--only", help="comma-separated figure numbers, e.g. 1,2,5")
    parser.add_argument("--markdown", nargs="?", const=os.path.join(RESULTS, "bench.json"),
                        metavar="JSON", help="print the published table from a saved run")
    parser.add_argument("--publish", action="store_true",
                        help="after a full run: bench/results/bench.json, the chart, and the "
                        "published table")
    args = parser.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            sys.stdout.write(markdown(json.load(f)))
        return
    if args.publish and (args.quick or args.only):
        parser.error("--publish needs a full run (no --quick, no --only)")
    reason = nsguest.why_namespaces_unavailable()
    if reason:
        raise SystemExit("bench: " + reason)
    only = set(args.only.split(",")) if args.only else set("1234567")
    q = args.quick
    os.makedirs(os.path.join(REPO, "dist"), exist_ok=True)
    pyz = os.path.join(REPO, "dist", "arcbox-agent.pyz")
    build.build_pyz(pyz)
    report = Report()
    started = time.time()
    if "1" in only:
        bench_shutdown(report, pyz, 3 if q else 20)
    if "2" in only:
        bench_grace(report, pyz, 2 if q else 7)
    if "3" in only:
        bench_startup(report, pyz, 5 if q else 30)
    if only & {"4", "5"}:
        bench_serving(report, pyz, 1000 if q else 10000, 1 if q else 5, 0.5 if q else 2.0)
    if "6" in only:
        bench_reaping(report, pyz, 1000 if q else 10000, 1 if q else 3)
    if "7" in only:
        bench_vm(report, pyz, 1 if q else 5)
    report.data["rows"] = report.rows
    report.data["meta"] = dict(run_metadata(), quick=q,
                               seconds=round(time.time() - started, 1))
    report.data["provenance"] = provenance.collect(HARNESS)
    print("\narcbox-agent benchmarks, %s%s, %d CPUs (medians, min-max)" % (
        report.data["meta"]["date"], " (--quick)" if q else "", os.cpu_count()))
    report.print()
    targets = report.data.get("targets", [])
    print("\ntargets: %s%s" % (", ".join("%d %s" % (sum(1 for t in targets
                                                       if t["verdict"].startswith(v)), v)
                                        for v in ("met", "missed", "not established")),
                               "".join("\n  %s: %s, %s (%s)" % (t["verdict"].upper(), t["figure"],
                                                                t["case"], t["target"])
                                       for t in targets if t["verdict"] != "met")))
    out = os.path.join(REPO, "dist", "bench.json")
    with open(out, "w") as f:
        json.dump(report.data, f, indent=1, sort_keys=True)
    print("figures: %s (%.0f s)" % (os.path.relpath(out), time.time() - started))
    if not q:                      # every real run kept, published or not
        print("kept: %s" % os.path.relpath(provenance.keep("bench", report.data), REPO))
    if args.publish:
        os.makedirs(RESULTS, exist_ok=True)
        provenance.publish(report.data, os.path.join(RESULTS, "bench.json"))
        import chart
        chart.draw(report.data, os.path.join(RESULTS, "shutdown.png"))
        print("published: bench/results/bench.json, bench/results/shutdown.png; now "
              "`python3 bench/docs_blocks.py` writes the docs' figures from it")


if __name__ == "__main__":
    main()
