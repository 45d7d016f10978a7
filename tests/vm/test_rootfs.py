"""The guest kind the design card names: a disk image whose root the kernel mounts, with the
.pyz installed as /sbin/arcbox-agent and /sbin/init -> it, booted the way distributions do
(a tiny busybox initramfs loads virtio and ext4, mounts root= ro or rw, switch_roots).
"Nothing lost": files written to the root without sync are there, and the root image is
clean (e2fsck -fn), after the agent powered the guest off and remounted / read-only."""

import shutil
import subprocess

import pytest

import agent
from vmchecks import assert_disk_intact, assert_powered_off, disk_writer, fresh_disk

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 180
STOP_TIMEOUT = 60


def boot_root(boot, rootfs_image, tmp_path, mode, cmdline="", data_disks=()):
    disk = str(tmp_path / "root.img")
    shutil.copyfile(rootfs_image["root_template"], disk)
    vm = boot("root=/dev/vda %s %s" % (mode, cmdline), disk=[disk] + list(data_disks),
              log_level="debug", image=rootfs_image, initramfs=rootfs_image["boot_initramfs"])
    return vm, disk


def debugfs_cat(disk, path):
    return subprocess.run(["debugfs", "-R", "cat " + path, disk], capture_output=True).stdout


def assert_root_clean(disk):
    header = subprocess.run(["dumpe2fs", "-h", disk], capture_output=True, text=True).stdout
    assert "Filesystem state:         clean" in header, header
    assert "needs_recovery" not in header, "the journal needs recovery: / was not remounted"
    fsck = subprocess.run(["e2fsck", "-fn", disk], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.parametrize("arch,run", [("x86_64", 0), ("x86_64", 1), ("x86_64", 2),
                                      ("aarch64", 0)])
def test_a_writable_root_is_remounted_read_only_and_nothing_is_lost(boot, request, tmp_path,
                                                                      arch, run):
    rootfs_image = request.getfixturevalue(
        "rootfs_image" if arch == "x86_64" else "arm_rootfs_image")
    write = ("mkdir -p /data && yes root-run-%d | head -c 1000000 > /data/big && "
             "echo run-%d > /data/small && echo ROOT-WRITTEN-$((40+2)) && exec sleep 1000"
             % (run, run))
    vm, disk = boot_root(boot, rootfs_image, tmp_path, "rw",
                         'arcbox.exec="/bin/sh -c \'%s\'"' % write)
    vm.wait_log("ROOT-WRITTEN-42", BOOT_TIMEOUT)
    vm.wait_ready(BOOT_TIMEOUT)
    assert vm.shutdown(grace=5) is True
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    lines = vm.messages()
    remounts = [l for l in lines if l.startswith("shutdown: remounted")]
    assert remounts and remounts[-1] == "shutdown: remounted / (ext4) read-only", remounts
    assert any(l.startswith("ready (pid 1, version %s)" % agent.__version__)   # /sbin/init
               for l in lines), lines                                              # was us
    assert_root_clean(disk)
    assert debugfs_cat(disk, "/data/big") == (b"root-run-%d\n" % run * 100000)[:1000000]
    assert debugfs_cat(disk, "/data/small") == b"run-%d\n" % run


def test_a_read_only_root_boots_serves_and_powers_off_without_writing(boot, rootfs_image,
                                                                       tmp_path):
    """...and a writable data disk under that read-only root (/dev/vdb on /mnt, written
    without sync) ends clean with its data: the teardown has nothing to do on / and still
    does its work below it."""
    data = fresh_disk(tmp_path)
    probe = "touch /written 2>/dev/null && echo ROOT-IS-RW || echo ROOT-IS-R$((0))O; " \
            + disk_writer("ro-root", then="exec sleep 1000").replace("/dev/vda", "/dev/vdb")
    vm, disk = boot_root(boot, rootfs_image, tmp_path, "ro",
                         'arcbox.exec="/bin/sh -c \'%s\'"' % probe, data_disks=[data])
    vm.wait_ready(BOOT_TIMEOUT)
    vm.wait_log("ROOT-IS-R0O", BOOT_TIMEOUT)           # the kernel's default: read-only
    vm.wait_log("DISK-WRITTEN-42", BOOT_TIMEOUT)
    info = agent.decode_message(agent.SYSTEM_INFO, vm.request(agent.MSG_GET_SYSTEM_INFO))
    assert info["hostname"] == "arcbox"
    assert vm.shutdown(grace=2) is True
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    lines = vm.messages()
    assert not any(l.startswith(("mount ", "warn")) and "Read-only" in l for l in lines), lines
    assert "shutdown: remounted / (ext4) read-only" not in lines   # it was never writable
    assert "shutdown: remounted /mnt (ext4) read-only" in lines
    assert_root_clean(disk)
    assert debugfs_cat(disk, "/written") == b""
    assert_disk_intact(data, "ro-root")
