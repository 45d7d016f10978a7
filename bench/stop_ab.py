#!/usr/bin/env python3
"""A/B of two agents' Shutdown overhead, interleaved pair by pair: figure 1's setup
(bench/run.py: one namespace guest whose one child takes a random 0-100 ms to handle SIGTERM),
each pair the same child time for both, in a random order. Prints each pair; saves every
sample (request to reboot(), the overhead, sync, the child's own time) for both.

    python3 bench/stop_ab.py A.pyz B.pyz --names A B --pairs 40 --seed 20261205 \\
        --describe "A: ...; B: ..." --out bench/results/NAME.json

    python3 bench/stop_ab.py --early-fork [--pairs 30]   # bench/results/early-fork-ab.json

--early-fork builds both agents from this agent.py -- with_prepare as it is, no_prepare with
PowerOffChild.prepare() returning at once (the power-off child forked when the last process
is gone) -- and publishes bench/results/early-fork-ab.json. Every run is kept in
bench/results/runs/stop-ab/. start-up-refactor/stop-ab.json (05001ae against 3ba781c: names
before after, 40 pairs, the same seed) was made with the two-.pyz form.
"""

import argparse
import os
import random
import statistics
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import provenance  # noqa: E402
import run  # noqa: E402
import verdict  # noqa: E402

HARNESS = ["bench/stop_ab.py", "bench/run.py", "bench/provenance.py", "tools/nsguest.py"]
REPO = os.path.dirname(HERE)
PREPARE = '''        if self.reaper.children() is None:
            return
        go_fd = self._fork(action, since, wait_for_go=True)'''


def early_fork_variants(work):
    """Two .pyz from this agent.py: as it is, and with prepare() returning at once."""
    made = []
    for name, edit in (("with_prepare", lambda text: text),
                       ("no_prepare", lambda text: text.replace(PREPARE, PREPARE.replace(
                           "if self.reaper.children() is None:", "if True:  # A/B")))):
        folder = os.path.join(work, name)
        os.makedirs(folder)
        shutil.copy(os.path.join(REPO, "build.py"), folder)
        with open(os.path.join(REPO, "agent.py")) as f:
            text = f.read()
        if PREPARE not in text:
            raise SystemExit("bench/stop_ab.py: PowerOffChild.prepare() is not as expected")
        with open(os.path.join(folder, "agent.py"), "w") as f:
            f.write(edit(text))
        out = os.path.join(folder, name + ".pyz")
        subprocess.run([sys.executable, os.path.join(folder, "build.py"), "-o", out],
                       check=True, stdout=subprocess.DEVNULL)
        made.append(out)
    return made


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pyz", nargs="*")
    parser.add_argument("--names", nargs=2, default=["a", "b"])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=20261205)
    parser.add_argument("--describe", default="")
    parser.add_argument("--out")
    parser.add_argument("--early-fork", action="store_true",
                        help="the early-fork A/B, built from this agent.py, published")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="arcbox-stop-ab-")
    if args.early_fork:
        args.pyz = early_fork_variants(work)
        args.names = ["with_prepare", "no_prepare"]
        args.describe = {"with_prepare": "this agent.py", "no_prepare": "this agent.py with "
                         "PowerOffChild.prepare() returning at once"}
        args.out = os.path.join(HERE, "results", "early-fork-ab.json")
    if len(args.pyz) != 2 or not args.out:
        parser.error("two .pyz and --out, or --early-fork")
    rnd = random.Random(args.seed)
    out = {name: [] for name in args.names}
    pyz = dict(zip(args.names, args.pyz))
    for i in range(args.pairs):
        order = list(args.names)
        rnd.shuffle(order)
        phase = rnd.uniform(0, run.PHASE)
        for name in order:
            out[name].append(run.one_shutdown(pyz[name], work, phase))
        print(i, {k: round(v[-1]["overhead"] * 1000, 2) for k, v in out.items()}, flush=True)
    result = {"provenance": provenance.collect(HARNESS), "variants": args.describe,
              "samples": out}
    print("kept %s" % provenance.keep("stop-ab", result))
    provenance.publish(result, args.out)


def early_fork_paragraph(result):
    """docs/performance.md's paragraph on early-fork-ab.json: with_prepare against
    no_prepare, paired, from the saved samples."""
    a = [s["overhead"] for s in result["samples"]["with_prepare"]]
    b = [s["overhead"] for s in result["samples"]["no_prepare"]]
    low, high = verdict.interval(verdict.median_of_differences, [b, a], paired=True)
    faster = sum(1 for x, y in zip(a, b) if x < y)
    return (
        "PID 1 forks the child that tears down and calls `reboot()` when SIGTERM goes out, "
        "waiting on a pipe, rather than when the last process is gone: %d interleaved pairs "
        "of namespace stops (figure 1's setup, a child exiting 0–100 ms after TERM) with the "
        "fork early and with it late, on the same agent (`bench/stop_ab.py`, %s): Shutdown "
        "overhead median %.2f ms against %.2f ms, %d of %d pairs faster with the early fork, "
        "the median of the paired differences %.2f ms (%.2f–%.2f ms at 90 %%, bootstrap)."
        % (len(a), provenance.says(result), statistics.median(a) * 1000,
           statistics.median(b) * 1000, faster, len(a),
           verdict.median_of_differences(b, a) * 1000, low * 1000, high * 1000))


if __name__ == "__main__":
    main()
