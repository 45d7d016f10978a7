"""Boot to first answer: how soon after QEMU starts does the host get its first answer, with
the agent as /init, with the card's floor, and with the seed. Not a test: figures, printed
and saved (bench/results/boot.json).

The same image and kernel for all three, the VM tests' module list on the kernel cmdline,
one QEMU at a time, the three interleaved in rounds; the host keeps one connection to the
virtio-serial port's chardev and sends an ArcBox Ping every 50 ms until one is answered.
Two clocks: the guest's, from the kernel's hand-off to /init ("Run /init as init process" in
the kernel log) to the first answer (each init logs it), which leaves the kernel's boot out;
and the host's, from QEMU's start to the answer:
- agent: arcbox-agent.pyz as /init (modules in the background, transports first);
- floor: bench/floor_init.py, the five imports of the card, the two transport modules, the
  port, Pings answered: what any Python init that answers the host must do;
- seed: bench/seed_agent.py, which loads every module of the list, then serves (the agent's
  old order).
The agent's own start, step by step, comes from its "ready" line (start_report()).

    python3 bench/boot.py [--boots 25] [--arm-boots 3] [--publish]

Every run is kept in bench/results/runs/boot/; --publish also makes it the published
bench/results/boot.json (then `python3 bench/docs_blocks.py` writes the docs from it).
The target is judged by bench/verdict.py's rule, on the per-round differences (paired: the
agent and the floor booted in the same round) and on the difference of the medians.
"""

import argparse
import os
import random
import re
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

import agent  # noqa: E402
import build  # noqa: E402
import provenance  # noqa: E402
import verdict as rule  # noqa: E402
import guestimage  # noqa: E402
import vm as vmtool  # noqa: E402

VARIANTS = {"agent": "", "floor": "rdinit=/bench/floor-init", "seed": "rdinit=/bench/seed-init"}
TARGET = 0.15                     # agent - floor, median seconds (issue 20)
HARNESS = ["bench/boot.py", "bench/floor_init.py", "bench/seed_agent.py", "bench/verdict.py",
           "bench/provenance.py", "tools/guestimage.py", "tools/vm.py"]


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


STEP_END = re.compile(r" \+([0-9.]+)s(?:, |$)")
STAMP = re.compile(r"^\[\s*([0-9.]+)\] ")


def guest_side(machine, variant):
    """(kernel hand-off, first answer) on the guest's boot clock, from the console."""
    if variant == "floor":
        machine.wait_log("FLOOR-FIRST-ANSWER", 30)
        m = re.search(r"FLOOR-FIRST-ANSWER ([0-9.]+) EXEC-AT ([0-9.]+) IMPORTS-DONE ([0-9.]+)",
                      machine.console())
        return float(m.group(2)), float(m.group(1)), [
            ["interpreter and imports", float(m.group(3)) - float(m.group(2))]]
    machine.wait_log("start: exec at", 30)
    machine.wait_log("first answer", 30)
    lines = machine.console().splitlines()
    first = next(float(STAMP.match(l).group(1)) for l in lines
                 if STAMP.match(l) and ": first answer" in l)
    start = next(l for l in lines if "start: exec at" in l)
    exec_at = float(re.search(r"exec at ([0-9.]+)s", start).group(1))
    steps = None
    if variant == "agent":         # "exec at Ts, NAME +Ss, NAME +Ss" (a name may hold commas)
        parts = STEP_END.split(start.split("start: exec at", 1)[1].split("s, ", 1)[1].strip())
        steps = [[parts[i].strip(), float(parts[i + 1])] for i in range(0, len(parts) - 1, 2)]
        steps.append(["first answer after that", first - exec_at - sum(v for _, v in steps)])
    return exec_at, first, steps


PING = agent.encode_frame(agent.MSG_PING)


