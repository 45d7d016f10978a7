"""The power button's pieces: KEY_POWER in a capability bitmap, input events, the device
source fed by a pipe (presses, drops, garbage), which devices are opened, and one that
appears later (its uevent)."""

import os
import socket
import struct

import pytest

import agent

EVENT = struct.Struct("llHHi")


def event(ev_type, code, value):
    return EVENT.pack(0, 0, ev_type, code, value)


# --- capabilities and events ------------------------------------------------------------

@pytest.mark.parametrize("bitmap,has_power", [
    ("10000000000000 0", True),                          # QEMU's ACPI "Power Button"
    ("402000000 3803078f800d001 feffffdfffefffff fffffffffffffffe", True),  # a PC keyboard
    ("0", False),                                        # a device with no keys
    ("4 0", False),                                      # another key in the same word
    ("", False),
    ("zz 0", False),                                     # garbage is a no
])
def test_key_power_in_a_capability_bitmap(bitmap, has_power):
    assert agent.has_key(bitmap, agent.KEY_POWER) is has_power


def test_only_a_press_of_key_power_counts():
    data = (event(1, 116, 1) + event(0, 0, 0) + event(1, 116, 0) + event(1, 116, 2)
            + event(1, 30, 1) + event(4, 116, 1))
    assert agent.power_presses(data) == (1, 0)           # press yes; release, repeat, others no
    assert agent.power_presses(data + b"\x01\x02\x03") == (1, 3)   # stray bytes are counted


def test_the_device_source_presses_drops_and_survives_garbage(tmp_path):
    presses = []
    buttons = agent.PowerButtons(presses.append, sysfs=str(tmp_path), devices=str(tmp_path))
    r, w = os.pipe()
    os.set_blocking(r, False)
    buttons.open_fds[r] = ("event7", "Power Button")
    os.write(w, os.urandom(5000).replace(b"\x74", b"\x00"))   # garbage, no 116 anywhere
    for _ in range(4):                                    # 5000 bytes: four reads, a short one
        buttons._on_device(r, 0)
    assert presses == []
    os.write(w, event(1, 116, 1) + event(1, 116, 0))
    buttons._on_device(r, 0)
    assert presses == ["event7 (Power Button)"]
    buttons._on_device(r, 0)                              # nothing to read: no spin, no drop
    assert r in buttons.open_fds
    os.close(w)                                           # the device goes away
    buttons._on_device(r, 0)
    assert buttons.open_fds == {}


def test_scan_opens_only_devices_with_key_power(tmp_path):
    for name, caps in (("event0", "10000000000000 0"), ("event1", "0"), ("event2", "bad")):
        (tmp_path / "sys" / name / "device" / "capabilities").mkdir(parents=True)
        (tmp_path / "sys" / name / "device" / "capabilities" / "key").write_text(caps + "\n")
        (tmp_path / "sys" / name / "device" / "name").write_text("dev %s\n" % name)
        (tmp_path / "dev").mkdir(exist_ok=True)
        (tmp_path / "dev" / name).write_bytes(b"")
    buttons = agent.PowerButtons(lambda d: None, sysfs=str(tmp_path / "sys"),
                                 devices=str(tmp_path / "dev"))
    buttons.scan()
    assert sorted(n for n, _ in buttons.open_fds.values()) == ["event0"]
    buttons.scan()                                        # a rescan does not open it twice
    assert len(buttons.open_fds) == 1
    buttons.close()




def test_a_device_that_appears_later_is_picked_up_on_its_uevent(tmp_path):
    """A module loaded after boot (evdev, button) makes its device later: the kernel's
    uevent (here through a socketpair standing in for the netlink socket) triggers a scan."""
    sysfs, devices = tmp_path / "sys", tmp_path / "dev"
    sysfs.mkdir()
    devices.mkdir()
    buttons = agent.PowerButtons(lambda d: None, sysfs=str(sysfs), devices=str(devices))
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    buttons.uevents = ours
    buttons.scan()
    assert buttons.open_fds == {} and buttons.deadline() is None    # no polling meanwhile
    caps = sysfs / "event3" / "device" / "capabilities"
    caps.mkdir(parents=True)
    (caps / "key").write_text("10000000000000 0\n")
    (sysfs / "event3" / "device" / "name").write_text("Power Button\n")
    (devices / "event3").write_bytes(b"")
    kernel.send(b"add@/devices/LNXSYSTM:00/LNXPWRBN:00/input/input3/event3\0ACTION=add\0"
                b"SUBSYSTEM=input\0DEVNAME=input/event3\0")
    buttons._on_uevent(None, 0)
    assert [n for n, _ in buttons.open_fds.values()] == ["event3"]
    kernel.send(b"change@/devices/x\0ACTION=change\0SUBSYSTEM=power_supply\0")
    buttons._on_uevent(None, 0)                                       # others: ignored
    assert len(buttons.open_fds) == 1
    buttons.close()
    kernel.close()
