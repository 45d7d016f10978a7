"""The VM tier: a busybox guest under QEMU (TCG) with the built .pyz as /init. Fails loudly,
never skips, when QEMU or the guest packages are missing: .ci/run installs them."""

import os

import pytest

import guestimage
import storagecheck
import vm as vmtool
from helpers import utmp_record

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_PROGRAMS = os.path.join(HERE, "..", "..", "tools", "guest")


def guest_test_files():
    with open(os.path.join(GUEST_PROGRAMS, "vsock_client.py"), "rb") as f:
        client = f.read()
    extra = {"/test/vsock_client.py": client,
             # a process that ignores SIGTERM (the disposition survives exec)
             "/test/ignore_term.sh": b"#!/bin/sh\ntrap '' TERM\necho IGNORING-TERM\nexec sleep 1000\n"}
    extra.update(guestimage.notify_receiver_files())
    extra.update(storagecheck.guest_files())
    with open(os.path.join(GUEST_PROGRAMS, "hung_disks.sh"), "rb") as f:
        extra["/test/hung_disks.sh"] = f.read()
    return extra


def require_vm(arch):
    """Fail (not skip) when this machine cannot boot an `arch` guest, saying why."""
    reason = vmtool.why_vm_unavailable(arch)
    if reason:
        pytest.fail("VM tests (%s) cannot run here: %s" % (arch, reason), pytrace=False)


def make_image(pyz, tmp_path_factory, arch):
    require_vm(arch)
    out = str(tmp_path_factory.mktemp("guest-" + arch) / "initramfs.cpio")
    info = guestimage.build_initramfs(pyz, out, extra_files=guest_test_files(), arch=arch)
    info["kernel"] = guestimage.kernel_image(guestimage.fetch_packages(arch), arch)
    info["initramfs"] = out
    return info


@pytest.fixture(scope="session")
def guest_image(pyz, tmp_path_factory):
    return make_image(pyz, tmp_path_factory, "x86_64")


QEMU_GA_SCRIPT = b"""#!/bin/sh
# qemu-ga on the second QGA port (the agent keeps org.qemu.guest_agent.0)
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name)" = %s ] && dev=/dev/${p##*/}
done
mkdir -p /data && mount -t ext4 /dev/vda /data
exec /usr/sbin/qemu-ga -m virtio-serial -p "$dev" -t /run
""" % vmtool.QEMU_GA_PEER_PORT.encode()


@pytest.fixture(scope="session")
def peer_image(pyz, tmp_path_factory):
    """The x86_64 image with Debian's qemu-ga too, and /test/qemu-ga.sh, which mounts
    /dev/vda on /data and runs qemu-ga on the port vm.QEMU_GA_PEER_PORT."""
    require_vm("x86_64")
    out = str(tmp_path_factory.mktemp("guest-qemu-ga") / "initramfs.cpio")
    files = guest_test_files()
    files["/test/qemu-ga.sh"] = QEMU_GA_SCRIPT
    info = guestimage.build_initramfs(pyz, out, extra_files=files, qemu_ga=True)
    info["kernel"] = guestimage.kernel_image(guestimage.fetch_packages())
    info["initramfs"] = out
    return info


KEYS = (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOne one@host\n"
        b"# a comment line\n"
        b"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC2 two@host\n")
OS_RELEASE = (b'PRETTY_NAME="Arc \\"Box\\" Linux 1.0 (test)"\n'
              b"NAME='ArcBox Linux'\n"
              b"ID=arcbox\n"
              b'VERSION="1.0 (\\$pecial \\`quoted\\`)"\n'
              b"VERSION_ID=1.0\n"
              b'VARIANT="Rich \\\\ Guest"\n'
              b"VARIANT_ID=rich\\ guest\n")


def rich_files():
    files = guest_test_files()
    for name, path in (("rich_guest.sh", "/test/rich_guest.sh"),
                       ("chpasswd.sh", "/usr/sbin/chpasswd")):
        with open(os.path.join(GUEST_PROGRAMS, name), "rb") as f:
            files[path] = f.read()
    files["/etc/passwd"] = (b"root:x:0:0:root:/root:/bin/sh\n"
                            b"alice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
                            b"bob:x:1001:1001:Bob:/home/bob:/bin/sh\n")
    files["/etc/shadow"] = (b"root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n"
                            b"bob:!:19000:0:99999:7:::\n")
    files["/etc/group"] = b"root:x:0:\nalice:x:1000:\nbob:x:1001:\n"
    files["/etc/os-release"] = OS_RELEASE
    files["/etc/adjtime"] = b"0.0 0 0.0\n0\nUTC\n"
    with open("/usr/share/zoneinfo/Europe/Berlin", "rb") as f:
        files["/usr/share/zoneinfo/Europe/Berlin"] = f.read()
    files["/etc/timezone"] = b"Europe/Berlin\n"
    for user in ("alice", "bob"):
        files["/home/%s/.ssh/authorized_keys" % user] = KEYS
    files["/test/utmp"] = (utmp_record("alice", "tty1", 300, 1700000000, 250000)
                           + utmp_record("bob", "pts/0", 301, 1700000100, 0)
                           + utmp_record("alice", "pts/1", 302, 1700000200, 0))
    return files


