"""Boot the busybox guest (tools/guestimage.py) under QEMU with arcbox-agent.pyz as /init.

Facts this follows (DESIGN.md, "How we test", measured on this machine kind):
- TCG only (`/dev/kvm` here does not run stock kernels), `-M pc` (microvm hung in ~7-10 % of
  TCG boots), `-cpu max` (RDRAND: no 1 s entropy stall), qboot, the ELF vmlinux through PVH;
- no vhost-vsock on this host: the host talks to the agent over a virtio-serial port that
  QEMU exposes as a Unix socket (`-chardev socket` + `virtserialport`);
- QEMU exits 0 on power-off *and* after a panic with panic=-1, so a pvpanic-pci device turns
  a panic into a failure exit, and the console must say "reboot: Power down";
- every run has a hard timeout.
aarch64 (`arch="aarch64"`): qemu-system-aarch64 `-M virt -cpu max` (pauth-impdef: the
cheap pointer-authentication algorithm, much faster under TCG), the kernel's Image booted
directly (QEMU makes the device tree; power-off is PSCI SYSTEM_OFF), console on the PL011
(ttyAMA0). Debian's arm64 kernel has no pvpanic: a panic is told by the console there.
"""

import os

import guestimage
from guestctl import GuestProcess

SERIAL_PORT_NAME = "org.arcbox.agent"
QGA_PORT_NAME = "org.qemu.guest_agent.0"      # what libvirt and Proxmox VE give the guest
QEMU_GA_PEER_PORT = "org.qemu.guest_agent.peer"   # Debian's qemu-ga, beside the agent (tests)
QEMU = "qemu-system-x86_64"
QEMU_BY_ARCH = {"x86_64": (QEMU, "qemu-system-x86"),
                "aarch64": ("qemu-system-aarch64", "qemu-system-arm")}
MACHINE = {
    "x86_64": ["-M", "pc", "-accel", "tcg", "-cpu", "max", "-bios",
               "/usr/share/qemu/qboot.rom", "-device", "pvpanic-pci",
               "-action", "panic=exit-failure"],
    "aarch64": ["-M", "virt", "-accel", "tcg", "-cpu", "max,pauth-impdef=on"],
}
CONSOLE = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}


def why_vm_unavailable(arch="x86_64"):
    import shutil
    qemu, package = QEMU_BY_ARCH[arch]
    for tool, pkg in ((qemu, package), ("cpio", "cpio")):
        if shutil.which(tool) is None:
            return "%s is missing (apt-get install %s)" % (tool, pkg)
    if not os.path.exists(guestimage.BUSYBOX):
        return "%s is missing (apt-get install busybox-static)" % guestimage.BUSYBOX
    if arch == "x86_64" and not os.path.exists("/usr/share/qemu/qboot.rom"):
        return "/usr/share/qemu/qboot.rom is missing (apt-get install qemu-system-x86)"
    return None


class VM(GuestProcess):
    """One QEMU guest: start(), then talk to `agent_address` (unix:...), then wait(). Its log
    is the serial console, where the agent's lines stand between the kernel's."""

    what = "the VM"
    ready_timeout = 60.0           # a TCG boot on a loaded machine
    request_timeout = 10.0

    def __init__(self, workdir, initramfs, kernel, cmdline="", disk=None, memory=256,
                 log_level="info", qemu_args=(), arch="x86_64", modules=(), ports=()):
        GuestProcess.__init__(self, workdir, os.path.join(workdir, "agent-serial.sock"),
                              os.path.join(workdir, "console.log"),
                              output_path=os.path.join(workdir, "qemu.out"))
        self.monitor = os.path.join(workdir, "monitor.sock")
        # every guest gets the QGA port libvirt would give it (its host side: qga_sock), and
        # `ports` more virtio-serial ports by name (host side: port_socket(name))
        self.qga_sock = os.path.join(workdir, "qga.sock")
        self.ports = [QGA_PORT_NAME] + list(ports)
        self.initramfs, self.kernel = initramfs, kernel
        # one disk image or a list of them: /dev/vda, /dev/vdb, ... in that order
        self.disks = [disk] if isinstance(disk, str) else list(disk or ())
        self.memory = memory
        self.qemu_args = list(qemu_args)
        self.arch = arch
        self.cmdline = " ".join([
            "console=" + CONSOLE[arch], "quiet", "panic=-1", "rdinit=/init",
            "arcbox.modules=" + ",".join(guestimage.guest_modules(arch) + list(modules)),
            "arcbox.listen=serial:%s,vsock:any:1024" % SERIAL_PORT_NAME,
            "arcbox.log=" + log_level, cmdline]).strip()

    @property
    def agent_address(self):
        return self.address

    def command(self):
        cmd = [QEMU_BY_ARCH[self.arch][0]] + MACHINE[self.arch] + [
               "-m", str(self.memory),
               "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config",
               "-kernel", self.kernel, "-initrd", self.initramfs, "-append", self.cmdline,
               "-serial", "file:" + self.log_path,
               "-monitor", "unix:%s,server=on,wait=off" % self.monitor,
               "-device", "virtio-serial-pci,id=vser",
               "-chardev", "socket,id=agent,path=%s,server=on,wait=off" % self.sock,
               "-device", "virtserialport,bus=vser.0,chardev=agent,name=" + SERIAL_PORT_NAME]
        for i, name in enumerate(self.ports):
            cmd += ["-chardev", "socket,id=port%d,path=%s,server=on,wait=off"
                    % (i, self.port_socket(name)),
                    "-device", "virtserialport,bus=vser.0,chardev=port%d,name=%s" % (i, name)]
        for disk in self.disks:
            cmd += ["-drive", "file=%s,if=virtio,format=raw,cache=writeback" % disk]
        return cmd + self.qemu_args

    def port_socket(self, name):
        return self.qga_sock if name == QGA_PORT_NAME else os.path.join(
            self.workdir, "port-%s.sock" % name)

    def start(self):
        for path in [self.sock, self.log_path] + [self.port_socket(n) for n in self.ports]:
            if os.path.exists(path):
                os.unlink(path)
        return GuestProcess.start(self)

    def after_start(self):
        self.wait_for_socket(30)

    def monitor_command(self, command):
        """A QEMU human-monitor command, e.g. 'sendkey ctrl-alt-delete'; returns its output."""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.monitor)
        out = b""
        try:
            while b"(qemu)" not in out:
                out += s.recv(4096)
            s.sendall(command.encode() + b"\n")
            out = b""
            while out.count(b"(qemu)") < 1:
                chunk = s.recv(4096)
                if not chunk:      # "quit": QEMU closes the monitor instead of a prompt
                    break
                out += chunk
        finally:
            s.close()
        return out.decode("utf-8", "replace")

    def console(self):
        return self.log()

    def powered_off(self):
        text = self.console()
        return "reboot: Power down" in text and "Kernel panic" not in text
