"""`build.py --demo`: the built .pyz as the init of a guest, powered off by the host.

With QEMU installed (`--demo vm`, or `auto`): a busybox guest under QEMU/TCG with the .pyz as
/init and a small workload (two processes that exit on SIGTERM, one that ignores it); the
host-side commands of the same .pyz ping it, read its system info and ask it to power off
over the virtio-serial port; then the timeline from the agent's log on the console and the
outcome: QEMU exits by itself and the kernel said "reboot: Power down".

Without QEMU (or `--demo namespace`): the .pyz as PID 1 of a PID namespace, same story; the
outcome there is the namespace init killed by SIGINT, which is reboot(POWER_OFF) reached.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import guestctl  # noqa: E402
import nsguest  # noqa: E402

VM_WORKLOAD = b"""#!/bin/sh
sleep 1000 &
sleep 1000 &
/demo/ignore_term.sh &
echo "demo workload: 3 processes started, one ignores SIGTERM"
exec sleep 1000
"""
# Also HUP: the workload is a session leader on the console, and when it dies the kernel
# hangs up its session, which would end this process before the grace does.
VM_IGNORE_TERM = b"""#!/bin/sh
trap '' TERM HUP
exec sleep 1000
"""

GUEST_SETUP = """\
sleep 1000 &                         # exits on SIGTERM
sleep 1000 &                         # exits on SIGTERM
(trap '' TERM; exec sleep 1000) &    # ignores SIGTERM: needs the SIGKILL
sh -c 'sleep 1000 & sleep 0.2' &     # its child becomes an orphan of PID 1
"""

TIMELINE_MARKS = (
    ("ready (", "agent ready as PID 1"),
    ("shutdown requested", "Shutdown request accepted"),
    ("SIGTERM sent", "SIGTERM + SIGCONT sent to all"),
    ("all processes gone after", "last process gone"),
    ("SIGKILL sent", "grace over: SIGKILL sent"),
    ("filesystems synced", "sync() done"),
    ("calling reboot(", "reboot(POWER_OFF) called"),
)


def _run_client(pyz, args):
    cmd = [sys.executable, pyz] + args
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    shown = "$ arcbox-agent.pyz %s" % " ".join(args)
    print(shown)
    for line in (result.stdout + result.stderr).strip().splitlines():
        print("    " + line)
    return result.returncode


def run(pyz, grace=2.0, mode="auto"):
    if mode in ("auto", "vm"):
        import vm as vmtool
        reason = vmtool.why_vm_unavailable()
        if reason is None:
            return run_vm(pyz, grace)
        print("demo: no VM: %s" % reason)
        if mode == "vm":
            return 1
        print("demo: falling back to the PID-namespace sandbox (no VM needed)")
    return run_namespace(pyz, grace)


def _print_timeline(events, ended):
    """The agent's log marks on its own clock (CLOCK_BOOTTIME), from the Shutdown request;
    `ended` only when it is on that same clock (a PID namespace shares the host's)."""
    start = next((t for t, _, m in events if "shutdown requested" in m), None)
    print("\ntimeline (agent log, seconds from the Shutdown request):")
    for stamp, _, message in events:
        for needle, label in TIMELINE_MARKS:
            if needle in message:
                rel = stamp - start if start is not None else stamp
                print("  %+9.3f s  %-34s %s" % (rel, label, message))
    if start is not None and ended is not None:
        print("  %+9.3f s  %s" % (ended - start, "the guest is gone (the host sees it)"))


def run_vm(pyz, grace):
    import guestimage
    import vm as vmtool
    with tempfile.TemporaryDirectory(prefix="arcbox-demo-vm-") as work:
        print("\nbuilding the busybox guest (first run: apt-get download of the kernel and "
              "guest Python into %s)" % guestimage.CACHE)
        try:
            initramfs = os.path.join(work, "initramfs.cpio")
            info = guestimage.build_initramfs(pyz, initramfs,
                                              extra_files={"/demo/workload.sh": VM_WORKLOAD,
                                                           "/demo/ignore_term.sh": VM_IGNORE_TERM})
            kernel = guestimage.vmlinux(guestimage.fetch_packages())
        except guestimage.ImageError as exc:
            print("demo: cannot build the guest: %s\ndemo: falling back to the PID-namespace "
                  "sandbox" % exc)
            return run_namespace(pyz, grace)
        print("guest: kernel %s, initramfs %d bytes, %d stdlib files: %s"
              % (info["release"], info["size"], len(info["stdlib"]), " ".join(info["stdlib"])))
        machine = vmtool.VM(work, initramfs, kernel, cmdline="arcbox.exec=/demo/workload.sh")
        with machine:
            print("\nbooting QEMU (TCG) with arcbox-agent.pyz as /init ...")
            ready = machine.wait_ready(120)
            print("agent answered over virtio-serial %.2f s after QEMU started" % ready)
            try:
                machine.wait_log("demo workload:", 60)
            except RuntimeError:
                pass                # said below: "(the workload said nothing)"
            print("guest console: %s\n" % next(
                (l.strip() for l in machine.console().splitlines() if "demo workload:" in l),
                "(the workload said nothing)"))
            ok = _run_client(pyz, ["ping", "--to", machine.agent_address]) == 0
            ok &= _run_client(pyz, ["info", "--to", machine.agent_address]) == 0
            asked = time.monotonic()
            ok &= _run_client(pyz, ["shutdown", "--grace", "%g" % grace, "--to",
                                    machine.agent_address]) == 0
            status = machine.wait(grace + 60)
            took = time.monotonic() - asked
            console = machine.console()
    events = guestctl.log_events(console)
    power = re.search(r"\[\s*([\d.]+)\] reboot: Power down", console)
    # The kernel stamps its own lines with another clock (printk's local_clock, tens of ms
    # off the agent's CLOCK_BOOTTIME), and the host has a third: each is printed apart.
    _print_timeline(events, None)
    if power:
        print("\nthe kernel's \"reboot: Power down\": %.3f s after boot on the kernel log's "
              "own clock (not the agent's: not on the timeline above)" % float(power.group(1)))
    print("shutdown request to QEMU exit, measured on the host's clock: %.3f s" % took)
    if status == 0 and power and "Kernel panic" not in console:
        print("outcome: QEMU exited by itself (status 0) and the kernel said "
              "\"reboot: Power down\": the guest powered off in order.")
        return 0 if ok else 1
    print("outcome: UNEXPECTED: QEMU status %s\n%s" % (status, console[-3000:]))
    return 1


def run_namespace(pyz, grace):
    reason = nsguest.why_namespaces_unavailable()
    if reason:
        print("demo: cannot run the PID-namespace guest here: %s" % reason)
        return 1
    with tempfile.TemporaryDirectory(prefix="arcbox-demo-") as work:
        guest = nsguest.NamespaceGuest(pyz, work, setup=GUEST_SETUP, log_level="info")
        with guest:
            print("\nstarting %s as PID 1 of a new PID namespace (unshare --pid --fork "
                  "--mount-proc)" % os.path.relpath(pyz))
            guest.wait_ready()
            print("guest processes besides PID 1: %d\n" % len(guest.processes()))
            ok = _run_client(pyz, ["ping", "--to", guest.address]) == 0
            ok &= _run_client(pyz, ["info", "--to", guest.address]) == 0
            ok &= _run_client(pyz, ["shutdown", "--grace", "%g" % grace, "--to",
                                    guest.address]) == 0
            returncode = guest.wait(timeout=grace + 30)
            ended = guestctl.boot_clock()
            log = guest.log()
    _print_timeline(guestctl.log_events(log), ended)
    if returncode == nsguest.POWER_OFF_RETURNCODE:
        print("\noutcome: the namespace init was killed by SIGINT: reboot(POWER_OFF) reached "
              "-- in a VM this is the power-off.")
        return 0 if ok else 1
    print("\noutcome: UNEXPECTED: unshare returned %r (power-off gives -2, SIGINT)\n%s"
          % (returncode, log))
    return 1
