#!/usr/bin/env python3
"""Benchmarks: arcbox-agent against the design it replaces, side by side, in one run.

    python3 bench/run.py            # full run (several minutes; root; QEMU for the VM rows)
    python3 bench/run.py --quick    # a short run, as CI does so that this cannot rot

Prints a table and writes dist/bench.json. Every figure is a median over repeated runs with
min and max; every speed figure is also a ratio against a baseline measured in this same run
(these machines are noisy: absolute times are context). Benchmarks never fail on speed; they
fail only when something does not work at all.

Baselines: bench/seed_agent.py (the seed's shutdown: 100 ms handler delay, 100 ms waitpid
polling, 500 ms reap window), bench/echo_server.py (a minimal blocking server answering the
same frames), `python3 -I -S -c pass`, a plain fork+waitpid loop, the bare interpreter's RSS.
"""

import argparse
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import agent  # noqa: E402
import build  # noqa: E402
import guestctl  # noqa: E402
import nsguest  # noqa: E402
from startup import vm_rss_kib  # noqa: E402

PY = "/usr/bin/python3"
SEED = os.path.join(HERE, "seed_agent.py")
ECHO = os.path.join(HERE, "echo_server.py")
PING = agent.encode_frame(agent.MSG_PING)


def stats(xs):
    xs = sorted(xs)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "n": len(xs)}


def fmt(st, unit="ms", scale=1000.0):
    return "%.2f %s (%.2f-%.2f, n=%d)" % (st["median"] * scale, unit, st["min"] * scale,
                                          st["max"] * scale, st["n"])


class Report:
    def __init__(self):
        self.rows = []
        self.data = {}

    def add(self, figure, what, value, baseline=None, ratio=None, target=None):
        self.rows.append((figure, what, value, baseline or "", ratio or "", target or ""))

    def print(self):
        widths = [max(len(str(r[i])) for r in self.rows + [HEAD]) for i in range(6)]
        for row in [HEAD] + self.rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


HEAD = ("figure", "case", "arcbox-agent", "baseline", "ratio", "target")


# ---- 1 + 2: shutdown latency and grace precision (PID namespace) -----------------------------

def namespace_shutdown(pyz_or_script, work, n_children, grace, ignore_term=False):
    setup = "for i in $(seq %d); do sleep 1000 & done" % n_children
    if ignore_term:
        setup = "(trap '' TERM; exec sleep 1000) &"
    g = nsguest.NamespaceGuest(pyz_or_script, work, setup=setup, log_level="info")
    with g:
        g.wait_ready(60)
        payload = agent.encode_message(agent.SHUTDOWN_REQUEST, {"timeout_seconds": grace})
        client = agent.Client(("unix", g.sock), 10)
        client.connect()
        started = time.perf_counter()
        client.request(agent.MSG_SHUTDOWN, payload)
        code = g.proc.wait(grace + 60)
        took = time.perf_counter() - started
        client.close()
        log = g.log()
    if code != nsguest.POWER_OFF_RETURNCODE:
        raise SystemExit("shutdown did not reach power-off (%s):\n%s" % (code, log))
    events = guestctl.log_events(log)
    term = next((t for t, _, m in events if "SIGTERM sent" in m), None)
    kill = next((t for t, _, m in events if "SIGKILL sent" in m), None)
    return took, (kill - term - grace) if (term is not None and kill is not None) else None


def bench_shutdown(report, pyz, runs, sizes):
    work = tempfile.mkdtemp(prefix="arcbox-bench-ns-")
    try:
        for n in sizes:
            ours = [namespace_shutdown(pyz, work, n, 30)[0] for _ in range(runs)]
            seed = [namespace_shutdown(SEED, work, n, 30)[0] for _ in range(runs)]
            o, s = stats(ours), stats(seed)
            report.data["shutdown_latency_n%d" % n] = {"ours": o, "seed": s}
            report.add("1 shutdown latency", "%d children exit on TERM" % n, fmt(o), fmt(s),
                       "%.1fx faster" % (s["median"] / o["median"]),
                       ">= 20x (n=1)" if n == 1 else "")
        late_o = [namespace_shutdown(pyz, work, 0, 1, ignore_term=True)[1] for _ in range(runs)]
        late_s = [namespace_shutdown(SEED, work, 0, 1, ignore_term=True)[1] for _ in range(runs)]
        o, s = stats(late_o), stats(late_s)
        report.data["grace_lateness"] = {"ours": o, "seed": s}
        report.add("2 grace precision", "SIGKILL after a 1 s grace: late by", fmt(o), fmt(s),
                   "%.1fx closer" % (s["median"] / max(o["median"], 1e-6)), "<= 10 ms late")
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


