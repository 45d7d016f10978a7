"""Boot to first answer: how soon after QEMU starts does the host get its first answer, with
the agent as /init, with the card's floor, and with the seed. Not a test: figures, printed
and saved (bench/results/boot.json).

The same image and kernel for all three, the VM tests' module list on the kernel cmdline,
one QEMU at a time, the three interleaved in rounds; the host polls the agent's
virtio-serial port with ArcBox Pings (0.1 s per try; a request sent before the port opens
waits in it, so the answer comes as soon as the guest reads):
- agent: arcbox-agent.pyz as /init (modules in the background, transports first);
- floor: bench/floor_init.py, the five imports of the card, the two transport modules, the
  port, Pings answered: what any Python init that answers the host must do;
- seed: bench/seed_agent.py, which loads every module of the list, then serves (the agent's
  old order).
The agent's own start, step by step, comes from its "ready" line (start_report()).

    python3 bench/boot.py [--boots 10] [--arm-boots 3] [--out bench/results/boot.json]
"""

import argparse
import json
import os
import re
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
import guestimage  # noqa: E402
import vm as vmtool  # noqa: E402

VARIANTS = {"agent": "", "floor": "rdinit=/bench/floor-init", "seed": "rdinit=/bench/seed-init"}
TARGET = 0.15                     # agent - floor, median seconds (issue 20)


def image_for(pyz, work, arch):
    with open(os.path.join(HERE, "floor_init.py"), "rb") as f:
        floor = f.read()
    with open(os.path.join(HERE, "seed_agent.py"), "rb") as f:
        seed = f.read()
    files = {"/bench/floor-init": floor, "/bench/seed_agent.py": seed,
             "/arcbox-agent.pyz": open(pyz, "rb").read(),
             "/bench/seed-init": b"#!/bin/sh\nexec /usr/bin/python3 -S /bench/seed_agent.py "
                                 b"--handler-delay 0\n"}
    image = os.path.join(work, "boot-%s.cpio" % arch)
    guestimage.build_initramfs(pyz, image, extra_files=files, arch=arch)
    return image, guestimage.kernel_image(guestimage.fetch_packages(arch), arch)


STEP = re.compile(r", ([a-z][^,+]*) \+([0-9.]+)s")


def one_boot(work, image, kernel, arch, variant):
    machine = vmtool.VM(work, image, kernel, arch=arch, cmdline=VARIANTS[variant])
    with machine:
        seconds = machine.wait_ready(180, try_timeout=0.1)
        steps = None
        if variant == "agent":
            machine.wait_log("ready (pid", 30)
            line = next(m for m in machine.messages() if m.startswith("ready (pid"))
            exec_at = float(re.search(r"exec at ([0-9.]+)s", line).group(1))
            steps = {"exec at": exec_at}
            steps.update((name, float(value)) for name, value in STEP.findall(line))
    return seconds, steps


def measure(pyz, work, arch, boots):
    image, kernel = image_for(pyz, work, arch)
    samples = {v: [] for v in VARIANTS}
    steps = []
    for _ in range(boots):
        for variant in VARIANTS:
            seconds, agent_steps = one_boot(work, image, kernel, arch, variant)
            samples[variant].append(round(seconds, 4))
            if agent_steps:
                steps.append(agent_steps)
    return {"samples_s": samples, "agent_start_steps": steps,
            "modules": guestimage.guest_modules(arch)}


def summary(result):
    med = {v: statistics.median(xs) for v, xs in result["samples_s"].items()}
    return {"median_s": {v: round(m, 3) for v, m in med.items()},
            "agent_minus_floor_s": round(med["agent"] - med["floor"], 3),
            "seed_minus_floor_s": round(med["seed"] - med["floor"], 3),
            "target_agent_minus_floor_s": TARGET,
            "met": med["agent"] - med["floor"] <= TARGET}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=10, help="x86_64 boots per variant")
    parser.add_argument("--arm-boots", type=int, default=3, help="aarch64 boots per variant")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "boot.json"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="arcbox-boot-bench-")
    pyz = os.path.join(work, "arcbox-agent.pyz")
    build.build_pyz(pyz)
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip(),
              "dirty": bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain",
                                            "agent.py"], capture_output=True,
                                           text=True).stdout.strip())}
    for arch, boots in (("x86_64", args.boots), ("aarch64", args.arm_boots)):
        if boots <= 0:
            continue
        reason = vmtool.why_vm_unavailable(arch)
        if reason:
            raise SystemExit("bench/boot.py: %s" % reason)
        result = measure(pyz, work, arch, boots)
        result.update(summary(result))
        report[arch] = result
        print("%s, %d boots per variant: QEMU start to first answer, median" % (arch, boots))
        for variant, xs in result["samples_s"].items():
            print("  %-6s %.3f s  (min %.3f, max %.3f)" % (variant, statistics.median(xs),
                                                         min(xs), max(xs)))
        print("  agent - floor: %+.3f s (target <= %.2f s: %s); seed - floor: %+.3f s"
              % (result["agent_minus_floor_s"], TARGET,
                 "met" if result["met"] else "MISSED", result["seed_minus_floor_s"]))
        names = [k for k in result["agent_start_steps"][0] if k != "exec at"]
        print("  the agent's start, median per step: exec at %.3f s, %s" % (
            statistics.median(s["exec at"] for s in result["agent_start_steps"]),
            ", ".join("%s +%.3f s" % (n, statistics.median(s[n] for s in
                                                           result["agent_start_steps"]))
                      for n in names)))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print("saved %s" % args.out)


if __name__ == "__main__":
    main()
