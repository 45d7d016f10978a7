"""Build a busybox initramfs whose /init is dist/arcbox-agent.pyz, from Debian packages.

No root needed: packages come from `apt-get download` and are unpacked with `dpkg-deb -x`
into a cache outside the repository ($ARCBOX_CACHE, default ~/.cache/arcbox-agent); the cpio
archive is written by this file, device nodes included. Never `apt-get install linux-image-*`
(it drags in udev and initramfs-tools and upgrades systemd).

The guest carries:
- busybox (static) and its applet links;
- the guest Python (binary, the shared libraries it and _ctypes need) and ONLY the stdlib
  files the agent's guest path imports, found by importing it with the guest interpreter and
  shipped precompiled (sourceless .pyc). An import outside the design card's list would fail
  in the guest: the import discipline is proven, not hoped;
- the kernel modules for virtio-pci, virtio-serial, virtio-blk, ext4, vsock + vsock_loopback
  and pvpanic-pci, with a modules.dep made from each module's own `depends=` field;
- /dev/console, /dev/null and /dev/urandom nodes, and the .pyz as /init (run through its
  shebang, #!/usr/bin/python3 -S).

    python3 tools/guestimage.py [--pyz dist/arcbox-agent.pyz] [--arch aarch64]
                                [-o initramfs.cpio | --rootfs root.img]
"""

import argparse
import hashlib
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
import agent  # noqa: E402  (its table of the power button's modules)
CACHE = os.environ.get("ARCBOX_CACHE") or os.path.expanduser("~/.cache/arcbox-agent")
PY = "python3.11"
PYTHON_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libffi8",
               "libc6", "zlib1g", "libexpat1"]
# Modules the VM tests need, loaded by the agent at boot (arcbox.modules=) in this order.
GUEST_MODULES = ["virtio_pci", "pvpanic_pci", "virtio_console", "virtio_blk", "crc32c_generic",
                 "ext4", "vsock_loopback", "virtio_net"]
# Debian's arm64 kernel has no pvpanic (a panic is told by the console there); its ext4
# needs crc32c_generic at mount time as on x86 ("EXT4-fs (vda): Cannot load crc32c driver").
GUEST_MODULES_BY_ARCH = {"x86_64": GUEST_MODULES,
                         "aarch64": ["virtio_pci", "virtio_console", "virtio_blk",
                                     "crc32c_generic", "ext4", "vsock_loopback"]}
# In the image too, but not in arcbox.modules: the agent loads these itself for the power
# button when modules.dep lists them (the ACPI button driver on x86, gpio-keys on arm64).
POWER_MODULES = {arch: agent.POWER_BUTTON_MODULES[arch] for arch in ("x86_64", "aarch64")}
# What a boot initramfs needs to mount a virtio disk root with Debian's generic kernels.
ROOT_MODULES = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"]   # ext4 asks crc32c at mount


def guest_modules(arch):
    return GUEST_MODULES_BY_ARCH[arch]


# In the image too, loaded by the tests that mount such things (loop devices, overlays).
STORAGE_MODULES = ["loop", "overlay"]
# In the x86_64 image too, loaded by the tests of a PID 1 that is never wedged: device-mapper
# (a disk whose I/O never completes: dmsetup suspend) and QEMU's i6300esb watchdog.
WEDGE_MODULES = {"x86_64": ["dm_mod", "i6300esb"], "aarch64": []}


def image_modules(arch):
    return GUEST_MODULES_BY_ARCH[arch] + POWER_MODULES[arch] + STORAGE_MODULES \
        + WEDGE_MODULES[arch]
BUSYBOX = "/bin/busybox"


class ImageError(RuntimeError):
    pass


# ---- packages ----------------------------------------------------------------------------------

def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise ImageError("%s failed (%d): %s" % (" ".join(cmd), result.returncode,
                                                 (result.stderr or result.stdout).strip()))
    return result.stdout


# Per guest architecture: Debian's name for it, the kernel meta-package, where libraries
# live and the dynamic loader. aarch64 packages come through a private apt state (its own
# lists and cache under CACHE), so the host's dpkg configuration is never touched.
ARCHES = {
    "x86_64": {"deb": "amd64", "kernel": "linux-image-amd64", "triplet": "x86_64-linux-gnu",
               "loader": ("ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2")},
    "aarch64": {"deb": "arm64", "kernel": "linux-image-arm64",
                "triplet": "aarch64-linux-gnu",
                "loader": ("ld-linux-aarch64.so.1", "/lib/ld-linux-aarch64.so.1")},
}
HOST_ARCH = "x86_64"


