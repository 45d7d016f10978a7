"""The VM tier's checks: what a clean power-off and an intact disk look like; and saving a
VM to a file and restoring it, the way a host does."""

import os
import re
import subprocess
import time

from helpers import wait_for


def assert_powered_off(vm, status):
    console = vm.console()
    assert status == 0, "qemu exit status %s (pvpanic: a kernel panic?)\n%s" % (status,
                                                                               console[-3000:])
    assert "reboot: Power down" in console, console[-3000:]
    assert "Kernel panic" not in console and "POWER-OFF FAILED" not in console
    # a bug the agent's loop caught and logged is a bug all the same
    assert "internal error (kept serving)" not in console, [
        l for l in console.splitlines() if "internal error" in l][:3]


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


def save_and_restore(boot, vm, workdir, after, cmdline="", log_level="debug"):
    """Save `vm` to a file the way a host saves a VM (stop, migrate to a file, quit), wait
    `after` seconds (the guest's clocks stand still), restore it into a new QEMU started by
    `boot` in `workdir` with the same `cmdline`, and let it run. Returns the restored VM."""
    state = os.path.join(workdir, "vm.state")
    os.makedirs(workdir, exist_ok=True)
    vm.monitor_command("stop")
    vm.monitor_command('migrate "exec:cat > %s"' % state)
    wait_for(lambda: "Migration status: completed" in vm.monitor_command("info migrate"),
             120, "the migration to a file")
    vm.monitor_command("quit")
    vm.wait(30)
    time.sleep(after)
    restored = boot(cmdline, log_level=log_level, workdir=workdir,
                    qemu_args=["-incoming", "exec:cat %s" % state])
    # the state was saved stopped, so it is restored stopped: go on once it is loaded
    wait_for(lambda: "inmigrate" not in restored.monitor_command("info status"), 120,
             "the restore")
    restored.monitor_command("cont")
    return restored