def bench_startup(report, pyz, runs):
    work = tempfile.mkdtemp(prefix="arcbox-bench-start-")
    try:
        nopyc = os.path.join(work, "nopyc.pyz")
        shiv = os.path.join(work, "shiv.pyz")
        build.build_pyz(nopyc, with_pyc=False)
        build.build_shiv(shiv)
        sock = os.path.join(work, "s.sock")
        serve = ["--listen", "unix:" + sock]
        env = dict(os.environ, SHIV_ROOT=os.path.join(work, "shiv-root"))
        base = stats([time_to_exit([PY, "-I", "-S", "-c", "pass"]) for _ in range(runs)])
        plain = stats([time_to_exit([PY, "-c", "pass"]) for _ in range(runs)])
        report.data["startup_baseline"] = {"python -I -S": base, "python": plain}
        report.add("3 start-up", "python3 -I -S -c pass (baseline)", "", fmt(base))
        report.add("3 start-up", "python3 -c pass", "", fmt(plain), "%.2fx" % (
            plain["median"] / base["median"]))
        cases = [(".pyz (pyc, -S): exec to first Ping", [PY, "-S", pyz] + serve, None),
                 (".pyz (pyc, -I -S)", [PY, "-I", "-S", pyz] + serve, None),
                 (".pyz without pyc, -S", [PY, "-S", nopyc] + serve, None),
                 ("shiv (warm ~/.shiv), -S", [PY, "-S", shiv] + serve, env)]
        for name, cmd, cenv in cases:
            st = stats([time_to_first_ping(cmd, sock, cenv) for _ in range(runs)])
            report.data["startup " + name] = st
            report.add("3 start-up", name, fmt(st), "", "%.2fx baseline" % (
                st["median"] / base["median"]), "<= 1.5x" if "(pyc, -S)" in name else "")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- 4 + 5: memory, throughput, latency -------------------------------------------------------------

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


