"""The teardown at power-off, in a PID namespace: filesystems remounted read-only with their
data (a loop-mounted ext4 and a tmpfs written without sync); and nothing lost whatever the
guest mounted: a swap file and an image file
on a loop-mounted disk, the image on a loop device of its own (set up with losetup, so nobody
clears it but the agent), mounted, with a bind mount beside it and a process that ignores
SIGTERM still appending when the power-off comes.

Swap areas and loop devices belong to the whole machine, not to the namespace: one the agent
leaves behind outlives the namespace, and keeps the disk image's filesystem alive and dirty.
So the host can see what a guest kernel would have powered off with."""

import os
import shlex
import shutil
import subprocess
import time

import pytest

from helpers import wait_for
from nsguest import POWER_OFF_RETURNCODE

pytestmark = pytest.mark.namespace


def host_swaps():
    with open("/proc/swaps") as f:
        return {line.split()[0] for line in f.read().splitlines()[1:] if line.strip()}


def host_loops():
    """{"/dev/loopN": backing file} for every bound loop device on the machine."""
    found = {}
    for name in os.listdir("/sys/block"):
        try:
            with open("/sys/block/%s/loop/backing_file" % name) as f:
                found["/dev/" + name] = f.read().strip()
        except OSError:
            pass
    return found


def debugfs(image, command):
    return subprocess.run(["debugfs", "-R", command, image], capture_output=True,
                          timeout=60).stdout


@pytest.fixture
def outer_image(tmp_path):
    image = str(tmp_path / "outer.img")
    with open(image, "wb") as f:
        f.truncate(96 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, timeout=60)
    swaps, loops = host_swaps(), host_loops()
    yield image
    # What a broken agent leaves on the machine. After a lazy unmount the swap file's path
    # is no longer reachable, but the outer image's loop device still holds its filesystem:
    # mounting that device again reaches the same files.
    leaked = {d: b for d, b in host_loops().items() if d not in loops}
    rescue = tmp_path / "rescue"
    rescue.mkdir()
    for device, backing in leaked.items():
        if backing == image and subprocess.run(["mount", device, str(rescue)]).returncode == 0:
            for path in host_swaps() - swaps:
                subprocess.run(["swapoff", str(rescue) + path], capture_output=True)
            for other in leaked:
                if other != device:
                    subprocess.run(["losetup", "-d", other], capture_output=True)
            subprocess.run(["umount", str(rescue)])
    for device in leaked:
        subprocess.run(["losetup", "-d", device], capture_output=True)