@pytest.fixture(scope="session")
def rich_image(pyz, tmp_path_factory):
    """The x86_64 image with qemu-ga 10, dmsetup and the rich guest's files."""
    require_vm("x86_64")
    out = str(tmp_path_factory.mktemp("guest-rich") / "initramfs.cpio")
    info = guestimage.build_initramfs(pyz, out, extra_files=rich_files(), qemu_ga=True,
                                      dmsetup=True,
                                      links={"/etc/localtime": "/usr/share/zoneinfo/Europe/Berlin"})
    info["kernel"] = guestimage.kernel_image(guestimage.fetch_packages())
    info["initramfs"] = out
    return info


@pytest.fixture(scope="session")
def big_module_image(pyz, tmp_path_factory):
    """The x86_64 image with btrfs in it too: a large module (with raid6_pq and xor, which
    benchmark themselves at load) to load last, for the tests of serving while modules load."""
    require_vm("x86_64")
    out = str(tmp_path_factory.mktemp("guest-big-module") / "initramfs.cpio")
    info = guestimage.build_initramfs(pyz, out, extra_files=guest_test_files(),
                                      modules=guestimage.image_modules("x86_64") + ["btrfs"])
    info["kernel"] = guestimage.kernel_image(guestimage.fetch_packages())
    info["initramfs"] = out
    return info


@pytest.fixture(scope="session")
def wedge_image(pyz, tmp_path_factory):
    """The x86_64 image with Debian's dmsetup too (/test/hung_disks.sh suspends disks)."""
    require_vm("x86_64")
    out = str(tmp_path_factory.mktemp("guest-dmsetup") / "initramfs.cpio")
    info = guestimage.build_initramfs(pyz, out, extra_files=guest_test_files(), dmsetup=True)
    info["kernel"] = guestimage.kernel_image(guestimage.fetch_packages())
    info["initramfs"] = out
    return info


@pytest.fixture(scope="session")
def arm_image(pyz, tmp_path_factory):
    return make_image(pyz, tmp_path_factory, "aarch64")


@pytest.fixture
def boot(guest_image, tmp_path):
    """boot(cmdline="", disk=None (an image or a list: vda, vdb, ...), log_level, qemu_args,
    image=None (the x86_64 one), initramfs=None (the image's), modules=() (loaded at boot
    after the usual ones), ports=() (more virtio-serial ports by name), workdir=None
    (tmp_path)) -> a started VM; every VM is killed at the end."""
    machines = []

    def start(cmdline="", disk=None, log_level="info", qemu_args=(), image=None,
              initramfs=None, modules=(), ports=(), workdir=None):
        image = image or guest_image
        machine = vmtool.VM(workdir or str(tmp_path), initramfs or image["initramfs"],
                            image["kernel"], cmdline=cmdline, disk=disk, log_level=log_level,
                            qemu_args=qemu_args, arch=image["arch"], modules=modules,
                            ports=ports)
        machines.append(machine)
        return machine.start()

    yield start
    for machine in machines:
        machine.__exit__(None, None, None)


def make_rootfs(pyz, tmp_path_factory, arch):
    """A disk-root guest: an ext4 root image with the .pyz as /sbin/arcbox-agent and
    /sbin/init -> it, and the tiny busybox initramfs that mounts it and switch_roots."""
    require_vm(arch)
    work = tmp_path_factory.mktemp("rootfs-" + arch)
    image = str(work / "root.img")
    info = guestimage.build_rootfs(pyz, image, extra_files=guest_test_files(), arch=arch)
    info["boot_initramfs"] = str(work / "boot.cpio")
    guestimage.build_boot_initramfs(info["boot_initramfs"], arch=arch)
    info["root_template"] = image
    info["kernel"] = guestimage.kernel_image(guestimage.fetch_packages(arch), arch)
    return info


@pytest.fixture(scope="session")
def rootfs_image(pyz, tmp_path_factory):
    return make_rootfs(pyz, tmp_path_factory, "x86_64")


@pytest.fixture(scope="session")
def arm_rootfs_image(pyz, tmp_path_factory):
    return make_rootfs(pyz, tmp_path_factory, "aarch64")
