"""The "nothing lost" scenario (tools/guest/mounts.sh): the two disks it mounts, and the
check afterwards, on the host, that every disk and every filesystem image inside one is
clean (e2fsck -fn, no journal to recover) and holds every byte the script wrote.
Used by tests/vm/test_nothing_lost.py and the benchmarks' peer comparison."""

import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "guest", "mounts.sh")
MB = 1000000
# what mounts.sh writes without sync, and where it lands: (disk, image inside it, path)
WRITTEN = {("vda", None, "/a"): b"disk-a", ("vdb", None, "/b"): b"disk-b",
           ("vda", "/loop.img", "/c"): b"loop-c", ("vdb", "/loop2.img", "/d"): b"loop2-d",
           ("vdb", None, "/shared/e"): b"bind-e", ("vdb", None, "/upper/f"): b"overlay-f"}
FROZEN_WRITE = ("vdb", None, "/g"), b"written-while-frozen\n"   # waits for the thaw
APPENDER = ("vda", "/loop.img", "/appender")                    # numbered lines, 1, 2, ...
INNER_IMAGES = (("vda", "/loop.img"), ("vdb", "/loop2.img"))


def guest_files():
    """The files the guest image needs for the scenario."""
    with open(SCRIPT, "rb") as f:
        return {"/test/mounts.sh": f.read()}


def mkfs(path, size, tree=None):
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F"] + (["-d", tree] if tree else []) + [path],
                   check=True, timeout=60)


def make_disks(workdir):
    """vda holds loop.img, the overlay's lower directory and the mount point of vdb; vdb
    holds loop2.img and the directories for the bind mount and the overlay's upper and
    work directories. Returns {"vda": path, "vdb": path}."""
    a, b = os.path.join(workdir, "tree-a"), os.path.join(workdir, "tree-b")
    for d in ("lower", "inner"):
        os.makedirs(os.path.join(a, d))
    for d in ("shared", "upper", "work"):
        os.makedirs(os.path.join(b, d))
    with open(os.path.join(a, "lower", "base"), "w") as f:
        f.write("from the lower layer\n")
    mkfs(os.path.join(a, "loop.img"), 16 << 20)
    mkfs(os.path.join(b, "loop2.img"), 8 << 20)
    disks = {"vda": os.path.join(workdir, "vda.img"), "vdb": os.path.join(workdir, "vdb.img")}
    mkfs(disks["vda"], 64 << 20, a)
    mkfs(disks["vdb"], 64 << 20, b)
    return disks


def debugfs(image, command):
    return subprocess.run(["debugfs", "-R", command, image], capture_output=True,
                          timeout=60).stdout


def _expected(tag):
    line = tag + b"\n"
    return line * (MB // len(line)) + line[:MB % len(line)]


def problems(disks, workdir, frozen=True):
    """Everything wrong with the disks after the guest is gone, one line each; [] when every
    filesystem is clean and every byte is there. `frozen`: the scenario froze vdb."""
    images = dict(disks)
    for disk, inner in INNER_IMAGES:
        out = os.path.join(workdir, "%s-%s" % (disk, inner.strip("/")))
        if os.path.exists(out):
            os.unlink(out)
        debugfs(disks[disk], "dump %s %s" % (inner, out))
        images[(disk, inner)] = out
    found = []
    for name, image in sorted(images.items(), key=str):
        header = subprocess.run(["dumpe2fs", "-h", image], capture_output=True,
                                text=True).stdout
        if "needs_recovery" in header:
            found.append("%s: the journal needs recovery" % (name,))
        fsck = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
        if fsck.returncode != 0:
            found.append("%s: e2fsck -fn exit %d: %s" % (name, fsck.returncode,
                                                          fsck.stdout.strip()[-300:]))
    written = dict(WRITTEN)
    for (disk, inner, path), tag in sorted(written.items(), key=str):
        got = debugfs(images[(disk, inner)] if inner else images[disk], "cat " + path)
        if got != _expected(tag):
            found.append("%s%s:%s: %d of %d bytes as written" % (
                disk, inner or "", path, sum(1 for a, b in zip(got, _expected(tag)) if a == b),
                MB))
    if frozen:
        (disk, _, path), data = FROZEN_WRITE
        if debugfs(images[disk], "cat " + path) != data:
            found.append("%s:%s: the write that waited for the thaw is missing" % (disk, path))
    disk, inner, path = APPENDER
    lines = debugfs(images[(disk, inner)], "cat " + path).decode("utf-8", "replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines or lines != [str(i) for i in range(1, len(lines) + 1)]:
        found.append("%s%s:%s: %d lines, not 1..N in order" % (disk, inner, path, len(lines)))
    return found
