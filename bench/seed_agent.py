#!/usr/bin/python3 -S
"""The baseline for the benchmarks: the shutdown algorithm this project replaces, as the
user's seed and the Rust agent 0.4.9 do it, in a small blocking server.

  reply, then the Rust handler's fixed 100 ms sleep before teardown;
  kill(-1, SIGTERM); poll waitpid(WNOHANG) with 100 ms sleeps until nobody is left or the
  grace is over; kill(-1, SIGKILL); reap for up to 500 ms (100 ms sleeps); sync; reboot().

Borrowed from agent.py, so that only the algorithm differs: the wire codec, the early mounts
and module loading (in a VM), and the log line format (for the grace-precision figure).
Where the seed is vague this version is the *faster* reading (it stops polling as soon as
waitpid says ECHILD), so the ratios against it are conservative.

usage: seed_agent.py --listen ADDR [--log L] [--handler-delay S]   (ADDR: unix:PATH or
       serial:NAME; --handler-delay 0 drops the Rust handler's 100 ms sleep)
"""

import os
import signal
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for candidate in ("/arcbox-agent.pyz", os.path.join(os.path.dirname(HERE), "agent.py")):
    if os.path.exists(candidate):
        sys.path.insert(0, candidate if candidate.endswith(".pyz") else os.path.dirname(candidate))
        break
import agent  # noqa: E402

POLL = 0.1            # the seed's polling interval
ANSWERED = []         # non-empty once the first answer is written
REAP_WINDOW = 0.5     # after SIGKILL
HANDLER_DELAY = 0.1   # the Rust handler's sleep between reply and teardown (--handler-delay)


def reap_all():
    """True when nobody is left (ECHILD)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False


def shutdown(grace):
    time.sleep(HANDLER_DELAY)
    agent.log("info", "shutdown requested: grace %gs" % grace)
    agent.kill_all(signal.SIGTERM)
    agent.log("info", "shutdown: SIGTERM sent to all processes (grace %gs)" % grace)
    deadline = time.monotonic() + grace
    gone = reap_all()
    while not gone and time.monotonic() < deadline:
        time.sleep(POLL)
        gone = reap_all()
    if not gone:
        agent.kill_all(signal.SIGKILL)
        agent.log("info", "shutdown: grace over, SIGKILL sent to the rest")
        end = time.monotonic() + REAP_WINDOW
        while not reap_all() and time.monotonic() < end:
            time.sleep(POLL)
    started = time.monotonic()
    os.sync()
    agent.log("info", "shutdown: sync() took %.2f ms"
              % ((time.monotonic() - started) * 1000))
    agent.log("info", "shutdown: calling reboot(poweroff)")
    agent.call_reboot(agent.LINUX_REBOOT_CMD_POWER_OFF)
    agent.log("error", "reboot() returned")
    os._exit(1)


def answer(msg_type, payload, trace):
    if msg_type == agent.MSG_PING:
        return agent.encode_frame(0x1001, agent.encode_message(
            agent.PING_RESPONSE, {"message": "pong", "version": "seed"}), trace), None
    if msg_type == agent.MSG_SHUTDOWN:
        grace = agent.decode_message(agent.SHUTDOWN_REQUEST, payload)["timeout_seconds"] or 25
        return agent.encode_frame(0x100A, agent.encode_message(
            agent.SHUTDOWN_RESPONSE, {"accepted": True}), trace), grace
    return agent.encode_frame(agent.MSG_ERROR, agent.encode_error(400, "unsupported"), trace), None


def serve_stream(read, write):
    buf = bytearray()
    while True:
        frame = agent.decode_frame(buf, 1 << 20)
        if frame is None:
            chunk = read()
            if not chunk:
                return
            buf += chunk
            continue
        del buf[:frame[3]]
        reply, grace = answer(frame[0], frame[2], frame[1])
        write(reply)
        if not ANSWERED:                  # for bench/boot.py: the first answer, on the log
            ANSWERED.append(True)
            agent.log("info", "first answer")
            if os.getpid() == 1:
                exec_at = agent.kernel_handoff()
                agent.log("info", "start: exec at %s" % (
                    "%.3fs" % exec_at if exec_at is not None else "?"))
        if grace is not None:
            shutdown(grace)


def cmdline_value(key):
    for word in agent.split_cmdline(agent._read_text("/proc/cmdline")):
        if word.startswith(key + "="):
            return word.split("=", 1)[1]
    return ""


def main():
    global HANDLER_DELAY
    addr = ("unix", "/tmp/seed.sock")
    args = sys.argv[1:]
    if "--handler-delay" in args:         # 0: the seed's algorithm without the Rust sleep
        HANDLER_DELAY = float(args[args.index("--handler-delay") + 1])
    if "--log" in args:
        agent.set_log_level(args[args.index("--log") + 1])
    if "--listen" in args:
        addr = agent.parse_address(args[args.index("--listen") + 1])
    if os.getpid() == 1:                  # a VM guest: the same boot as the agent's
        agent.early_boot()
        agent.load_modules(agent._parse_words(cmdline_value("arcbox.modules")))
        if "--listen" not in args:        # the first serial address of arcbox.listen=
            addr = next(a for a in agent._parse_listen(cmdline_value("arcbox.listen"))
                        if a[0] == "serial")
    agent.log("info", "ready (pid %d, seed baseline)" % os.getpid())
    if addr[0] == "serial":
        while True:
            try:
                fd = os.open(agent.resolve_serial_port(addr[1]), os.O_RDWR | os.O_NOCTTY)
                break
            except OSError:
                time.sleep(POLL)

        def read_serial():
            data = os.read(fd, 65536)
            if not data:
                time.sleep(POLL)          # the host side is not connected
            return data

        while True:
            serve_stream(read_serial, lambda data: os.write(fd, data))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(addr[1]):
        os.unlink(addr[1])
    server.bind(addr[1])
    server.listen(16)
    while True:
        conn, _ = server.accept()
        with conn:
            serve_stream(lambda: conn.recv(65536), conn.sendall)


if __name__ == "__main__":
    main()