def first_answer(machine, timeout=180.0):
    """Like a host that keeps its connection (libvirt, the ArcBox host): one connection to
    the port's chardev, a Ping, and another every 50 ms until an answer comes (a request sent
    before the guest opens the port waits in the chardev). Seconds since QEMU started."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(machine.sock)
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline or machine.proc.poll() is not None:
                raise SystemExit("no chardev socket:\n" + machine.tail())
            time.sleep(0.005)
    try:
        sock.settimeout(0.05)
        while time.monotonic() < deadline:
            try:
                sock.sendall(PING)
            except socket.timeout:
                pass                               # QEMU is not reading yet: it will
            try:
                if sock.recv(4096):
                    return time.monotonic() - machine.started
            except socket.timeout:
                pass
            if machine.proc.poll() is not None:
                break
        raise SystemExit("no answer:\n" + machine.tail())
    finally:
        sock.close()


def one_boot(work, image, kernel, arch, variant):
    machine = vmtool.VM(work, image, kernel, arch=arch, cmdline=VARIANTS[variant])
    with machine:
        seconds = first_answer(machine)
        exec_at, first, steps = guest_side(machine, variant)
    return seconds, first - exec_at, steps


def measure(pyz, work, arch, boots):
    image, kernel = image_for(pyz, work, arch)
    host = {v: [] for v in VARIANTS}
    guest = {v: [] for v in VARIANTS}
    steps = {v: [] for v in VARIANTS}
    rnd = random.Random(20261202)
    for _ in range(boots):
        # a new order each round (seeded): whatever the previous QEMU leaves behind (its
        # exit, freed memory) falls on each variant alike
        for variant in rnd.sample(list(VARIANTS), len(VARIANTS)):
            seconds, userspace, its_steps = one_boot(work, image, kernel, arch, variant)
            host[variant].append(round(seconds, 4))
            guest[variant].append(round(userspace, 4))
            if its_steps:
                steps[variant].append([[k, round(v, 4)] for k, v in its_steps])
    return {"qemu_start_to_first_answer_s": host, "handoff_to_first_answer_s": guest,
            "agent_start_steps": steps["agent"], "floor_start_steps": steps["floor"],
            "modules": guestimage.guest_modules(arch)}


def summary(result):
    out = {"target_agent_minus_floor_s": TARGET}
    for key in ("handoff_to_first_answer_s", "qemu_start_to_first_answer_s"):
        med = {v: statistics.median(xs) for v, xs in result[key].items()}
        out[key + "_median"] = {v: round(m, 3) for v, m in med.items()}
        out[key + "_agent_minus_floor"] = round(med["agent"] - med["floor"], 3)
        out[key + "_seed_minus_floor"] = round(med["seed"] - med["floor"], 3)
    out.update(judged(result["handoff_to_first_answer_s"]))
    # the same difference per round (the agent and the floor booted in the same round, so
    # both saw the machine's load of that moment): a distribution, not one number
    diffs = per_round(result["handoff_to_first_answer_s"])
    out["handoff_agent_minus_floor_per_round_s"] = [round(d, 4) for d in diffs]
    return out


def judged(guest):
    """The target judged twice (bench/verdict.py): on the median of the per-round
    differences (paired) and on the difference of the medians."""
    pair = [guest["agent"], guest["floor"]]
    return {"per_round": rule.judge("paired difference", pair, at_most=TARGET),
            "difference_of_medians": rule.judge("difference", pair, at_most=TARGET)}


def per_round(guest):
    """agent - floor for each round, from {variant: [seconds per round]}."""
    return [a - f for a, f in zip(guest["agent"], guest["floor"])]


def judgement_text(j):
    return "%+.3f s, 90 %% interval %+.3f…%+.3f s: %s" % (j["value"], j["interval"][0],
                                                         j["interval"][1], j["verdict"])


def median_steps(boots):
    """[[name, seconds], ...] per boot -> [(name, median seconds)], in the order of the boot
    with the most steps; each step's median over the boots that logged it (a boot whose
    first answer came before "ready" has no "first answer after that" step)."""
    longest = max(boots, key=len)
    return [(name, statistics.median(dict(b)[name] for b in boots if name in dict(b)))
            for name, _ in longest]


def percentiles(xs):
    """(median, p10, p90), nearest rank."""
    xs = sorted(xs)
    return (statistics.median(xs), xs[int(0.1 * (len(xs) - 1) + 0.5)],
            xs[int(0.9 * (len(xs) - 1) + 0.5)])


def published_paragraph(report):
    """docs/performance.md's boot figures, recomputed from the saved samples (the figures
    tests check that the page says exactly this)."""
    med = statistics.median
    parts = []
    for arch in ("x86_64", "aarch64"):
        r = report.get(arch)
        if not r:
            continue
        g, h = r["handoff_to_first_answer_s"], r["qemu_start_to_first_answer_s"]
        j = judged(g)
        middle, p10, p90 = percentiles(per_round(g))
        parts.append(
            "%s, %d boots each: from the kernel's hand-off to /init to the first answer, "
            "median agent %.3f s, floor %.3f s, seed %.3f s; agent − floor per round (the "
            "agent and the floor booted in the same round, in a random order) %s (p10 "
            "%+.3f s, p90 %+.3f s); by the difference of the medians %s; seed − floor %+.3f "
            "s; from QEMU's start (host clock, the kernel's boot included, noisier): agent "
            "%.3f s, floor %.3f s, seed %.3f s"
            % (arch, len(g["agent"]), med(g["agent"]), med(g["floor"]), med(g["seed"]),
               judgement_text(j["per_round"]), p10, p90,
               judgement_text(j["difference_of_medians"]), med(g["seed"]) - med(g["floor"]),
               med(h["agent"]), med(h["floor"]), med(h["seed"])))
    steps = median_steps(report["x86_64"]["agent_start_steps"])
    floor = median_steps(report["x86_64"]["floor_start_steps"])
    return ("**Boot to first answer** (`bench/boot.py`, %s; the same image, the VM tests' "
            "module list, one QEMU at a time, the three interleaved; the target: agent − "
            "floor ≤ %.2f s, judged by the 90 %% bootstrap interval): %s. The agent's start on "
            "x86_64, median per step from the hand-off: %s; the floor's interpreter and "
            "imports: %.3f s."
            % (provenance.says(report), TARGET, "; ".join(parts), ", ".join(
                ("the first answer %.3f s before those steps ended (the virtio-serial port "
                 "opened before the vsock transports were in)" % -value)
                if name == "first answer after that" and value < 0
                else "%s %.3f s" % (name, value) for name, value in steps), floor[0][1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=25, help="x86_64 boots per variant")
    parser.add_argument("--arm-boots", type=int, default=3, help="aarch64 boots per variant")
    parser.add_argument("--publish", action="store_true",
                        help="make this run bench/results/boot.json (every run is kept)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="arcbox-boot-bench-")
    pyz = os.path.join(work, "arcbox-agent.pyz")
    build.build_pyz(pyz)
    report = {"provenance": provenance.collect(HARNESS)}
    for arch, boots in (("x86_64", args.boots), ("aarch64", args.arm_boots)):
        if boots <= 0:
            continue
        reason = vmtool.why_vm_unavailable(arch)
        if reason:
            raise SystemExit("bench/boot.py: %s" % reason)
        result = measure(pyz, work, arch, boots)
        result.update(summary(result))
        report[arch] = result
        for key, what in (("handoff_to_first_answer_s", "the kernel's hand-off to /init to "
                                                          "the first answer (guest clock)"),
                          ("qemu_start_to_first_answer_s", "QEMU start to the first answer "
                                                             "(host clock)")):
            print("%s, %d boots per variant: %s, median" % (arch, boots, what))
            for variant, xs in result[key].items():
                print("  %-6s %.3f s  (min %.3f, max %.3f)" % (
                    variant, statistics.median(xs), min(xs), max(xs)))
            print("  agent - floor: %+.3f s; seed - floor: %+.3f s" % (
                result[key + "_agent_minus_floor"], result[key + "_seed_minus_floor"]))
        for how in ("per_round", "difference_of_medians"):
            print("  target (guest clock) agent - floor <= %.2f s, %s: %s" % (
                TARGET, how.replace("_", " "), judgement_text(result[how])))
        for who in ("agent", "floor"):
            print("  the %s's start, median per step: %s" % (who, ", ".join(
                "%s +%.3f s" % (name, value)
                for name, value in median_steps(result[who + "_start_steps"]))))
    print("kept %s" % os.path.relpath(provenance.keep("boot", report), REPO))
    if args.publish:
        provenance.publish(report, os.path.join(HERE, "results", "boot.json"))
        print("published bench/results/boot.json")
    if "x86_64" in report:
        print("\nfor docs/performance.md:\n" + published_paragraph(report))


if __name__ == "__main__":
    main()
