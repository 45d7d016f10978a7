"""QGA conformance in a rich guest, one boot: qemu-ga 10.0 (Debian 13's, through its own
loader) on a second port of the same guest as the agent, in a guest with something to compare
-- two vCPUs, a partitioned disk, a bind mount, a loop device, a device-mapper disk, a second
route, logged-in users (utmp), an os-release with quotes and escapes, a time zone, users with
SSH keys (tools/guest/rich_guest.sh, tests/vm/conftest.py's rich_files).

- read-only commands: the replies compared whole, value by value (named exceptions: counters,
  compared between two of qemu-ga's readings; the load averages asked again across their 5 s
  tick);
- control commands by their effect, each agent's change read back by the other: a vCPU taken
  offline and back, a password set (the shadow entry), keys added and removed (the file's
  bytes, mode and owner), the RTC written by guest-set-time, a trim's shape; bad arguments'
  error texts compared; the frozen state's refusals compared;
- a KubeVirt-style poller (its required commands, then load, CPU and disk statistics, disks
  and routes at its intervals, compressed) and a Proxmox-style session (fstrim, exec with
  output, a file written and read back, set-user-password) against the agent."""

import base64
import json
import struct
import time

import pytest

import vm as vmtool
from helpers import between_readings, wait_for
from qgaclient import connect

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 180
NIC = ["-netdev", "user,id=n,restrict=on", "-device", "virtio-net-pci,netdev=n"]
ALLOW = ("default,guest-exec,guest-exec-status,guest-file-open,guest-file-read,"
         "guest-file-write,guest-file-close,guest-file-seek,guest-file-flush,"
         "guest-set-user-password,guest-ssh-add-authorized-keys,"
         "guest-ssh-remove-authorized-keys")