def _private_apt_state(name, deb_arch):
    """(folder, apt options) of a private apt state under CACHE: its own lists and cache, an
    empty dpkg status, one architecture; the host's apt and dpkg setup are never touched."""
    state = os.path.join(CACHE, "apt-" + name)
    for sub in ("lists/partial", "cache/archives/partial"):
        os.makedirs(os.path.join(state, sub), exist_ok=True)
    return state, ["-o", "APT::Architecture=" + deb_arch, "-o", "APT::Architectures=" + deb_arch,
                   "-o", "Dir::State::Lists=" + os.path.join(state, "lists"),
                   "-o", "Dir::Cache=" + os.path.join(state, "cache"),
                   "-o", "Dir::State::status=/dev/null", "-o", "APT::Sandbox::User=root"]


def _apt_options(arch):
    """apt-get/apt-cache options: the host's own state for the host's architecture, a
    private one for another."""
    if arch == HOST_ARCH:
        return []
    return _private_apt_state(ARCHES[arch]["deb"], ARCHES[arch]["deb"])[1]


def _apt_update(arch):
    """Fresh package lists for a foreign architecture (at most daily)."""
    lists = os.path.join(CACHE, "apt-" + ARCHES[arch]["deb"], "lists")
    fresh = [n for n in os.listdir(lists) if n.endswith("Packages")] if os.path.isdir(
        lists) else []
    if not fresh or time.time() - max(os.path.getmtime(os.path.join(lists, n))
                                      for n in fresh) > 86400:
        _run(["apt-get"] + _apt_options(arch) + ["-q", "update"])


def kernel_package(arch=HOST_ARCH):
    """The versioned kernel package behind the meta-package, e.g. linux-image-6.1.0-56-amd64."""
    meta = ARCHES[arch]["kernel"]
    if arch != HOST_ARCH:
        _apt_update(arch)
    for line in _run(["apt-cache"] + _apt_options(arch) + ["depends", meta]).splitlines():
        word = line.strip().split(":")[-1].strip()
        if line.strip().startswith("Depends:") and word.startswith("linux-image-"):
            return word
    raise ImageError("apt-cache knows no %s for %s (run apt-get update)" % (meta, arch))


def fetch_packages(arch=HOST_ARCH):
    """Download and unpack the kernel and guest-Python packages (and, for another
    architecture, its busybox-static) once; returns the root."""
    if arch not in ARCHES:
        raise ImageError("no guest architecture %r (known: %s)" % (arch, ", ".join(ARCHES)))
    suffix = "" if arch == HOST_ARCH else "-" + arch
    root = os.path.join(CACHE, "root" + suffix)
    stamp = os.path.join(CACHE, "root%s.json" % suffix)
    wanted = [kernel_package(arch)] + PYTHON_DEBS + (
        ["busybox-static"] if arch != HOST_ARCH else [])
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("packages") == wanted:
                return root
    debs = os.path.join(CACHE, "debs" + suffix)
    os.makedirs(debs, exist_ok=True)
    # _apt cannot write into root's home: download as root, into our own folder.
    _run(["apt-get"] + _apt_options(arch) + ["download", "-o", "APT::Sandbox::User=root"]
         + wanted, cwd=debs)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for name in sorted(os.listdir(debs)):
        if name.endswith(".deb") and name.split("_")[0] in wanted:
            if "_%s.deb" % ARCHES[arch]["deb"] not in name and not name.endswith("_all.deb"):
                raise ImageError("%s is not a %s package" % (name, ARCHES[arch]["deb"]))
            _run(["dpkg-deb", "-x", os.path.join(debs, name), root])
    with open(stamp, "w") as f:
        json.dump({"packages": wanted}, f)
    return root


# qemu-ga 10.0 from Debian 13 (trixie) and the libraries it needs, its own C library
# included: the real peer the QGA tests and benchmarks run beside the agent, on this Debian 12
# machine and in the guest image (only for the host's architecture). Fetched through a
# private apt state for trixie (its own sources list, lists and cache under CACHE; the
# host's apt configuration is never touched), unpacked, never installed, and run through
# its own dynamic loader: `ld-linux-x86-64.so.2 --library-path LIBS qemu-ga`.
QEMU_GA_SUITE = "trixie"
QEMU_GA_DEBS = ["qemu-guest-agent", "libc6", "libglib2.0-0t64", "libnuma1", "libudev1",
                "liburing2", "libffi8", "libpcre2-8-0", "zlib1g", "libmount1", "libblkid1",
                "libselinux1", "libcap2", "libatomic1"]
