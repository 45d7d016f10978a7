#!/usr/bin/env python3
"""A/B of two agents' Shutdown overhead, interleaved pair by pair: figure 1's setup
(bench/run.py: one namespace guest whose one child takes a random 0-100 ms to handle SIGTERM),
each pair the same child time for both, in a random order. Prints each pair; saves every
sample (request to reboot(), the overhead, sync, the child's own time) for both.

    python3 bench/stop_ab.py A.pyz B.pyz --names A B --pairs 40 --seed 20261205 \\
        --describe "A: ...; B: ..." --out bench/results/NAME.json

Made bench/results/early-fork-ab.json (the early-forked power-off child against none: names
with_prepare no_prepare, 30 pairs, seed 20261205) and start-up-refactor/stop-ab.json (05001ae
against 3ba781c: names before after, 40 pairs, the same seed), then as a script with those
arguments written into it.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pyz", nargs=2)
    parser.add_argument("--names", nargs=2, default=["a", "b"])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=20261205)
    parser.add_argument("--describe", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="arcbox-stop-ab-")
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
    commit = subprocess.run(["git", "-C", os.path.dirname(HERE), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(args.out, "w") as f:
        json.dump({"commit": commit, "variants": args.describe, "samples": out}, f, indent=1)


if __name__ == "__main__":
    main()
