"""QGA benchmark: this agent vs Debian's qemu-ga in the same busybox guest (x86_64, TCG), the
same host client, the same QEMU. Not a test: figures, printed and saved.

One boot of the image the conformance test uses (tests/vm/test_qga_vm.py): the agent is PID 1
and answers QGA on org.qemu.guest_agent.0; qemu-ga runs on a second virtio-serial port.
- guest-ping round trip from the host, both agents interleaved in blocks (n per agent);
- each agent's memory in the guest after the pings (RSS and PSS from /proc/PID/smaps_rollup,
  printed on the console by a small loop in the guest), and the card's floor beside them in
  the same boot: `python3 -S` that imports the card's five modules and waits; the agent's
  RSS, idle (before any QGA request) and after serving both protocols, against the floor's
  (target <= 1.2x, judged on the range of the boots' ratios: memory barely varies);
- every compared command's reply side by side, and qemu-ga's guest-shutdown in a busybox
  guest.

    python3 bench/qga.py [--pings 400] [--boots 5] [--publish]

Every run is kept in bench/results/runs/qga/; --publish also makes it bench/results/qga.json.
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

import agent  # noqa: E402
import build  # noqa: E402
import provenance  # noqa: E402
import verdict as rule  # noqa: E402
import guestimage  # noqa: E402
import vm as vmtool  # noqa: E402
from qgaclient import connect  # noqa: E402

PEER_PORT = vmtool.QEMU_GA_PEER_PORT
MEMORY_TARGET = 1.2               # the agent's RSS / the card floor's, in the same boot
HARNESS = ["bench/qga.py", "bench/verdict.py", "bench/provenance.py", "tools/guestimage.py",
           "tools/vm.py", "tools/qgaclient.py"]
SCRIPT = b"""#!/bin/sh
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name)" = %s ] && dev=/dev/${p##*/}
done
mkdir -p /data && mount -t ext4 /dev/vda /data
/usr/sbin/qemu-ga -m virtio-serial -p "$dev" -t /run &
ga=$!
/usr/bin/python3 -S -c 'import os, signal, socket, time, ctypes; signal.pause()' &
floor=$!
sleep 1
while :; do
    echo "MEM agent $(grep -E '^(Rss|Pss):' /proc/1/smaps_rollup | tr -s ' ' | tr '\\n' ' ')" \\
         "qemu-ga $(grep -E '^(Rss|Pss):' /proc/$ga/smaps_rollup | tr -s ' ' | tr '\\n' ' ')" \\
         "floor $(grep -E '^(Rss|Pss):' /proc/$floor/smaps_rollup | tr -s ' ' | tr '\\n' ' ')"
    sleep 1
done
""" % PEER_PORT.encode()
COMPARED = ["guest-ping", "guest-get-time", "guest-get-host-name", "guest-get-osinfo",
            "guest-get-timezone", "guest-get-users", "guest-get-vcpus",
            "guest-network-get-interfaces", "guest-get-fsinfo", "guest-fsfreeze-status"]


def pings(client, count):
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        client.result("guest-ping")
        times.append(time.perf_counter() - t0)
    return times


def arcbox_pings(client, count):
    """The same loop and serial port path, the ArcBox binary protocol: the loop's own share."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        client.request(agent.MSG_PING)
        times.append(time.perf_counter() - t0)
    return times


def dist(xs):
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]   # noqa: E731
    return {"n": len(xs), "median_ms": round(statistics.median(xs) * 1000, 3),
            "p10_ms": round(pick(0.10) * 1000, 3), "p90_ms": round(pick(0.90) * 1000, 3),
            "max_ms": round(xs[-1] * 1000, 3)}


def memory(console):
    lines = re.findall(r"^MEM agent Rss: (\d+) kB Pss: (\d+) kB\s+qemu-ga Rss: (\d+) kB "
                       r"Pss: (\d+) kB\s+floor Rss: (\d+) kB Pss: (\d+) kB", console, re.M)
    if not lines:
        raise SystemExit("no MEM line on the console:\n" + console[-2000:])
    a_rss, a_pss, q_rss, q_pss, f_rss, f_pss = map(int, lines[-1])
    return {"arcbox-agent": {"rss_kib": a_rss, "pss_kib": a_pss},
            "qemu-ga": {"rss_kib": q_rss, "pss_kib": q_pss},
            "floor": {"rss_kib": f_rss, "pss_kib": f_pss}}