def partitioned_disk(path):
    """64 MiB with an MBR: vda1 (32 MiB, ext4, made here) and vda2 (the rest, for dm)."""
    import subprocess
    sector, first, size1 = 512, 2048, 65536
    size2 = (64 << 20) // sector - first - size1
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        mbr = bytearray(512)
        for i, (start, count) in enumerate(((first, size1), (first + size1, size2))):
            # status, CHS (unused: LBA), type 0x83 (Linux), CHS, first LBA, sectors
            mbr[446 + 16 * i:462 + 16 * i] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff",
                                                          0x83, b"\xfe\xff\xff", start, count)
        mbr[510:512] = b"\x55\xaa"
        f.seek(0)
        f.write(mbr)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "offset=%d" % (first * sector), path,
                    "%dk" % (size1 * sector // 1024)], check=True, timeout=60)
    return path


def ask_both(ours, real, name, args=None):
    return ours.call(name, args), real.call(name, args)


def strip_ids(answer):
    answer.pop("id", None)
    return answer


def run(client, path, *args, data=None):
    arguments = {"path": path, "arg": list(args), "capture-output": True}
    if data is not None:
        arguments["input-data"] = base64.b64encode(data).decode()
    pid = client.result("guest-exec", arguments)["pid"]
    for _ in range(600):
        status = client.result("guest-exec-status", {"pid": pid})
        if status["exited"]:
            out = base64.b64decode(status.get("out-data", "")).decode()
            return status.get("exitcode"), out
        time.sleep(0.05)
    raise AssertionError("%s %r did not exit" % (path, args))


def read_file(client, path):
    handle = client.result("guest-file-open", {"path": path, "mode": "r"})
    data = b""
    while True:
        chunk = client.result("guest-file-read", {"handle": handle, "count": 65536})
        data += base64.b64decode(chunk["buf-b64"])
        if chunk["eof"]:
            break
    client.result("guest-file-close", {"handle": handle})
    return data


def named_differences(name, ours, real):
    """Where we differ on purpose (docs/qga.md): os-release values in single quotes or with
    an escaped space outside quotes are unquoted as os-release(5) and a shell say, where
    qemu-ga 10 cuts them at the first space ("'ArcBox", "rich\\"); a device-mapper disk's
    alias and a disk's serial come from sysfs, where qemu-ga asks udev's database, which a
    guest without udevd has not. Those fields are checked here and left out of the rest."""
    ours, real = json.loads(json.dumps(ours)), json.loads(json.dumps(real))
    if name == "guest-get-osinfo" and "return" in ours:
        assert ours["return"]["name"] == "ArcBox Linux" and real["return"]["name"] == "'ArcBox"
        assert ours["return"]["variant-id"] == "rich guest"
        assert real["return"]["variant-id"] == "rich\\"
        for key in ("name", "variant-id"):
            ours["return"].pop(key)
            real["return"].pop(key)
    if name == "guest-get-disks" and "return" in ours:
        for entry in ours["return"]:
            if entry["name"] == "/dev/dm-0":
                assert entry.pop("alias") == "lv0"
            entry.get("address", {}).pop("serial", None)
    return ours, real


COMPARED_EXACTLY = ["guest-get-osinfo", "guest-get-timezone", "guest-get-users",
                    "guest-get-vcpus", "guest-get-host-name", "guest-get-memory-blocks",
                    "guest-get-memory-block-info", "guest-network-get-route",
                    "guest-get-disks", "guest-get-fsinfo", "guest-fsfreeze-status",
                    "guest-ssh-get-authorized-keys"]
BETWEEN = ["guest-get-cpustats", "guest-get-diskstats", "guest-network-get-interfaces"]


def test_the_agent_and_qemu_ga_10_agree_in_a_rich_guest(boot, tmp_path, rich_image):
    disk = partitioned_disk(str(tmp_path / "disk.img"))
    vm = boot("arcbox.exec=/test/rich_guest.sh arcbox.net=eth0:10.0.2.15/24:10.0.2.2 "
              "arcbox.qga_allow=" + ALLOW, disk=disk, image=rich_image,
              ports=[vmtool.QEMU_GA_PEER_PORT], modules=["loop", "dm_mod"],
              qemu_args=NIC + ["-smp", "2"])
    vm.wait_log("RICH-GUEST-READY-42", BOOT_TIMEOUT)
    ours = connect(vm.qga_sock, timeout=BOOT_TIMEOUT)
    real = connect(vm.port_socket(vmtool.QEMU_GA_PEER_PORT), timeout=BOOT_TIMEOUT)
    assert real.result("guest-info")["version"].startswith("10.0")
    report = {}

    # ---- read-only: value by value
    differences = {}
    for name in COMPARED_EXACTLY + ["guest-get-load"]:
        args = {"username": "alice"} if name == "guest-ssh-get-authorized-keys" else None
        for _ in range(3):
            a, b = ask_both(ours, real, name, args)
            if a == b:
                break
        report[name] = b
        a, b = named_differences(name, a, b)
        if a != b:
            differences[name] = (a, b)
    if differences:
        with open(str(tmp_path / "differences.json"), "w") as f:
            json.dump(differences, f, indent=1)
    assert differences == {}, json.dumps(differences, indent=1)[:8000]
    for name in BETWEEN:
        first, a, second = real.call(name), ours.call(name), real.call(name)
        between_readings(first["return"], a["return"], second["return"], name)
    # what the rich guest has, seen in the replies
    osinfo = report["guest-get-osinfo"]["return"]
    assert osinfo["pretty-name"] == 'Arc "Box" Linux 1.0 (test)'
    assert osinfo["variant"] == "Rich \\ Guest" and osinfo["version"] == "1.0 ($pecial `quoted`)"
    assert [u["user"] for u in report["guest-get-users"]["return"]] == ["alice", "bob"]
    assert report["guest-get-timezone"]["return"]["zone"] in ("CET", "CEST")
    assert len(report["guest-get-vcpus"]["return"]) == 2
    fs = {f["mountpoint"]: f for f in report["guest-get-fsinfo"]["return"]}
    assert set(fs) == {"/data", "/dm", "/loop"}      # /bind is /data's: listed once
    assert fs["/data"]["name"] == "vda1" and fs["/data"]["disk"][0]["dev"] == "/dev/vda1"
    assert fs["/dm"]["name"] == "dm-0" and fs["/dm"]["disk"][0]["dev"] == "/dev/vda2"
    assert fs["/loop"]["name"] == "loop0" and fs["/loop"]["disk"] == []
    disks = {d["name"]: d for d in report["guest-get-disks"]["return"]}
    assert disks["/dev/vda2"] == {"name": "/dev/vda2", "partition": True,
                                  "dependencies": ["/dev/vda"]}
    assert disks["/dev/dm-0"]["dependencies"] == ["/dev/vda2"]
    routes = report["guest-network-get-route"]["return"]
    assert {"destination": "192.168.50.0", "gateway": "10.0.2.2", "metric": 7} in [
        {k: r.get(k) for k in ("destination", "gateway", "metric")} for r in routes]
    assert report["guest-ssh-get-authorized-keys"]["return"]["keys"] == [
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC2 two@host",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOne one@host"]

    # ---- bad arguments: the same error texts
    bad = [("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": False}]}),
           ("guest-set-vcpus", {"vcpus": [{"logical-id": 9, "online": True}]}),
           ("guest-set-vcpus", {"vcpus": [{"logical-id": 0}]}),
           ("guest-set-memory-blocks", {"mem-blks": [{"phys-index": 99999, "online": True}]}),
           ("guest-ssh-get-authorized-keys", {"username": "nobody-here"}),
           ("guest-ssh-add-authorized-keys", {"username": "alice", "keys": ["#not a key"]}),
           ("guest-ssh-remove-authorized-keys", {"username": "nobody-here", "keys": ["k"]}),
           ("guest-set-user-password", {"username": "a:b", "password": "eA==",
                                        "crypted": False}),
           ("guest-set-user-password", {"username": "alice", "password": "eAp5",
                                        "crypted": False}),
           ("guest-set-user-password", {"username": "alice", "password": "%%",
                                        "crypted": False}),
           ("guest-set-user-password", {"username": "nobody-here", "password": "eA==",
                                        "crypted": False}),
           ("guest-set-time", {"time": 4102444800 * 10 ** 9}),
           ("guest-fstrim", {"minimum": "x"})]
    differences = []
    for name, args in bad:
        a, b = ask_both(ours, real, name, args)
        report.setdefault("errors", []).append((name, args, b))
        if a != b:
            differences.append((name, args, a, b))
    assert differences == [], json.dumps(differences, indent=1)
    # frozen (a mount point not mounted left out): what each refuses, then the thaw
    frozen = []
    for client in (ours, real):
        count = client.result("guest-fsfreeze-freeze-list", {"mountpoints": ["/dm", "/nowhere"]})
        frozen.append((count, client.call("guest-get-osinfo"), client.call("guest-fstrim"),
                       client.result("guest-fsfreeze-status")))
        assert client.result("guest-fsfreeze-thaw") == count
    assert frozen[0] == frozen[1], frozen
    assert frozen[0][0] == 1 and frozen[0][3] == "frozen"
    report["frozen"] = frozen[1]

    # ---- control commands by their effect, each read back by the other agent
    assert ours.result("guest-set-vcpus", {"vcpus": [{"logical-id": 1, "online": False}]}) == 1
    assert [c["online"] for c in real.result("guest-get-vcpus")] == [False, True]
    assert real.result("guest-set-vcpus", {"vcpus": [{"logical-id": 1, "online": True}]}) == 1
    assert [c["online"] for c in ours.result("guest-get-vcpus")] == [True, True]

    crypted = "$6$salt$" + "x" * 86
    for client, user in ((ours, "alice"), (real, "bob")):
        assert client.result("guest-set-user-password", {
            "username": user, "password": base64.b64encode(crypted.encode()).decode(),
            "crypted": True}) == {}
    shadow = read_file(ours, "/etc/shadow").decode()
    entries = {line.split(":")[0]: line.split(":")[1] for line in shadow.splitlines()}
    assert entries["alice"] == entries["bob"] == crypted
    for client, user in ((ours, "alice"), (real, "bob")):
        assert client.result("guest-set-user-password", {
            "username": user, "password": base64.b64encode(b"s3cret pass").decode(),
            "crypted": False}) == {}
    entries = {line.split(":")[0]: line.split(":")[1]
               for line in read_file(ours, "/etc/shadow").decode().splitlines()}
    assert entries["alice"].split("$")[1] == entries["bob"].split("$")[1]   # one algorithm
    assert entries["alice"] != crypted
    report["shadow"] = {u: entries[u][:3] + "..." for u in ("alice", "bob")}

    new_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINewKey new@host"
    keys_after = {}
    for client, user in ((ours, "alice"), (real, "bob")):
        path = "/home/%s/.ssh/authorized_keys" % user
        assert client.result("guest-ssh-add-authorized-keys", {
            "username": user, "keys": [new_key, new_key]}) == {}
        added = read_file(ours, path)
        assert client.result("guest-ssh-remove-authorized-keys", {
            "username": user, "keys": ["ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC2 two@host"]}) == {}
        removed = read_file(ours, path)
        assert client.result("guest-ssh-add-authorized-keys", {
            "username": user, "keys": [new_key], "reset": True}) == {}
        reset = read_file(ours, path)
        mode = run(ours, "/bin/busybox", "stat", "-c", "%a %u %g", path)[1].strip()
        keys_after[user] = (added, removed, reset, mode)
        # a user without .ssh: made for them
        run(ours, "/bin/busybox", "rm", "-rf", "/home/%s/.ssh" % user)
        assert client.result("guest-ssh-add-authorized-keys", {
            "username": user, "keys": [new_key]}) == {}
        keys_after[user] += (read_file(ours, path),
                             run(ours, "/bin/busybox", "stat", "-c", "%a", "/home/%s/.ssh" % user)[1])
    alice, bob = keys_after["alice"], keys_after["bob"]
    assert alice[:3] + alice[4:5] == bob[:3] + bob[4:5], keys_after
    assert alice[3] == "600 1000 1000" and bob[3] == "600 1001 1001", keys_after
    assert alice[5] == bob[5] == "700\n", keys_after
    report["keys"] = {"bob": [k.decode() if isinstance(k, bytes) else k for k in bob]}

    # the RTC: written by guest-set-time with a time (qemu-ga: `hwclock -w`, UTC by
    # /etc/adjtime), read back by the other's guest-set-time without one
    for setter, reader, hours in ((ours, real, 1), (real, ours, 2)):
        target = time.time_ns() - hours * 3600 * 10 ** 9
        assert setter.result("guest-set-time", {"time": target}) == {}
        assert reader.result("guest-set-time") == {}
        behind = time.time() - reader.result("guest-get-time") / 1e9
        assert hours * 3600 - 5 < behind < hours * 3600 + 5, (hours, behind)
    assert ours.result("guest-set-time", {"time": time.time_ns()}) == {}

    # fstrim: the same paths, each trimmed or refused the same way
    a, b = ours.result("guest-fstrim"), real.result("guest-fstrim")
    report["guest-fstrim"] = b
    assert [p["path"] for p in a["paths"]] == [p["path"] for p in b["paths"]]
    for x, y in zip(a["paths"], b["paths"]):
        assert set(x) == set(y) and x.get("error") == y.get("error"), (x, y)
    print("qemu-ga 10.0 in the rich guest:", json.dumps(report, indent=1)[:20000])


