#!/usr/bin/env python3
"""The fleet case: 20 guests on one host stopped at once and waited for. Not a test:
figures, printed and saved (bench/results/fleet.json).

Each guest is the real .pyz as PID 1 of a PID namespace with one process that exits on
SIGTERM. Two ways to stop the 20, alternated round by round on fresh guests:
- ours: one `arcbox-agent shutdown --wait --grace 1 --to G1 ... --to G20` (a thread per
  guest);
- baseline: what a user could write without it, a shell loop starting one
  `arcbox-agent shutdown --wait --to G > G.out` process per guest in the background, then
  `wait` (20 processes at once: the strongest simple alternative; one after another would be
  20 times a stop).
Wall time from the command's start to its end, and each guest's "gone after" as the client
reported it.

    python3 bench/fleet.py [--guests 20] [--rounds 5] [--publish]

Every run is kept in bench/results/runs/fleet/; --publish also makes it
bench/results/fleet.json.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

import build  # noqa: E402
import nsguest  # noqa: E402
import provenance  # noqa: E402
from run import run_metadata  # noqa: E402

HARNESS = ["bench/fleet.py", "bench/provenance.py", "tools/nsguest.py", "tools/guestctl.py"]


def start_guests(pyz, work, n):
    guests = []
    for i in range(n):
        d = os.path.join(work, "g%d" % i)
        os.makedirs(d)
        g = nsguest.NamespaceGuest(pyz, d, setup="sleep 1000 &", log_level="info")
        g.start()
        guests.append(g)
    for g in guests:
        g.wait_ready(60)
    return guests


def stop(variant, pyz, guests):
    """(wall seconds, [gone after s])."""
    began = time.monotonic()
    if variant == "ours":
        cmd = [sys.executable, pyz, "shutdown", "--wait", "--grace", "1", "--json"]
        for g in guests:
            cmd += ["--to", g.address]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        lines = out.stdout.splitlines()
    else:
        # each process's line to a file of its own: 20 writers on one pipe may interleave
        outs = [g.sock + ".out" for g in guests]
        script = "".join("%s %s shutdown --wait --grace 1 --json --to %s > %s &\n"
                         % (sys.executable, pyz, g.address, o) for g, o in zip(guests, outs)) \
            + "wait\n"
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
        lines = []
        for o in outs:
            with open(o) as f:
                lines += f.read().splitlines()
    wall = time.monotonic() - began
    try:
        results = [json.loads(line) for line in lines]
    except ValueError:
        raise SystemExit("%s: not JSON lines: %r" % (variant, out.stdout))
    if len(results) != len(guests) or not all(r.get("gone") for r in results):
        raise SystemExit("%s: not every guest was seen gone: %s %s" % (variant, out.stdout,
                                                                       out.stderr))
    for g in guests:
        g.wait(30)
    return wall, [r["gone_after_s"] for r in results]


def published_paragraph(report):
    """docs/performance.md's fleet figures, from the saved samples."""
    walls = {v: [r["wall_s"] for r in report["samples"][v]] for v in ("ours", "baseline")}
    slowest = {v: [max(r["gone_after_s"]) for r in report["samples"][v]]
               for v in ("ours", "baseline")}
    span = lambda xs: "%.3f–%.3f" % (min(xs), max(xs))          # noqa: E731
    return (
        "%d namespace guests (the real `.pyz` as PID 1, one process that exits on SIGTERM), "
        "stopped and waited for with one `arcbox-agent shutdown --wait --grace 1 --to G1 ... "
        "--to G%d` (a thread per guest), against the strongest simple alternative a user "
        "could write without it: a shell loop starting one `shutdown --wait --to G` process "
        "per guest in the background, then `wait`. %d rounds on fresh guests, the two "
        "alternated in a random order (`bench/fleet.py`, %s): from the command's start to "
        "every guest seen gone, median %.3f s (%s) against %.3f s (%s) — the loop's "
        "interpreter starts, not the guests, make the difference (the slowest guest was gone "
        "%s s after its request with ours, %s s with the loop)."
        % (report["guests"], report["guests"], report["rounds"], provenance.says(report),
           statistics.median(walls["ours"]), span(walls["ours"]),
           statistics.median(walls["baseline"]), span(walls["baseline"]),
           span(slowest["ours"]), span(slowest["baseline"])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guests", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--publish", action="store_true",
                        help="make this run bench/results/fleet.json (every run is kept)")
    args = parser.parse_args()
    reason = nsguest.why_namespaces_unavailable()
    if reason:
        raise SystemExit("bench/fleet.py: " + reason)
    work = tempfile.mkdtemp(prefix="arcbox-fleet-")
    pyz = os.path.join(work, "arcbox-agent.pyz")
    build.build_pyz(pyz)
    samples = {"ours": [], "baseline": []}
    rnd = random.Random(27)
    try:
        for r in range(args.rounds):
            order = ["ours", "baseline"]
            rnd.shuffle(order)
            for variant in order:
                round_dir = os.path.join(work, "r%d-%s" % (r, variant))
                guests = start_guests(pyz, round_dir, args.guests)
                try:
                    wall, gone = stop(variant, pyz, guests)
                finally:
                    for g in guests:
                        g.close()
                samples[variant].append({"wall_s": wall, "gone_after_s": gone})
                print("round %d %-8s %d guests stopped and seen gone in %.3f s (the slowest "
                      "gone %.3f s after its request)" % (r + 1, variant, args.guests, wall,
                                                          max(gone)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"meta": run_metadata(), "provenance": provenance.collect(HARNESS),
              "guests": args.guests, "rounds": args.rounds, "samples": samples}
    print("kept %s" % os.path.relpath(provenance.keep("fleet", report), REPO))
    if args.publish:
        provenance.publish(report, os.path.join(HERE, "results", "fleet.json"))
        print("published bench/results/fleet.json")
    for variant in ("ours", "baseline"):
        walls = [s["wall_s"] for s in samples[variant]]
        print("%-8s wall median %.3f s (min %.3f, max %.3f, n=%d)" % (
            variant, statistics.median(walls), min(walls), max(walls), len(walls)))
    print("\nfor docs/performance.md:\n" + published_paragraph(report))


if __name__ == "__main__":
    main()
