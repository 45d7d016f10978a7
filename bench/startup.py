#!/usr/bin/env python3
"""Start-up cost of the artifacts, as ratios against the bare interpreter in the same run.

    python3 bench/startup.py [--runs N] [--publish]

Each figure is the median (min-max) wall time of `ARTIFACT --version` over N runs; memory is
VmRSS of the artifact *serving* on a Unix socket (after a Ping), against a bare interpreter
sleeping. (ru_maxrss from wait4 is useless here: it keeps the forking parent's high-water
mark across exec.) Builds what it measures into a temporary folder. Every run is kept in
bench/results/runs/startup/; --publish also makes it bench/results/startup.json.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import build  # noqa: E402
import provenance  # noqa: E402

PY = "/usr/bin/python3"
HARNESS = ["bench/startup.py", "bench/provenance.py"]


def measure(cmd, runs, env=None, fresh_dir=None):
    times = []
    for _ in range(runs):
        if fresh_dir:
            shutil.rmtree(fresh_dir, ignore_errors=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if proc.wait() != 0:
            raise SystemExit("%s failed with %d" % (cmd, proc.returncode))
        times.append(time.perf_counter() - start)
    return times


def vm_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def serving_rss(cmd, sock, env=None):
    """VmRSS (KiB) of cmd serving on sock, once it has answered a Ping; None for the
    baseline, which is given no socket."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 30
        while sock:
            probe = subprocess.run([PY, "-S", os.path.join(os.path.dirname(HERE), "agent.py"),
                                    "ping", "--to", "unix:" + sock], capture_output=True)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit("%s never answered" % cmd)
            time.sleep(0.05)
        if not sock:
            time.sleep(0.5)
        return vm_rss_kib(proc.pid)
    finally:
        proc.kill()
        proc.wait()


PUBLISHED_NAMES = ["`python3 -I -S -c pass` (baseline)", "`python3 -c pass`",
                   "**.pyz with agent.pyc, `-S` (default)**", ".pyz with agent.pyc, `-I -S`",
                   ".pyz with agent.pyc, with site", ".pyz source only, `-S`",
                   "shiv, `~/.shiv` already extracted", "shiv, first start (extracts)"]


def published_text(report):
    """docs/performance.md's artifact table and the line under it, from a saved run."""
    rows, mem, sizes = report["rows"], report["memory_kib"], report["sizes"]
    base = statistics.median(rows[0][1])
    out = ["Measured with `python3 bench/startup.py --runs %d` (%s %s, %s):" % (
               report["runs"], PY, report["provenance"]["python"].get(PY, "?"),
               provenance.says(report)), "",
           "| `ARTIFACT --version` | median | min–max | vs bare `python3 -I -S` |",
           "|---|---|---|---|"]
    for label, (_, times) in zip(PUBLISHED_NAMES, rows):
        med = statistics.median(times)
        bold = "**" if label.startswith("**") else ""
        out.append("| %s | %s%.1f ms%s | %.1f–%.1f | %.2f× |" % (
            label, bold, med * 1000, bold, min(times) * 1000, max(times) * 1000, med / base))
    out += ["", "Serving memory (VmRSS after a Ping): bare interpreter %.1f MiB, `.pyz` %.1f MiB "
            "(%+.1f), shiv %.1f MiB (%+.1f). Sizes: `.pyz` %s bytes (%s without the pyc), "
            "shiv %s." % (mem[0][1] / 1024, mem[1][1] / 1024, (mem[1][1] - mem[0][1]) / 1024,
                          mem[2][1] / 1024, (mem[2][1] - mem[0][1]) / 1024,
                          "{:,}".format(sizes[0]), "{:,}".format(sizes[1]),
                          "{:,}".format(sizes[2]))]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--publish", action="store_true",
                        help="make this run bench/results/startup.json (every run is kept)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="arcbox-bench-")
    try:
        pyc = os.path.join(work, "pyc.pyz")
        nopyc = os.path.join(work, "nopyc.pyz")
        shiv = os.path.join(work, "shiv.pyz")
        build.build_pyz(pyc)
        build.build_pyz(nopyc, with_pyc=False)
        build.build_shiv(shiv)
        shiv_root = os.path.join(work, "shiv-root")
        env = dict(os.environ, SHIV_ROOT=shiv_root)
        cases = [
            ("python3 -I -S -c pass (baseline)", [PY, "-I", "-S", "-c", "pass"], {}),
            ("python3 -c pass", [PY, "-c", "pass"], {}),
            (".pyz, pyc, -S (the default)", [PY, "-S", pyc, "--version"], {}),
            (".pyz, pyc, -I -S", [PY, "-I", "-S", pyc, "--version"], {}),
            (".pyz, pyc, with site", [PY, pyc, "--version"], {}),
            (".pyz, source only, -S", [PY, "-S", nopyc, "--version"], {}),
            ("shiv, warm ~/.shiv, -S", [PY, "-S", shiv, "--version"], {"env": env}),
            ("shiv, first start (extracts), -S", [PY, "-S", shiv, "--version"],
             {"env": env, "fresh_dir": shiv_root}),
        ]
        rows = [(name, measure(cmd, args.runs, **kw)) for name, cmd, kw in cases]
        base = statistics.median(rows[0][1])
        print("start-up, %d runs each, %s; ratio = median / baseline median" % (args.runs, PY))
        print("%-36s %9s %17s %7s" % ("", "median", "min-max", "ratio"))
        for name, times in rows:
            med = statistics.median(times)
            print("%-36s %7.1fms %7.1f-%6.1fms %6.2fx" % (
                name, med * 1000, min(times) * 1000, max(times) * 1000, med / base))
        sock = os.path.join(work, "s.sock")
        serve = ["--listen", "unix:" + sock]
        mem = [("bare python3 -I -S (baseline)", serving_rss(
                    [PY, "-I", "-S", "-c", "import time; time.sleep(60)"], None)),
               (".pyz serving", serving_rss([PY, "-S", pyc] + serve, sock)),
               ("shiv serving", serving_rss([PY, "-S", shiv] + serve, sock, env))]
        print("\nmemory (VmRSS)")
        for name, kib in mem:
            print("%-36s %7.1fMiB %+7.1fMiB vs baseline" % (name, kib / 1024,
                                                          (kib - mem[0][1]) / 1024))
        sizes = (os.path.getsize(pyc), os.path.getsize(nopyc), os.path.getsize(shiv))
        print("sizes: .pyz %d bytes (pyc) / %d (source only), shiv %d" % sizes)
        report = {"provenance": provenance.collect(HARNESS), "runs": args.runs,
                  "rows": rows, "memory_kib": mem, "sizes": sizes}
        print("kept %s" % os.path.relpath(provenance.keep("startup", report),
                                          os.path.dirname(HERE)))
        if args.publish:
            provenance.publish(report, os.path.join(HERE, "results", "startup.json"))
            print("published bench/results/startup.json")
        print("\nfor docs/performance.md:\n" + published_text(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
