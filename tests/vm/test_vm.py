"""The real thing: a real kernel, the .pyz as the real init, real AF_VSOCK (vsock_loopback
inside the guest), real reboot(), a real ext4 disk. The host drives the agent over a
virtio-serial port that QEMU exposes as a Unix socket.

Oracles: QEMU exits by itself with status 0, the console says "reboot: Power down" and no
"Kernel panic" (a panic makes pvpanic exit QEMU with a failure status), and the agent's log
lines on the console show the orderly sequence."""

import json
import os
import random
import re
import socket
import subprocess
import threading
import time

import pytest

import agent
import guestimage
from helpers import VM_LATE, assert_grace_kept
from vmchecks import assert_disk_intact, assert_powered_off, disk_writer, fresh_disk

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 90          # TCG on a loaded machine; a boot takes ~4 s here
STOP_TIMEOUT = 60


def test_host_pings_reads_info_and_powers_off_over_virtio_serial(boot):
    vm = boot()
    ready = vm.wait_ready(BOOT_TIMEOUT)
    assert 0 < ready < BOOT_TIMEOUT
    pong = agent.decode_message(agent.PING_RESPONSE, vm.request(agent.MSG_PING))
    assert pong == {"message": "pong", "version": agent.__version__}
    info = agent.decode_message(agent.SYSTEM_INFO, vm.request(agent.MSG_GET_SYSTEM_INFO))
    assert info["os_name"] == "Linux" and info["kernel_version"].endswith("-amd64")
    assert info["arch"] == "x86_64" and info["cpu_count"] == 1 and info["hostname"] == "arcbox"
    assert 150 << 20 < info["total_memory"] <= 256 << 20
    assert 0 < info["available_memory"] < info["total_memory"] and len(info["load_average"]) == 3
    asked = time.monotonic()
    assert vm.shutdown(grace=5) is True
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    assert time.monotonic() - asked < STOP_TIMEOUT
    lines = vm.messages()
    assert "listening on serial:org.arcbox.agent" in lines
    assert "listening on vsock:any:1024" in lines
    assert any(l.startswith("shutdown: calling reboot(poweroff)") for l in lines)


def test_the_host_client_command_drives_the_guest(boot, pyz):
    vm = boot()
    vm.wait_ready(BOOT_TIMEOUT)
    run = lambda *a: subprocess.run(["/usr/bin/python3", pyz] + list(a) + ["--to",
                                    vm.agent_address], capture_output=True, text=True,
                                    timeout=60)
    out = run("info")
    assert out.returncode == 0 and "hostname      arcbox" in out.stdout, out.stderr
    out = run("shutdown", "--grace", "3")
    assert out.returncode == 0 and "shutdown accepted" in out.stdout, out.stderr
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))


def vsock_client_cmdline(extra=""):
    return ('arcbox.exec="/usr/bin/python3 -S /test/vsock_client.py" ' + extra).strip()


def test_real_af_vsock_in_the_guest_and_the_peer_cid_rule(boot):
    # Default: CID 1 (the guest itself) may ping, not shut down.
    vm = boot(vsock_client_cmdline())
    vm.wait_log("VSOCK-TEST: shutdown", BOOT_TIMEOUT)
    console = vm.console()
    assert "VSOCK-TEST: ping 0x1001" in console and "pong: vsock" in console
    assert re.search(r"VSOCK-TEST: shutdown error 403 shutdown refused: vsock peer cid 1 "
                     r"port \d+ is not allowed", console), console[-2000:]
    assert vm.proc.poll() is None                       # still up
    vm.wait_ready(BOOT_TIMEOUT)
    assert vm.shutdown(grace=2) is True                 # the host may
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))


def test_an_allowed_vsock_peer_powers_the_guest_off(boot):
    vm = boot(vsock_client_cmdline("arcbox.allow=cid:1"))
    status = vm.wait(BOOT_TIMEOUT + STOP_TIMEOUT)
    assert_powered_off(vm, status)
    assert "VSOCK-TEST: shutdown 0x100A b'\\x08\\x01'" in vm.console()
    assert any(l.startswith("shutdown requested (Shutdown from vsock peer cid 1")
               for l in vm.messages())