KUBEVIRT_REQUIRED = ("guest-shutdown", "guest-network-get-interfaces", "guest-get-fsinfo",
                     "guest-get-osinfo", "guest-get-users", "guest-get-timezone",
                     "guest-get-host-name", "guest-info", "guest-ping")


def test_a_kubevirt_poller_and_a_proxmox_session(boot, tmp_path, rich_image):
    disk = partitioned_disk(str(tmp_path / "disk.img"))
    vm = boot("arcbox.exec=/test/rich_guest.sh arcbox.net=eth0:10.0.2.15/24:10.0.2.2 "
              "arcbox.qga_allow=default,guest-exec,guest-exec-status,guest-file-open,"
              "guest-file-read,guest-file-write,guest-file-close,guest-set-user-password",
              disk=disk, image=rich_image, ports=[vmtool.QEMU_GA_PEER_PORT],
              modules=["loop", "dm_mod"], qemu_args=NIC + ["-smp", "2"])
    vm.wait_log("RICH-GUEST-READY-42", BOOT_TIMEOUT)
    # KubeVirt: the required commands enabled, then its pollers (120 s, 20 s, 5 min: here
    # three rounds, back to back)
    kubevirt = connect(vm.qga_sock, timeout=BOOT_TIMEOUT)
    info = {c["name"]: c for c in kubevirt.result("guest-info")["supported_commands"]}
    assert all(info[name]["enabled"] for name in KUBEVIRT_REQUIRED)
    for _ in range(3):
        load = kubevirt.result("guest-get-load")
        assert set(load) == {"load1m", "load5m", "load15m"}
        assert len(kubevirt.result("guest-get-cpustats")) == 2
        assert "vda" in {d["name"] for d in kubevirt.result("guest-get-diskstats")}
        assert "/dev/vda" in {d["name"] for d in kubevirt.result("guest-get-disks")}
        assert any(r["destination"] == "0.0.0.0" and r["gateway"] == "10.0.2.2"
                   for r in kubevirt.result("guest-network-get-route"))
        assert kubevirt.result("guest-get-memory-blocks")
    kubevirt.close()
    # Proxmox: fstrim after a disk move, `qm guest exec`, file-write/read, a password
    proxmox = connect(vm.qga_sock, delimited=True)
    trimmed = proxmox.result("guest-fstrim")["paths"]
    assert {p["path"] for p in trimmed} == {"/data", "/dm", "/loop"}
    assert all(isinstance(p.get("trimmed"), int) or p.get("error") for p in trimmed)
    assert run(proxmox, "/bin/sh", "-c", "cat; echo done", data=b"from the host\n") == (
        0, "from the host\ndone\n")
    handle = proxmox.result("guest-file-open", {"path": "/data/from-host", "mode": "w"})
    assert proxmox.result("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(
        b"written by qm guest\n").decode()})["count"] == 20
    assert proxmox.result("guest-file-close", {"handle": handle}) == {}
    assert read_file(proxmox, "/data/from-host") == b"written by qm guest\n"
    assert proxmox.result("guest-set-user-password", {
        "username": "alice", "password": base64.b64encode(b"pve").decode(),
        "crypted": False}) == {}
    # the ssh commands were not allowed here: off, in qemu-ga's words
    refused = proxmox.call("guest-ssh-add-authorized-keys", {"username": "alice", "keys": []})
    assert refused["error"]["desc"] == ("Command guest-ssh-add-authorized-keys has been "
                                        "disabled: the command is not allowed")
    proxmox.close()
    assert vm.shutdown(grace=2) is True
    wait_for(lambda: vm.proc.poll() is not None, 60, "the power-off")


