"""`build.py --demo`: the built .pyz as PID 1 of a PID namespace, powered off by the host.

A few processes are started in the "guest" first (two that exit on SIGTERM, one that ignores
it, one orphaned grandchild); the host-side commands of the same .pyz ping it, read its
system info and ask it to power off over a Unix socket; then the timeline from the agent's
log and the outcome: the namespace init killed by SIGINT is reboot(POWER_OFF) reached.
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import nsguest  # noqa: E402

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


def run(pyz, grace=2.0):
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
            ended = nsguest.boot_clock()
            log = guest.log()
    events = nsguest.log_events(log)
    start = next((t for t, _, m in events if "shutdown requested" in m), None)
    print("\ntimeline (agent log, seconds from the Shutdown request):")
    for stamp, _, message in events:
        for needle, label in TIMELINE_MARKS:
            if needle in message:
                rel = stamp - start if start is not None else stamp
                print("  %+9.3f s  %-34s %s" % (rel, label, message))
    if start is not None:
        print("  %+9.3f s  %-34s" % (ended - start, "namespace init gone (host sees it)"))
    if returncode == nsguest.POWER_OFF_RETURNCODE:
        print("\noutcome: the namespace init was killed by SIGINT: reboot(POWER_OFF) reached "
              "-- in a VM this is the power-off.")
        return 0 if ok else 1
    print("\noutcome: UNEXPECTED: unshare returned %r (power-off gives -2, SIGINT)\n%s"
          % (returncode, log))
    return 1