def test_busybox_poweroff_in_the_guest_goes_through_the_agent(boot):
    vm = boot('arcbox.exec="/bin/sh -c \'sleep 1; exec poweroff\'" arcbox.grace=5')
    assert_powered_off(vm, vm.wait(BOOT_TIMEOUT + STOP_TIMEOUT))
    lines = vm.messages()
    assert any(l.startswith("shutdown requested (signal 12): action poweroff") for l in lines)
    assert any(l.startswith("shutdown: SIGTERM sent to all processes") for l in lines)


def test_ctrl_alt_del_from_the_vmm_powers_off_in_order(boot):
    """The agent turned Ctrl-Alt-Del into SIGINT with reboot(CAD_OFF) at boot; the keyboard
    combination (what Firecracker's SendCtrlAltDel does) then runs the configured action
    through the orderly sequence instead of an instant unsynced restart."""
    vm = boot("arcbox.grace=3")
    vm.wait_ready(BOOT_TIMEOUT)
    vm.monitor_command("sendkey ctrl-alt-delete")
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    lines = vm.messages()
    assert any(l.startswith("shutdown requested (signal 2): action poweroff") for l in lines), \
        lines
    assert any(l.startswith("shutdown: calling reboot(poweroff)") for l in lines)


def test_a_process_ignoring_sigterm_is_named_killed_and_shutdown_wait_sees_qemu_exit(
        boot, pyz):
    """One boot: `shutdown --wait` says when the guest went down, and that agrees with when
    this test saw QEMU exit (the client's own start and connect come before its request);
    the console names the process that held the stop up, before SIGKILL, and has the
    summary line before reboot()."""
    vm = boot('arcbox.exec=/test/ignore_term.sh')
    vm.wait_ready(BOOT_TIMEOUT)
    vm.wait_log("IGNORING-TERM", BOOT_TIMEOUT)
    exited = []
    watcher = threading.Thread(target=lambda: (vm.proc.wait(), exited.append(time.monotonic())),
                               daemon=True)
    watcher.start()
    launched = time.monotonic()
    out = subprocess.run(["/usr/bin/python3", pyz, "shutdown", "--to", vm.agent_address,
                          "--grace", "1", "--wait", "--json"], capture_output=True, text=True,
                         timeout=STOP_TIMEOUT + 30)
    watcher.join(STOP_TIMEOUT)
    assert out.returncode == 0, (out.stdout, out.stderr)
    result = json.loads(out.stdout)
    assert result["gone"] is True and result["seen"].startswith((
        "the connection closed", "the connection was reset")), result   # QEMU's socket ended
    lag = (exited[0] - launched) - result["gone_after_s"]
    print("shutdown --wait: gone %.3f s after the request; QEMU's exit seen here %.3f s after "
          "the client started" % (result["gone_after_s"], exited[0] - launched))
    assert -0.1 <= lag <= 0.5, (lag, result)
    assert 1.0 <= result["gone_after_s"] < STOP_TIMEOUT
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    lines = vm.messages()
    held = [l for l in lines if l.startswith("shutdown: the grace (1s) is over and 1 process "
                                             "still runs: pid ")]
    assert len(held) == 1 and held[0].endswith("(sleep) ignores SIGTERM"), lines
    assert lines.index(held[0]) < lines.index("shutdown: grace over, SIGKILL sent to the rest")
    assert "shutdown: all processes gone after SIGKILL" in lines
    summary = [l for l in lines if l.startswith("shutdown: summary: ")]
    assert len(summary) == 1 and re.search(r"; 1 killed at the grace: pid \d+ \(sleep\); "
                                            r"teardown [0-9.]+s; reboot\(poweroff\) ", summary[0])
    assert lines.index(summary[0]) < next(i for i, l in enumerate(lines)
                                          if l.startswith("shutdown: calling reboot("))


@pytest.mark.parametrize("run", range(3))
def test_nothing_lost_on_an_ext4_disk(boot, tmp_path, run):
    disk = fresh_disk(tmp_path)
    vm = boot('arcbox.exec="/bin/sh -c \'%s\'"' % disk_writer(run), disk=disk,
              log_level="debug")
    vm.wait_log("DISK-WRITTEN-42", BOOT_TIMEOUT)
    vm.wait_ready(BOOT_TIMEOUT)
    assert vm.shutdown(grace=5) is True
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    assert "shutdown: remounted /mnt (ext4) read-only" in vm.messages()
    assert_disk_intact(disk, str(run))