def answers(client):
    try:
        client.sync()
        return True
    except Exception:              # the port comes back with the guest
        return False


def suspended(vm):
    return "suspended" in vm.monitor_command("info status")


def test_suspend_to_ram_and_back_as_qemu_ga_does(boot, tmp_path, rich_image):
    """guest-suspend-ram from each agent: no answer, the guest sleeps (QEMU says
    "suspended"), QEMU's system_wakeup wakes it, and both agents answer again, ArcBox too.
    The console is not read here: in these runs the guest's serial output stopped at the
    first suspend (seen; the cause is not established)."""
    disk = partitioned_disk(str(tmp_path / "disk.img"))
    vm = boot("arcbox.exec=/test/rich_guest.sh arcbox.net=eth0:10.0.2.15/24:10.0.2.2",
              disk=disk, image=rich_image, ports=[vmtool.QEMU_GA_PEER_PORT],
              modules=["loop", "dm_mod"], qemu_args=NIC, log_level="debug")
    vm.wait_log("RICH-GUEST-READY-42", BOOT_TIMEOUT)
    ours = connect(vm.qga_sock, timeout=BOOT_TIMEOUT)
    real = connect(vm.port_socket(vmtool.QEMU_GA_PEER_PORT), timeout=BOOT_TIMEOUT)
    refused = []
    for client in (ours, real):
        info = {c["name"]: c for c in client.result("guest-info")["supported_commands"]}
        assert info["guest-suspend-ram"]["success-response"] is False
        for attempt in range(3):
            # The kernel may refuse: "Freezing of tasks failed after 20 s (1 tasks refusing
            # to freeze)", seen once in a CI run, 0.7 s after boot, with our agent's request
            # (which logged "guest-suspend-ram: Device or resource busy" and served on). The
            # same sysfs write from either agent; asked again, it sleeps.
            client.call("guest-suspend-ram", reply=False)
            try:
                wait_for(lambda: suspended(vm), 45, "the guest to sleep")
                break
            except AssertionError:
                refused.append(client is ours and "arcbox-agent" or "qemu-ga")
                assert answers(client), "the agent did not answer after a refused suspend"
        else:
            raise AssertionError("the guest never slept: %r" % refused)
        time.sleep(1)
        assert suspended(vm)
        vm.monitor_command("system_wakeup")
        wait_for(lambda: not suspended(vm), 60, "the guest to wake")
        wait_for(lambda: answers(client), 60, "an answer after the wake-up")
        assert ours.result("guest-ping") == {} and real.result("guest-ping") == {}
    assert b"pong" in vm.request(0x0001)                 # ArcBox too, after two sleeps
    print("suspend requests the kernel refused (then asked again): %r" % refused)
    assert vm.shutdown(grace=2) is True
    wait_for(lambda: vm.proc.poll() is not None, 60, "the power-off")
