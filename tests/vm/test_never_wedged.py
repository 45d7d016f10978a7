"""PID 1 is never wedged, in a real guest (x86_64 under TCG):

- disks that never answer -- device-mapper suspended with lockfs (LVM, `dmsetup suspend`) and
  with --nolockfs (a dead SAN), a writer stuck on each -- beside a healthy disk: ArcBox
  Shutdown, the power button and QGA guest-shutdown (behind a guest-fsfreeze-freeze hung on
  the dead disk) each end in reboot() within grace + kill-wait + sync-timeout + power-timeout
  + 1 s; the healthy disk comes back clean with every file; the log names each disk that could
  not be synced and the processes stuck on it (one boot serves both kinds of dead disk);
- a freeze that flushes 32 MB to a disk throttled to 2 MB/s: every ArcBox Ping is answered
  within 0.5 s, guest-set-time reads the RTC meanwhile, the watchdog (i6300esb, petted by the
  loop every second) keeps the guest up through several of its periods, and a Shutdown during
  the flush ends in an orderly power-off;
- a stop that hangs past its bounds (a huge --sync-timeout with the hung disks) is ended by the
  watchdog armed across the stop, at the armed time."""

import subprocess
import time

import pytest

import storagecheck
from guestctl import request
from helpers import wait_for
from qgaclient import connect
from vmchecks import assert_powered_off

import agent

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 120
GRACE, KILL_WAIT, SYNC_TIMEOUT, POWER_TIMEOUT = 1.0, 0.5, 4.0, 10.0
STOP_BOUND = GRACE + KILL_WAIT + SYNC_TIMEOUT + POWER_TIMEOUT + 1.0
FILE_BYTES = 65536
WATCHDOG = ["-device", "i6300esb", "-action", "watchdog=poweroff"]


def hung_disk_images(tmp_path):
    disks = []
    for name in ("vda", "vdb", "vdc"):
        path = str(tmp_path / (name + ".img"))
        storagecheck.mkfs(path, 32 << 20)
        disks.append(path)
    return disks


def boot_hung_disks(boot, image, disks, cmdline="", qemu_args=(), modules=()):
    vm = boot('arcbox.exec=/test/hung_disks.sh arcbox.grace=%g arcbox.kill_wait=%g %s'
              % (GRACE, KILL_WAIT, cmdline), disk=disks, log_level="debug", image=image,
              modules=["dm_mod"] + list(modules), qemu_args=qemu_args)
    wait_for(lambda: "HUNG-DISKS-READY-42" in vm.console() or "workload exited" in vm.console(),
             BOOT_TIMEOUT, "hung_disks.sh")
    assert "HUNG-DISKS-READY-42" in vm.console(), vm.console()[-3000:]
    vm.wait_ready(BOOT_TIMEOUT)
    return vm