def test_swap_files_and_loop_devices_are_released_and_every_disk_ends_clean(
        guest, tmp_path, outer_image):
    m = str(tmp_path / "m")
    for d in ("outer", "inner", "bind"):
        os.makedirs(os.path.join(m, d))
    script = """
set -e
mount -o loop {img} {m}/outer
dd if=/dev/zero of={m}/outer/swap bs=1M count=8 status=none
chmod 600 {m}/outer/swap && mkswap -q {m}/outer/swap && swapon {m}/outer/swap
mkfs.ext4 -q {m}/outer/inner.img 24M
dev=$(losetup -f --show {m}/outer/inner.img)
mount "$dev" {m}/inner
mkdir {m}/outer/sub && mount --bind {m}/outer/sub {m}/bind
yes inner-data | head -c 3000000 > {m}/inner/big
echo outer > {m}/outer/small
echo via-bind > {m}/bind/f
(trap '' TERM; i=0; while :; do i=$((i+1)); echo $i >> {m}/inner/appender; done) &
touch {m}/.ready
exec sleep 1000
""".format(img=shlex.quote(outer_image), m=shlex.quote(m))
    swaps, loops = host_swaps(), host_loops()          # the machine's own, before the guest
    g = guest(agent_args=["--exec", "sh", "-c", script], log_level="debug")
    wait_for(lambda: os.path.exists(os.path.join(m, ".ready")), timeout=60,
             what="the workload's mounts")
    appender = "/proc/%d/root%s/inner/appender" % (g.init_pid(), m)
    wait_for(lambda: os.path.exists(appender) and os.path.getsize(appender) > 10000,
             timeout=30, what="the appender")
    swap = os.path.join(m, "outer", "swap")
    assert swap in host_swaps() and len(host_loops()) == len(loops) + 2
    assert g.shutdown(grace=1) is True
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    msgs = g.messages()
    # what a guest kernel would have been left with at reboot(): nothing of the guest's
    assert host_swaps() == swaps, "a swap area of the guest is still on"
    left = {d: b for d, b in host_loops().items() if d not in loops}
    assert left == {}, "loop devices still hold the guest's images: %s" % left
    assert "shutdown: swapoff %s: done" % swap in msgs, msgs
    assert any(l.startswith("shutdown: detach /dev/loop") and l.endswith("inner.img: done")
               for l in msgs), msgs
    assert not any("stays writable" in l for l in msgs), msgs
    assert any("filesystems synced and read-only" in l for l in msgs), msgs
    assert "shutdown: remounted %s/outer (ext4) read-only" % m in msgs
    # the disk image and the image inside it: clean, and every byte there
    header = subprocess.run(["dumpe2fs", "-h", outer_image], capture_output=True,
                            text=True).stdout
    assert "needs_recovery" not in header, header
    fsck = subprocess.run(["e2fsck", "-fn", outer_image], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert debugfs(outer_image, "cat /small") == b"outer\n"
    assert debugfs(outer_image, "cat /sub/f") == b"via-bind\n"
    inner = str(tmp_path / "inner-out.img")
    debugfs(outer_image, "dump /inner.img %s" % inner)
    fsck = subprocess.run(["e2fsck", "-fn", inner], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert debugfs(inner, "cat /big") == (b"inner-data\n" * 300000)[:3000000]
    lines = debugfs(inner, "cat /appender").decode().splitlines()
    assert len(lines) > 1000 and lines == [str(i) for i in range(1, len(lines) + 1)]


@pytest.fixture
def ext4_image(tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.fail("mkfs.ext4 is missing (apt-get install e2fsprogs)", pytrace=False)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=60)
    return image


def test_filesystems_are_remounted_read_only_before_power_off_and_keep_their_data(
        guest, tmp_path, ext4_image):
    mnt, tmpfs = tmp_path / "mnt", tmp_path / "scratch"
    mnt.mkdir()
    tmpfs.mkdir()
    # The workload mounts a disk and a tmpfs, writes without syncing, and stays busy.
    script = ("mount -o loop {img} {mnt} && mount -t tmpfs scratch {tmpfs} && "
              "echo 'no data lost' > {mnt}/file && echo x > {tmpfs}/x && "
              "touch {mnt}/.ready && exec sleep 1000").format(
                  img=shlex.quote(str(ext4_image)), mnt=shlex.quote(str(mnt)),
                  tmpfs=shlex.quote(str(tmpfs)))
    g = guest(agent_args=["--exec", "sh", "-c", script])
    wait_for(lambda: any(m.startswith("started sh") for m in g.messages()), what="workload")
    time.sleep(0.5)
    assert g.shutdown(grace=10) is True
    assert g.wait(timeout=60) == POWER_OFF_RETURNCODE
    log = g.messages()
    # (the /run the agent mounted itself, where the machine has none, is remounted too)
    remounted = [m for m in log if m.startswith("shutdown: remounted")
                 and not m.startswith("shutdown: remounted /run ")]
    assert remounted == ["shutdown: remounted %s (tmpfs) read-only" % tmpfs,
                         "shutdown: remounted %s (ext4) read-only" % mnt], log
    assert any("filesystems synced and read-only" in m for m in log)
    fsck = subprocess.run(["e2fsck", "-fn", str(ext4_image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /file", str(ext4_image)], capture_output=True,
                         text=True)
    assert cat.stdout == "no data lost\n"
