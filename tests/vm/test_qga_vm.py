"""QGA in a real guest, over the QEMU chardev of the virtio-serial port libvirt and Proxmox VE
use (org.qemu.guest_agent.0), the agent's default as PID 1:

- a libvirt-style client (guest-sync with ids) and a Proxmox-style one (0xFF,
  guest-sync-delimited) read the guest; fsfreeze on a data disk holds a writer until the
  thaw; frozen again, an ArcBox Shutdown still powers off cleanly and the disk is clean;
- the clock: set wrong by guest-set-time, brought back from the RTC by guest-set-time without
  a time; then a snapshot (migrate to a file) and a restore in a new QEMU: both protocols
  answer without a restart, the RTC brings the clock back again, guest-shutdown powers off;
- conformance: Debian's qemu-ga in the same image, on a second port, answers the same
  read-only commands; every reply is compared, keys, types and values (the time within 2 s,
  the interface counters left out: they move), and qemu-ga's guest-shutdown is recorded
  failing in a busybox guest (no /sbin/shutdown)."""

import re
import subprocess
import time

import pytest

import agent

from helpers import wait_for
import vm as vmtool
from qgaclient import connect, shape
from vmchecks import assert_powered_off, fresh_disk, save_and_restore

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 120

# mounts the data disk and writes a counter, saying each completed write on the console
WRITER = ("mount -t ext4 /dev/vda /data && i=0 && while :; do i=$((i+1)); "
          "echo $i > /data/counter.new && mv /data/counter.new /data/counter && "
          "echo TICK-$i; sleep 0.1; done")


def ticks(vm):
    found = re.findall(r"^TICK-(\d+)\r?$", vm.console(), re.M)
    return int(found[-1]) if found else 0


