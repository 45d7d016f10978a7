"""QGA benchmark: this agent vs Debian's qemu-ga in the same busybox guest (x86_64, TCG), the
same host client, the same QEMU. Not a test: figures, printed and saved.

One boot of the image the conformance test uses (tests/vm/test_qga_vm.py): the agent is PID 1
and answers QGA on org.qemu.guest_agent.0; qemu-ga runs on a second virtio-serial port.
- guest-ping round trip from the host, both agents interleaved in blocks (n per agent);
- each agent's memory in the guest after the pings (RSS and PSS from /proc/PID/smaps_rollup,
  printed on the console by a small loop in the guest);
- every compared command's reply side by side, and qemu-ga's guest-shutdown in a busybox
  guest.

    python3 bench/qga.py [--pings 400] [--out bench/results/qga.json]
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
import guestimage  # noqa: E402
import vm as vmtool  # noqa: E402
from qgaclient import connect  # noqa: E402

PEER_PORT = vmtool.QEMU_GA_PEER_PORT
SCRIPT = b"""#!/bin/sh
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name)" = %s ] && dev=/dev/${p##*/}
done
mkdir -p /data && mount -t ext4 /dev/vda /data
/usr/sbin/qemu-ga -m virtio-serial -p "$dev" -t /run &
ga=$!
sleep 1
while :; do
    echo "MEM agent $(grep -E '^(Rss|Pss):' /proc/1/smaps_rollup | tr -s ' ' | tr '\\n' ' ')" \\
         "qemu-ga $(grep -E '^(Rss|Pss):' /proc/$ga/smaps_rollup | tr -s ' ' | tr '\\n' ' ')"
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
                       r"Pss: (\d+) kB", console, re.M)
    if not lines:
        raise SystemExit("no MEM line on the console:\n" + console[-2000:])
    a_rss, a_pss, q_rss, q_pss = map(int, lines[-1])
    return {"arcbox-agent": {"rss_kib": a_rss, "pss_kib": a_pss},
            "qemu-ga": {"rss_kib": q_rss, "pss_kib": q_pss}}


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
        before = memory(machine.console())["arcbox-agent"]
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


def published_paragraph(report):
    """docs/performance.md's figures, recomputed from the saved raw samples and memory readings (a
    test in tests/figures/ checks that the page says exactly this)."""
    boots = report["samples_ms_per_boot"]
    med = lambda xs: statistics.median(xs)                      # noqa: E731
    per_boot = [(med(b["arcbox-agent"]), med(b["qemu-ga"])) for b in boots]
    whole = {who: sorted(t for b in boots for t in b[who]) for who in WHO}
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    mem, before = report["memory_per_boot"], report["memory_agent_before_qga_per_boot"]
    rss = lambda who: "/".join(str(m[who]["rss_kib"]) for m in mem)   # noqa: E731
    extra = sorted(m["arcbox-agent"]["rss_kib"] - b["rss_kib"] for m, b in zip(mem, before))
    return (
        "**What it costs** (`bench/qga.py`: %d boots of the conformance test's guest, %d round "
        "trips per agent per boot, interleaved in blocks of 20, the same host client; commit "
        "%s, %s). guest-ping round trip over the same virtio-serial path, median per boot: "
        "arcbox-agent %s ms, qemu-ga %s ms (ratio %s); all %d samples each: arcbox-agent "
        "%.2f ms (p10 %.2f, p90 %.2f), qemu-ga %.2f ms (p10 %.2f, p90 %.2f); the agent's loop "
        "with ArcBox's binary Ping on its own port, for scale: %.2f ms. Memory in the guest "
        "after the pings, RSS per boot: arcbox-agent %s KiB — it is also PID 1 and the ArcBox "
        "server; QGA itself (json and re, loaded on the first request) added %s KiB — "
        "and qemu-ga, which only answers QGA, %s KiB."
        % (len(boots), report["pings_per_agent_per_boot"], report["commit"], report["when"],
           "/".join("%.2f" % a for a, _ in per_boot), "/".join("%.2f" % q for _, q in per_boot),
           "/".join("%.2f" % (a / q) for a, q in per_boot), len(whole["qemu-ga"]),
           med(whole["arcbox-agent"]), pct(whole["arcbox-agent"], 0.1),
           pct(whole["arcbox-agent"], 0.9), med(whole["qemu-ga"]), pct(whole["qemu-ga"], 0.1),
           pct(whole["qemu-ga"], 0.9), med(whole["arcbox-agent, ArcBox Ping"]),
           rss("arcbox-agent"), "%d" % extra[0] if extra[0] == extra[-1] else
           "%d to %d" % (extra[0], extra[-1]), rss("qemu-ga")))


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
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "qga.json"))
    args = parser.parse_args()
    work, image, info, kernel, disk = bench_guest("arcbox-qga-bench-")
    boots = [one_boot(work, image, kernel, disk, args.pings) for _ in range(args.boots)]
    per_boot = [{who: dist(b["times"][who]) for who in WHO} for b in boots]
    ping = {who: dist([t for b in boots for t in b["times"][who]]) for who in WHO}
    ratios = [round(p["arcbox-agent"]["median_ms"] / p["qemu-ga"]["median_ms"], 2)
              for p in per_boot]
    qemu_version = subprocess.run([vmtool.QEMU, "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "agent.py"],
                           capture_output=True, text=True).stdout.strip()
    replies = boots[-1]["replies"]
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit + ("+dirty agent.py" if dirty else ""),
        "qemu": qemu_version, "guest_kernel": info["release"],
        "qemu_ga_version": replies["guest-info"]["qemu-ga"]["return"]["version"],
        "boots": args.boots, "pings_per_agent_per_boot": args.pings,
        "guest_ping": ping, "guest_ping_per_boot": per_boot,
        "samples_ms_per_boot": [{who: [round(t * 1000, 4) for t in b["times"][who]]
                                 for who in WHO} for b in boots],
        "guest_ping_median_ratio_per_boot": ratios,
        "memory_per_boot": [b["memory"] for b in boots],
        "memory_agent_before_qga_per_boot": [b["memory_agent_before_qga"] for b in boots],
        "replies": replies,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print("QGA, this agent vs qemu-ga %s, same guest, same client (%s, commit %s, %d boots)"
          % (report["qemu_ga_version"], report["when"], report["commit"], args.boots))
    for who in WHO:
        p = ping[who]
        print("  %-26s round trip median %.2f ms (p10 %.2f, p90 %.2f, n=%d)"
              % (who, p["median_ms"], p["p10_ms"], p["p90_ms"], p["n"]))
    print("  guest-ping median ratio per boot (agent / qemu-ga): %s" % ratios)
    for who in ("arcbox-agent", "qemu-ga"):
        print("  %-13s memory after the pings, per boot: RSS %s KiB, PSS %s KiB" % (
            who, [b["memory"][who]["rss_kib"] for b in boots],
            [b["memory"][who]["pss_kib"] for b in boots]))
    print("  the agent before its first QGA request, per boot: RSS %s KiB"
          % [b["memory_agent_before_qga"]["rss_kib"] for b in boots])
    print("  qemu-ga guest-shutdown: %r" % replies["guest-shutdown"]["qemu-ga"])
    print("saved %s" % args.out)
    print("\nfor docs/performance.md:\n" + published_paragraph(report))


if __name__ == "__main__":
    main()