def healthy_disk_problems(image):
    """Everything wrong with the healthy disk, one line each: [] when it is clean (no journal
    to recover) and holds all 21 files, byte for byte."""
    found = []
    header = subprocess.run(["dumpe2fs", "-h", image], capture_output=True, text=True).stdout
    if "needs_recovery" in header:
        found.append("the journal needs recovery")
    fsck = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
    if fsck.returncode != 0:
        found.append("e2fsck -fn exit %d: %s" % (fsck.returncode, fsck.stdout[-300:]))
    for i in range(1, 22):
        line = b"healthy file %d\n" % i
        want = (line * (FILE_BYTES // len(line) + 1))[:FILE_BYTES]
        got = storagecheck.debugfs(image, "cat /f%d" % i)
        if got != want:
            found.append("/f%d: %d of %d bytes as written" % (i, sum(
                1 for a, b in zip(got, want) if a == b), FILE_BYTES))
    return found


@pytest.mark.parametrize("how", ["arcbox-shutdown", "power-button", "qga-shutdown"])
def test_hung_disks_still_power_off_and_the_healthy_one_comes_back_clean(
        boot, wedge_image, tmp_path, figures, how):
    disks = hung_disk_images(tmp_path)
    vm = boot_hung_disks(boot, wedge_image, disks, "arcbox.sync_timeout=%g" % SYNC_TIMEOUT)
    if how == "qga-shutdown":
        qga = connect(vm.qga_sock, timeout=BOOT_TIMEOUT)
        # a freeze that can never finish (it must flush to the dead disk) is still under way
        qga.call("guest-fsfreeze-freeze-list", {"mountpoints": ["/dead"]}, reply=False)
        wait_for(lambda: "guest-fsfreeze-freeze" in vm.console(), 30, "the freeze")
        time.sleep(0.5)
        asked = time.monotonic()
        qga.call("guest-shutdown", reply=False)
    elif how == "arcbox-shutdown":
        asked = time.monotonic()
        assert vm.shutdown(grace=GRACE) is True
    else:
        asked = time.monotonic()
        vm.monitor_command("system_powerdown")
    status = vm.wait(STOP_BOUND + 30)
    took = time.monotonic() - asked
    figures["stop_seconds"] = round(took, 2)
    figures["bound_seconds"] = STOP_BOUND
    assert_powered_off(vm, status)
    assert took <= STOP_BOUND, "the stop took %.1fs (bound %gs)" % (took, STOP_BOUND)
    msgs = vm.messages()
    for target in ("/locked", "/dead"):
        assert any("on %s did not finish within" % target in m for m in msgs), msgs
    assert any("stuck on it: pid" in m and " (dd) in D" in m for m in msgs), msgs
    assert "shutdown: remounted /data (ext4) read-only" in msgs, msgs
    assert healthy_disk_problems(disks[0]) == []


def timed_pings(vm, seconds, every=0.25):
    """ArcBox Pings for `seconds`: each answer's time (a timeout counts as its 2 s)."""
    times, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.monotonic()
        try:
            request(vm.sock, agent.MSG_PING, b"", 2.0)
        except (OSError, agent.ClientError):
            pass
        times.append(time.monotonic() - began)
        time.sleep(every)
    return times


SLOW_DISK = ("mkdir -p /slow && mount -t ext4 /dev/vda /slow && "
             "dd if=/dev/zero of=/slow/dirty bs=1M count=32 2>/dev/null && "
             "echo DIRTY-$((40 + 2)) && exec sleep 100000")


def test_while_a_freeze_flushes_a_slow_disk_pid1_answers_pets_its_watchdog_and_stops(
        boot, tmp_path, figures):
    disk = str(tmp_path / "slow.img")
    storagecheck.mkfs(disk, 64 << 20)
    period = 2
    vm = boot('arcbox.exec="/bin/sh -c \'%s\'" arcbox.grace=1 arcbox.watchdog=%d'
              % (SLOW_DISK, period), log_level="debug", modules=["i6300esb"],
              qemu_args=WATCHDOG + ["-drive", "file=%s,if=virtio,format=raw,cache=writeback,"
                                    "throttling.bps-write=%d" % (disk, 2 << 20)])
    wait_for(lambda: "DIRTY-42" in vm.console(), BOOT_TIMEOUT, "the dirty data")
    vm.wait_ready(BOOT_TIMEOUT)
    assert any("watchdog: /dev/watchdog armed for %gs" % period in m for m in vm.messages())
    qga = connect(vm.qga_sock, timeout=BOOT_TIMEOUT)
    qga.call("guest-fsfreeze-freeze", reply=False)
    wait_for(lambda: "guest-fsfreeze-freeze" in vm.console(), 30, "the freeze")
    qga.call("guest-set-time", reply=False)         # the RTC's wait, beside the freeze
    pings = timed_pings(vm, 7.0)
    figures["ping_ms_during_flush"] = sorted(round(p * 1000, 1) for p in pings)
    assert max(pings) < 0.5, "a Ping waited %.2fs during the flush" % max(pings)
    assert not any(m.startswith("froze ") for m in vm.messages()), "the flush was over early"
    assert any(m.startswith("clock set from the hardware clock") for m in vm.messages())
    assert vm.shutdown(grace=1) is True              # during the flush
    assert_powered_off(vm, vm.wait(60))
    msgs = vm.messages()
    order = [next(i for i, m in enumerate(msgs) if needle in m) for needle in (
        "shutdown requested", "SIGTERM sent", "watchdog: armed for the stop",
        "calling reboot(poweroff)")]
    assert order == sorted(order), msgs
    events = vm.events()
    armed = next(t for t, _, m in events if m.startswith("watchdog: /dev/watchdog armed"))
    stop = next(t for t, _, m in events if m.startswith("shutdown requested"))
    figures["watchdog_periods_petted"] = round((stop - armed) / period, 1)
    assert stop - armed >= 3 * period, "up only %.1fs with the watchdog" % (stop - armed)


def test_a_stop_that_hangs_past_its_bounds_is_ended_by_the_watchdog(
        boot, wedge_image, tmp_path, figures):
    disks = hung_disk_images(tmp_path)
    armed_for = 6
    vm = boot_hung_disks(boot, wedge_image, disks, "arcbox.sync_timeout=600 "
                         "arcbox.watchdog=stop:%d" % armed_for, qemu_args=WATCHDOG,
                         modules=["i6300esb"])
    assert vm.shutdown(grace=GRACE) is True
    wait_for(lambda: "watchdog: armed for the stop" in vm.console(), 60, "the stop's arming")
    armed = time.monotonic()
    status = vm.wait(120)
    ended = time.monotonic() - armed
    figures["watchdog_ended_after_seconds"] = round(ended, 2)
    console = vm.console()
    assert "reboot: Power down" not in console and "calling reboot(" not in console, \
        "the stop did not hang: nothing for the watchdog to do"
    assert status == 0, status
    assert armed_for - 0.5 <= ended <= armed_for + 3, "ended %.1fs after arming" % ended
