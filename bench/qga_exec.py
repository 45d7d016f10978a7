"""QGA benchmark, the heavier commands: guest-exec of /bin/true to its end (guest-exec, then
guest-exec-status until `exited`) and guest-get-fsinfo, this agent vs qemu-ga 10.0 (Debian
13's, through its own loader) in the same busybox guest (x86_64, TCG), the same host client,
the same QEMU. Not a test: figures, printed and saved with the code they measured.

Each boot: the agent is PID 1 and answers QGA on org.qemu.guest_agent.0 (guest-exec turned on
with --qga-allow); qemu-ga runs on a second virtio-serial port (bench/qga.py's guest). The
two commands are timed for both agents interleaved in blocks of 10; then each agent's memory
in the guest (RSS and PSS from /proc/PID/smaps_rollup, printed on the console by a loop in
the guest). Every sample of every boot is saved; the published paragraph (docs/qga.md) is
recomputed from them by published_paragraph(), which tests/figures/ checks.

    python3 bench/qga_exec.py [--boots 3] [--rounds 200] [--publish]

Every run is kept in bench/results/runs/qga-exec/; --publish also makes it
bench/results/qga-exec.json.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, HERE)

import guestimage  # noqa: E402
import provenance  # noqa: E402
import vm as vmtool  # noqa: E402
from qga import PEER_PORT, bench_guest, memory  # noqa: E402
from qgaclient import connect  # noqa: E402

WHO = ("arcbox-agent", "qemu-ga")
HARNESS = ["bench/qga_exec.py", "bench/qga.py", "bench/provenance.py", "tools/guestimage.py",
           "tools/vm.py", "tools/qgaclient.py"]
BLOCK = 10


def exec_true(client):
    """One guest-exec of /bin/true, polled until it exited: the seconds it took."""
    t0 = time.perf_counter()
    pid = client.result("guest-exec", {"path": "/bin/true"})["pid"]
    while not client.result("guest-exec-status", {"pid": pid})["exited"]:
        pass
    return time.perf_counter() - t0


def fsinfo(client):
    t0 = time.perf_counter()
    client.result("guest-get-fsinfo")
    return time.perf_counter() - t0


def one_boot(work, image, kernel, disk, rounds):
    machine = vmtool.VM(work, image, kernel, disk=disk, ports=[PEER_PORT],
                        cmdline="arcbox.exec=/test/qga-bench.sh "
                                "arcbox.qga_allow=default,guest-exec,guest-exec-status")
    samples = {"exec": {who: [] for who in WHO}, "fsinfo": {who: [] for who in WHO}}
    with machine:
        clients = {"arcbox-agent": connect(machine.qga_sock, timeout=120),
                   "qemu-ga": connect(machine.port_socket(PEER_PORT), timeout=120)}
        for who, client in clients.items():          # warm: json, base64, the first fork
            exec_true(client)
            fsinfo(client)
        for _ in range(max(1, rounds // BLOCK)):
            for who, client in clients.items():
                samples["exec"][who] += [exec_true(client) for _ in range(BLOCK)]
                samples["fsinfo"][who] += [fsinfo(client) for _ in range(BLOCK)]
        time.sleep(2.5)                              # a MEM line printed after the work
        mem = memory(machine.console())
        for client in clients.values():
            client.close()
        machine.shutdown(grace=1)
        machine.wait(60)
    return {"samples_ms": {kind: {who: [round(t * 1000, 4) for t in xs]
                                  for who, xs in by.items()} for kind, by in samples.items()},
            "memory": mem}


def published_paragraph(report):
    """docs/qga.md's paragraph, recomputed from the saved samples (tests/figures/ checks that
    the page says exactly this)."""
    boots = report["boots"]
    med = statistics.median
    lines = []
    for kind, what in (("exec", "guest-exec of `/bin/true` to its end (exec, then status "
                                "until exited)"),
                       ("fsinfo", "guest-get-fsinfo")):
        per_boot = [(med(b["samples_ms"][kind]["arcbox-agent"]),
                     med(b["samples_ms"][kind]["qemu-ga"])) for b in boots]
        lines.append("%s, median per boot: arcbox-agent %s ms, qemu-ga %s ms (ratio %s)"
                     % (what, "/".join("%.1f" % a for a, _ in per_boot),
                        "/".join("%.1f" % q for _, q in per_boot),
                        "/".join("%.2f" % (a / q) for a, q in per_boot)))
    rss = {who: "/".join(str(b["memory"][who]["rss_kib"]) for b in boots) for who in WHO}
    return ("**guest-exec and guest-get-fsinfo against qemu-ga %s** (`bench/qga_exec.py`: %d "
            "boots of a busybox guest under TCG, %d of each per agent per boot, interleaved in "
            "blocks of %d, the same host client; %s). %s; %s. "
            "Memory in the guest after them, RSS per boot: arcbox-agent %s KiB (also PID 1 "
            "and the ArcBox server), qemu-ga %s KiB."
            % (report["qemu_ga_version"], len(boots), report["rounds_per_boot"], BLOCK,
               provenance.says(report), lines[0], lines[1], rss["arcbox-agent"],
               rss["qemu-ga"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=200, help="of each, per agent and boot")
    parser.add_argument("--publish", action="store_true",
                        help="make this run bench/results/qga-exec.json (every run is kept)")
    args = parser.parse_args()
    work, image, info, kernel, disk = bench_guest("arcbox-qga-exec-")
    boots = [one_boot(work, image, kernel, disk, args.rounds) for _ in range(args.boots)]
    version = subprocess.run(guestimage.qemu_ga_command(guestimage.fetch_qemu_ga())
                             + ["--version"], capture_output=True, text=True).stdout.split()
    report = {
        "provenance": provenance.collect(HARNESS),
        "qemu": subprocess.run([vmtool.QEMU, "--version"], capture_output=True,
                               text=True).stdout.splitlines()[0],
        "guest_kernel": info["release"], "qemu_ga_version": version[-1],
        "rounds_per_boot": args.rounds, "boots": boots,
    }
    print("kept %s" % os.path.relpath(provenance.keep("qga-exec", report), REPO))
    if args.publish:
        provenance.publish(report, os.path.join(HERE, "results", "qga-exec.json"))
        print("published bench/results/qga-exec.json")
    print(published_paragraph(report))


if __name__ == "__main__":
    main()
