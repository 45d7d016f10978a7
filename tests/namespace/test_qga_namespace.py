"""QGA over a Unix socket, the real .pyz as PID 1 of a PID namespace: every command's reply
shape, every kind of bad input, who may run what, guest-shutdown's orderly power-off, and
fsfreeze on a disk the guest mounted (a write waits while frozen; a forgotten freeze is
thawed; a freeze does not survive a power-off)."""

import os
import shlex
import subprocess
import time

import pytest

from helpers import wait_for
from nsguest import POWER_OFF_RETURNCODE, REBOOT_RETURNCODE
import storagecheck
from qgaclient import connect

pytestmark = pytest.mark.namespace


def qga_guest(guest, tmp_path, *args, **options):
    sock = str(tmp_path / "qga.sock")
    g = guest(agent_args=["--qga", "unix:" + sock] + list(args), **options)
    return g, connect(sock, timeout=30)


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def test_every_command_answers_in_qemu_ga_shape(guest, tmp_path):
    g, c = qga_guest(guest, tmp_path)
    c.sync_delimited()
    assert c.result("guest-ping") == {}
    info = c.result("guest-info")
    assert set(info) == {"version", "supported_commands"}
    assert all(set(cmd) == {"enabled", "name", "success-response"}
               for cmd in info["supported_commands"])
    now = c.result("guest-get-time")
    assert is_int(now) and abs(now / 1e9 - time.time()) < 5
    assert set(c.result("guest-get-host-name")) == {"host-name"}
    osinfo = c.result("guest-get-osinfo")
    assert osinfo["kernel-release"] == os.uname().release and osinfo["machine"]
    tz = c.result("guest-get-timezone")
    assert is_int(tz["offset"]) and set(tz) <= {"offset", "zone"}
    assert isinstance(c.result("guest-get-users"), list)
    cpus = c.result("guest-get-vcpus")
    assert len(cpus) == os.cpu_count()
    assert all(set(cpu) == {"online", "can-offline", "logical-id"} for cpu in cpus)
    ifaces = {i["name"]: i for i in c.result("guest-network-get-interfaces")}
    lo = ifaces["lo"]
    assert {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8} in \
        lo["ip-addresses"]
    assert lo["hardware-address"] == "00:00:00:00:00:00"
    assert set(lo["statistics"]) == {"rx-bytes", "rx-packets", "rx-errs", "rx-dropped",
                                     "tx-bytes", "tx-packets", "tx-errs", "tx-dropped"}
    # the host's filesystems are not this guest's: none is listed, none can be frozen
    assert c.result("guest-get-fsinfo") == []
    assert c.result("guest-fsfreeze-status") == "thawed"
    assert c.result("guest-fsfreeze-freeze") == 0
    assert c.result("guest-fsfreeze-freeze-list", {"mountpoints": ["/"]}) == 0  # left out
    assert c.call("guest-exec", {"path": "/bin/sh"}, id="e") == {      # off by default
        "error": {"class": "CommandNotFound", "desc": "Command guest-exec has been disabled: "
                                                      "the command is not allowed"}, "id": "e"}
    assert "clock is set only by the host" in c.call("guest-set-time")["error"]["desc"]
    assert b"pong" in g.request(0x0001)          # ArcBox still answers beside it


def test_bad_input_of_every_kind_never_hurts_pid1(guest, tmp_path):
    g, c = qga_guest(guest, tmp_path, "--max-frame", "4096")
    bad = [
        (b"garbage\n", "stray 'garbage'"),
        (b'{"execute": "guest-sync", "arguments": {"id": "a', None),       # then 0xFF
        (b'\xff{"execute": "guest-ping", "arguments": "x"}', "'arguments' must be an object"),
        (b'{"execute": "guest-ping", "pad": "' + b"x" * 10000 + b'"}', "larger than 4096"),
        (b"[" * 200 + b"]" * 200, "nesting deeper"),
        (b'{"execute": "guest-sync", "arguments": {"id": 1.5}}', "expected: integer"),
        (b'{"execute": "guest-sync", "arguments": {}}', "Parameter 'id' is missing"),
        (b'{"execute": "guest-nonsense"}', "has not been found"),
        (b'{"execute": "guest-ping"', None),                               # the client leaves
    ]
    for raw, desc in bad:
        c.send(raw)
        if desc is not None:
            answer = c.read_answer()
            assert desc in answer["error"]["desc"], (raw[:60], answer)
    c.close()
    c = connect(str(tmp_path / "qga.sock"))
    c.sync()
    assert c.result("guest-ping") == {}
    assert g.proc.poll() is None and b"pong" in g.request(0x0001)
    assert not any("internal error" in line for line in g.messages())