def concurrent_rate(sock, conns, seconds):
    """conns connections, each keeping one Ping in flight; answers per second."""
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
        s.send(PING)
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
            s.send(PING * n)
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
        proc, s = start_server([PY, "-S", pyz, "--listen", "unix:" + sock, "--log", "error",
                                "--max-conns", "1000"],
                               sock)
        try:
            seq = ping_roundtrips(s, pings)
            rss_10k = vm_rss_kib(proc.proc.pid)
            fds_10k = len(os.listdir("/proc/%d/fd" % proc.proc.pid))
            ping_roundtrips(s, pings * 9)
            rss_100k = vm_rss_kib(proc.proc.pid)
            fds_100k = len(os.listdir("/proc/%d/fd" % proc.proc.pid))
            s.close()
            ours_rate = stats([concurrent_rate(sock, 100, seconds) for _ in range(runs)])
        finally:
            proc.close()
        eproc, es = start_server([PY, "-S", ECHO, sock], sock)
        try:
            eseq = ping_roundtrips(es, pings)
            es.close()
            echo_rate = stats([concurrent_rate(sock, 100, seconds) for _ in range(runs)])
        finally:
            eproc.close()
        report.data["memory"] = {"bare_kib": bare_kib, "after_%d" % pings: rss_10k,
                                 "after_%d" % (pings * 10): rss_100k, "fds": [fds_10k, fds_100k],
                                 "pyz_bytes": os.path.getsize(pyz)}
        report.add("4 memory", "VmRSS serving, after %d Pings" % pings, "%.1f MiB" % (
            rss_10k / 1024), "bare python3 -I -S: %.1f MiB" % (bare_kib / 1024),
                   "+%.1f MiB" % ((rss_10k - bare_kib) / 1024))
        report.add("4 memory", "growth %d -> %d Pings" % (pings, pings * 10),
                   "%+d KiB, fds %d -> %d" % (rss_100k - rss_10k, fds_10k, fds_100k), "", "",
                   "no growth")
        report.add("4 size", "arcbox-agent.pyz", "%d bytes" % os.path.getsize(pyz))
        pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]
        report.data["latency_us"] = {"ours": [pct(seq, .5) * 1e6, pct(seq, .99) * 1e6],
                                     "echo": [pct(eseq, .5) * 1e6, pct(eseq, .99) * 1e6]}
        report.add("5 latency", "Ping round trip, one connection p50/p99",
                   "%.0f/%.0f us" % (pct(seq, .5) * 1e6, pct(seq, .99) * 1e6),
                   "%.0f/%.0f us" % (pct(eseq, .5) * 1e6, pct(eseq, .99) * 1e6),
                   "%.2fx" % (pct(seq, .5) / pct(eseq, .5)))
        report.data["throughput"] = {"ours": ours_rate, "echo": echo_rate}
        report.add("5 throughput", "100 concurrent connections",
                   "%.0f req/s" % ours_rate["median"], "%.0f req/s" % echo_rate["median"],
                   "%.2fx" % (ours_rate["median"] / echo_rate["median"]), ">= 0.5x")
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
        report.add("6 reaping", "%d orphans: burst start to none left" % count,
                   "%s (%.0f/s)" % (fmt(o, "s", 1), count / o["median"]),
                   "blocking wait() loop: %s" % fmt(b, "s", 1),
                   "%.2fx" % (o["median"] / b["median"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- 7: VM -------------------------------------------------------------------------------------------

def bench_vm(report, pyz, boots):
    import guestimage
    import vm as vmtool
    reason = vmtool.why_vm_unavailable()
    if reason:
        report.add("7 VM", "not measured", reason)
        return
    work = tempfile.mkdtemp(prefix="arcbox-bench-vm-")
    try:
        ours_img = os.path.join(work, "ours.cpio")
        seed_img = os.path.join(work, "seed.cpio")
        guestimage.build_initramfs(pyz, ours_img)
        with open(SEED, "rb") as f:
            seed_src = f.read()
        # the same guest, with the seed baseline as /init and our .pyz beside it for its codec
        guestimage.build_initramfs(pyz, seed_img, extra_files={"/arcbox-agent.pyz": open(
            pyz, "rb").read()}, init=seed_src)
        kernel = guestimage.vmlinux(guestimage.fetch_packages())
        results = {}
        for name, img in (("ours", ours_img), ("seed", seed_img)):
            ready, stop = [], []
            for _ in range(boots):
                machine = vmtool.VM(work, img, kernel)
                with machine:
                    ready.append(machine.wait_ready(120))
                    started = time.perf_counter()
                    machine.shutdown(grace=5)
                    status = machine.wait(60)
                    stop.append(time.perf_counter() - started)
                    if status != 0 or not machine.powered_off():
                        raise SystemExit("%s: no clean power-off:\n%s" % (name,
                                                                          machine.console()))
            results[name] = {"boot_to_ready": stats(ready), "shutdown_to_exit": stats(stop)}
        report.data["vm"] = results
        o, s = results["ours"], results["seed"]
        report.add("7 VM (TCG)", "boot to first Ping answered", fmt(o["boot_to_ready"], "s", 1),
                   fmt(s["boot_to_ready"], "s", 1))
        report.add("7 VM (TCG)", "Shutdown request to QEMU exit",
                   fmt(o["shutdown_to_exit"], "s", 1), fmt(s["shutdown_to_exit"], "s", 1),
                   "%.1fx faster" % (s["shutdown_to_exit"]["median"] /
                                     o["shutdown_to_exit"]["median"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    parser.add_argument("--only", help="comma-separated figure numbers, e.g. 1,2,5")
    args = parser.parse_args()
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
    if only & {"1", "2"}:
        bench_shutdown(report, pyz, 2 if q else 7, (1, 50) if q else (1, 50, 500))
    if "3" in only:
        bench_startup(report, pyz, 5 if q else 30)
    if only & {"4", "5"}:
        bench_serving(report, pyz, 1000 if q else 10000, 1 if q else 5, 0.5 if q else 2.0)
    if "6" in only:
        bench_reaping(report, pyz, 1000 if q else 10000, 1 if q else 3)
    if "7" in only:
        bench_vm(report, pyz, 1 if q else 10)
    report.data["meta"] = {"date": time.strftime("%Y-%m-%d"), "quick": q,
                           "seconds": round(time.time() - started, 1),
                           "python": sys.version.split()[0], "machine": os.uname().machine,
                           "cpus": os.cpu_count()}
    print("\narcbox-agent benchmarks, %s%s, %d CPUs (medians, min-max)" % (
        report.data["meta"]["date"], " (--quick)" if q else "", os.cpu_count()))
    report.print()
    out = os.path.join(REPO, "dist", "bench.json")
    with open(out, "w") as f:
        json.dump(report.data, f, indent=1, sort_keys=True)
    print("\nfigures: %s (%.0f s)" % (os.path.relpath(out), time.time() - started))


if __name__ == "__main__":
    main()