QEMU_GA = "/usr/sbin/qemu-ga"
QEMU_GA_PREFIX = "/opt/qemu-ga"   # where the guest image keeps qemu-ga 10 and its libraries


# Debian's dmsetup and libdevmapper: the tests suspend a device-mapper disk with it, the way
# LVM and `dmsetup suspend` do, to make a disk whose I/O never completes.
DMSETUP_DEBS = ["dmsetup", "libdevmapper1.02.1", "libselinux1", "libudev1", "libpcre2-8-0",
                "libc6"]
DMSETUP = "/sbin/dmsetup"


def fetch_debs(name, debs, apt=(), update=False):
    """Download the host architecture's packages `debs` and unpack them into one root, once
    (again when the list changes); returns the root. `apt`: options for another apt state
    (`update`: refresh its lists first)."""
    root = os.path.join(CACHE, name)
    stamp = root + ".json"
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("packages") == debs:
                return root
    folder = os.path.join(CACHE, "debs-" + name)
    os.makedirs(folder, exist_ok=True)
    if update:
        _run(["apt-get"] + list(apt) + ["-q", "update"])
    _run(["apt-get"] + list(apt) + ["download", "-o", "APT::Sandbox::User=root"] + debs,
         cwd=folder)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for deb in sorted(os.listdir(folder)):
        if deb.endswith(".deb") and deb.split("_")[0] in debs:
            _run(["dpkg-deb", "-x", os.path.join(folder, deb), root])
    with open(stamp, "w") as f:
        json.dump({"packages": debs}, f)
    return root


