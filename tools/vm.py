"""Boot the busybox guest (tools/guestimage.py) under QEMU with arcbox-agent.pyz as /init.

Facts this follows (DESIGN.md section 6.3, measured on this machine kind):
- TCG only (`/dev/kvm` here does not run stock kernels), `-M pc` (microvm hung in ~7-10 % of
  TCG boots), `-cpu max` (RDRAND: no 1 s entropy stall), qboot, the ELF vmlinux through PVH;
- no vhost-vsock on this host: the host talks to the agent over a virtio-serial port that
  QEMU exposes as a Unix socket (`-chardev socket` + `virtserialport`);
- QEMU exits 0 on power-off *and* after a panic with panic=-1, so a pvpanic-pci device turns
  a panic into a failure exit, and the console must say "reboot: Power down";
- every run has a hard timeout.
"""

import os
import subprocess
import sys
import time

import guestimage
import nsguest

sys.path.insert(0, guestimage.REPO)
import agent  # noqa: E402

SERIAL_PORT_NAME = "org.arcbox.agent"
QEMU = "qemu-system-x86_64"


def why_vm_unavailable():
    import shutil
    for tool, package in ((QEMU, "qemu-system-x86"), ("cpio", "cpio")):
        if shutil.which(tool) is None:
            return "%s is missing (apt-get install %s)" % (tool, package)
    if not os.path.exists(guestimage.BUSYBOX):
        return "%s is missing (apt-get install busybox-static)" % guestimage.BUSYBOX
    if not os.path.exists("/usr/share/qemu/qboot.rom"):
        return "/usr/share/qemu/qboot.rom is missing (apt-get install qemu-system-x86)"
    return None


class VM:
    """One QEMU guest: start(), then talk to `agent_address` (unix:...), then wait()."""

    def __init__(self, workdir, initramfs, kernel, cmdline="", disk=None, memory=256,
                 log_level="info"):
        self.workdir = workdir
        self.socket = os.path.join(workdir, "agent-serial.sock")
        self.monitor = os.path.join(workdir, "monitor.sock")
        self.console_path = os.path.join(workdir, "console.log")
        self.initramfs, self.kernel, self.disk = initramfs, kernel, disk
        self.memory = memory
        self.cmdline = " ".join([
            "console=ttyS0", "quiet", "panic=-1", "rdinit=/init",
            "arcbox.modules=" + ",".join(guestimage.GUEST_MODULES),
            "arcbox.listen=serial:%s,vsock:any:1024" % SERIAL_PORT_NAME,
            "arcbox.log=" + log_level, cmdline]).strip()
        self.proc = None
        self.started = None

    @property
    def agent_address(self):
        return "unix:" + self.socket

    def command(self):
        cmd = [QEMU, "-M", "pc", "-accel", "tcg", "-cpu", "max", "-m", str(self.memory),
               "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config",
               "-bios", "/usr/share/qemu/qboot.rom",
               "-kernel", self.kernel, "-initrd", self.initramfs, "-append", self.cmdline,
               "-serial", "file:" + self.console_path,
               "-monitor", "unix:%s,server=on,wait=off" % self.monitor,
               "-device", "pvpanic-pci", "-action", "panic=exit-failure",
               "-device", "virtio-serial-pci,id=vser",
               "-chardev", "socket,id=agent,path=%s,server=on,wait=off" % self.socket,
               "-device", "virtserialport,bus=vser.0,chardev=agent,name=" + SERIAL_PORT_NAME]
        if self.disk:
            cmd += ["-drive", "file=%s,if=virtio,format=raw,cache=writeback" % self.disk]
        return cmd

    def start(self):
        for path in (self.socket, self.console_path):
            if os.path.exists(path):
                os.unlink(path)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise RuntimeError("qemu exited at once: %s"
                                   % self.proc.stdout.read().decode("utf-8", "replace"))
            if time.monotonic() > deadline:
                raise RuntimeError("qemu made no serial socket within 30 s")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout=60.0):
        """Ping over the virtio-serial port until the agent answers; returns the seconds
        from QEMU's start."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the VM stopped before the agent answered (%s):\n%s"
                                   % (self.proc.returncode, self.console()[-4000:]))
            try:
                self.request(agent.MSG_PING, timeout=1.0)
                return time.monotonic() - self.started
            except agent.ClientError as exc:
                last = exc
                time.sleep(0.02)
        raise RuntimeError("the agent did not answer within %gs (%s):\n%s"
                           % (timeout, last, self.console()[-4000:]))

    def request(self, msg_type, payload=b"", timeout=10.0):
        return nsguest.request(self.socket, msg_type, payload, timeout)

    def shutdown(self, grace=0, timeout=10.0):
        return nsguest.ask_shutdown(self.socket, grace, timeout)

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
                out += s.recv(4096)
        finally:
            s.close()
        return out.decode("utf-8", "replace")

    def wait(self, timeout):
        """Wait for QEMU to exit; returns its status. Kills it at the timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("the VM did not stop within %gs; console:\n%s"
                               % (timeout, self.console()[-4000:]))

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def console(self):
        try:
            with open(self.console_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def powered_off(self):
        text = self.console()
        return "reboot: Power down" in text and "Kernel panic" not in text

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
