"""Nothing lost whatever the guest mounted (tools/guest/mounts.sh): two disks, one nested
in the other, an image file on each disk loop-mounted (one by `mount -o loop`, one on a
loop device set up by hand), a swap file on the nested disk and another on a loop
filesystem, a bind mount, an overlay whose upper directory is on a disk; files written
without sync, the nested disk frozen (FIFREEZE) with a writer waiting on it, and a process
that ignores SIGTERM still appending when the power-off comes.

Each way the host stops a guest must end with QEMU exiting by itself, and then, on the
host: every disk and every image inside one clean (e2fsck -fn, no journal to recover), every
byte written before the request there."""

import pytest

import guestimage
import storagecheck
from helpers import wait_for
from vmchecks import assert_powered_off

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 120
STOP_TIMEOUT = 60


def wait_for_mounts(vm):
    """Until mounts.sh says it is done; at once if it failed (set -e: the workload exits)."""
    wait_for(lambda: "MOUNTS-READY-42" in vm.console() or "workload exited" in vm.console(),
             BOOT_TIMEOUT, "mounts.sh")
    assert "MOUNTS-READY-42" in vm.console(), vm.console()[-3000:]


def teardown_lines(vm):
    return [m for m in vm.messages() if m.startswith("shutdown: ")]


def assert_torn_down_in_order(vm):
    lines = teardown_lines(vm)
    for needed in ("shutdown: /data/inner was frozen; thawed it",
                   "shutdown: swapoff /data/inner/swapfile: done",
                   "shutdown: swapoff /mnt/loop/swap2: done",
                   "shutdown: remounted /data (ext4) read-only",
                   "shutdown: remounted /data/inner (ext4) read-only",
                   "shutdown: unmount /mnt/ovl (overlay on overlay): done",
                   "shutdown: unmount /mnt/loop2 (ext4 on /dev/loop1): done"):
        assert needed in lines, (needed, lines)
    assert any(l.startswith("shutdown: detach /dev/loop1 from ") and l.endswith(
        "/data/inner/loop2.img: done") for l in lines), lines
    assert not any("stays writable" in l for l in lines), lines
    assert any("filesystems synced and read-only" in l for l in lines), lines


@pytest.mark.parametrize("how", ["arcbox-shutdown", "acpi-button", "busybox-poweroff"])
def test_every_mount_kind_ends_clean_whichever_way_the_host_stops_the_guest(
        boot, tmp_path, how):
    disks = storagecheck.make_disks(str(tmp_path))
    arg = " poweroff" if how == "busybox-poweroff" else ""
    vm = boot('arcbox.exec="/test/mounts.sh%s" arcbox.grace=1' % arg,
              disk=[disks["vda"], disks["vdb"]], log_level="debug",
              modules=guestimage.STORAGE_MODULES)
    wait_for_mounts(vm)
    assert "/mnt/loop/swap2" in vm.console()                    # both swap files were on
    if how == "arcbox-shutdown":
        vm.wait_ready(BOOT_TIMEOUT)
        assert vm.shutdown(grace=1) is True
    elif how == "acpi-button":
        vm.wait_ready(BOOT_TIMEOUT)
        vm.monitor_command("system_powerdown")
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    assert "shutdown: grace over, SIGKILL sent to the rest" in vm.messages()  # the appender
    assert_torn_down_in_order(vm)
    assert storagecheck.problems(disks, str(tmp_path)) == []


def test_every_mount_kind_ends_clean_on_aarch64(boot, arm_image, tmp_path):
    disks = storagecheck.make_disks(str(tmp_path))
    vm = boot('arcbox.exec="/test/mounts.sh" arcbox.grace=1', disk=[disks["vda"], disks["vdb"]],
              log_level="debug", image=arm_image, modules=guestimage.STORAGE_MODULES)
    wait_for_mounts(vm)
    vm.wait_ready(BOOT_TIMEOUT)
    assert vm.shutdown(grace=1) is True
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    assert_torn_down_in_order(vm)
    assert storagecheck.problems(disks, str(tmp_path)) == []
