"""Test helpers (importable: tests never import from conftest): a raw frame client, a
polling wait, and the agent started as a plain process (tools/guestctl.py drives it)."""

import re
import socket
import subprocess
import time

import agent
from guestctl import AgentProcess


def start_agent(pyz, workdir, *args):
    """The agent as a plain process (not PID 1) on workdir/agent.sock, serving."""
    return AgentProcess(pyz, workdir, *args).start()


def wait_for(predicate, timeout=15, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.02)


# A log line's stamp is taken just after the event it reports (the signal is sent, then
# the line is formatted and written), so the gap between two stamps can fall short of the
# gap between the events by the time one write takes. 20 ms is far above that, far below
# any grace a test uses.
LOG_STAMP_SLACK = 0.02


def assert_grace_kept(events, grace, most=2.0):
    """SIGKILL came after the whole grace (counted from SIGTERM), and not much later."""
    term = next(t for t, _, m in events if "SIGTERM sent" in m)
    kill = next(t for t, _, m in events if "SIGKILL sent" in m)
    assert grace - LOG_STAMP_SLACK <= kill - term < grace + most, (
        "SIGKILL %.3fs after SIGTERM, grace %gs" % (kill - term, grace))


class RawClient:
    """Frames in, frames out, no help: for testing what the agent does with odd input."""

    def __init__(self, path, timeout=5.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = bytearray()

    def send(self, data):
        self.s.sendall(data)

    def frame(self):
        """Next frame (type, trace, payload), or None at EOF."""
        while True:
            got = agent.decode_frame(self.buf, 1 << 24)
            if got is not None:
                del self.buf[:got[3]]
                return got[:3]
            chunk = self.s.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def request(self, msg_type, payload=b"", trace=b""):
        self.send(agent.encode_frame(msg_type, payload, trace))
        return self.frame()

    def close(self):
        self.s.close()


# ---- the VM tier: what a clean power-off and an intact disk look like -----------------------

def assert_powered_off(vm, status):
    console = vm.console()
    assert status == 0, "qemu exit status %s (pvpanic: a kernel panic?)\n%s" % (status,
                                                                               console[-3000:])
    assert "reboot: Power down" in console, console[-3000:]
    assert "Kernel panic" not in console and "POWER-OFF FAILED" not in console


def fresh_disk(tmp_path):
    disk = str(tmp_path / "disk.img")
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", disk], check=True, timeout=60)
    return disk


def disk_writer(tag, then="exec sleep 1000"):
    """A workload that writes 2 MB and a small file to the disk, never syncs, says so on the
    console (DISK-WRITTEN-42, computed so that the echoed command cannot match), then `then`."""
    return ("mount -t ext4 /dev/vda /mnt && "
            "yes arcbox-run-%s | head -c 2000000 > /mnt/data && echo done > /mnt/marker && "
            "echo DISK-WRITTEN-$((40+2)) && %s" % (tag, then))


def assert_disk_intact(disk, tag):
    header = subprocess.run(["dumpe2fs", "-h", disk], capture_output=True, text=True).stdout
    assert re.search(r"Filesystem state:\s+clean", header), header
    assert "needs_recovery" not in header, "the journal needs recovery: not cleanly remounted"
    fsck = subprocess.run(["e2fsck", "-fn", disk], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    data = subprocess.run(["debugfs", "-R", "cat /data", disk], capture_output=True).stdout
    assert data == (b"arcbox-run-%s\n" % tag.encode() * 200000)[:2000000]
    marker = subprocess.run(["debugfs", "-R", "cat /marker", disk], capture_output=True).stdout
    assert marker == b"done\n"
