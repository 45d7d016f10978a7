#!/usr/bin/python3 -S
"""The card's floor, as a guest's /init: what any Python init that answers the host must do,
and nothing more. The five imports of the design card (os, signal, socket, time, ctypes),
/proc, /sys and /dev, the two modules the virtio-serial port needs (virtio_pci,
virtio_console; finit_module in modules.dep order), the port found by name, and ArcBox Pings
answered (a fixed pong, the request's trace echoed). The benchmark's baseline for
boot-to-first-answer (bench/boot.py); never used by the agent.

Fair to both: no console line before the first answer (the agent holds its lines until then:
a line costs ~30 ms on a TCG serial console), and the first answer stamped after its write(),
the event the agent's "first answer" line stamps too."""

import ctypes
import os
import signal  # noqa: F401  (the card's five imports: their cost is the floor's)
import socket  # noqa: F401
import time

IMPORTS_DONE = time.clock_gettime(time.CLOCK_BOOTTIME)
PORT = "org.arcbox.agent"
TRANSPORT = ["virtio_pci", "virtio_console"]
FINIT_MODULE = {"x86_64": 313, "aarch64": 273}[os.uname().machine]
PONG = b"\x0a\x04pong\x12\x050.1.0"            # PingResponse{message: "pong", version}


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    for source, target, fstype in (("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"),
                                   ("devtmpfs", "/dev", "devtmpfs")):
        libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None)
    base = "/lib/modules/" + os.uname().release
    deps = {}
    with open(base + "/modules.dep") as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[os.path.basename(path).split(".ko")[0]] = \
                list(reversed(rest.split())) + [path]
    for name in TRANSPORT:
        for path in deps.get(name, []):
            fd = os.open(base + "/" + path, os.O_RDONLY)
            libc.syscall(FINIT_MODULE, fd, b"", 0)     # EEXIST for a dependency loaded twice
            os.close(fd)
    device = None
    while device is None:
        for port in os.listdir("/sys/class/virtio-ports") if os.path.isdir(
                "/sys/class/virtio-ports") else []:
            try:
                with open("/sys/class/virtio-ports/%s/name" % port) as f:
                    if f.read().strip() == PORT:
                        device = "/dev/" + port
            except OSError:
                pass                                   # a port whose name is not there yet
        if device is None:
            time.sleep(0.005)
    while True:
        try:
            fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
            break
        except OSError:
            time.sleep(0.005)                          # /dev's node comes a moment later
    buf = b""
    answered = False
    while True:
        data = os.read(fd, 65536)
        if not data:
            time.sleep(0.01)                           # the host side is not connected
            continue
        buf += data
        while len(buf) >= 10:
            length = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + length:
                break
            frame, buf = buf[4:4 + length], buf[4 + length:]
            msg_type = int.from_bytes(frame[:4], "big")
            trace_len = int.from_bytes(frame[4:6], "big")
            trace = frame[6:6 + trace_len]
            body = (msg_type | 0x1000).to_bytes(4, "big") + len(trace).to_bytes(2, "big") \
                + trace + PONG
            os.write(fd, len(body).to_bytes(4, "big") + body)
            if not answered:
                answered = True
                report(time.clock_gettime(time.CLOCK_BOOTTIME))


def report(first):
    """Once answered: when, and when the kernel ran us ("Run /init as init process" in the
    kernel log), both on the boot clock; on the console for bench/boot.py."""
    exec_at = "?"
    kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                record = os.read(kmsg, 8192)
            except BlockingIOError:
                break
            except OSError:
                continue
            head, _, text = record.partition(b";")
            if text.startswith(b"Run ") and b" as init process" in text:
                exec_at = "%.6f" % (int(head.split(b",")[2]) / 1e6)
                break
    finally:
        os.close(kmsg)
    os.write(1, ("FLOOR-FIRST-ANSWER %.6f EXEC-AT %s IMPORTS-DONE %.6f\n"
                 % (first, exec_at, IMPORTS_DONE)).encode())


main()