def test_the_acpi_power_button_powers_off_in_order(boot, tmp_path):
    """QEMU's system_powerdown (what libvirt, Proxmox and OpenStack press): the ACPI button
    driver reports it on an input device, the agent runs the orderly sequence. A process
    that exits on TERM goes at once, one that ignores TERM is killed at the grace, a second
    press during the grace changes nothing, the disk written without sync is intact."""
    disk = fresh_disk(tmp_path)
    work = disk_writer("button", then="(sleep 1000 &) && exec /test/ignore_term.sh")
    vm = boot('arcbox.exec="/bin/sh -c \'%s\'" arcbox.grace=2' % work, disk=disk,
              log_level="debug")
    vm.wait_log("IGNORING-TERM", BOOT_TIMEOUT)
    vm.wait_ready(BOOT_TIMEOUT)
    assert any(l.startswith("power button: watching") and "(Power Button)" in l
               for l in vm.messages()), vm.messages()
    vm.monitor_command("system_powerdown")
    vm.wait_log("shutdown: SIGTERM sent", STOP_TIMEOUT)
    vm.monitor_command("system_powerdown")                # pressed again during the grace
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    lines = vm.messages()
    assert sum(1 for l in lines if l.startswith("shutdown requested (power button")) == 1, lines
    assert any("shutdown already in progress" in l and "power button" in l for l in lines)
    assert sum(1 for l in lines if l.startswith("shutdown: SIGTERM sent")) == 1
    assert any(l.startswith("reaped pid") and "killed by signal 15" in l for l in lines)
    assert "shutdown: grace over, SIGKILL sent to the rest" in lines
    assert_grace_kept(vm.events(), 2.0, most=VM_LATE)   # TCG: a slow vCPU wakes late
    assert_disk_intact(disk, "button")


def test_with_the_power_button_switched_off_a_press_is_ignored(boot):
    vm = boot("arcbox.power_button=0")
    vm.wait_ready(BOOT_TIMEOUT)
    vm.monitor_command("system_powerdown")
    time.sleep(2.0)
    assert vm.proc.poll() is None, "the guest went down although the button is off"
    assert vm.request(agent.MSG_PING)
    assert not any("power button" in l or "shutdown requested" in l for l in vm.messages())
    assert vm.shutdown(grace=2) is True                   # stopped the other way
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))


def test_the_host_is_told_ready_and_the_exit_status_through_smbios_and_vsock(boot):
    """systemd's VM interface: the notify address arrives as an SMBIOS type 11 credential
    (as systemd-vmspawn passes it); `vsock:1:5555` tries a datagram (vsock_loopback has
    none), then seqpacket, where a receiver in the guest stands in for the host. The
    workload's exit status (3) ends the guest and is what the host is told."""
    vm = boot("rdinit=/notify-init arcbox.on_exit=poweroff arcbox.grace=2 "
              "arcbox.exec=\"/bin/sh -c 'sleep 2; exit 3'\"",
              qemu_args=guestimage.notify_smbios_args())
    assert_powered_off(vm, vm.wait(BOOT_TIMEOUT + STOP_TIMEOUT))
    console = vm.console()
    got = [l.split(": ", 1)[1] for l in console.splitlines() if "NOTIFY-RECEIVED at" in l]
    assert len(got) == 2, console[-3000:]
    ready = dict(f.split("=", 1) for f in got[0].split(" | ") if "=" in f)
    assert ready["READY"] == "1" and ready["X_SYSTEMD_HOSTNAME"] == "arcbox"
    assert "serving on serial:org.arcbox.agent" in ready["STATUS"]
    assert got[1].startswith("X_SYSTEMD_SHUTDOWN=poweroff | EXIT_STATUS=3"), got[1]
    assert "notify: telling the host at vsock:1:5555" in vm.messages()
    assert "shutdown: poweroff, exit status 3" in vm.messages()