def one_boot(work, image, kernel, disk, pings_per_agent):
    """One boot: replies, round trips, memory, the two guest-shutdowns."""
    machine = vmtool.VM(work, image, kernel,
                        cmdline="arcbox.exec=/test/qga-bench.sh arcbox.net=eth0:10.0.2.15/24",
                        disk=disk, ports=[PEER_PORT],
                        qemu_args=["-netdev", "user,id=n,restrict=on", "-device",
                                   "virtio-net-pci,netdev=n"])   # nothing leaves QEMU
    with machine:
        # the agent's memory before any QGA request (json not loaded yet): the first MEM line
        deadline = time.monotonic() + 120
        while "MEM agent" not in machine.console():
            if time.monotonic() > deadline:
                raise SystemExit("no MEM line:\n" + machine.console()[-2000:])
            time.sleep(0.1)
        before = memory(machine.console())
        ours = connect(machine.qga_sock, timeout=120)
        real = connect(machine.port_socket(PEER_PORT), timeout=120)
        replies = {}
        for name in ["guest-info"] + COMPARED:
            replies[name] = {"arcbox-agent": ours.call(name), "qemu-ga": real.call(name)}
        times = {who: [] for who in WHO}
        arcbox = agent.Client(("unix", machine.sock), 600.0)   # one deadline for all
        arcbox.connect()
        block = 20
        for _ in range(max(1, pings_per_agent // block)):
            times["arcbox-agent"] += pings(ours, block)
            times["qemu-ga"] += pings(real, block)
            times["arcbox-agent, ArcBox Ping"] += arcbox_pings(arcbox, block)
        arcbox.close()
        time.sleep(2.5)                          # a MEM line printed after the pings
        mem = memory(machine.console())
        shutdown = real.call("guest-shutdown", timeout=20)
        time.sleep(2)
        replies["guest-shutdown"] = {"qemu-ga": shutdown,
                                     "qemu-ga: guest still running 2 s later":
                                     machine.proc.poll() is None}
        ours.call("guest-shutdown", reply=False)
        replies["guest-shutdown"]["arcbox-agent: QEMU exit status"] = machine.wait(60)
    return {"times": times, "memory": mem, "memory_agent_before_qga": before,
            "replies": replies}


WHO = ("arcbox-agent", "qemu-ga", "arcbox-agent, ArcBox Ping")


def memory_ratios(report):
    """Per boot, the agent's RSS over the card floor's read on the same console line: idle
    (before any QGA request) and after serving both protocols."""
    idle = [b["arcbox-agent"]["rss_kib"] / b["floor"]["rss_kib"]
            for b in report["memory_before_qga_per_boot"]]
    after = [m["arcbox-agent"]["rss_kib"] / m["floor"]["rss_kib"]
             for m in report["memory_per_boot"]]
    return idle, after


def published_paragraph(report):
    """docs/performance.md's QGA and memory figures, recomputed from the saved raw samples and
    memory readings (the figures tests check that the page says exactly this)."""
    boots = report["samples_ms_per_boot"]
    med = lambda xs: statistics.median(xs)                      # noqa: E731
    per_boot = [(med(b["arcbox-agent"]), med(b["qemu-ga"])) for b in boots]
    whole = {who: sorted(t for b in boots for t in b[who]) for who in WHO}
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    mem, before = report["memory_per_boot"], report["memory_before_qga_per_boot"]
    rss = lambda rows, who: "/".join(str(m[who]["rss_kib"]) for m in rows)  # noqa: E731
    idle, after = memory_ratios(report)
    judged = [rule.judge("range", [xs], at_most=MEMORY_TARGET) for xs in (idle, after)]
    span = lambda xs: "%.2f–%.2f×" % (min(xs), max(xs))          # noqa: E731
    return (
        "**What it costs** (`bench/qga.py`, %s: %d boots of the conformance test's guest, %d "
        "round trips per agent per boot, interleaved in blocks of 20, the same host client). "
        "guest-ping round trip over the same virtio-serial path, median per boot: "
        "arcbox-agent %s ms, qemu-ga %s ms (ratio %s); all %d samples each: arcbox-agent "
        "%.2f ms (p10 %.2f, p90 %.2f), qemu-ga %.2f ms (p10 %.2f, p90 %.2f); the agent's loop "
        "with ArcBox's binary Ping on its own port, for scale: %.2f ms.\n\n"
        "**Memory, next to the card's floor** (the same boots; RSS in KiB per boot, read on "
        "one console line each time): the floor — `python3 -S` importing os, signal, socket, "
        "time and ctypes, then waiting — %s; the agent idle (PID 1 serving, before any QGA "
        "request) %s, %s the floor's: target ≤ %.1f×: %s (on the range of the boots' ratios: "
        "memory barely varies); after serving both protocols (QGA loads json and re on its "
        "first request) %s, %s: %s. qemu-ga, in C and answering only QGA: %s."
        % (provenance.says(report), len(boots), report["pings_per_agent_per_boot"],
           "/".join("%.2f" % a for a, _ in per_boot), "/".join("%.2f" % q for _, q in per_boot),
           "/".join("%.2f" % (a / q) for a, q in per_boot), len(whole["qemu-ga"]),
           med(whole["arcbox-agent"]), pct(whole["arcbox-agent"], 0.1),
           pct(whole["arcbox-agent"], 0.9), med(whole["qemu-ga"]), pct(whole["qemu-ga"], 0.1),
           pct(whole["qemu-ga"], 0.9), med(whole["arcbox-agent, ArcBox Ping"]),
           rss(mem, "floor"), rss(before, "arcbox-agent"), span(idle), MEMORY_TARGET,
           judged[0]["verdict"], rss(mem, "arcbox-agent"), span(after), judged[1]["verdict"],
           rss(mem, "qemu-ga")))


def shutdown_side_by_side(report):
    """docs/qga.md's guest-shutdown in a busybox guest, from the saved replies."""
    r = report["replies"]["guest-shutdown"]
    still = r["qemu-ga: guest still running 2 s later"]
    return (
        "**In a busybox guest, side by side** (same guest, same host client; `bench/qga.py`, "
        "%s):\n\n"
        "| `guest-shutdown` | qemu-ga %s | arcbox-agent |\n"
        "|---|---|---|\n"
        "| what it does | forks `/sbin/shutdown`, which busybox has not | the orderly sequence: "
        "TERM, grace, KILL, teardown, sync, power-off |\n"
        "| answer | `%s` | none (as specified); QEMU exits %d |\n"
        "| the guest | %s | %s |"
        % (provenance.says(report), report["qemu_ga_version"],
           json.dumps(r["qemu-ga"]).replace("|", "\\|"), r["arcbox-agent: QEMU exit status"],
           "still running 2 s later" if still else "gone",
           "powered off in order" if r["arcbox-agent: QEMU exit status"] == 0 else "not off"))


def bench_guest(prefix):
    """The benchmarks' guest, built fresh in a new folder: (folder, initramfs, its info, the
    kernel, a 64 MiB ext4 disk). The agent as /init, qemu-ga 10 and /test/qga-bench.sh."""
    work = tempfile.mkdtemp(prefix=prefix)
    pyz = os.path.join(work, "arcbox-agent.pyz")
    build.build_pyz(pyz)
    image = os.path.join(work, "initramfs.cpio")
    info = guestimage.build_initramfs(pyz, image, extra_files={"/test/qga-bench.sh": SCRIPT},
                                      qemu_ga=True)
    kernel = guestimage.kernel_image(guestimage.fetch_packages())
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", disk], check=True)
    return work, image, info, kernel, disk


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=400, help="round trips per agent and boot")
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--publish", action="store_true",
                        help="make this run bench/results/qga.json (every run is kept)")
    args = parser.parse_args()
    work, image, info, kernel, disk = bench_guest("arcbox-qga-bench-")
    boots = [one_boot(work, image, kernel, disk, args.pings) for _ in range(args.boots)]
    per_boot = [{who: dist(b["times"][who]) for who in WHO} for b in boots]
    ping = {who: dist([t for b in boots for t in b["times"][who]]) for who in WHO}
    ratios = [round(p["arcbox-agent"]["median_ms"] / p["qemu-ga"]["median_ms"], 2)
              for p in per_boot]
    qemu_version = subprocess.run([vmtool.QEMU, "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    replies = boots[-1]["replies"]
    report = {
        "provenance": provenance.collect(HARNESS),
        "qemu": qemu_version, "guest_kernel": info["release"],
        "qemu_ga_version": replies["guest-info"]["qemu-ga"]["return"]["version"],
        "boots": args.boots, "pings_per_agent_per_boot": args.pings,
        "guest_ping": ping, "guest_ping_per_boot": per_boot,
        "samples_ms_per_boot": [{who: [round(t * 1000, 4) for t in b["times"][who]]
                                 for who in WHO} for b in boots],
        "guest_ping_median_ratio_per_boot": ratios,
        "memory_per_boot": [b["memory"] for b in boots],
        "memory_before_qga_per_boot": [b["memory_agent_before_qga"] for b in boots],
        "replies": replies,
    }
    print("kept %s" % os.path.relpath(provenance.keep("qga", report), REPO))
    if args.publish:
        provenance.publish(report, os.path.join(HERE, "results", "qga.json"))
        print("published bench/results/qga.json")
    print("QGA, this agent vs qemu-ga %s, same guest, same client (%s, %d boots)"
          % (report["qemu_ga_version"], provenance.says(report), args.boots))
    for who in WHO:
        p = ping[who]
        print("  %-26s round trip median %.2f ms (p10 %.2f, p90 %.2f, n=%d)"
              % (who, p["median_ms"], p["p10_ms"], p["p90_ms"], p["n"]))
    print("  guest-ping median ratio per boot (agent / qemu-ga): %s" % ratios)
    for who in ("arcbox-agent", "qemu-ga", "floor"):
        print("  %-13s memory after the pings, per boot: RSS %s KiB, PSS %s KiB" % (
            who, [b["memory"][who]["rss_kib"] for b in boots],
            [b["memory"][who]["pss_kib"] for b in boots]))
    print("  the agent before its first QGA request, per boot: RSS %s KiB"
          % [b["memory_agent_before_qga"]["arcbox-agent"]["rss_kib"] for b in boots])
    print("  qemu-ga guest-shutdown: %r" % replies["guest-shutdown"]["qemu-ga"])
    print("\nfor docs/performance.md:\n" + published_paragraph(report))


if __name__ == "__main__":
    main()