def _suite_apt_options(suite):
    """apt options for a private apt state that knows only Debian's `suite` (amd64)."""
    state, options = _private_apt_state(suite, "amd64")
    sources = os.path.join(state, "sources.list")
    with open(sources, "w") as f:
        f.write("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                "http://deb.debian.org/debian %s main\n" % suite)
    return options + ["-o", "Dir::Etc::SourceList=" + sources,
                      "-o", "Dir::Etc::SourceParts=/dev/null"]


def fetch_qemu_ga():
    """Download and unpack qemu-ga 10 (Debian 13) and its libraries once; returns the root.
    Run it with qemu_ga_command(root)."""
    return fetch_debs("qemu-ga-" + QEMU_GA_SUITE, QEMU_GA_DEBS,
                      _suite_apt_options(QEMU_GA_SUITE), update=True)


def qemu_ga_command(root, prefix=None):
    """argv that runs qemu-ga 10 from `root` through its own loader; `prefix`: where root is
    in the guest (None: here, on the host)."""
    top = prefix or root
    libs = os.path.join(top, "usr/lib/x86_64-linux-gnu")
    return [os.path.join(libs, "ld-linux-x86-64.so.2"), "--library-path", libs,
            os.path.join(top, QEMU_GA.lstrip("/"))]


def _add_program(img, root, path):
    """A dynamically linked program from a package root, with the libraries it needs."""
    binary = os.path.join(root, path.lstrip("/"))
    img.host_file(path, binary, 0o755)
    for soname, guest_path in sorted(shared_libraries(root, [binary]).items()):
        if guest_path.strip("/") not in img.entries:
            img.host_file(guest_path, os.path.join(root, guest_path.lstrip("/")), 0o755)


def _add_qemu_ga(img):
    """qemu-ga 10 and its libraries under QEMU_GA_PREFIX, and /usr/sbin/qemu-ga, a script
    that runs it through its own loader (the guest's C library is Debian 12's)."""
    root = fetch_qemu_ga()
    binary = os.path.join(root, QEMU_GA.lstrip("/"))
    img.host_file(QEMU_GA_PREFIX + QEMU_GA, binary, 0o755)
    libs = "usr/lib/x86_64-linux-gnu/"    # every library, the loader too (trixie: merged /usr)
    for soname in sorted(shared_libraries(root, [binary])):
        img.host_file(QEMU_GA_PREFIX + "/" + libs + soname,
                      os.path.realpath(os.path.join(root, libs, soname)), 0o755)
    argv = qemu_ga_command(root, QEMU_GA_PREFIX)
    img.file(QEMU_GA, ("#!/bin/sh\n# qemu-ga %s from Debian's %s, through its own loader\n"
                       "exec %s \"$@\"\n" % ("10", QEMU_GA_SUITE, " ".join(argv))).encode(),
             0o755)
    img.dir("/var/run")                 # qemu-ga's pid file and state directory
    img.dir("/usr/local/var/run")


def kernel_release(root):
    releases = sorted(os.listdir(os.path.join(root, "lib", "modules")))
    if not releases:
        raise ImageError("no kernel modules under %s/lib/modules" % root)
    return releases[-1]


def kernel_image(root, arch=HOST_ARCH):
    """What QEMU's -kernel boots: the ELF vmlinux on x86 (PVH), the Image on arm64 (Debian's
    arm64 vmlinuz is an uncompressed Image; a gzipped one is unpacked)."""
    if arch == "x86_64":
        return vmlinux(root)
    release = kernel_release(root)
    path = os.path.join(root, "boot", "vmlinuz-" + release)
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"\x1f\x8b":
        return path
    import gzip
    out = os.path.join(CACHE, "Image-" + release)
    if not os.path.exists(out):
        with gzip.open(path) as f, open(out + ".tmp", "wb") as g:
            shutil.copyfileobj(f, g)
        os.replace(out + ".tmp", out)
    return out


def vmlinux(root):
    """The ELF kernel inside the bzImage: QEMU boots it through PVH without the ~2.3 s the
    bzImage spends decompressing itself under TCG."""
    release = kernel_release(root)
    out = os.path.join(CACHE, "vmlinux-" + release)
    if not os.path.exists(out):
        with open(os.path.join(root, "boot", "vmlinuz-" + release), "rb") as f:
            data = f.read()
        start = data.find(b"\xfd7zXZ\x00")        # the xz stream's magic
        if start < 0:
            raise ImageError("no xz stream in vmlinuz-%s" % release)
        elf = lzma.LZMADecompressor().decompress(data[start:])
        if not elf.startswith(b"\x7fELF"):
            raise ImageError("the xz stream in vmlinuz is not an ELF kernel")
        with open(out + ".tmp", "wb") as f:
            f.write(elf)
        os.replace(out + ".tmp", out)
    return out


# ---- what goes in -------------------------------------------------------------------------------

def _modinfo_depends(path):
    with open(path, "rb") as f:
        data = f.read()
    at = data.find(b"\x00depends=")
    if at < 0:
        return []
    value = data[at + 9:data.index(b"\x00", at + 9)].decode()
    return [d.replace("-", "_") for d in value.split(",") if d]


def _module_index(root):
    """{module name: path relative to /lib/modules/REL} for every .ko the kernel ships."""
    base = os.path.join(root, "lib", "modules", kernel_release(root))
    index = {}
    for dirpath, _, files in os.walk(os.path.join(base, "kernel")):
        for name in files:
            if name.endswith(".ko"):
                index[name[:-3].replace("-", "_")] = os.path.relpath(os.path.join(dirpath, name),
                                                                     base)
    return index


def module_closure(root, names):
    """{module name: path relative to /lib/modules/REL} for names and what they depend on,
    read from each .ko's modinfo (the deb ships no modules.dep; depmod is not needed)."""
    release = kernel_release(root)
    base = os.path.join(root, "lib", "modules", release)
    index = _module_index(root)
    found, deps, todo = {}, {}, list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        if name not in index:
            raise ImageError("kernel module %s not found in %s" % (name, release))
        found[name] = index[name]
        deps[name] = _modinfo_depends(os.path.join(base, index[name]))
        todo.extend(deps[name])
    return found, deps


def modules_dep_text(found, deps):
    """modules.dep lines, 'path: dependency paths', listed as depmod does: loading them from
    the last to the first, then the module itself, meets every dependency first."""
    def load_order(name, seen):
        order = []
        for dep in deps[name]:
            if dep not in seen:
                seen.add(dep)
                order.extend(load_order(dep, seen))
                order.append(dep)
        return order
    lines = []
    for name in sorted(found):
        first_to_last = load_order(name, set())
        lines.append("%s: %s" % (found[name], " ".join(found[d] for d in
                                                       reversed(first_to_last))))
    return "\n".join(lines) + "\n"


PROBE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import runpy                                  # how the interpreter runs a zip's __main__
import agent
agent.libc()                                  # the guest path's lazy imports
agent._remove_stale_socket("/nonexistent")
agent.qga_json()                              # QGA's json and re, on its first request
for name, module in sorted(sys.modules.items()):
    origin = getattr(getattr(module, "__spec__", None), "origin", None)
    if origin and origin.startswith(sys.argv[2]):
        print(origin)
"""


COMPILE = r"""
import os, py_compile, sys
src, dst, shown = sys.argv[1:4]
for rel in sys.argv[4:]:
    out = os.path.join(dst, rel[:-3] + ".pyc")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    py_compile.compile(os.path.join(src, rel), out, dfile=os.path.join(shown, rel), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def stdlib_files(root, pyz, arch=HOST_ARCH):
    """The stdlib files the agent's guest path imports, as the guest interpreter reports.
    Another architecture's interpreter cannot run here; its Python is the same version, so
    the same files are needed, the extension modules named for its triplet (the VM tests
    then prove the set in a real guest: a missing file fails the agent's start)."""
    if arch != HOST_ARCH:
        host = stdlib_files(fetch_packages(HOST_ARCH), pyz)
        return [f.replace(ARCHES[HOST_ARCH]["triplet"], ARCHES[arch]["triplet"]) for f in host]
    stdlib = os.path.join(root, "usr", "lib", PY)
    env = {"PYTHONHOME": os.path.join(root, "usr"), "HOME": "/", "TERM": "linux"}
    out = _run([os.path.join(root, "usr", "bin", PY), "-S", "-c", PROBE, pyz, stdlib + "/"],
               env=env)
    files = [os.path.relpath(p, stdlib) for p in out.split()]
    if not any(f.startswith("socket") for f in files):
        raise ImageError("the probe found no socket module: %r" % files)
    return files


def _elf_needed(path):
    """DT_NEEDED sonames of a 64-bit little-endian ELF file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ImageError("%s is not a 64-bit ELF file" % path)
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    for sh in sections:
        if sh[1] == 6:                              # SHT_DYNAMIC
            strtab = sections[sh[6]]                # sh_link: its string table
            needed = []
            for off in range(sh[4], sh[4] + sh[5], 16):
                tag, val = struct.unpack_from("<qQ", data, off)
                if tag == 0:
                    break
                if tag == 1:                        # DT_NEEDED
                    start = strtab[4] + val
                    needed.append(data[start:data.index(b"\x00", start)].decode())
            return needed
    return []


def shared_libraries(root, binaries, arch=HOST_ARCH):
    """Guest paths of every library the binaries need, transitively, plus the loader."""
    dirs = ["lib/" + ARCHES[arch]["triplet"], "usr/lib/" + ARCHES[arch]["triplet"]]
    found, todo = {}, list(binaries)
    while todo:
        for soname in _elf_needed(todo.pop()):
            if soname in found:
                continue
            for d in dirs:
                if os.path.exists(os.path.join(root, d, soname)):
                    found[soname] = "/" + d + "/" + soname
                    todo.append(os.path.realpath(os.path.join(root, d, soname)))
                    break
            else:
                raise ImageError("library %s not found in the guest packages" % soname)
    soname, guest_path = ARCHES[arch]["loader"]
    found[soname] = guest_path
    return found


# ---- cpio (newc) ------------------------------------------------------------------------------------

class Cpio:
    """A newc cpio writer: entries with any owner and device nodes, no root needed."""

    def __init__(self):
        self.entries = {}                 # guest path -> (mode, data, rdev)

    def dir(self, path):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b"", (0, 0)))

    def file(self, path, data, mode=0o644):
        self.dir(os.path.dirname(path.strip("/")) or ".")
        self.entries[path.strip("/")] = (stat.S_IFREG | mode, data, (0, 0))

    def host_file(self, path, host_path, mode=None):
        real = os.path.realpath(host_path)
        with open(real, "rb") as f:
            data = f.read()
        self.file(path, data, mode if mode is not None else os.stat(real).st_mode & 0o777)

    def symlink(self, path, target):
        self.dir(os.path.dirname(path.strip("/")) or ".")
        self.entries[path.strip("/")] = (stat.S_IFLNK | 0o777, target.encode(), (0, 0))

    def node(self, path, kind, major, minor, mode=0o600):
        self.dir(os.path.dirname(path.strip("/")))
        self.entries[path.strip("/")] = (kind | mode, b"", (major, minor))

    def write_dir(self, top):
        """The same tree as files under top (device nodes left out: the agent mounts
        devtmpfs, and making nodes needs root)."""
        for name in sorted(n for n in self.entries if n != "."):
            mode, data, _ = self.entries[name]
            path = os.path.join(top, name)
            if stat.S_ISDIR(mode):
                os.makedirs(path, exist_ok=True)
            elif stat.S_ISLNK(mode):
                os.symlink(data.decode(), path)
            elif stat.S_ISREG(mode):
                with open(path, "wb") as f:
                    f.write(data)
                os.chmod(path, mode & 0o7777)

    def write(self, out):
        with open(out, "wb") as f:
            ino = 1
            for name in sorted(n for n in self.entries if n != "."):
                mode, data, (major, minor) = self.entries[name]
                self._entry(f, ino, name, mode, data, major, minor)
                ino += 1
            self._entry(f, ino, "TRAILER!!!", 0, b"", 0, 0)

    @staticmethod
    def _entry(f, ino, name, mode, data, rmajor, rminor):
        encoded = name.encode() + b"\x00"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmajor, rminor, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        f.write(header + encoded + b"\x00" * (-(len(header) + len(encoded)) % 4))
        f.write(data + b"\x00" * (-len(data) % 4))


# ---- the image -------------------------------------------------------------------------------------------

NOTIFY_RECEIVER_PORT = 5555


def notify_receiver_files():
    """Extra files for a guest that receives systemd's notify messages itself, standing in
    for a host that could listen on vsock (this machine has no vhost-vsock): boot it with
    rdinit=/notify-init. The receiver must listen before the agent says READY=1, so the
    wrapper loads vsock_loopback (with the agent's own loader, from /init: the .pyz), starts
    the receiver, waits until it listens, then execs the agent."""
    with open(os.path.join(HERE, "guest", "notify_receiver.py"), "rb") as f:
        receiver = f.read()
    return {"/notify_receiver.py": receiver,
            "/notify-init": (
                b"#!/bin/sh\n/usr/bin/python3 -S -c \"import sys; sys.path.insert(0, '/init'); "
                b"import agent; agent.load_modules(sys.argv[1:])\" vsock_loopback\n"
                b"/usr/bin/python3 -S /notify_receiver.py %d /tmp/rx-ready &\n"
                b"while [ ! -e /tmp/rx-ready ]; do sleep 0.02; done\nexec /init\n"
                % NOTIFY_RECEIVER_PORT)}


def notify_smbios_args():
    """QEMU arguments passing the notify address the way systemd-vmspawn does."""
    return ["-smbios", "type=11,value=io.systemd.credential:vmm.notify_socket=vsock:1:%d"
            % NOTIFY_RECEIVER_PORT]


def _add_busybox(img, arch):
    """busybox and its applet links. Another architecture's busybox cannot run here to list
    its applets: Debian builds busybox-static alike for every architecture, so the host's
    list is used."""
    if not os.path.exists(BUSYBOX):
        raise ImageError("%s is missing (apt-get install busybox-static)" % BUSYBOX)
    binary = BUSYBOX if arch == HOST_ARCH else os.path.join(fetch_packages(arch), "bin",
                                                              "busybox")
    img.host_file("/bin/busybox", binary, 0o755)
    for applet in _run([BUSYBOX, "--list-full"]).split():
        if applet.strip("/") != "bin/busybox":
            img.symlink("/" + applet, "/bin/busybox")


def _add_python(img, root, pyz, arch):
    """The guest Python: binary, libraries, the landmark and only the imported stdlib
    files, as sourceless unchecked-hash .pyc (bytecode does not depend on the
    architecture: the host-architecture guest interpreter of the same version compiles)."""
    python_bin = os.path.join(root, "usr", "bin", PY)
    img.host_file("/usr/bin/" + PY, python_bin, 0o755)
    img.symlink("/usr/bin/python3", PY)
    stdlib = os.path.join(root, "usr", "lib", PY)
    files = stdlib_files(root, pyz, arch)
    dynload = [os.path.join(stdlib, f) for f in files if f.endswith(".so")]
    for soname, guest_path in sorted(shared_libraries(root, [python_bin] + dynload,
                                                      arch).items()):
        img.host_file(guest_path, os.path.join(root, guest_path.lstrip("/")), 0o755)
    img.dir("/usr/lib/%s/lib-dynload" % PY)
    sources = [rel for rel in files + ["os.py"] if rel.endswith(".py")]  # os: getpath's landmark
    for rel in files:
        if rel.endswith(".so"):
            if not os.path.exists(os.path.join(stdlib, rel)):
                raise ImageError("%s is not in the %s guest Python" % (rel, arch))
            img.host_file("/usr/lib/%s/%s" % (PY, rel), os.path.join(stdlib, rel), 0o755)
    host_root = root if arch == HOST_ARCH else fetch_packages(HOST_ARCH)
    compiler = os.path.join(host_root, "usr", "bin", PY)
    with tempfile.TemporaryDirectory() as tmp:
        _run([compiler, "-S", "-c", COMPILE, stdlib, tmp, "/usr/lib/" + PY] + sources,
             env={"PYTHONHOME": os.path.join(host_root, "usr")})
        for rel in sources:
            img.host_file("/usr/lib/%s/%s" % (PY, rel[:-3] + ".pyc"),
                          os.path.join(tmp, rel[:-3] + ".pyc"), 0o644)
    return files


def _add_modules(img, root, modules):
    release = kernel_release(root)
    found, deps = module_closure(root, modules)
    base = "/lib/modules/%s/" % release
    for name, rel in sorted(found.items()):
        img.host_file(base + rel, os.path.join(root, base.lstrip("/"), rel), 0o644)
    text = modules_dep_text(found, deps)
    img.file(base + "modules.dep", text.encode())
    return found, text


def _add_basics(img, extra_files):
    img.node("/dev/console", stat.S_IFCHR, 5, 1, 0o600)
    img.node("/dev/null", stat.S_IFCHR, 1, 3, 0o666)
    img.node("/dev/urandom", stat.S_IFCHR, 1, 9, 0o666)
    for d in ("/proc", "/sys", "/dev", "/run", "/tmp", "/mnt", "/root", "/etc"):
        img.dir(d)
    for path, data in sorted((extra_files or {}).items()):
        mode = 0o755 if data.startswith(b"#!") else 0o644
        img.file(path, data, mode)


def build_initramfs(pyz, out, extra_files=None, modules=None, init=None, arch=HOST_ARCH,
                    qemu_ga=False, dmsetup=False, links=None):
    """Write the initramfs; returns a dict describing what went in. `init` replaces the
    .pyz as /init (the benchmarks' baseline agent); `qemu_ga` adds qemu-ga 10 (Debian 13's),
    `dmsetup` Debian's dmsetup; `links`: {path: target} symlinks."""
    root = fetch_packages(arch)
    img = Cpio()
    _add_busybox(img, arch)
    files = _add_python(img, root, pyz, arch)
    if qemu_ga:
        _add_qemu_ga(img)
    if dmsetup:
        _add_program(img, fetch_debs("dmsetup", DMSETUP_DEBS), DMSETUP)
    found, _ = _add_modules(img, root, image_modules(arch) if modules is None else modules)
    if init is None:
        img.host_file("/init", pyz, 0o755)
    else:
        img.file("/init", init, 0o755)
    _add_basics(img, extra_files)
    for path, target in sorted((links or {}).items()):
        img.symlink(path, target)
    img.write(out)
    return {"release": kernel_release(root), "stdlib": sorted(files), "modules": sorted(found),
            "size": os.path.getsize(out), "sha256": _sha256(out), "arch": arch}


# ---- a disk root filesystem, and the tiny initramfs that mounts it ---------------------------

def build_rootfs(pyz, out, extra_files=None, arch=HOST_ARCH, size_mb=160):
    """An ext4 root filesystem image, made without root privileges (mkfs.ext4 -d): the
    same busybox, guest Python and modules as the initramfs, and the .pyz installed the way
    the README says: /sbin/arcbox-agent, and /sbin/init pointing at it."""
    if shutil.which("mkfs.ext4") is None:
        raise ImageError("mkfs.ext4 is missing (apt-get install e2fsprogs)")
    root = fetch_packages(arch)
    img = Cpio()
    _add_busybox(img, arch)
    files = _add_python(img, root, pyz, arch)
    found, _ = _add_modules(img, root, image_modules(arch))
    img.host_file("/sbin/arcbox-agent", pyz, 0o755)
    img.symlink("/sbin/init", "arcbox-agent")
    _add_basics(img, extra_files)
    with tempfile.TemporaryDirectory() as tree:
        img.write_dir(tree)
        if os.path.exists(out):
            os.unlink(out)
        _run(["mkfs.ext4", "-q", "-F", "-L", "arcbox-root", "-d", tree, out, "%dM" % size_mb])
    return {"release": kernel_release(root), "stdlib": sorted(files), "modules": sorted(found),
            "size": os.path.getsize(out), "arch": arch}


BOOT_INIT = """#!/bin/sh
# A tiny initramfs, the way distributions boot a disk root: Debian's kernels build the
# virtio and ext4 drivers as modules, so load them, mount root= (ro unless the cmdline says
# rw, as the kernel would), and switch_root to its init (/sbin/init unless init= says).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in %(modules)s; do
    insmod "$m" 2>/dev/null || grep -q "^$(basename "$m" .ko | tr - _) " /proc/modules \
        || echo "boot: insmod $m failed"
done
root=/dev/vda mode=ro init=/sbin/init
for word in $(cat /proc/cmdline); do
    case "$word" in
        root=*) root="${word#root=}" ;;
        rw) mode=rw ;;
        ro) mode=ro ;;
        init=*) init="${word#init=}" ;;
    esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o "$mode" "$root" /newroot; then
    echo "boot: cannot mount $root ($mode): the kernel lacks a driver, or it is no ext4"
    poweroff -f
fi
umount /sys /proc
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
"""


def build_boot_initramfs(out, arch=HOST_ARCH):
    """The initramfs that boots a disk root (BOOT_INIT): busybox and the modules to reach
    a virtio disk with ext4, loaded with insmod in dependency order."""
    root = fetch_packages(arch)
    img = Cpio()
    _add_busybox(img, arch)
    found, text = _add_modules(img, root, [m for m in ROOT_MODULES
                                           if m in _module_index(root)])
    base = "/lib/modules/%s/" % kernel_release(root)
    order = []
    for line in text.splitlines():          # "path: deps..." as modules_dep_text writes it
        path, _, deps = line.partition(":")
        for rel in list(reversed(deps.split())) + [path]:
            if base + rel not in order:
                order.append(base + rel)
    img.file("/init", (BOOT_INIT % {"modules": " ".join(order)}).encode(), 0o755)
    _add_basics(img, {})
    img.dir("/newroot")
    img.write(out)
    return {"modules": sorted(found), "size": os.path.getsize(out)}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def main():
    parser = argparse.ArgumentParser(description="Build a busybox guest with the agent: an "
                                     "initramfs (the .pyz as /init), or an ext4 root image "
                                     "(/sbin/init -> /sbin/arcbox-agent) with its boot "
                                     "initramfs.")
    parser.add_argument("--pyz", default=os.path.join(REPO, "dist", "arcbox-agent.pyz"))
    parser.add_argument("--arch", default=HOST_ARCH, choices=sorted(ARCHES))
    parser.add_argument("-o", "--output", default=None,
                        help="initramfs (default CACHE/initramfs-ARCH.cpio)")
    parser.add_argument("--rootfs", metavar="IMG",
                        help="instead: an ext4 root image, and IMG.boot.cpio to boot it")
    args = parser.parse_args()
    try:
        kernel = kernel_image(fetch_packages(args.arch), args.arch)
        if args.rootfs:
            info = build_rootfs(args.pyz, args.rootfs, arch=args.arch)
            build_boot_initramfs(args.rootfs + ".boot.cpio", arch=args.arch)
            print("root image %s (%d bytes) and %s.boot.cpio; boot with root=/dev/vda rw"
                  % (args.rootfs, info["size"], args.rootfs))
        else:
            out = args.output or os.path.join(CACHE, "initramfs-%s.cpio" % args.arch)
            info = build_initramfs(args.pyz, out, arch=args.arch)
            print("initramfs %s: %d bytes" % (out, info["size"]))
    except ImageError as exc:
        raise SystemExit("guestimage: %s" % exc)
    print("kernel %s (%s), %s" % (info["release"], kernel, args.arch))
    print("stdlib files: %s" % " ".join(info["stdlib"]))
    print("modules: %s" % " ".join(info["modules"]))


if __name__ == "__main__":
    sys.exit(main())