def test_dhcp_through_udhcpc_gives_an_address_and_shutdown_stays_orderly(boot):
    """QEMU's user network, restricted (QEMU answers DHCP itself; nothing leaves the QEMU
    process): arcbox.net=dhcp runs busybox udhcpc with the .pyz as its script; the address
    shows in GetSystemInfo; at shutdown udhcpc is TERMed and reaped like anybody else."""
    vm = boot("arcbox.net=dhcp", log_level="debug",
              qemu_args=["-netdev", "user,id=n,restrict=on", "-device",
                         "virtio-net-pci,netdev=n"])
    ready = vm.wait_ready(BOOT_TIMEOUT)
    deadline = time.monotonic() + 20
    while True:
        info = agent.decode_message(agent.SYSTEM_INFO, vm.request(agent.MSG_GET_SYSTEM_INFO))
        if "10.0.2.15" in info["ip_addresses"]:
            break
        assert time.monotonic() < deadline, (info["ip_addresses"], vm.console()[-3000:])
        time.sleep(0.1)
    took = time.monotonic() - vm.started - ready
    assert took < 10, "the lease came %.1fs after the agent served" % took
    vm.wait_log("dhcp: eth0 10.0.2.15/24", 10)   # the script logs it after setting it
    lines = vm.messages()
    # (restrict=on: QEMU's DHCP offers no router, so no default route: "via" only if it did)
    assert any(l.startswith("dhcp: eth0 10.0.2.15/24") for l in lines), lines
    assert "network: lo up" in lines
    assert vm.shutdown(grace=5) is True
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    lines = vm.messages()
    assert "udhcpc: received SIGTERM" in vm.console()              # it handles TERM itself
    assert "udhcpc exited with status 0 during shutdown" in lines, lines
    assert "shutdown: grace over, SIGKILL sent to the rest" not in lines


def test_pid1_survives_a_flood_of_bad_frames_then_powers_off(boot):
    vm = boot()
    vm.wait_ready(BOOT_TIMEOUT)
    rnd = random.Random(1234)
    floods = [bytes(rnd.getrandbits(8) for _ in range(200000)),
              b"\xff" * 50000,
              b"\x00\x00\x00\x08\x00\x00\x00\x01",              # a header without its body
              agent.encode_frame(0x0777, b"junk") * 100,         # well framed, unknown type
              agent.encode_frame(agent.MSG_PING, b"\x0a\x09bad") * 100]
    for chunk in floods:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(vm.sock)
        s.sendall(chunk)
        s.close()
    # A host retries a Ping that got no answer, as the ArcBox host's boot probe does: the
    # first may be swallowed by a plausible-looking garbage frame (dropped after 0.5 s).
    vm.wait_ready(30)
    pong = agent.decode_message(agent.PING_RESPONSE, vm.request(agent.MSG_PING))
    assert pong["message"] == "pong"
    assert vm.proc.poll() is None
    assert vm.shutdown(grace=2) is True
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    lines = vm.messages()
    assert any("garbage in the stream; resynchronising" in l for l in lines)
    assert not any("internal error" in l for l in lines)


def test_the_main_job_demo_boots_and_powers_off_a_vm(guest_image, tmp_path):
    build = os.path.join(os.path.dirname(__file__), "..", "..", "build.py")
    out = subprocess.run(["/usr/bin/python3", build, "-o", str(tmp_path / "a.pyz"), "--demo",
                          "vm"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    assert "grace over: SIGKILL sent" in out.stdout and "reboot(POWER_OFF) called" in out.stdout
    assert "outcome: QEMU exited by itself (status 0)" in out.stdout
    # one clock per list: the agent's timeline is in order and holds no other clock's line
    timeline = out.stdout.split("timeline (agent log")[1].split("\n\n")[0]
    stamps = [float(line.split()[0]) for line in timeline.splitlines()[1:] if line.strip()]
    assert len(stamps) >= 5 and stamps == sorted(stamps), timeline


def test_kmsg_logging_reaches_the_kernel_log(boot):
    # (the kernel cmdline has no escapes: the pattern uses dots for its spaces)
    vm = boot('arcbox.kmsg=1 arcbox.exec="/bin/sh -c \'sleep 0.5; '
              'dmesg | grep -q arcbox-agent:.listening.on.serial && echo KMSG-$((6*7))\'"')
    vm.wait_log("KMSG-42", BOOT_TIMEOUT)
    vm.wait_ready(BOOT_TIMEOUT)
    assert vm.shutdown(grace=2) is True
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