def test_libvirt_and_proxmox_clients_fsfreeze_and_a_shutdown_while_frozen(boot, tmp_path):
    disk = fresh_disk(tmp_path)
    vm = boot('arcbox.exec="/bin/sh -c \'mkdir -p /data && %s\'" arcbox.grace=2' % WRITER,
              disk=disk, log_level="debug")
    libvirt = connect(vm.qga_sock, timeout=BOOT_TIMEOUT)       # guest-sync with an id
    # (start-up lines reach the console just after the first answer: AfterFirstAnswer)
    vm.wait_log("listening on serial:org.qemu.guest_agent.0", 30)
    assert libvirt.result("guest-get-host-name") == {"host-name": "arcbox"}
    osinfo = libvirt.result("guest-get-osinfo")
    assert osinfo["kernel-release"] and osinfo["machine"] == "x86_64"
    now = libvirt.result("guest-get-time") / 1e9
    assert abs(now - time.time()) < 60
    assert [c["online"] for c in libvirt.result("guest-get-vcpus")] == [True]
    lo = [i for i in libvirt.result("guest-network-get-interfaces") if i["name"] == "lo"][0]
    assert lo["ip-addresses"][0]["ip-address"] == "127.0.0.1"
    wait_for(lambda: ticks(vm) > 3, BOOT_TIMEOUT, "the writer")
    fs = libvirt.result("guest-get-fsinfo")
    assert [(f["mountpoint"], f["type"], f["name"]) for f in fs] == [("/data", "ext4", "vda")]
    address = fs[0]["disk"][0]
    assert address["bus-type"] == "virtio" and address["dev"] == "/dev/vda"
    assert address["pci-controller"]["slot"] >= 0
    libvirt.close()

    # a backup, the Proxmox way: 0xFF + guest-sync-delimited before every command
    proxmox = connect(vm.qga_sock, delimited=True)
    assert proxmox.result("guest-ping") == {}
    proxmox.sync_delimited()
    assert proxmox.result("guest-fsfreeze-freeze") == 1
    proxmox.sync_delimited()
    assert proxmox.result("guest-fsfreeze-status") == "frozen"
    time.sleep(1.0)                       # a write under way when the freeze came may land
    held = ticks(vm)
    time.sleep(2.0)
    assert ticks(vm) == held, "the writer went on while /data was frozen"
    proxmox.sync_delimited()
    assert proxmox.result("guest-fsfreeze-thaw") == 1
    wait_for(lambda: ticks(vm) > held + 2, 30, "writes after the thaw")

    # frozen when the host shuts the guest down over ArcBox: thawed, torn down, clean
    assert proxmox.result("guest-fsfreeze-freeze") == 1
    proxmox.close()
    assert vm.shutdown(grace=0) is True
    assert_powered_off(vm, vm.wait(60))
    msgs = vm.messages()
    thawed = msgs.index("shutdown: /data was frozen; thawed it")      # the errand, then:
    assert thawed < next(i for i, m in enumerate(msgs) if "SIGTERM sent" in m), msgs
    assert "shutdown: remounted /data (ext4) read-only" in msgs, msgs
    fsck = subprocess.run(["e2fsck", "-fn", disk], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    counter = subprocess.run(["debugfs", "-R", "cat /counter", disk], capture_output=True,
                             text=True).stdout
    assert int(counter) >= held + 2


def assert_clock_near_host(client, within):
    guest = client.result("guest-get-time") / 1e9
    assert abs(guest - time.time()) < within, (guest, time.time())


def test_the_clock_from_the_rtc_and_a_snapshot_restore_then_guest_shutdown(boot, tmp_path):
    # (the clock keeper off: this is the host's own way, tested alone; the keeper's test is
    # tests/vm/test_clock_vm.py)
    vm = boot("arcbox.clock_check=0", log_level="debug")
    c = connect(vm.qga_sock, timeout=BOOT_TIMEOUT)
    assert c.result("guest-set-time", {"time": time.time_ns() - 3600 * 10 ** 9}) == {}
    guest = c.result("guest-get-time") / 1e9
    assert 3590 < time.time() - guest < 3610
    # with a time, the RTC is written too (qemu-ga's `hwclock -w`): read back from it, the
    # clock stays an hour behind; set right, the RTC is right again
    assert c.result("guest-set-time") == {}                # from the RTC, like hwclock -s
    assert 3590 < time.time() - c.result("guest-get-time") / 1e9 < 3610
    assert c.result("guest-set-time", {"time": time.time_ns()}) == {}
    assert c.result("guest-set-time") == {}
    assert_clock_near_host(c, 1.0)
    # an ArcBox Ping's timestamp (whole seconds) from the host's side of the serial port is
    # the other way to set it: the agent applies the effect handle_request returns
    assert c.result("guest-set-time", {"time": time.time_ns() - 3600 * 10 ** 9}) == {}
    vm.request(0x0001, agent.encode_message(agent.PING_REQUEST,
                                            {"timestamp_secs": int(time.time())}))
    assert_clock_near_host(c, 2.0)
    # (a Ping sets the clock only: the RTC, written an hour behind above, is set right here)
    assert c.result("guest-set-time", {"time": time.time_ns()}) == {}
    c.close()

    # snapshot to a file, the way a host saves a VM; restore it in a new QEMU a while later
    restored = save_and_restore(boot, vm, str(tmp_path / "restored"), 5,
                                "arcbox.clock_check=0")
    assert "running" in restored.monitor_command("info status")
    c = connect(restored.qga_sock, timeout=60)
    assert b"pong" in restored.request(0x0001)             # ArcBox answers too
    guest = c.result("guest-get-time") / 1e9
    assert time.time() - guest > 4, "the restored guest's clock should be behind"
    assert c.result("guest-set-time") == {}
    assert_clock_near_host(c, 1.0)
    c.call("guest-shutdown", reply=False)
    status = restored.wait(60)
    assert status == 0 and "reboot: Power down" in restored.console()
    lines = restored.console()
    assert "shutdown requested (guest-shutdown from serial port org.qemu.guest_agent.0)" \
        in lines, lines[-3000:]



# QEMU's user network, restricted: nothing leaves it; eth0 gets a static address
NIC = ["-netdev", "user,id=n,restrict=on", "-device", "virtio-net-pci,netdev=n"]
# read-only commands compared reply for reply (the time within 2 s)
COMPARED = ["guest-ping", "guest-get-time", "guest-get-host-name", "guest-get-osinfo",
            "guest-get-timezone", "guest-get-users", "guest-get-vcpus",
            "guest-network-get-interfaces", "guest-get-fsinfo", "guest-fsfreeze-status"]


def test_replies_have_qemu_ga_shapes_and_qemu_ga_cannot_shut_a_busybox_guest_down(
        boot, tmp_path, peer_image, pyz):
    disk = fresh_disk(tmp_path)
    vm = boot('arcbox.exec=/test/qemu-ga.sh arcbox.net=eth0:10.0.2.15/24', disk=disk,
              image=peer_image, ports=[vmtool.QEMU_GA_PEER_PORT], qemu_args=NIC)
    ours = connect(vm.qga_sock, timeout=BOOT_TIMEOUT)
    real = connect(vm.port_socket(vmtool.QEMU_GA_PEER_PORT), timeout=BOOT_TIMEOUT)
    version = real.result("guest-info")["version"]
    differences = {}
    for name in COMPARED:
        a, b = ours.result(name), real.result(name)
        if name == "guest-get-time":
            assert abs(a - b) < 2e9, (a, b)
            a = b = 0
        if name == "guest-network-get-interfaces":      # the counters move between calls
            for entry in a + b:
                entry["statistics"] = {k: 0 for k in entry["statistics"]}
        if shape(a) != shape(b) or a != b:
            differences[name] = (a, b)
    eth0 = [i for i in ours.result("guest-network-get-interfaces") if i["name"] == "eth0"][0]
    assert {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24} in \
        eth0["ip-addresses"]
    info_ours, info_real = ours.result("guest-info"), real.result("guest-info")
    assert shape(info_ours) == shape(info_real)
    real_names = {c["name"] for c in info_real["supported_commands"]}
    assert {c["name"] for c in info_ours["supported_commands"]} <= real_names
    for delimited in (False, True):
        for client in (ours, real):
            (client.sync_delimited if delimited else client.sync)()
    assert differences == {}, "replies differ from qemu-ga %s: %r" % (version, differences)
    # the same unknown command: the same error class
    assert ours.call("guest-no-such")["error"]["class"] == \
        real.call("guest-no-such")["error"]["class"] == "CommandNotFound"
    # The host client, one tool for both agents (the test's own connections closed first: a
    # QEMU chardev serves one client at a time). qemu-ga's guest-shutdown runs
    # /sbin/shutdown, which busybox has not: the client says so at once, and the guest stays
    # up; ours powers off, and `--wait` sees it go.
    ours.close()
    real.close()
    cli = lambda *a: subprocess.run(["/usr/bin/python3", pyz] + list(a), capture_output=True,
                                    text=True, timeout=90)
    began = time.monotonic()
    out = cli("shutdown", "--to", "qga:unix:" + vm.port_socket(vmtool.QEMU_GA_PEER_PORT),
              "--wait", "--timeout", "60")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "guest-shutdown: GenericError: " in out.stderr, out.stderr
    assert time.monotonic() - began < 30                  # said, not waited out
    time.sleep(2)
    assert vm.proc.poll() is None
    print("qemu-ga %s guest-shutdown in a busybox guest, by the host client: %s"
          % (version, out.stderr.strip()))
    info = cli("info", "--to", "qga:unix:" + vm.qga_sock)
    assert info.returncode == 0 and "guest agent   %s" % agent.__version__ in info.stdout, info
    out = cli("shutdown", "--to", "qga:unix:" + vm.qga_sock, "--wait")
    assert out.returncode == 0 and out.stdout.startswith("powered off "), (out.stdout,
                                                                          out.stderr)
    assert_powered_off(vm, vm.wait(60))
