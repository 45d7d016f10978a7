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

    python3 tools/guestimage.py [--pyz dist/arcbox-agent.pyz] [-o initramfs.cpio]
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CACHE = os.environ.get("ARCBOX_CACHE") or os.path.expanduser("~/.cache/arcbox-agent")
PY = "python3.11"
PYTHON_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libffi8",
               "libc6", "zlib1g", "libexpat1"]
# Modules the VM tests need, loaded by the agent at boot (arcbox.modules=) in this order.
GUEST_MODULES = ["virtio_pci", "pvpanic_pci", "virtio_console", "virtio_blk", "crc32c_generic",
                 "ext4", "vsock_loopback"]
# In the image too, but not in arcbox.modules: the agent loads these itself for the power
# button when modules.dep lists them (ACPI button driver and evdev on x86).
IMAGE_MODULES = GUEST_MODULES + ["button", "evdev"]
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


def kernel_package():
    """The versioned kernel package behind linux-image-amd64, e.g. linux-image-6.1.0-56-amd64."""
    for line in _run(["apt-cache", "depends", "linux-image-amd64"]).splitlines():
        word = line.strip().split(":")[-1].strip()
        if line.strip().startswith("Depends:") and word.startswith("linux-image-"):
            return word
    raise ImageError("apt-cache knows no linux-image-amd64 (run apt-get update)")


def fetch_packages():
    """Download and unpack the kernel and guest-Python packages once; returns the root."""
    root = os.path.join(CACHE, "root")
    stamp = os.path.join(CACHE, "root.json")
    wanted = [kernel_package()] + PYTHON_DEBS
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("packages") == wanted:
                return root
    debs = os.path.join(CACHE, "debs")
    os.makedirs(debs, exist_ok=True)
    # _apt cannot write into root's home: download as root, into our own folder.
    _run(["apt-get", "download", "-o", "APT::Sandbox::User=root"] + wanted, cwd=debs)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for name in sorted(os.listdir(debs)):
        if name.endswith(".deb") and name.split("_")[0] in wanted:
            _run(["dpkg-deb", "-x", os.path.join(debs, name), root])
    with open(stamp, "w") as f:
        json.dump({"packages": wanted}, f)
    return root


def kernel_release(root):
    releases = sorted(os.listdir(os.path.join(root, "lib", "modules")))
    if not releases:
        raise ImageError("no kernel modules under %s/lib/modules" % root)
    return releases[-1]


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


def module_closure(root, names):
    """{module name: path relative to /lib/modules/REL} for names and what they depend on,
    read from each .ko's modinfo (the deb ships no modules.dep; depmod is not needed)."""
    release = kernel_release(root)
    base = os.path.join(root, "lib", "modules", release)
    index = {}
    for dirpath, _, files in os.walk(os.path.join(base, "kernel")):
        for name in files:
            if name.endswith(".ko"):
                index[name[:-3].replace("-", "_")] = os.path.relpath(os.path.join(dirpath, name),
                                                                     base)
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


def stdlib_files(root, pyz):
    """The stdlib files the agent's guest path imports, as the guest interpreter reports."""
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


def shared_libraries(root, binaries):
    """Guest paths of every library the binaries need, transitively, plus the loader."""
    dirs = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
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
    found["ld-linux-x86-64.so.2"] = "/lib64/ld-linux-x86-64.so.2"
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
    with open(os.path.join(HERE, "guest_notify_receiver.py"), "rb") as f:
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


def build_initramfs(pyz, out, extra_files=None, modules=IMAGE_MODULES, init=None):
    """Write the initramfs; returns a dict describing what went in. `init` replaces the
    .pyz as /init (the benchmarks' baseline agent)."""
    if not os.path.exists(BUSYBOX):
        raise ImageError("%s is missing (apt-get install busybox-static)" % BUSYBOX)
    root = fetch_packages()
    release = kernel_release(root)
    img = Cpio()
    # busybox and its applets
    img.host_file("/bin/busybox", BUSYBOX, 0o755)
    for applet in _run([BUSYBOX, "--list-full"]).split():
        if applet.strip("/") != "bin/busybox":
            img.symlink("/" + applet, "/bin/busybox")
    # python: binary, libraries, the landmark and only the imported stdlib files, compiled
    python_bin = os.path.join(root, "usr", "bin", PY)
    img.host_file("/usr/bin/" + PY, python_bin, 0o755)
    img.symlink("/usr/bin/python3", PY)
    stdlib = os.path.join(root, "usr", "lib", PY)
    files = stdlib_files(root, pyz)
    dynload = [os.path.join(stdlib, f) for f in files if f.endswith(".so")]
    for soname, guest_path in sorted(shared_libraries(root, [python_bin] + dynload).items()):
        img.host_file(guest_path, os.path.join(root, guest_path.lstrip("/")), 0o755)
    img.dir("/usr/lib/%s/lib-dynload" % PY)
    sources = [rel for rel in files + ["os.py"] if rel.endswith(".py")]  # os: getpath's landmark
    for rel in files:
        if rel.endswith(".so"):
            img.host_file("/usr/lib/%s/%s" % (PY, rel), os.path.join(stdlib, rel), 0o755)
    with tempfile.TemporaryDirectory() as tmp:
        # Sourceless, unchecked-hash .pyc compiled by the guest interpreter itself.
        _run([python_bin, "-S", "-c", COMPILE, stdlib, tmp, "/usr/lib/" + PY] + sources,
             env={"PYTHONHOME": os.path.join(root, "usr")})
        for rel in sources:
            img.host_file("/usr/lib/%s/%s" % (PY, rel[:-3] + ".pyc"),
                          os.path.join(tmp, rel[:-3] + ".pyc"), 0o644)
    # kernel modules
    found, deps = module_closure(root, modules)
    base = "/lib/modules/%s/" % release
    for name, rel in sorted(found.items()):
        img.host_file(base + rel, os.path.join(root, base.lstrip("/"), rel), 0o644)
    img.file(base + "modules.dep", modules_dep_text(found, deps).encode())
    # devices, mount points, the agent as /init
    img.node("/dev/console", stat.S_IFCHR, 5, 1, 0o600)
    img.node("/dev/null", stat.S_IFCHR, 1, 3, 0o666)
    img.node("/dev/urandom", stat.S_IFCHR, 1, 9, 0o666)
    for d in ("/proc", "/sys", "/run", "/tmp", "/mnt", "/root", "/etc"):
        img.dir(d)
    if init is None:
        img.host_file("/init", pyz, 0o755)
    else:
        img.file("/init", init, 0o755)
    for path, data in sorted((extra_files or {}).items()):
        mode = 0o755 if data.startswith(b"#!") else 0o644
        img.file(path, data, mode)
    img.write(out)
    return {"release": release, "stdlib": sorted(files), "modules": sorted(found),
            "size": os.path.getsize(out), "sha256": _sha256(out)}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def main():
    parser = argparse.ArgumentParser(description="Build the busybox+agent guest initramfs.")
    parser.add_argument("--pyz", default=os.path.join(REPO, "dist", "arcbox-agent.pyz"))
    parser.add_argument("-o", "--output", default=os.path.join(CACHE, "initramfs.cpio"))
    args = parser.parse_args()
    info = build_initramfs(args.pyz, args.output)
    print("initramfs %s: %d bytes, kernel %s (%s)" % (args.output, info["size"], info["release"],
                                                      vmlinux(fetch_packages())))
    print("stdlib files: %s" % " ".join(info["stdlib"]))
    print("modules: %s" % " ".join(info["modules"]))


if __name__ == "__main__":
    sys.exit(main())