def test_guest_shutdown_is_refused_to_a_peer_not_allowed_and_runs_in_order_otherwise(
        guest, tmp_path):
    g, c = qga_guest(guest, tmp_path, "--allow", "cid:2")
    answer = c.call("guest-shutdown")
    assert "not allowed" in answer["error"]["desc"]
    assert "not allowed" in c.call("guest-fsfreeze-freeze")["error"]["desc"]
    g.close()
    g, c = qga_guest(guest, tmp_path, "--grace", "3",
                     setup="sh -c 'trap \"echo TERMED; exit 0\" TERM; "
                           "while :; do sleep 0.05; done' & ")
    assert c.call("guest-shutdown", reply=False) is None
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    msgs = g.messages()
    started = [m for m in msgs if m.startswith("shutdown requested (guest-shutdown from "
                                                "unix peer")]
    assert started and "action poweroff, grace 3s" in started[0], msgs
    # in order: the workload had its SIGTERM, said so and exited, so no SIGKILL was needed
    log = g.log()
    assert log.count("TERMED") == 1, log
    assert log.index("SIGTERM sent") < log.index("TERMED"), log
    assert not any("SIGKILL sent" in m for m in msgs), msgs
    g, c = qga_guest(guest, tmp_path)
    c.call("guest-shutdown", {"mode": "reboot"}, reply=False)
    assert g.wait(timeout=30) == REBOOT_RETURNCODE


@pytest.fixture
def data_image(tmp_path):
    image = str(tmp_path / "data.img")
    storagecheck.mkfs(image, 32 << 20)
    return image


def test_fsfreeze_holds_writes_until_thaw_and_a_forgotten_freeze_is_thawed(
        guest, tmp_path, data_image):
    mnt = str(tmp_path / "data")
    os.makedirs(mnt)
    # the workload mounts the disk after the agent started (the agent spares what it found)
    # and writes a counter; each write waits while the filesystem is frozen
    script = """
set -e
mount -o loop {img} {m}
i=0
touch {m}/.ready
while :; do i=$((i+1)); echo $i > {m}/counter.new; mv {m}/counter.new {m}/counter; sleep 0.02; done
""".format(img=shlex.quote(data_image), m=shlex.quote(mnt))
    g, c = qga_guest(guest, tmp_path, "--freeze-timeout", "2", "--exec", "sh", "-c", script)
    inside = "/proc/%d/root%s" % (g.init_pid(), mnt)
    wait_for(lambda: os.path.exists(inside + "/counter"), timeout=30, what="the writer")

    def counter():
        with open(inside + "/counter") as f:
            return int(f.read() or 0)
    fs = c.result("guest-get-fsinfo")
    assert [(f["mountpoint"], f["type"]) for f in fs] == [(mnt, "ext4")], fs
    assert fs[0]["total-bytes"] > fs[0]["used-bytes"] > 0
    assert c.result("guest-fsfreeze-freeze-list", {"mountpoints": [mnt]}) == 1
    assert c.result("guest-fsfreeze-status") == "frozen"
    time.sleep(0.3)
    held = counter()
    time.sleep(1.0)
    assert counter() == held, "a write went through while the disk was frozen"
    assert c.result("guest-fsfreeze-thaw") == 1
    wait_for(lambda: counter() > held + 5, timeout=10, what="writes after the thaw")
    # the host forgets to thaw: --freeze-timeout 2 thaws it, logged
    assert c.result("guest-fsfreeze-freeze") == 1
    frozen_at = time.monotonic()
    held = counter()
    wait_for(lambda: counter() > held + 5, timeout=15, what="the timeout's thaw")
    assert time.monotonic() - frozen_at >= 1.9
    assert c.result("guest-fsfreeze-status") == "thawed"
    assert any("did not thaw them; thawing (--freeze-timeout)" in m for m in g.messages())
    # frozen when the power-off comes: thawed first, then torn down; the disk ends clean
    assert c.result("guest-fsfreeze-freeze") == 1
    c.call("guest-shutdown", reply=False)
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    msgs = g.messages()
    thawed = msgs.index("shutdown: %s was frozen; thawed it" % mnt)      # by the errand
    assert thawed < next(i for i, m in enumerate(msgs) if "SIGTERM sent" in m), msgs
    fsck = subprocess.run(["e2fsck", "-fn", data_image], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_guest_exec_children_are_pid1s_reaped_and_killed_at_the_grace(guest, tmp_path):
    """A guest-exec'd program is PID 1's child like any other: its output comes back, its
    exit is reaped; one that ignores SIGTERM is named and SIGKILLed at the grace of an
    orderly power-off, which then completes."""
    g, c = qga_guest(guest, tmp_path, "--qga-allow", "default,guest-exec,guest-exec-status")
    started = c.result("guest-exec", {"path": "/bin/sh", "arg": ["-c", "echo $$; exit 4"],
                                      "capture-output": True})
    for _ in range(200):
        status = c.result("guest-exec-status", {"pid": started["pid"]})
        if status["exited"]:
            break
        time.sleep(0.05)
    import base64
    assert status["exitcode"] == 4
    assert base64.b64decode(status["out-data"]).decode().strip() == str(started["pid"])
    stubborn = c.result("guest-exec", {"path": "/bin/sh", "arg": [
        "-c", "trap '' TERM; while :; do sleep 0.1; done"]})["pid"]
    time.sleep(0.3)
    assert g.shutdown(grace=1) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    log = g.messages()
    held = [m for m in log if "is over and" in m]
    assert len(held) == 1 and "pid %d (sh) ignores SIGTERM" % stubborn in held[0], log
    assert any("guest-exec: pid %d" % stubborn in m for m in log), log
