#!/usr/bin/env python3
"""The benchmarks' chart, drawn from a saved run (bench/results/bench.json by default):

  left:   shutdown overhead per run (request -> reboot() entered, minus the child's own time
          and the time inside sync()), every sample, for the three delays the child takes on
          SIGTERM, log scale: arcbox-agent against the seed with and without its 100 ms sleep;
  middle: a real TCG VM, stop request -> QEMU exit: arcbox-agent, the seed, busybox init;
  right:  start-up, from the bare interpreter to the first Ping answered.

    python3 bench/chart.py [JSON] [-o PNG]      (matplotlib: a benchmark-only dependency)
"""

import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
COLOURS = {"arcbox-agent": "#1b7837", "seed + Rust 100 ms sleep": "#b2182b",
           "seed without the sleep": "#ef8a62", "ours": "#1b7837", "seed": "#b2182b",
           "busybox": "#4d4d4d"}


def draw(data, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [3, 2, 2]})
    jitter = random.Random(1)

    ax = axes[0]
    overhead = data.get("shutdown_overhead", {})
    names = list(overhead)
    delays = sorted({d for per in overhead.values() for d in per}, key=float)
    for i, delay in enumerate(delays):
        for j, name in enumerate(names):
            xs = [v * 1000 for v in overhead[name][delay]["overhead"]]
            pos = i * (len(names) + 1) + j
            ax.scatter([pos + jitter.uniform(-0.25, 0.25) for _ in xs], xs, s=12,
                       color=COLOURS.get(name, "k"), alpha=0.7,
                       label=name if i == 0 else None)
            ax.hlines(sorted(xs)[len(xs) // 2], pos - 0.35, pos + 0.35, color="k", lw=1)
    ax.set_xticks([i * (len(names) + 1) + (len(names) - 1) / 2 for i in range(len(delays))])
    ax.set_xticklabels(["child exits after\n%g ms on TERM" % (float(d) * 1000)
                        for d in delays])
    ax.set_yscale("log")
    ax.set_ylabel("overhead per shutdown, ms (log)")
    ax.set_title("Shutdown overhead, PID namespace, every run\n(bar: median)")
    ax.axhline(3, color="#1b7837", ls=":", lw=1)
    ax.text(ax.get_xlim()[1], 3, " 3 ms target", va="center", fontsize=8, color="#1b7837")
    ax.legend(fontsize=8, loc="center right")

    ax = axes[1]
    vm = data.get("vm", {})
    labels, positions = [], []
    for i, workload in enumerate(("exits", "ignores")):
        for j, init in enumerate(("ours", "seed", "busybox")):
            xs = vm.get(init, {}).get("stop_" + workload, [])
            pos = i * 4 + j
            ax.scatter([pos + jitter.uniform(-0.2, 0.2) for _ in xs], xs, s=14,
                       color=COLOURS[init], alpha=0.8,
                       label={"ours": "arcbox-agent", "seed": "seed + 100 ms sleep",
                              "busybox": "busybox init + poweroff"}[init] if i == 0 else None)
            if xs:
                ax.hlines(sorted(xs)[len(xs) // 2], pos - 0.3, pos + 0.3, color="k", lw=1)
        labels.append({"exits": "process exits\non TERM",
                       "ignores": "+ one ignoring TERM\n(grace 1 s)"}[workload])
        positions.append(i * 4 + 1)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels)
    ax.set_ylabel("stop request -> QEMU exit, s")
    ax.set_ylim(bottom=0)
    ax.set_title("Real VM (QEMU TCG), same image and kernel")
    ax.legend(fontsize=8, loc="center left")

    ax = axes[2]
    startup = data.get("startup", {})
    order = [k for k in ("python -I -S", "+ socket, signal, select", ".pyz --version",
                         ".pyz (pyc, -S): exec to first Ping", "shiv (warm ~/.shiv), -S")
             if k in startup]
    ax.barh(range(len(order)), [startup[k]["median"] * 1000 for k in order],
            color=["#999999", "#999999", "#66a61e", "#1b7837", "#b2182b"][:len(order)])
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([k.replace(": exec to first Ping", "\nto first Ping") for k in order],
                       fontsize=8)
    ax.invert_yaxis()
    for i, k in enumerate(order):
        ax.text(startup[k]["median"] * 1000, i, " %.1f" % (startup[k]["median"] * 1000),
                va="center", fontsize=8)
    ax.set_xlabel("ms, median")
    ax.set_title("Start-up")

    meta = data.get("meta", {})
    fig.suptitle("arcbox-agent benchmarks, %s, %s CPUs%s" % (
        meta.get("date", "?"), meta.get("cpus", "?"), " (--quick)" if meta.get("quick") else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", default=os.path.join(HERE, "results", "bench.json"))
    parser.add_argument("-o", "--output", default=os.path.join(HERE, "results", "shutdown.png"))
    args = parser.parse_args()
    with open(args.json) as f:
        draw(json.load(f), args.output)
    print(args.output)


if __name__ == "__main__":
    main()
