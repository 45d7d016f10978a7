"""arcbox-agent: a tiny PID 1 for Linux VM guests that the host can power off cleanly.

One flat, stdlib-only module. In the guest it runs as init (PID 1), speaks the ArcBox
host<->guest wire protocol (format V2) on AF_VSOCK port 1024 and, when the host asks, tears
the guest down in order: ack, SIGTERM+SIGCONT to everyone, reap until nobody is left or the
grace ends, SIGKILL, reap, the teardown of what the guest mounted, sync,
reboot(LINUX_REBOOT_CMD_POWER_OFF). On the host the same file is the client: `ping`, `info`,
`shutdown`.

It reads in the order of its story, top-down; no name is used above the section that
defines it (tests/unit/test_structure.py checks both that and this table):
  1. Primitives: logging, files, the C library, child processes
      - what this is, and its exit codes
      - logging: one line per event, time since boot, to the console (and /dev/kmsg)
      - small files, the C library, reboot(2), kill(-1), child processes
  2. Configuration: flags, the kernel cmdline, defaults
      - values: durations, numbers, words, hostnames, IPv4, the network mode
      - addresses: vsock, unix, serial, hvsock; who may ask; where to notify
      - the serve options, from flags and from arcbox.* words on the kernel cmdline
  3. Storage: the guest's mounts, and the kernel's calls on filesystems
      - mounts: what mountinfo says, and which are the guest's
      - the kernel's calls on filesystems: freeze, thaw, remount, swapoff, loops
  4. Boot: early mounts, console, hostname, kernel modules, network
      - early boot: mounts, console, hostname
      - kernel modules: finit_module(2) in modules.dep order, modprobe as the fallback
      - network: loopback up, a static address, or DHCP through busybox's udhcpc
      - boot duties: what needs the configuration
  5. The event loop: one thread, one poll(); signals; reaping; errands
      - the loop and its sources
      - signals
      - reaping: every child, and every orphan when PID 1
      - errands: calls that may block, in a child with a deadline
  6. Beside the server: the workload, udhcpc, the power button, the watchdog, the clock, notify
      - supervised programs: the workload (--exec), udhcpc
      - the power button: evdev devices that can report KEY_POWER
      - the watchdog: petted from the loop, armed across the stop
      - the clock keeper: the system clock kept right from the KVM PTP clock or the RTC
      - telling the host: systemd's VM notify protocol
  7. The wire: ArcBox frames and proto3 messages (pure functions)
      - the ArcBox wire protocol: message types, frames, Error payloads (pure functions)
      - proto3: a tiny encoder/decoder and the messages' schemas
  8. The protocols: what a request does, ArcBox and QGA
      - the protocol seam: what every protocol offers the server
      - requests: Ping, GetSystemInfo, Shutdown, and who may ask (answers and effects)
      - the ArcBox protocol on one stream: bytes in, replies and effects out
      - the QEMU guest agent protocol: JSON commands for libvirt, Proxmox VE, KubeVirt
      - the QGA commands: what each reads or does
      - the QGA commands that read the guest's counters: load, CPUs, disks, routes, memory
      - the QGA commands that change the machine: vCPUs, memory blocks, fstrim, suspend
      - credentials: a user's password and SSH keys (off by default)
      - programs and files for the host: guest-exec, guest-file-* (off by default)
      - freezing the disks for a backup, and thawing them when the host forgets
  9. The server: listeners and connections, two kinds of each
      - the server: listeners and connections, two kinds of each
  10. The power-off: what happens on Shutdown
      - the sequence: a state machine stepped by the event loop
      - tearing down what the guest mounted, the way systemd-shutdown does
      - the power-off child: teardown, then reboot()
  11. The agent: the start-up, the parts wired into one loop, the PID-1 story
      - the start-up: each step when the one before it is done
      - the agent: what a signal, a request or the workload's end starts
      - serve_main(): the PID-1 story, top-down
  12. The host client: ping, info, shutdown, rehearse
      - talking to an agent
      - talking to a QEMU guest agent: ours, or qemu-ga
      - waiting until the guest is gone
      - the commands, for one guest or several at once
      - rehearse: a workload's real power-off in a namespace, no VM
  13. main() and the entry point
      - which command; PID 1's entry, which never returns

Import discipline: the guest path imports only os, signal, socket, time, ctypes (plus sys and
C built-ins such as select, errno, _struct, _thread, marshal, which need no .py files;
collections is loaded by those already). A minimal guest carries only the stdlib files those
pull in. The one exception is QGA: the first QGA request imports json (and re), never boot,
ArcBox serving or the power-off. Host-side commands import argparse/json lazily.
"""

import errno
import _thread
import gc
import marshal
import os
import select
import signal
import socket
import sys
import time
from collections import namedtuple
from operator import itemgetter
from struct import Struct

# The start, step by step, on the boot clock: logged once the agent serves (start_report), so
# that a slow start tells where its time went. The first step ends here, the imports done.
_START_STEPS = [("interpreter, agent.pyc and imports", time.clock_gettime(
    getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)))]


# =============================================================================================
# 1. Primitives: logging, files, the C library, child processes
# =============================================================================================


# ---- what this is, and its exit codes -------------------------------------------------------

__version__ = "0.1.0"
PROG = "arcbox-agent"
EXIT_OK = 0
EXIT_REFUSED = 1       # the agent answered with an Error frame
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3   # cannot connect: refused, no such socket, not listening (hvsock)
EXIT_TIMEOUT = 4
EXIT_PROTOCOL = 5      # the peer's answer does not follow the protocol


# ---- logging: one line per event, time since boot, to the console (and /dev/kmsg) -----------

LOG_LEVELS = {"error": 0, "warn": 1, "info": 2, "debug": 3}
LOG_DEBUG = LOG_LEVELS["debug"]
_log_level = LOG_LEVELS["info"]
_log_fd = 2
_kmsg_fd = -1
_KMSG_PRIORITY = {"error": 3, "warn": 4, "info": 6, "debug": 7}   # syslog levels


def set_log_level(name):
    global _log_level
    _log_level = LOG_LEVELS[name]


def log(level, message):
    """One line per event: seconds since boot, level, message. Never raises: the console
    may be missing (fds 0-2 closed) or full."""
    if LOG_LEVELS[level] > _log_level:
        return
    line = "[%11.6f] %s %s: %s\n" % (_since_boot(), PROG, level, message)
    held = False
    if _held_lines is not None and LOG_LEVELS[level] >= LOG_INFO:
        with _hold_lock:           # the module loader thread logs too
            if _held_lines is not None:
                _held_lines.append(line)   # written at release_console(); the stamp stays
                held = True
    if not held:
        release_console()          # a warning or an error goes out at once, in order
        _write_console(line)
    elif _release_due:
        release_console()          # the alarm came while the line was being held
    if _kmsg_fd >= 0:
        try:
            os.write(_kmsg_fd, ("<%d>%s: %s\n" % (_KMSG_PRIORITY[level], PROG, message))
                     .encode("utf-8", "replace")[:1000])
        except OSError:
            pass


# PID 1 writes its lines through a console descriptor of its own in non-blocking mode
# (use_own_console): a console nobody drains (a serial port whose host side stalls, flow
# control) would otherwise block PID 1 in write(2). What the console cannot take now waits in
# a backlog the loop writes out when it can (ConsoleBacklog), in order; past CONSOLE_BACKLOG
# bytes the newest lines are counted and dropped, and the count is said once it drains. A
# forked child writes through fd 2 as before, blocking: PID 1 bounds every child.
CONSOLE_BACKLOG = 256 << 10
_own_console = -1                 # PID 1's non-blocking console descriptor, once opened
_console_backlog = bytearray()
_console_dropped = 0
# One writer at a time (the loop, the module loader thread): a partial write followed by
# another thread's line would cut a line in two. The hold's alarm never waits for it.
_console_lock = _thread.allocate_lock()


def _write_console(text):
    data = text.encode("utf-8", "replace")
    with _console_lock:
        _write_console_locked(data)
    if _release_due:
        release_console()          # the hold's alarm came while this held the console


def _write_console_locked(data):
    global _console_dropped
    if _console_backlog:
        if len(_console_backlog) + len(data) > CONSOLE_BACKLOG:
            _console_dropped += len(data)
        else:
            _console_backlog.extend(data)
        return
    try:
        written = os.write(_log_fd, data)
    except BlockingIOError:
        written = 0
    except (OSError, ValueError):
        return
    _console_backlog.extend(data[written:])


def flush_console_backlog(*_):
    """Write what the console can take of the backlog now; True when it is empty."""
    with _console_lock:
        return _flush_locked()


def _flush_locked():
    global _console_dropped
    while _console_backlog:
        try:
            written = os.write(_log_fd, _console_backlog)
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            written = len(_console_backlog)        # gone for good: nothing to wait for
        del _console_backlog[:written]
        if not _console_backlog and _console_dropped:
            note, _console_dropped = ("[%11.6f] %s warn: %d bytes of log dropped: the console "
                                      "did not drain\n" % (_since_boot(), PROG,
                                                            _console_dropped)), 0
            _console_backlog.extend(note.encode())
    return True


def use_own_console():
    """PID 1: log through a non-blocking descriptor of its own (see above) to the terminal
    fd 2 is, the console in a VM. Anything else (a file, a pipe: a PID namespace's) stays
    fd 2, whose offset the workload's output shares."""
    global _log_fd, _own_console
    try:
        if os.isatty(2):
            _log_fd = _own_console = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NOCTTY
                                             | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        pass                       # fd 2 cannot be opened again: written as before


# A VM's serial console is slow: every byte is a trap into the VMM (under TCG, on the only
# vCPU, a line costs the guest milliseconds). While PID 1 starts, its info and debug lines
# are held and written in one go once the host has had its first answer, or the agent is
# ready, or START_HOLD has passed (Agent), so that no console line stands between the
# kernel's hand-off and the first answer. Warnings and errors are never held: they write
# what is held, then themselves. The loop ends the hold; should the start hang before the
# loop turns, an alarm (SIGALRM, at START_HOLD) writes them all the same.
START_HOLD = 2.0                  # seconds: the longest a start-up line waits for the console
LOG_INFO = LOG_LEVELS["info"]
_held_lines = None                # a list while holding
_hold_lock = _thread.allocate_lock()   # the list, between log() in any thread and release
_release_due = False              # the alarm came while a log() held the list


def hold_console():
    global _held_lines
    if _held_lines is None:
        _held_lines = []
        try:
            signal.signal(signal.SIGALRM, _hold_alarm)
            signal.setitimer(signal.ITIMER_REAL, START_HOLD)
        except (ValueError, OSError):
            pass                   # not the main thread (a test): the loop ends the hold


def _hold_alarm(signum, frame):
    """SIGALRM, in the main thread, maybe in the middle of its own log(): never waits for
    the list's lock; whoever holds it releases the lines when done (_release_due)."""
    global _release_due
    _release_due = True
    for lock in (_hold_lock, _console_lock):
        if not lock.acquire(False):
            return
        lock.release()
    release_console()


def release_console():
    """Write the held lines (one write) and stop holding; idempotent."""
    global _held_lines, _release_due
    with _hold_lock:
        lines, _held_lines, _release_due = _held_lines, None, False
    if lines is not None:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)     # the alarm is not needed any more
        except (ValueError, OSError):
            pass
    if lines:
        _write_console("".join(lines))


def _forget_held():
    global _held_lines, _log_fd, _hold_lock, _console_lock
    _hold_lock = _thread.allocate_lock()   # the parent's may have been held by its thread
    _console_lock = _thread.allocate_lock()
    _held_lines = None             # a forked child: the parent writes them, once,
    del _console_backlog[:]        # and its backlog; the child writes through fd 2, blocking
    if _log_fd == _own_console:
        _log_fd = 2


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held)


def enable_kmsg():
    global _kmsg_fd
    try:
        _kmsg_fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        log("warn", "cannot log to /dev/kmsg: %s" % exc.strerror)


# Repeated warnings caused by peers are rate-limited per (kind, who): on a serial console
# (Firecracker's 8250, a TCG guest) a flood of bad frames would otherwise become a console
# flood that stalls PID 1. The first LOG_BURST of a key in a LOG_WINDOW are written; the rest
# are counted and summarised in one line when the window is over.
LOG_BURST, LOG_WINDOW, LOG_MAX_KEYS = 3, 10.0, 256
_log_windows = {}                  # (kind, who) -> [window start, written, suppressed]


def log_limited(kind, who, level, message):
    now = time.monotonic()
    key = (kind, who)
    window = _log_windows.get(key)
    if window is not None and now - window[0] >= LOG_WINDOW:
        _summarise(key, window)
        window = None
    if window is None:
        if len(_log_windows) >= LOG_MAX_KEYS:   # many distinct peers: forget the oldest
            oldest = next(iter(_log_windows))
            _summarise(oldest, _log_windows.pop(oldest))
        window = _log_windows[key] = [now, 0, 0]
    if window[1] < LOG_BURST:
        window[1] += 1
        log(level, message)
    else:
        window[2] += 1


def log_summaries_due(now):
    """Summarise the windows that are over; returns when the next one ends (or None)."""
    soonest = None
    for key, window in list(_log_windows.items()):
        if now - window[0] >= LOG_WINDOW:
            _summarise(key, _log_windows.pop(key))
        elif window[2] and (soonest is None or window[0] + LOG_WINDOW < soonest):
            soonest = window[0] + LOG_WINDOW
    return soonest


def _summarise(key, window):
    if window[2]:
        log("warn", "suppressed %d similar messages (%s, %s) in %gs"
            % (window[2], key[0], key[1], LOG_WINDOW))


def _since_boot():
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is not None:
        try:
            return time.clock_gettime(clock)
        except OSError:
            pass
    return time.monotonic()


def start_step(name):
    """The step `name` of the start has just ended."""
    _START_STEPS.append((name, _since_boot()))


def kernel_handoff():
    """When the kernel ran init, on the boot clock: its "Run /init as init process" line in
    the kernel log (also with `quiet`). PID 1's /proc starttime is no use: that is when the
    kernel made the task, before it unpacked the initramfs and probed the devices."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                return None                # the end of the log: no such line
            except OSError:
                continue                   # EPIPE: a record overwritten while we read
            head, _, text = record.partition(b";")
            if text.startswith(b"Run ") and b" as init process" in text:
                return int(head.split(b",")[2]) / 1e6   # "prio,seq,usec since boot,flags"
    except (ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def start_report(is_init):
    """'exec at T s, step +seconds, ...': the start's steps since the kernel ran us."""
    previous = kernel_handoff() if is_init else None
    if previous is None and not is_init:
        try:
            ticks = int(_read_text("/proc/self/stat").rsplit(")", 1)[1].split()[19])
            previous = ticks / os.sysconf("SC_CLK_TCK")  # starttime: clock ticks since boot
        except (ValueError, IndexError, OSError):
            pass
    text = "exec at %.3fs" % previous if previous is not None else "exec at ?"
    previous = previous if previous is not None else _START_STEPS[0][1]
    for name, when in _START_STEPS:
        text += ", %s +%.3fs" % (name, when - previous)
        previous = when
    return text


def describe_exception(exc):
    """Type, message and innermost frames without importing traceback (and linecache...)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append("%s:%d" % (tb.tb_frame.f_code.co_name, tb.tb_lineno))
        tb = tb.tb_next
    return "%s: %s [at %s]" % (type(exc).__name__, exc, " < ".join(reversed(frames[-6:])))


def describe_exit_code(code):
    """An exit code as os.waitstatus_to_exitcode gives it (negative: a signal)."""
    if code is None:
        return "still running"
    return "killed by signal %d" % -code if code < 0 else "exit status %d" % code


def describe_status(status):
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return "exited with status %d" % os.WEXITSTATUS(status)
    return "status 0x%x" % status


# ---- small files, the C library, reboot(2), kill(-1), child processes -----------------------

def _read_bytes(path, limit=1 << 20):
    """A small file's bytes (at most about `limit`), or None when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            limit -= len(chunk)
            if limit <= 0:
                break
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_text(path, limit=1 << 20):
    data = _read_bytes(path, limit)
    return "" if data is None else data.decode("utf-8", "replace")


_libc = None


def libc():
    """The C library, loaded without ctypes.util (which would drag in subprocess, tempfile,
    bz2, lzma). CDLL(None) is the already-loaded libc of this process."""
    global _libc
    if _libc is None:
        import ctypes
        lib = ctypes.CDLL(None, use_errno=True)
        # int reboot(int cmd): glibc and musl wrap reboot(2) and add the two magic numbers.
        lib.reboot.argtypes = [ctypes.c_int]
        # int mount(const char *src, const char *target, const char *fstype,
        #           unsigned long flags, const void *data)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_ulong, ctypes.c_char_p]
        # int umount2(const char *target, int flags)
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        # int swapoff(const char *path)
        lib.swapoff.argtypes = [ctypes.c_char_p]
        # long syscall(long number, ...): finit_module has no libc wrapper everywhere.
        lib.syscall.restype = ctypes.c_long
        for fn in (lib.reboot, lib.mount, lib.umount2, lib.swapoff):
            fn.restype = ctypes.c_int
        _libc = lib
    return _libc


def libc_call(name, *args):
    """Call a libc function; returns 0, or the errno it failed with."""
    import ctypes
    if getattr(libc(), name)(*args) == -1:
        return ctypes.get_errno() or errno.EIO
    return 0


FIFREEZE = 0xC0045877             # <linux/fs.h> _IOWR('X', 119, int): freeze a filesystem
FITHAW = 0xC0045878               # <linux/fs.h> _IOWR('X', 120, int): thaw a frozen filesystem
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)   # how a mount point is opened


def _ioctl_on(path, flags, request):
    """open(path), ioctl(fd, request, 0), close: 0 or the errno."""
    import ctypes
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK)
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        # int ioctl(int fd, unsigned long request, ...): LOOP_CLR_FD, FIFREEZE and FITHAW
        # ignore the argument
        return libc_call("ioctl", fd, ctypes.c_ulong(request), ctypes.c_long(0))
    finally:
        os.close(fd)


# reboot(2) commands, from <linux/reboot.h>. The libc wrapper adds the two magic numbers
# (0xFEE1DEAD, 672274793) the raw syscall also wants.
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567
LINUX_REBOOT_CMD_HALT = 0xCDEF0123
LINUX_REBOOT_CMD_CAD_OFF = 0x00000000   # Ctrl-Alt-Del becomes SIGINT to PID 1
REBOOT_COMMANDS = {
    "poweroff": LINUX_REBOOT_CMD_POWER_OFF,
    "reboot": LINUX_REBOOT_CMD_RESTART,
    "halt": LINUX_REBOOT_CMD_HALT,
}


def call_reboot(command):
    """reboot(2) with a LINUX_REBOOT_CMD_*. Returns 0, or the errno on failure."""
    # cmd is an unsigned magic number; the C prototype takes int, so pass its bit pattern.
    return libc_call("reboot", command - (1 << 32) if command >= 1 << 31 else command)


def kill_all(sig):
    """kill(-1, sig): every process but PID 1 and the caller (in a PID namespace, only that
    namespace). os.P_ALL is 0, which is not this. Returns False when nobody was there."""
    try:
        os.kill(-1, sig)
        return True
    except ProcessLookupError:
        return False


def _close_fds_but(*keep):
    """In a child forked by run_in_child: close every descriptor except stdin/stdout and
    `keep` (negative ones ignored), listed from /proc/self/fd so the cost follows what is
    open."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 1 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass               # the listing's own descriptor, already closed


def describe_process(pid):
    """'pid N (name) in D at WCHAN': who a process is and where the kernel holds it (its
    state letter, and the kernel function it sleeps in, /proc/PID/wchan). Reading /proc
    never waits on the process, even one stuck on a dead disk."""
    stat = _read_text("/proc/%d/stat" % pid)
    name, _, rest = stat.partition(" (")[2].rpartition(")")
    state = rest.split()[0] if rest.split() else "?"
    wchan = _read_text("/proc/%d/wchan" % pid).strip()
    return "pid %d (%s) in %s%s" % (pid, name or "?", state,
                                     " at " + wchan if wchan and wchan != "0" else "")


PF_KTHREAD = 0x00200000           # <linux/sched.h>: a kernel thread (kill(-1) never reaches it)
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)   # its bit in /proc/PID/status's signal masks

def processes(skip=()):
    """Every user process but this one and `skip`, from /proc: [(pid, name)]. Kernel threads
    are left out. Reads only /proc/PID/stat, which never waits on the process."""
    me, found = os.getpid(), []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in sorted(pids):
        if pid == me or pid in skip:
            continue
        stat = _read_text("/proc/%d/stat" % pid)
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        fields = rest.split()
        try:
            if int(fields[6]) & PF_KTHREAD:      # field 9: flags
                continue
            found.append((pid, name))
        except (IndexError, ValueError):
            continue                             # gone meanwhile
    return found


def sigterm_disposition(pid):
    """What a process does with SIGTERM, from /proc/PID/status: 'ignores SIGTERM', 'blocks
    SIGTERM', 'handles SIGTERM' or 'default' (dies of it, unless stopped or in the kernel)."""
    masks = {}
    for line in _read_text("/proc/%d/status" % pid).splitlines():
        key, _, value = line.partition(":")
        if key in ("SigIgn", "SigBlk", "SigCgt"):
            try:
                masks[key] = int(value.strip(), 16)
            except ValueError:
                pass
    for key, what in (("SigIgn", "ignores SIGTERM"), ("SigBlk", "blocks SIGTERM"),
                      ("SigCgt", "handles SIGTERM")):
        if masks.get(key, 0) & SIGTERM_BIT:
            return what
    return "default"


def run_in_child(body):
    """Fork a child that runs body() and _exits with its result. Used for the steps that
    may block (sync) or end this process (reboot): PID 1 survives a failure and keeps its
    loop. Returns the pid, or None when fork failed."""
    try:
        pid = os.fork()
    except OSError as exc:
        log("error", "fork failed: %s" % exc)
        return None
    if pid == 0:
        code = 1
        try:
            code = body()
        finally:
            os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)
    return pid


def _wait_bounded(pid, timeout):
    """waitpid with a bound, at boot before the event loop exists: the child's status, or
    None after SIGKILLing it at the timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# =============================================================================================
# 2. Configuration: flags, the kernel cmdline, defaults
# =============================================================================================


# ---- values: durations, numbers, words, hostnames, IPv4, the network mode -------------------

class ConfigError(ValueError):
    """A flag or cmdline value that cannot be used; the message says why."""


def parse_seconds(text):
    """'25', '1.5', '2s', '500ms' -> float seconds (> 0, at most a day)."""
    s = str(text).strip().lower()
    scale = 1.0
    if s.endswith("ms"):
        s, scale = s[:-2], 0.001
    elif s.endswith("s"):
        s = s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        raise ConfigError("%r is not a duration (try 25, 1.5, 2s or 500ms)" % (text,))
    if not (0 < value <= 86400):       # NaN fails this test too
        raise ConfigError("%r is out of range (0 < seconds <= 86400)" % (text,))
    return value


def qga_addresses(value, is_init):
    """The --qga value -> the addresses to answer QGA on ("auto": the usual port as PID 1)."""
    if value == "auto":
        return [("serial", QGA_PORT_NAME)] if is_init else []
    return [] if value == "off" else [value]


def _seconds_or_never(text):
    """A duration, or 0 for "never"."""
    return 0.0 if str(text).strip() in ("0", "0s", "never") else parse_seconds(text)


def _int_in_range(lo, hi):
    def parse(text):
        try:
            value = int(str(text).strip(), 0)
        except ValueError:
            raise ConfigError("%r is not a whole number" % (text,))
        if not lo <= value <= hi:
            raise ConfigError("%r is out of range (%d..%d)" % (text, lo, hi))
        return value
    return parse


def _choice(*names):
    def parse(text):
        value = str(text).strip().lower()
        if value not in names:
            raise ConfigError("%r is not one of %s" % (text, ", ".join(names)))
        return value
    return parse


def parse_watchdog(text):
    """off | stop | SECONDS | SECONDS:STOP | stop:STOP -> (seconds petted at run time or
    None, seconds armed across the stop: a number, "auto", or None)."""
    value = str(text).strip().lower()
    if value in ("off", "0", "no", "none"):
        return (None, None)
    run, _, stop = value.partition(":")
    try:
        running = None if run == "stop" else parse_seconds(run)
        stopping = "auto" if stop in ("", "auto") else None if stop == "off" \
            else parse_seconds(stop)
    except ConfigError:
        raise ConfigError("%r: expected off, stop, SECONDS, SECONDS:STOP_SECONDS or "
                          "stop:STOP_SECONDS" % (text,))
    if running is not None and not 1 <= running <= 3600:
        raise ConfigError("%r: the watchdog's period is 1 to 3600 seconds" % (text,))
    return (running, stopping)


def _parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ConfigError("%r is not a yes/no value (1, 0, yes, no, on, off)" % (text,))


def _parse_words(text):
    """A list: a list from flags, a space- or comma-separated string from the cmdline."""
    if isinstance(text, list):
        return list(text)
    return [w for w in str(text).replace(",", " ").split() if w]


# The QGA commands, qemu-ga 10.0's on Linux (QGA_COMMANDS in "the QGA commands" has each one's
# handler; a unit test holds the two together).
QGA_COMMAND_NAMES = (
    "guest-sync-delimited", "guest-sync", "guest-ping", "guest-info", "guest-shutdown",
    "guest-get-time", "guest-set-time", "guest-get-host-name", "guest-get-osinfo",
    "guest-get-timezone", "guest-get-users", "guest-get-load", "guest-get-cpustats",
    "guest-get-diskstats", "guest-get-vcpus", "guest-set-vcpus", "guest-get-memory-blocks",
    "guest-get-memory-block-info", "guest-set-memory-blocks", "guest-network-get-interfaces",
    "guest-network-get-route", "guest-get-disks", "guest-get-fsinfo", "guest-fstrim",
    "guest-fsfreeze-status", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw", "guest-suspend-ram", "guest-suspend-disk", "guest-suspend-hybrid",
    "guest-ssh-get-authorized-keys", "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys", "guest-set-user-password", "guest-exec",
    "guest-exec-status", "guest-file-open", "guest-file-close", "guest-file-read",
    "guest-file-write", "guest-file-seek", "guest-file-flush")
# Off until the operator turns them on (--qga-allow): they run programs, change credentials
# or touch any file as root. qemu-ga enables them all; a guest that never asked for them
# should not have them.
QGA_OFF_BY_DEFAULT = frozenset((
    "guest-exec", "guest-exec-status", "guest-file-open", "guest-file-close",
    "guest-file-read", "guest-file-write", "guest-file-seek", "guest-file-flush",
    "guest-set-user-password", "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys"))


def _parse_qga_commands(word_default):
    """--qga-allow / --qga-block: QGA command names, comma-separated; in an allow list,
    `default` stands for the commands on by default. An unknown name is an error (a typo
    would otherwise leave a command on that the operator meant to block)."""
    def parse(text):
        names = _parse_words(text)
        known = set(QGA_COMMAND_NAMES) | ({"default"} if word_default else set())
        for name in names:
            if name not in known:
                raise ConfigError("%r is not a QGA command (known: %s)" % (
                    name, ", ".join((["default"] if word_default else [])
                                    + list(QGA_COMMAND_NAMES))))
        return tuple(names)
    return parse


def split_command(text):
    """A command line as a shell splits words: spaces separate, '...' and "..." group,
    a backslash escapes (outside single quotes). The kernel cmdline can carry one with double
    quotes around it: arcbox.exec="/bin/sh -c 'sleep 1; poweroff'"."""
    if isinstance(text, list):
        return list(text)
    return _split_words(text, quotes="'\"", escapes=True, strict=True)


def _split_words(text, quotes, escapes, strict):
    """Split on spaces outside quotes; the quotes themselves are removed."""
    words, word, quote, has_word, escaped = [], [], None, False, False
    for ch in str(text):
        if escaped:
            word.append(ch)
            escaped = False
        elif escapes and ch == "\\" and quote != "'":
            escaped = has_word = True
        elif quote:
            if ch == quote:
                quote = None
            else:
                word.append(ch)
        elif ch in quotes:
            quote, has_word = ch, True
        elif ch.isspace():
            if has_word:
                words.append("".join(word))
            word, has_word = [], False
        else:
            word.append(ch)
            has_word = True
    if quote and strict:
        raise ConfigError("%r has an unterminated %s quote" % (text, quote))
    if has_word:
        words.append("".join(word))
    return words


def _parse_hostname(text):
    name = str(text).strip()
    if not (0 < len(name) <= 64) or any(c.isspace() or c == "/" for c in name):
        raise ConfigError("%r is not a hostname (1-64 characters, no spaces)" % (text,))
    return name


IFNAMSIZ = 16                     # <net/if.h>: interface names are shorter than this


def parse_ipv4(text):
    """Dotted quad -> packed 4 bytes; anything else (inet_aton's '10.1' shorthands too) is a
    ConfigError: a lease or a flag value, never trusted."""
    parts = str(text).strip().split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 and len(p) <= 3 for p in parts):
        raise ConfigError("%r is not an IPv4 address" % (text,))
    return bytes(int(p) for p in parts)


def _prefix(text):
    try:
        prefix = int(str(text).strip())
    except ValueError:
        raise ConfigError("%r is not a prefix length (0-32)" % (text,))
    if not 0 <= prefix <= 32:
        raise ConfigError("prefix %d is out of range (0-32)" % prefix)
    return prefix


def _iface(text):
    name = str(text).strip()
    if not 0 < len(name) < IFNAMSIZ or any(c in name for c in "/: \t"):
        raise ConfigError("%r is not an interface name" % (text,))
    try:
        size = len(name.encode("utf-8"))   # a flag's bytes that are not UTF-8 arrive as
    except UnicodeEncodeError:             # surrogates, which no ioctl can name
        raise ConfigError("%r is not an interface name (not UTF-8)" % (text,))
    if size >= IFNAMSIZ or not name.isprintable():
        raise ConfigError("%r is not an interface name (printable, at most %d bytes)"
                          % (text, IFNAMSIZ - 1))
    return name


def parse_net(text):
    """none | dhcp[:IFACE] | IFACE:ADDR/PREFIX[:GATEWAY] -> ("none",), ("dhcp", iface),
    ("static", iface, addr, prefix, gateway or None)."""
    value = str(text).strip()
    if value.lower() in ("", "none", "off"):
        return ("none",)
    kind, _, rest = value.partition(":")
    if kind.lower() == "dhcp":
        return ("dhcp", _iface(rest or "eth0"))
    iface, _, rest = value.partition(":")
    addr, slash, rest = rest.partition("/")
    prefix, _, gateway = rest.partition(":")
    if not slash:
        raise ConfigError("%r: expected none, dhcp[:IFACE] or IFACE:ADDR/PREFIX[:GATEWAY]"
                          % (text,))
    parse_ipv4(addr)
    if gateway:
        parse_ipv4(gateway)
    return ("static", _iface(iface), addr, _prefix(prefix), gateway or None)


# ---- addresses: vsock, unix, serial, hvsock; who may ask; where to notify -------------------

AGENT_PORT = 1024                 # ArcBox: the guest agent listens on vsock port 1024
QGA_PORT_NAME = "org.qemu.guest_agent.0"   # the virtio-serial port QGA hosts use
VMADDR_CID_ANY = 0xFFFFFFFF       # -1U: bind on every CID (Python 3.11 lacks some constants)
VMADDR_CID_LOCAL = 1              # vsock_loopback: a guest talking to itself
VMADDR_CID_HOST = 2               # the hypervisor/host side of vsock

# AF_VSOCK: Linux only, and some Python builds lack the constant.
AF_VSOCK = getattr(socket, "AF_VSOCK", None)


def vsock_family():
    if AF_VSOCK is None:
        raise OSError(errno.EAFNOSUPPORT, "this Python/OS has no AF_VSOCK")
    return AF_VSOCK


def is_abstract(path):
    """unix:@NAME is a name in Linux's abstract socket namespace, not a file."""
    return path.startswith("@")


def unix_sockaddr(path):
    """The address for bind()/connect(): @NAME becomes NUL + NAME."""
    return "\0" + path[1:] if is_abstract(path) else path


def _parse_cid(text):
    named = {"any": VMADDR_CID_ANY, "-1": VMADDR_CID_ANY, "local": VMADDR_CID_LOCAL,
             "host": VMADDR_CID_HOST}
    if text.lower() in named:
        return named[text.lower()]
    cid = _int_in_range(0, 0xFFFFFFFF)(text)
    return cid


def parse_address(text, default_port=AGENT_PORT):
    """Parse a listen/connect address into a tuple.

    vsock:CID[:PORT]          ("vsock", cid, port); CID is a number, any, local or host
    unix:PATH  / unix:@NAME   ("unix", path); @NAME is the Linux abstract namespace
    hvsock:UDS_PATH[:PORT]    ("hvsock", uds_path, port): Firecracker/Cloud Hypervisor
    serial:NAME / serial:PATH ("serial", name or /dev path): a virtio-serial port (guest side)
    """
    kind, sep, rest = str(text).partition(":")
    kind = kind.strip().lower()
    if not sep or not rest:
        raise ConfigError("%r is not an address (vsock:CID[:PORT], unix:PATH, "
                          "hvsock:UDS_PATH[:PORT])" % (text,))
    if kind == "vsock":
        cid_text, _, port_text = rest.partition(":")
        port = _int_in_range(0, 0xFFFFFFFF)(port_text) if port_text else default_port
        return ("vsock", _parse_cid(cid_text), port)
    if kind == "unix":
        return ("unix", rest)
    if kind == "serial":
        return ("serial", rest)
    if kind == "hvsock":
        path, _, port_text = rest.rpartition(":")
        if path and port_text.isdigit():
            return ("hvsock", path, _int_in_range(0, 0xFFFFFFFF)(port_text))
        return ("hvsock", rest, default_port)
    raise ConfigError("%r: unknown address kind %r (vsock, unix, hvsock, serial)"
                      % (text, kind))


def format_address(addr):
    if addr[0] == "qga":                  # the host client's QGA targets: ("qga", address)
        return "qga:" + format_address(addr[1])
    if addr[0] == "vsock":
        cid = "any" if addr[1] == VMADDR_CID_ANY else str(addr[1])
        return "vsock:%s:%d" % (cid, addr[2])
    if addr[0] == "hvsock":
        return "hvsock:%s:%d" % (addr[1], addr[2])
    return "%s:%s" % addr[:2]


def _parse_listen(text):
    addrs = [parse_address(part) for part in str(text).split(",") if part.strip()]
    for addr in addrs:
        if addr[0] == "hvsock":
            raise ConfigError("hvsock: is a host-side address; a guest listens on vsock:")
    if not addrs:
        raise ConfigError("no address given")
    return addrs


def _parse_qga(text):
    """--qga: where to speak the QEMU guest agent protocol; "auto" is the virtio-serial port
    org.qemu.guest_agent.0 as PID 1 and nothing otherwise (see Agent)."""
    text = str(text).strip()
    if text.lower() in ("off", "none", "auto"):
        return text.lower().replace("none", "off")
    addr = parse_address(text, default_port=None)
    if addr[0] == "hvsock":
        raise ConfigError("hvsock: is a host-side address; a guest listens on vsock:")
    if addr[0] == "vsock" and addr[2] is None:
        raise ConfigError("%r: QGA over vsock needs a port (vsock:any:PORT; ArcBox has 1024)"
                          % text)
    return addr


def _parse_allow(text):
    """'cid:2,cid:3,uid:0,serial' -> {"cid": {2, 3}, "uid": {0}, "serial": True, ...};
    'serial' trusts virtio-serial ports (only the VMM reaches them); 'any' every peer."""
    allow = {"cid": set(), "uid": set(), "any": False, "serial": False}
    for item in str(text).split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item in ("any", "serial"):
            allow[item] = True
            continue
        kind, _, value = item.partition(":")
        if kind not in ("cid", "uid") or not value:
            raise ConfigError("%r: expected cid:N, uid:N, serial or any" % (item,))
        allow[kind].add(_parse_cid(value) if kind == "cid" else _int_in_range(0, 2**32 - 1)(value))
    return allow


# systemd's notify address forms (systemd(1), vmm.notify_socket): vsock:CID:PORT tries a
# datagram, then a seqpacket, then a stream socket; vsock-dgram:, vsock-seqpacket: and
# vsock-stream: force one type. An AF_UNIX address is a path or @abstract (our unix:PATH too).
NOTIFY_TYPES = {"vsock": ("dgram", "seqpacket", "stream"), "vsock-dgram": ("dgram",),
                "vsock-seqpacket": ("seqpacket",), "vsock-stream": ("stream",)}


def parse_notify_address(text):
    """-> ("vsock", (types...), cid, port) or ("unix", (types...), path); "" -> None."""
    text = str(text).strip()
    if not text or text.lower() in ("none", "off", "0"):
        return None
    kind, sep, rest = text.partition(":")
    if kind.lower() in NOTIFY_TYPES:
        cid_text, _, port_text = rest.partition(":")
        if not cid_text or not port_text:
            raise ConfigError("%r: expected %s:CID:PORT" % (text, kind))
        return ("vsock", NOTIFY_TYPES[kind.lower()], _parse_cid(cid_text),
                _int_in_range(0, 0xFFFFFFFF)(port_text))
    path = rest if kind.lower() == "unix" and sep else text
    if path.startswith(("/", "@")) and len(path) > 1:
        return ("unix", NOTIFY_TYPES["vsock"], path)
    raise ConfigError("%r is not a notify address (vsock:CID:PORT, vsock-stream:CID:PORT, "
                      "vsock-dgram:, vsock-seqpacket:, /PATH or @NAME)" % (text,))


def format_notify_address(addr):
    if not addr:                   # None, or the unset default ""
        return "none"
    if addr[0] == "unix":
        return addr[2]
    kind = "vsock" if len(addr[1]) > 1 else "vsock-" + addr[1][0]
    return "%s:%d:%d" % (kind, addr[2], addr[3])


ADDRESS_HELP = """addresses:
  vsock:CID[:PORT]        AF_VSOCK to a guest (CID 3 and up; 1 is local loopback), port 1024
  unix:PATH               a Unix stream socket (unix:@NAME for the abstract namespace)
  hvsock:UDS_PATH[:PORT]  Firecracker / Cloud Hypervisor hybrid vsock: the VMM's Unix socket;
                          sends "CONNECT PORT\\n" and expects "OK ...\\n", port default 1024"""


# ---- the serve options, from flags and from arcbox.* words on the kernel cmdline ------------

# The serve options: (name, metavar, parser, default, help). The flag is --name (with dashes),
# the kernel cmdline key is arcbox.name; flags win over the cmdline, which wins over defaults.
SERVE_OPTIONS = (
    ("listen", "ADDR", _parse_listen, "vsock:any:1024",
     "where to listen (repeatable, or comma-separated): vsock:CID:PORT, unix:PATH, "
     "serial:NAME (a virtio-serial port by name, or serial:/dev/PATH)"),
    ("qga", "ADDR", _parse_qga, "auto",
     "where to answer the QEMU guest agent protocol (libvirt, Proxmox VE, KubeVirt): "
     "serial:NAME, vsock:CID:PORT, unix:PATH, or off; auto is serial:org.qemu.guest_agent.0 "
     "as PID 1, off otherwise"),
    ("qga_allow", "LIST", _parse_qga_commands(True), "default",
     "the QGA commands enabled, comma-separated, and only those (qemu-ga's --allow-rpcs); "
     "`default` stands for those on by default: all but guest-exec, guest-exec-status, "
     "guest-file-*, guest-set-user-password and guest-ssh-add/remove-authorized-keys, so "
     "default,guest-exec,guest-exec-status turns exec on"),
    ("qga_block", "LIST", _parse_qga_commands(False), "",
     "QGA commands disabled even if allowed (qemu-ga's --block-rpcs)"),
    ("freeze_timeout", "SECONDS", _seconds_or_never, "600",
     "thaw the filesystems a QGA host froze (guest-fsfreeze-freeze) if it has not thawed them "
     "after this long; 0: never"),
    ("grace", "SECONDS", parse_seconds, "25",
     "SIGTERM grace for signals and for a Shutdown that asks for 0 (ArcBox's default)"),
    ("action", "ACTION", _choice("poweroff", "reboot", "halt"), "poweroff",
     "final reboot(2) command: poweroff, reboot (the only one that ends a Firecracker "
     "x86 VMM), halt"),
    ("log", "LEVEL", _choice(*LOG_LEVELS), "info", "log level: error, warn, info, debug"),
    ("allow", "PEERS", _parse_allow, "cid:2,uid:0,serial",
     "who may request Shutdown: cid:N (vsock peer), uid:N (unix peer), serial, any"),
    ("max_frame", "BYTES", _int_in_range(64, 16 << 20), "65536",
     "largest frame accepted; a larger declared length gets an Error and the connection "
     "is closed"),
    ("max_conns", "N", _int_in_range(1, 100000), "128",
     "concurrent connections; at the limit a newcomer allowed to shut down (--allow) "
     "evicts the oldest connection of a peer that is not, any other is closed at once"),
    ("idle_timeout", "SECONDS", parse_seconds, "60",
     "close a connection that sends nothing for this long"),
    ("frame_timeout", "SECONDS", parse_seconds, "10",
     "close a connection whose frame is not complete this long after its first byte "
     "(a slow dribbler)"),
    ("max_output", "BYTES", _int_in_range(4096, 64 << 20), "262144",
     "answers buffered for a peer that does not read; past it the agent stops reading "
     "from that peer"),
    ("kill_wait", "SECONDS", parse_seconds, "0.5", "how long to reap after SIGKILL"),
    ("watchdog", "SPEC", parse_watchdog, "stop",
     "PID 1 and /dev/watchdog (QEMU's i6300esb, a VMM's): stop arms it as the teardown "
     "begins, to end the guest should the stop hang past --sync-timeout + --power-timeout "
     "+ 5s; SECONDS also opens it at start and pets it from the loop (a wedged PID 1 is "
     "reset after SECONDS); SECONDS:STOP or stop:STOP arms STOP seconds across the stop; "
     "off leaves it alone"),
    ("clock_check", "SECONDS", _seconds_or_never, "30",
     "PID 1 in a VM: every SECONDS, read the KVM PTP clock (or else the RTC) and step the "
     "system clock when it is wrong (after a pause, a host's sleep, a snapshot restore); a "
     "host that sets the time wins; 0: off"),
    ("sync_timeout", "SECONDS", parse_seconds, "10",
     "bound on sync + remount read-only + sync before power-off (done in a child)"),
    ("power_timeout", "SECONDS", parse_seconds, "10",
     "how long reboot(2) may take before the agent declares it failed"),
    ("hostname", "NAME", _parse_hostname, "",
     "hostname to set at boot (PID 1; default: arcbox, if the kernel left none)"),
    ("modules", "LIST", _parse_words, "",
     "kernel modules to load at start, comma-separated (e.g. vsock_loopback)"),
    ("exec", "CMD...", split_command, "",
     "a program to start after boot (as a flag: the rest of the command line)"),
    ("net", "MODE", parse_net, "none",
     "PID 1: lo is always brought up; then none, dhcp[:IFACE] (busybox udhcpc, supervised; "
     "IFACE default eth0) or a static IFACE:ADDR/PREFIX[:GATEWAY]"),
    ("dns", "LIST", _parse_words, "",
     "nameservers for /etc/resolv.conf (or /run/resolv.conf on a read-only root)"),
    ("on_exit", "POLICY", _choice("ignore", "respawn", "poweroff"), "ignore",
     "when the --exec program exits: ignore, respawn (with back-off), poweroff"),
    ("delegate", None, _parse_bool, "0",
     "not PID 1: on Shutdown signal PID 1 the busybox way, then force power-off after the "
     "grace"),
    ("kmsg", None, _parse_bool, "0", "also log to /dev/kmsg"),
    ("power_button", "on|off", _parse_bool, "on",
     "PID 1 (and --delegate): a press of the ACPI/GPIO power button (any input device with "
     "KEY_POWER) runs the orderly shutdown with --action; loads the button/evdev (x86) or "
     "gpio_keys/evdev (arm) modules when they are modules"),
    ("notify", "ADDR", parse_notify_address, "",
     "tell the host READY=1 and, at shutdown, X_SYSTEMD_SHUTDOWN and EXIT_STATUS (systemd's "
     "VM notify protocol): vsock:CID:PORT, vsock-stream:CID:PORT, /PATH, @NAME; default: "
     "the vmm.notify_socket credential (systemd.set_credential= or SMBIOS type 11)"),
)


def flag_name(name):
    return "--" + name.replace("_", "-")


def default_config():
    config = {}
    for name, _, parse, default, _ in SERVE_OPTIONS:
        config[name] = parse(default) if default else (
            [] if parse in (_parse_words, split_command) else "")
    return config


def split_cmdline(text):
    """Split the kernel command line as the kernel does: on spaces, except inside double
    quotes, which are removed (key="a b" -> key=a b); no escapes."""
    return _split_words(text, quotes='"', escapes=False, strict=False)


def parse_cmdline(text):
    """Kernel command line -> ({name: raw value}, [problems]). Only arcbox.* words count."""
    found, problems = {}, []
    known = {name for name, _, _, _, _ in SERVE_OPTIONS}
    for word in split_cmdline(text):
        if not word.startswith("arcbox."):
            continue
        key, sep, value = word[len("arcbox."):].partition("=")
        key = key.replace("-", "_")
        if key not in known:
            problems.append("kernel cmdline: unknown key arcbox.%s (ignored)" % key)
        elif not sep:
            problems.append("kernel cmdline: arcbox.%s needs =VALUE (ignored)" % key)
        elif key == "listen" and key in found:
            found[key] += "," + value
        else:
            found[key] = value
    return found, problems


def parse_serve_flags(argv):
    """argv (after 'serve') -> ({name: [raw values]}, [problems], wants_help).
    --exec takes every argument after it; flags without a metavar are switches."""
    by_flag = {flag_name(name): name for name, _, _, _, _ in SERVE_OPTIONS}
    switches = {name for name, metavar, _, _, _ in SERVE_OPTIONS if metavar is None}
    found, problems, wants_help = {}, [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            wants_help = True
            continue
        flag, eq, value = arg.partition("=")
        name = by_flag.get(flag)
        if name is None:
            problems.append("unknown argument %r" % arg)
            continue
        if name == "exec":
            rest = ([value] if eq else []) + argv[i:]
            if not rest:
                problems.append("--exec needs a command")
            else:
                found["exec"] = [rest]
            break
        if name in switches and not eq:
            value = "1"
        elif not eq:
            if i >= len(argv):
                problems.append("%s needs a value" % flag)
                continue
            value = argv[i]
            i += 1
        found.setdefault(name, []).append(value)
    return found, problems, wants_help


def build_config(flags, cmdline):
    """Defaults < cmdline < flags. Returns (config, [(origin, problem)]), origin "flag" or
    "cmdline": a bad value keeps what was there before and is named, never raised."""
    config = default_config()
    problems = []
    parsers = {name: parse for name, _, parse, _, _ in SERVE_OPTIONS}
    layers = (("cmdline", {k: [v] for k, v in cmdline.items()}), ("flag", flags))
    for origin, values in layers:
        for name, raws in values.items():
            label = "arcbox." + name if origin == "cmdline" else flag_name(name)
            try:
                if name == "listen":
                    config[name] = [a for raw in raws for a in parsers[name](raw)]
                else:
                    config[name] = parsers[name](raws[-1])
            except ConfigError as exc:
                problems.append((origin, "%s: %s; keeping %s" % (label, exc,
                                                                 _describe(name, config[name]))))
    return config, problems


def _describe(name, value):
    if name == "listen":
        return ",".join(format_address(a) for a in value)
    if name in ("modules", "exec"):
        return " ".join(value) or "nothing"
    if name == "notify":
        return format_notify_address(value)
    if name == "qga":
        return value if isinstance(value, str) else format_address(value)
    if name == "net":
        return value[0] if value[0] != "static" else "%s:%s/%d%s" % (
            value[1], value[2], value[3], ":" + value[4] if value[4] else "")
    if name == "watchdog":
        if value == (None, None):
            return "off"
        running = "stop" if value[0] is None else "%g" % value[0]
        return running if value[1] == "auto" else "%s:%s" % (
            running, "off" if value[1] is None else "%g" % value[1])
    if name == "allow":
        if value["any"]:
            return "any"
        return ",".join(["cid:%d" % c for c in sorted(value["cid"])] +
                        ["uid:%d" % u for u in sorted(value["uid"])] +
                        (["serial"] if value["serial"] else []))
    return "%g" % value if isinstance(value, float) else str(value)


USAGE = """usage: %(prog)s [serve] [OPTIONS]    run the guest agent (the default; PID 1 in a VM)
       %(prog)s ping|info|shutdown --to ADDR [--timeout S] [--json]   talk to an agent
       %(prog)s --version | --help

arcbox-agent is a tiny init for Linux VM guests. As PID 1 it reaps orphans, listens for the
ArcBox host protocol and, on Shutdown, stops the guest in order: ack, SIGTERM+SIGCONT to all,
wait up to the grace while reaping, SIGKILL the rest, sync, reboot(POWER_OFF). It also
answers the QEMU guest agent protocol (libvirt, Proxmox VE, KubeVirt) on the virtio-serial
port org.qemu.guest_agent.0: guest-shutdown, the clock, addresses, filesystems, fsfreeze.
Not PID 1, it serves Ping/GetSystemInfo and refuses Shutdown.

serve options (flag --name VALUE, or kernel cmdline arcbox.name=VALUE; flags win):
%(options)s

signals to PID 1: SIGUSR2 power-off, SIGUSR1 halt, SIGTERM reboot (busybox poweroff/halt/
reboot), SIGPWR power-off, SIGINT (Ctrl-Alt-Del) the configured action. The ACPI/GPIO power
button (QEMU system_powerdown, virsh shutdown) runs the configured action too.

%(addresses)s

client commands: ping, info, shutdown [--grace S]; '%(prog)s ping --help' for their options.
"""


def usage_text():
    rows = []
    for name, metavar, _, default, text in SERVE_OPTIONS:
        flag = flag_name(name) + (" " + metavar if metavar else "")
        rows.append("  %-24s %s (default %s)" % (flag, text, default or "none"))
    return USAGE % {"prog": PROG, "options": "\n".join(rows), "addresses": ADDRESS_HELP}


def _write(fd, text):
    try:
        os.write(fd, text.encode("utf-8", "replace"))
    except OSError:
        pass


# =============================================================================================
# 3. Storage: the guest's mounts, and the kernel's calls on filesystems
# =============================================================================================


# ---- mounts: what mountinfo says, and which are the guest's ---------------------------------

# mount(2) flags, from <sys/mount.h>.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT = 32

# Filesystems with nothing to flush to a disk: never remounted read-only at power-off.
PSEUDO_FILESYSTEMS = frozenset((
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs",
    "tracefs", "configfs", "pstore", "bpf", "mqueue", "hugetlbfs", "fusectl", "binfmt_misc",
    "efivarfs", "autofs", "rpc_pipefs", "nsfs", "rootfs", "ramfs", "selinuxfs"))

def _unescape_mount_path(text):
    """mountinfo and /proc/swaps write space, tab, newline and backslash as octal escapes."""
    return (text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def parse_mountinfo(text):
    """/proc/self/mountinfo text -> [(mount id, mount point, fs type, read-only?, source)],
    in mount order. Read-only means the superblock's: a read-only bind of a writable disk is
    still writable where it matters (its data is on the disk)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
            mount_id, target = int(fields[0]), _unescape_mount_path(fields[4])
            fstype, source = fields[sep + 1], _unescape_mount_path(fields[sep + 2])
            super_options = fields[sep + 3].split(",")
        except (ValueError, IndexError):
            continue
        mounts.append((mount_id, target, fstype, "ro" in super_options, source))
    return mounts


def read_mountinfo():
    return parse_mountinfo(_read_text("/proc/self/mountinfo"))


def is_initial_pid_namespace():
    """True in a real VM guest, False in a PID namespace (a container, our tests). In the
    initial namespace PID 2 is kthreadd, whose parent is 0; nowhere else is that so."""
    try:
        return _read_text("/proc/2/stat").rsplit(")", 1)[1].split()[1] == "0"
    except IndexError:
        return False


class GuestMounts:
    """Which mounts are this guest's, decided once when the agent starts and handed to all
    who touch a filesystem (the freezer, QGA's filesystem commands, the thaw before SIGTERM,
    the teardown). In a real guest: every one. In a PID namespace (a container, our tests):
    none of those there when the agent started (`inherited`, their mount ids), which are the
    host's -- a superblock remount or a freeze would reach the host."""

    def __init__(self, inherited=frozenset()):
        self.inherited = frozenset(inherited)
        self.contained = bool(self.inherited)   # inside a PID namespace: /proc/swaps and
                                                # /sys/block are the host's too

    @classmethod
    def at_start(cls):
        if is_initial_pid_namespace():
            return cls()
        return cls(m[0] for m in read_mountinfo())

    def ours(self, entry):
        """A parse_mountinfo entry this guest mounted."""
        return entry[0] not in self.inherited

    def is_disk(self, entry):
        """One of this guest's disk filesystems: on a block device (only those can be
        frozen; opening a network filesystem's mount point could hang on a dead server), not
        a pseudo filesystem."""
        return (entry[0] not in self.inherited and entry[2] not in PSEUDO_FILESYSTEMS
                and entry[4].startswith("/dev/"))

    def writable_disks(self, mounts):
        """The mount points of this guest's writable disk filesystems in `mounts`."""
        return [m[1] for m in mounts if not m[3] and self.is_disk(m)]

    def disk_filesystems(self, writable_only=False):
        """The mounted disk filesystems of this guest, in mount order, one entry per
        superblock (a bind mount of one already listed is left out, as qemu-ga does):
        [(mount point, fstype, read-only, st_dev)]. It stats each mount point, which waits
        on a disk that does not answer: never in PID 1's loop."""
        found, seen = [], set()
        for entry in read_mountinfo():
            _, target, fstype, readonly, _ = entry
            if not self.is_disk(entry) or (writable_only and readonly):
                continue
            try:
                dev = os.stat(target).st_dev
            except OSError:
                continue
            if dev in seen:
                continue                   # a bind mount of a filesystem already listed
            seen.add(dev)
            found.append((target, fstype, readonly, dev))
        return found


# ---- the kernel's calls on filesystems: freeze, thaw, remount, swapoff, loops ---------------

LOOP_CLR_FD = 0x4C01          # <linux/loop.h>: unbind a loop device from its backing file

def parse_swaps(text):
    """/proc/swaps -> the active swap areas' paths (files or block devices)."""
    return [_unescape_mount_path(line.split()[0])
            for line in text.splitlines()[1:] if line.strip()]


def owning_mount(path, mounts):
    """The entry of `mounts` (parse_mountinfo's) whose filesystem holds `path`: the deepest
    mount point above it; of mounts stacked on one point, the last one."""
    best = None
    for entry in mounts:
        top = entry[1].rstrip("/")
        if (path == entry[1] or path.startswith(top + "/")) and (
                best is None or len(entry[1]) >= len(best[1])):
            best = entry
    return best


class KernelStorage:
    """What the teardown reads from and asks of the kernel, one method each (a test stands
    in a fake kernel). Every action returns 0 or an errno; nothing raises."""

    @staticmethod
    def mounts():
        return read_mountinfo()

    @staticmethod
    def swaps():
        return parse_swaps(_read_text("/proc/swaps"))

    @staticmethod
    def loops():
        """{"/dev/loopN": backing file} for every bound loop device."""
        found = {}
        try:
            names = os.listdir("/sys/block")
        except OSError:
            return found
        for name in sorted(names):
            if name.startswith("loop"):
                backing = _read_text("/sys/block/%s/loop/backing_file" % name).rstrip("\n")
                if backing:
                    found["/dev/" + name] = backing
        return found

    @staticmethod
    def remount_read_only(target):
        return libc_call("mount", None, target.encode(), None, MS_REMOUNT | MS_RDONLY, None)

    @staticmethod
    def unmount(target):
        return libc_call("umount2", target.encode(), 0)

    @staticmethod
    def swapoff(path):
        return libc_call("swapoff", path.encode())

    @staticmethod
    def clear_loop(device):
        return _ioctl_on(device, os.O_RDONLY, LOOP_CLR_FD)

    @staticmethod
    def freeze(target):
        return _ioctl_on(target, _DIRECTORY, FIFREEZE)

    @staticmethod
    def thaw(target):
        return _ioctl_on(target, _DIRECTORY, FITHAW)

    @staticmethod
    def sync():
        os.sync()

    @staticmethod
    def syncfs(target):
        """syncfs(2) on the filesystem of target: that one disk, not every disk as sync()."""
        import ctypes
        try:
            fd = os.open(target, _DIRECTORY | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK)
        except OSError as exc:
            return exc.errno or errno.EIO
        try:
            return libc_call("syncfs", ctypes.c_int(fd))   # int syncfs(int fd)
        finally:
            os.close(fd)

    @staticmethod
    def holders(target):
        """'pid N (name) in STATE at WCHAN' for each other process with a file open under
        target."""
        found, me = [], str(os.getpid())
        for pid in (p for p in os.listdir("/proc") if p.isdigit() and p != me):
            try:
                fds = os.listdir("/proc/%s/fd" % pid)
            except OSError:
                continue
            for fd in fds:
                try:
                    path = os.readlink("/proc/%s/fd/%s" % (pid, fd))
                except OSError:
                    continue
                if path == target or path.startswith(target.rstrip("/") + "/"):
                    found.append(describe_process(int(pid)))
                    break
        return found


def thaw_one(kernel, target):
    """FITHAW one filesystem: True (and said) when it was frozen. EINVAL, the usual answer,
    means it was not."""
    if kernel.thaw(target) == 0:
        log("warn", "shutdown: %s was frozen; thawed it" % target)
        return True
    return False


def thaw_filesystems(kernel, guest, mounts=None):
    """FITHAW every writable disk filesystem of the guest's: a frozen one would hang its
    writers (even through SIGKILL) and sync(). Returns the mount points thawed."""
    return [target for target in guest.writable_disks(mounts or kernel.mounts())
            if thaw_one(kernel, target)]


# =============================================================================================
# 4. Boot: early mounts, console, hostname, kernel modules, network
# =============================================================================================


# ---- early boot: mounts, console, hostname --------------------------------------------------

# What the agent itself needs, mounted at early boot: /proc (the cmdline), /sys (the serial
# ports' names), /dev (the ports, the console). What the guest's programs need is mounted
# once the modules are in, before the workload starts: nothing before it uses them, and each
# mount here is time before the host's first answer.
AGENT_MOUNTS = (
    # source, target, type, flags, data
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
)
GUEST_MOUNTS = (
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
)

def mount_filesystems(table):
    """Mount AGENT_MOUNTS or GUEST_MOUNTS; skip what is mounted; never raise."""
    mounted = None                 # mount points, read once /proc is there
    for source, target, fstype, flags, data in table:
        if mounted is None and os.path.exists("/proc/self"):
            mounted = {m[1] for m in read_mountinfo()}
        if target in (mounted or ()):
            continue
        try:
            os.makedirs(target, exist_ok=True)
        except OSError:
            pass                   # a read-only root that already has it, or cannot: try anyway
        err = libc_call("mount", source.encode(), target.encode(), fstype.encode(), flags,
                        data.encode() or None)
        if err:
            log("warn", "mount %s on %s: %s" % (fstype, target, os.strerror(err)))
        else:
            log("debug", "mounted %s on %s" % (fstype, target))


def ensure_stdio():
    """The kernel may start init with fds 0-2 closed (no /dev/console in the rootfs). Fill
    them so a later socket never lands on fd 2 and receives our log lines."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        for path in ("/dev/console", "/dev/null"):
            try:
                new = os.open(path, os.O_RDWR | os.O_NOCTTY)
            except OSError:
                continue
            if new != fd:
                os.dup2(new, fd)
                os.close(new)
            break


def early_boot():
    """PID 1, before the configuration is read: /proc (for /proc/cmdline), /sys and /dev,
    then stdio on /dev/console now that devtmpfs may have made it, and the log's own
    non-blocking console descriptor."""
    ensure_stdio()
    if sys.platform.startswith("linux"):
        mount_filesystems(AGENT_MOUNTS)
        ensure_stdio()
        use_own_console()


def set_hostname(name):
    """Set the configured hostname, or 'arcbox' when the kernel left its '(none)'."""
    try:
        current = socket.gethostname()
        if not name and current not in ("", "(none)"):
            return
        name = name or "arcbox"
        if name != current:
            socket.sethostname(name)
            log("debug", "hostname set to %s" % name)
    except OSError as exc:
        log("warn", "cannot set the hostname to %r: %s" % (name, exc))


# ---- kernel modules: finit_module(2) in modules.dep order, modprobe as the fallback ---------

# finit_module(2) syscall numbers: glibc has no finit_module() wrapper (kmod calls syscall()).
FINIT_MODULE_SYSCALL = {"x86_64": 313, "aarch64": 273, "riscv64": 273, "i686": 350,
                        "i386": 350, "armv7l": 379, "armv6l": 379, "ppc64le": 353,
                        "s390x": 344, "loongarch64": 273}
MODULE_INIT_COMPRESSED_FILE = 4   # finit_module flag: the kernel decompresses .ko.xz/.zst
POWER_BUTTON_MODULES = {"x86_64": ["button", "evdev"], "i686": ["button", "evdev"],
                        "i386": ["button", "evdev"], "aarch64": ["gpio_keys", "evdev"],
                        "armv7l": ["gpio_keys", "evdev"]}


def modules_dep(base):
    """base/modules.dep -> {module name: [paths to load, dependencies first, itself last]}."""
    table = {}
    for line in _read_text(base + "/modules.dep", limit=16 << 20).splitlines():
        path, _, deps = line.partition(":")
        name = os.path.basename(path).split(".ko")[0].replace("-", "_")
        table[name] = [base + "/" + d for d in reversed(deps.split())] + [base + "/" + path]
    return table


def load_modules(names, optional=()):
    """Load kernel modules with finit_module(2) in dependency order (modules.dep), without
    a child process or a modprobe binary; busybox/kmod modprobe is the fallback when
    modules.dep does not know a module. `optional` ones are loaded only if modules.dep
    knows them (elsewhere they are built in, or not needed). Never raises; returns the
    names that failed."""
    failed = []
    if not names and not optional:
        return failed
    import ctypes
    table = modules_dep("/lib/modules/" + os.uname().release)
    names = list(names) + [n for n in optional if n in table and n not in names]
    number = FINIT_MODULE_SYSCALL.get(os.uname().machine)
    for name in names:
        paths = table.get(name.replace("-", "_"))
        if paths is None or number is None:
            if not _modprobe(name):
                failed.append(name)
            continue
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                log("warn", "module %s: cannot open %s: %s" % (name, path, exc.strerror))
                failed.append(name)
                break
            try:
                flags = MODULE_INIT_COMPRESSED_FILE if not path.endswith(".ko") else 0
                rc = libc().syscall(number, fd, b"", flags)
                err = ctypes.get_errno() if rc != 0 else 0
            finally:
                os.close(fd)
            if err and err != errno.EEXIST:
                log("warn", "module %s: loading %s: %s" % (name, os.path.basename(path),
                                                           os.strerror(err)))
                failed.append(name)
                break
        else:
            log("debug", "module %s loaded" % name)
    return failed


MODPROBE_TIMEOUT = 10.0           # boot must not hang on a stuck modprobe


def _modprobe(name):
    for exe, argv in (("/sbin/modprobe", ["modprobe", name]),
                      ("/bin/busybox", ["busybox", "modprobe", name])):
        if os.access(exe, os.X_OK):
            pid = run_in_child(lambda: os.execv(exe, argv))
            if pid is None:
                return False
            status = _wait_bounded(pid, MODPROBE_TIMEOUT)
            if status is None:
                log("warn", "module %s: %s still running after %gs; killed"
                    % (name, exe, MODPROBE_TIMEOUT))
                return False
            if status == 0:
                log("debug", "module %s loaded by %s" % (name, exe))
                return True
            log("warn", "module %s: %s %s" % (name, exe, describe_status(status)))
            return False
    log("warn", "module %s: not in modules.dep and no modprobe to ask" % name)
    return False


# ---- network: loopback up, a static address, or DHCP through busybox's udhcpc ---------------

# Debian's kernels have no ip= autoconfiguration (CONFIG_IP_PNP is off), and a guest whose lo
# is down cannot even reach 127.0.0.1. Addresses and routes are set with the same ioctls
# ifconfig and route use (no external command); DHCP is busybox's udhcpc, supervised like the
# workload, with the .pyz itself as its script (udhcpc runs SCRIPT bound|renew|deconfig|...
# with the lease in its environment).
SIOCADDRT, SIOCDELRT = 0x890B, 0x890C           # <linux/sockios.h>: routes
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914     # interface flags
SIOCSIFADDR, SIOCSIFNETMASK = 0x8916, 0x891C    # interface address and netmask
IFF_UP = 0x1                                    # <net/if.h>
RTF_UP, RTF_GATEWAY = 0x1, 0x2                  # <linux/route.h>
_IFREQ = Struct("16sH14s")                      # struct ifreq: name, then a sockaddr or flags
_SOCKADDR_IN = Struct("=H2s4s8s")               # struct sockaddr_in: family, port, addr, zero
UDHCPC_EVENTS = ("deconfig", "bound", "renew", "leasefail", "nak")


def _sockaddr_in(addr):
    return _SOCKADDR_IN.pack(socket.AF_INET, b"\0\0", parse_ipv4(addr), b"\0" * 8)


def _ifreq_addr(name, addr):
    """struct ifreq with an interface name and an IPv4 address (SIOCSIFADDR/NETMASK)."""
    return name.encode().ljust(IFNAMSIZ, b"\0")[:IFNAMSIZ] + _sockaddr_in(addr)


def _net_ioctl(request, data):
    """ioctl(2) on an AF_INET datagram socket with a buffer holding `data`: returns (errno
    or 0, the buffer's bytes afterwards)."""
    import ctypes
    data = data.ljust(40, b"\0")       # at least sizeof(struct ifreq): the kernel copies 40
    buf = ctypes.create_string_buffer(data, len(data))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # int ioctl(int fd, unsigned long request, void *argp)
        err = libc_call("ioctl", sock.fileno(), ctypes.c_ulong(request), buf)
    return err, buf.raw


def interface_up(name):
    """Set IFF_UP if it is not set. -> "up", "already up", or the reason it failed."""
    err, raw = _net_ioctl(SIOCGIFFLAGS, _IFREQ.pack(name.encode(), 0, b""))
    if err:
        return os.strerror(err)
    flags = _IFREQ.unpack_from(raw)[1]
    if flags & IFF_UP:
        return "already up"
    err, _ = _net_ioctl(SIOCSIFFLAGS, _IFREQ.pack(name.encode(), flags | IFF_UP, b""))
    return os.strerror(err) if err else "up"


def set_ipv4(name, addr, prefix):
    """Address and netmask on an interface, then up. -> None, or the reason it failed."""
    mask = ".".join(str(b) for b in ((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF)
                    .to_bytes(4, "big"))
    for request, value in ((SIOCSIFADDR, addr), (SIOCSIFNETMASK, mask)):
        err, _ = _net_ioctl(request, _ifreq_addr(name, value))
        if err:
            return "%s %s: %s" % ("address" if request == SIOCSIFADDR else "netmask", value,
                                  os.strerror(err))
    state = interface_up(name)
    return None if state in ("up", "already up") else "up: " + state


def set_default_route(gateway, name):
    """Replace the default route with one via gateway on name. -> None, or why not."""
    import ctypes

    sockaddr = ctypes.c_ubyte * 16     # bytes, not c_char: a c_char array stops at a NUL

    class RtEntry(ctypes.Structure):   # struct rtentry, <linux/route.h>
        _fields_ = [("pad1", ctypes.c_ulong), ("dst", sockaddr),
                    ("gateway", sockaddr), ("genmask", sockaddr),
                    ("flags", ctypes.c_ushort), ("pad2", ctypes.c_short),
                    ("pad3", ctypes.c_ulong), ("pad4", ctypes.c_void_p),
                    ("metric", ctypes.c_short), ("dev", ctypes.c_void_p),
                    ("mtu", ctypes.c_ulong), ("window", ctypes.c_ulong),
                    ("irtt", ctypes.c_ushort)]

    dev = ctypes.create_string_buffer(name.encode())   # alive for both calls below

    def entry(with_gateway):
        rt = RtEntry()
        rt.dst = rt.genmask = sockaddr.from_buffer_copy(_sockaddr_in("0.0.0.0"))
        rt.flags = RTF_UP | (RTF_GATEWAY if with_gateway else 0)
        if with_gateway:
            rt.gateway = sockaddr.from_buffer_copy(_sockaddr_in(gateway))
            rt.dev = ctypes.addressof(dev)
        return bytes(rt)

    _net_ioctl(SIOCDELRT, entry(False))            # an old default route: gone if there was one
    err, _ = _net_ioctl(SIOCADDRT, entry(True))
    return "default via %s: %s" % (gateway, os.strerror(err)) if err else None


def write_resolv_conf(servers):
    """nameserver lines in /etc/resolv.conf, or in /run/resolv.conf when the root is
    read-only (point /etc/resolv.conf there in the image). -> the file written, or None."""
    text = "".join("nameserver %s\n" % s for s in servers)
    for path in ("/etc/resolv.conf", "/run/resolv.conf"):
        try:   # in place: it may be a symlink, or a file bind-mounted over (containers)
            with open(path, "w") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def loopback_up():
    """PID 1, at the end of the loop turn of "ready" or of the host's first answer (bringing
    lo up is kernel work the first answer need not wait for), or before the workload
    starts if that comes first (StartUp.release), so that 127.0.0.1 works for QGA's
    interface list from then on and for the workload from its start."""
    state = interface_up("lo")
    log("debug" if state in ("up", "already up") else "warn", "network: lo %s" % state)


def configure_network(net):
    """PID 1 once the modules are in (a NIC's driver may be one; lo is up already:
    StartUp.release): the static address, if that is the mode. DHCP starts then too,
    supervised, and the nameservers are written off the loop (StartUp: the file is on a
    disk). Failures are log lines."""
    if net[0] == "static":
        _, iface, addr, prefix, gateway = net
        why = set_ipv4(iface, addr, prefix) or (
            set_default_route(gateway, iface) if gateway else None)
        if why:
            log("warn", "network: %s: %s" % (iface, why))
        else:
            log("info", "network: %s %s/%d%s" % (iface, addr, prefix,
                                                 " via " + gateway if gateway else ""))
    if net[0] == "dhcp":
        state = interface_up(net[1])           # udhcpc's deconfig does it too; say it early
        if state not in ("up", "already up"):
            log("warn", "network: %s: %s (dhcp will keep trying)" % (net[1], state))


def write_nameservers(dns):
    """The nameservers in resolv.conf (in an errand: the file is on a disk); logged."""
    where = write_resolv_conf(dns)
    log("info" if where else "warn", "network: nameservers %s %s" % (
        " ".join(dns), "in " + where if where else "not written (no writable place)"))


def find_udhcpc():
    """busybox's udhcpc (or a standalone one) as an argv prefix, or None."""
    for exe, argv in (("/sbin/udhcpc", ["/sbin/udhcpc"]),
                      ("/usr/sbin/udhcpc", ["/usr/sbin/udhcpc"]),
                      ("/bin/busybox", ["/bin/busybox", "udhcpc"])):
        if os.access(exe, os.X_OK):
            return argv
    return None


def dhcp_client_argv(net):
    """The supervised DHCP client for --net dhcp[:IFACE]: udhcpc in the foreground with this
    .pyz as its script; [] when not wanted or not possible (said in the log)."""
    if net[0] != "dhcp":
        return []
    udhcpc = find_udhcpc()
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if udhcpc is None:
        log("warn", "network: dhcp on %s wanted, but there is no udhcpc (busybox's, or "
            "/sbin/udhcpc); %s stays unconfigured" % (net[1], net[1]))
        return []
    if not os.access(script, os.X_OK):
        log("warn", "network: dhcp: %r is not an executable script for udhcpc (run the .pyz "
            "through its shebang); %s stays unconfigured" % (script, net[1]))
        return []
    return udhcpc + ["-f", "-i", net[1], "-s", script]


def udhcpc_script(event, env):
    """The .pyz run by udhcpc as its script: apply the lease in env to env["interface"].
    Returns the exit status (udhcpc only logs it)."""
    iface = env.get("interface", "")
    try:
        iface = _iface(iface)
        if event in ("leasefail", "nak"):
            log("warn", "dhcp: %s: %s" % (iface, "no lease yet" if event == "leasefail"
                                          else "the server said no (NAK)"))
            return 0
        if event == "deconfig":
            # udhcpc starts (and ends a lease) with this: the link must be up to ask at all
            state = interface_up(iface)
            if state not in ("up", "already up"):
                log("warn", "dhcp: %s: cannot bring it up: %s" % (iface, state))
                return 1
            _net_ioctl(SIOCSIFADDR, _ifreq_addr(iface, "0.0.0.0"))   # none there is fine
            return 0
        addr = env.get("ip", "")
        parse_ipv4(addr)
        if env.get("mask"):
            prefix = _prefix(env["mask"])
        else:
            mask = int.from_bytes(parse_ipv4(env.get("subnet", "")), "big")
            prefix = bin(mask).count("1")
            if mask != (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF:
                raise ConfigError("subnet %r is not a netmask" % env.get("subnet"))
        routers = [r for r in env.get("router", "").split() if r]
        for router in routers:
            parse_ipv4(router)
        dns = [d for d in env.get("dns", "").split() if d]
        for server in dns:
            parse_ipv4(server)
    except ConfigError as exc:
        log("warn", "dhcp: %s: lease refused: %s" % (iface or "?", exc))
        return 1
    why = set_ipv4(iface, addr, prefix) or (
        set_default_route(routers[0], iface) if routers else None)
    if why:
        log("warn", "dhcp: %s: %s" % (iface, why))
        return 1
    if dns:
        write_resolv_conf(dns)
    log("info", "dhcp: %s %s/%d%s" % (iface, addr, prefix,
                                      " via " + routers[0] if routers else ""))
    return 0


# ---- boot duties: what needs the configuration ----------------------------------------------

def boot_duties(config):
    """PID 1's duties that need the configuration (early_boot() ran before it was read) and
    no kernel module: the hostname. The modules load in the background while the agent
    serves, and the network is configured once they are in (StartUp)."""
    if sys.platform.startswith("linux"):
        set_hostname(config["hostname"])


def boot_modules(config):
    """(the cmdline's modules, the optional power-button ones) for PID 1 to load. The optional
    ones only where a modules.dep could name them (elsewhere they are built in, or absent),
    and not in a PID namespace (a container, our tests), whose kernel is the host's."""
    wanted = POWER_BUTTON_MODULES.get(os.uname().machine, ["evdev"]) \
        if config["power_button"] else []
    if not (os.path.exists("/lib/modules/%s/modules.dep" % os.uname().release)
            and is_initial_pid_namespace()):
        wanted = []
    return list(config["modules"]), wanted


# =============================================================================================
# 5. The event loop: one thread, one poll(); signals; reaping; errands
# =============================================================================================


# ---- the loop and its sources ---------------------------------------------------------------

POLL_MAX_MS = 3600 * 1000         # poll() takes a C int of ms: wake at least hourly instead
_POLLIN = select.POLLIN | getattr(select, "POLLPRI", 0)
_POLLOUT = select.POLLOUT
_POLLFAIL = select.POLLHUP | select.POLLERR | getattr(select, "POLLNVAL", 0)


class Source:
    """Something the event loop serves: fds to poll with their handlers, a deadline, and a
    tick after every wake-up. The defaults: nothing, never, nothing. The sources: the signal
    inbox, the console's backlog, the reaper, the errands, the server, the power button,
    the notifier, the watchdog, the clock keeper, the freezer, the supervised programs
    (workload, udhcpc), the shutdown sequence and the start-up. To add one (an input
    device, a socket): write the Source and add it in Agent.__init__, where the order they
    tick in is explained."""

    def wants(self, now):
        return ()

    def deadline(self):
        return None

    def tick(self, now):
        pass


class EventLoop:
    """One poll() over every source's fds. As in CPython's selectors (a key per registration
    that carries its data), each registration carries its handler: a ready fd goes straight
    to handler(data, mask). After the handlers, every source ticks, in the order added."""

    def __init__(self):
        self.sources = []
        self.poller = select.poll()
        self.registered = {}       # fd -> event mask given to poll()

    def add(self, source):
        self.sources.append(source)

    def run_once(self, max_wait=None):
        now = time.monotonic()
        keys = {}                  # fd -> (mask, handler, data)
        soonest = None
        for source in self.sources:
            for fd, mask, handler, data in source.wants(now):
                keys[fd] = (mask, handler, data)
            when = source.deadline()
            if when is not None and (soonest is None or when < soonest):
                soonest = when
        timeout = None if soonest is None else max(0.0, soonest - now)
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        self._register(keys)
        try:
            events = self.poller.poll(None if timeout is None else
                                      min(int(timeout * 1000) + 1, POLL_MAX_MS))
        except InterruptedError:
            events = []
        for fd, mask in events:
            key = keys.get(fd)
            if key is not None:
                key[1](key[2], mask)
        now = time.monotonic()
        for source in self.sources:
            source.tick(now)

    def _register(self, keys):
        registered = self.registered
        for fd in [fd for fd in registered if fd not in keys]:
            try:
                self.poller.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass
            del registered[fd]
        for fd, key in keys.items():
            old = registered.get(fd)
            if old is None:
                self.poller.register(fd, key[0])
            elif old != key[0]:
                self.poller.modify(fd, key[0])
            registered[fd] = key[0]


class ConsoleBacklog(Source):
    """Writes the console's backlog (see "logging") when the console can take more."""

    def wants(self, now):
        if _console_backlog:
            return ((_log_fd, _POLLOUT, flush_console_backlog, None),)
        return ()


# ---- signals --------------------------------------------------------------------------------

# Signals, the way busybox init explains them before its code: a PID 1 without a handler
# never receives a signal (the kernel drops it), and "some users send poweroff signals to
# init VERY early", so the handlers are installed before anything else (SignalInbox, from
# main()). A handler only records the number: it runs between two bytecodes, possibly in the
# middle of a step. set_wakeup_fd writes a byte to a pipe so that poll() wakes at once, and
# the loop acts on the recorded signals after every wake-up, once the agent can act at all:
# a SIGUSR2 that arrives while modules load is honoured as soon as the loop first turns.

# What busybox's poweroff, halt and reboot send to PID 1 (busybox init/init.c). As PID 1 we
# receive them; in delegate mode we send them to the real PID 1.
BUSYBOX_INIT_SIGNALS = {"poweroff": signal.SIGUSR2, "halt": signal.SIGUSR1,
                        "reboot": signal.SIGTERM}

# The signals PID 1 acts on, and the action: busybox's three; SIGPWR (a power failure, sent
# by UPS daemons and some VMMs) powers off; SIGINT is Ctrl-Alt-Del once reboot(CAD_OFF) is
# set (Firecracker's SendCtrlAltDel) and runs the configured action.
INIT_SIGNAL_ACTIONS = {sig: action for action, sig in BUSYBOX_INIT_SIGNALS.items()}
INIT_SIGNAL_ACTIONS[signal.SIGINT] = "configured"
if hasattr(signal, "SIGPWR"):
    INIT_SIGNAL_ACTIONS[signal.SIGPWR] = "poweroff"

# Handled so that they are not lost or fatal: SIGCHLD wakes the reaper; SIGHUP and SIGQUIT
# do nothing (a PID 1 without a handler ignores them anyway; a plain process would die).
HANDLED_SIGNALS = [signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT] + list(INIT_SIGNAL_ACTIONS)


class SignalInbox(Source):
    """Takes the signals from the first instant (see the comment above) and hands each to
    `route`, set by the agent, when the loop turns."""

    def __init__(self):
        self.pending = []
        self.wake_r = self.wake_w = -1
        self.route = None          # callback(signal number)

    def install(self):
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame):
        self.pending.append(signum)

    def wants(self, now):
        return ((self.wake_r, select.POLLIN, _drain, self.wake_r),) if self.wake_r >= 0 else ()

    def tick(self, now):
        while self.pending:
            sig = self.pending.pop(0)
            if sig == signal.SIGCHLD:
                continue            # the reaper runs after every wake-up anyway
            log("debug", "signal %d received" % sig)
            if self.route is not None:
                self.route(sig)

    def close(self):
        if self.wake_r < 0:
            return
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        self.wake_r = self.wake_w = -1


def child_signals():
    """In a child forked by PID 1 that stays Python (an errand): the
    default action for every signal PID 1 handles -- a SIGTERM at shutdown ends it, as it
    ends anyone -- and no wake-up pipe, which is PID 1's."""
    signal.set_wakeup_fd(-1)
    for sig in HANDLED_SIGNALS + [signal.SIGTERM, signal.SIGINT, signal.SIGALRM]:
        signal.signal(sig, signal.SIG_DFL)


def _drain(fd, mask=0):
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


# ---- reaping: every child, and every orphan when PID 1 --------------------------------------

REAPER_UNCLAIMED = 64             # exit statuses kept for a watch() that comes late


class Reaper(Source):
    """Owns waitpid(). SIGCHLD coalesces, and as PID 1 every orphan is ours, so every wake-up
    loops waitpid(-1, WNOHANG) until nothing more. ECHILD means no process is left besides
    this one (`no_children`). Callers that care about one pid watch() it; a child watched as
    `uncounted` (the agent's own waiting power-off child, an errand given up on) does not
    count as a process left: then "nobody left" is "no child but those" in
    /proc/self/task/PID/children (every other process
    of the guest has an ancestor among PID 1's children)."""

    def __init__(self):
        self.watched = {}          # pid -> callback(pid, wait status)
        self.unclaimed = {}        # pid -> wait status of the last REAPER_UNCLAIMED nobody
        self.uncounted = set()     # watched (orphans, mostly: their statuses are dropped)
        self.no_children = False
        self.reaped_at = None      # {pid: monotonic time} once a stop asks for it (who exited)

    def watch(self, pid, callback, uncounted=False):
        """callback(pid, status) when it is reaped -- at once if it was already (a child
        started from a thread of PID 1's may exit before its starter gets here)."""
        if pid in self.unclaimed:
            callback(pid, self.unclaimed.pop(pid))
            return
        self.watched[pid] = callback
        if uncounted:
            self.uncounted.add(pid)

    def count(self, pid):
        """pid now counts as a process left, like any other."""
        self.uncounted.discard(pid)

    @staticmethod
    def children():
        """Our direct children, or None when the kernel does not list them (the file needs
        CONFIG_PROC_CHILDREN, which Debian's kernels have, and a mounted /proc)."""
        data = _read_bytes("/proc/self/task/%d/children" % os.getpid())
        try:
            return None if data is None else {int(pid) for pid in data.split()}
        except ValueError:
            return None

    def tick(self, now):
        self.reap()

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.no_children = True
                return
            if pid == 0:
                if self.uncounted:
                    children = self.children()
                    self.no_children = children is not None and children <= self.uncounted
                else:
                    self.no_children = False
                return
            log("debug", "reaped pid %d (%s)" % (pid, describe_status(status)))
            if self.reaped_at is not None:
                self.reaped_at[pid] = time.monotonic()
            self.uncounted.discard(pid)
            callback = self.watched.pop(pid, None)
            if callback is not None:
                callback(pid, status)
            else:
                self.unclaimed[pid] = status
                if len(self.unclaimed) > REAPER_UNCLAIMED:
                    del self.unclaimed[next(iter(self.unclaimed))]   # the oldest


# ---- errands: calls that may block, in a child with a deadline ------------------------------

# PID 1's loop must keep turning. A call that can wait on a disk or a device -- a freeze that
# flushes a slow disk, a thaw that writes a superblock to a suspended device, the RTC's wait
# for the edge of its second, statvfs of a mount, a netlink dump -- runs in a child forked for
# it, an errand, whose outcome comes back on a pipe (marshal: a C built-in, no .py file to
# ship). Meanwhile the loop reaps, answers both protocols and honours a stop. Past its
# deadline the errand is over for PID 1: its requester is told, and the child is logged with
# where the kernel holds it and left there. A child in an uninterruptible sleep cannot be
# killed, and nothing waits for it: it is not a process left for the power-off either
# (Reaper.uncounted).
#
# An outcome is ("ok", value), ("error", class or None, text) when the body raised (an
# exception's `klass`, QGA's error class, travels with it), or ("timeout", text). A body that
# only makes a few system calls (the thaw before SIGTERM, the clock keeper's look, QGA's
# reading commands) or works on a descriptor PID 1 keeps (guest-file-*) runs in a thread
# instead (Errand.thread): the same deadline and the same pipe to wake the loop, without the
# fork's cost (83 ms before SIGTERM under TCG as a child).
ERRAND_MAX_OUTCOME = 16 << 20     # bytes: an outcome is a small answer; more is a bug
ERRANDS_MAX = 16                  # children at once; past it a request is answered "busy"

# finish(outcome) runs in PID 1; thread: the body in a thread of PID 1's, not a child
Errand = namedtuple("Errand", "what body timeout finish thread", defaults=(False,))


class Errands(Source):
    """The errands under way: run(errand, on_done) forks the child; on_done(outcome) is
    called once, from the loop, with what the child sent, or with a timeout."""

    def __init__(self, reaper, fork=None):
        self.reaper = reaper
        self.fork = fork or run_in_child
        # read fd -> [errand, the child's pid (None: a thread), deadline, what came back (a
        # child's chunks; a thread's id, then its outcome), on_done]
        self.running = {}
        self.failed = []           # (on_done, outcome) of errands that could not start

    def run(self, errand, on_done):
        """Start it; on_done is never called from here (its caller may be in the middle of
        something): an errand that cannot start is told so at the next tick."""
        thread = errand.thread
        if len(self.running) >= ERRANDS_MAX:
            self.failed.append((on_done, ("error", None, "%s: %d others are under way; try "
                                          "again later" % (errand.what, ERRANDS_MAX))))
            return
        try:
            r, w = os.pipe()
        except OSError as exc:
            self.failed.append((on_done, ("error", None, "%s: no pipe: %s"
                                          % (errand.what, exc.strerror))))
            return
        if thread:
            box = []               # the thread's id, then its outcome
            _thread.start_new_thread(self._in_thread, (errand, w, box))
            os.set_blocking(r, False)
            self.running[r] = [errand, None, time.monotonic() + errand.timeout, box, on_done]
            return
        pid = self.fork(lambda: self._child(errand, r, w))
        os.close(w)
        if pid is None:
            os.close(r)
            self.failed.append((on_done, ("error", None, "%s: cannot fork" % errand.what)))
            return
        os.set_blocking(r, False)
        self.reaper.watch(pid, self._exited, uncounted=True)
        self.running[r] = [errand, pid, time.monotonic() + errand.timeout, [], on_done]

    @staticmethod
    def _in_thread(errand, w, box):
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())   # the loop's
        box.append(_thread.get_native_id() if hasattr(_thread, "get_native_id") else 0)
        try:
            box.append(("ok", errand.body()))
        except Exception as exc:
            box.append(("error", getattr(exc, "klass", None),
                        getattr(exc, "strerror", None) or str(exc)))
        finally:
            for call in (lambda: os.write(w, b"!"), lambda: os.close(w)):
                try:
                    call()
                except OSError:
                    pass           # the loop closed its end: it has given up on this one

    @staticmethod
    def _child(errand, r, w):
        os.close(r)
        child_signals()
        _close_fds_but(2, _kmsg_fd, w)     # no dup of a connection outlives PID 1's
        try:
            outcome = ("ok", errand.body())
            data = marshal.dumps(outcome)
        except OSError as exc:
            data = marshal.dumps(("error", getattr(exc, "klass", None),
                                  exc.strerror or str(exc)))
        except Exception as exc:           # the body's own error, or an unmarshallable value
            data = marshal.dumps(("error", getattr(exc, "klass", None), str(exc)))
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
        return 0

    def _exited(self, pid, status):
        pass                       # the pipe's end says it all; the reaper only reaps it

    # the event loop's view
    def wants(self, now):
        return [(fd, select.POLLIN, self._read, fd) for fd in self.running]

    def deadline(self):
        if self.failed:
            return 0.0
        return min((entry[2] for entry in self.running.values()), default=None)

    def tick(self, now):
        failed, self.failed = self.failed, []
        for on_done, outcome in failed:
            on_done(outcome)
        for fd, entry in list(self.running.items()):
            if now >= entry[2]:
                errand, pid, box = entry[0], entry[1], entry[3]
                who = describe_process(pid) if pid is not None else (
                    "a thread of PID 1's, %s" % describe_process(box[0]) if box else "a thread")
                log("warn", "%s did not finish within %gs: %s; left behind"
                    % (errand.what, errand.timeout, who))
                self._end(fd, ("timeout", "%s did not finish within %gs (a disk or device "
                                          "that does not answer?)" % (errand.what,
                                                                       errand.timeout)))

    def _read(self, fd, mask):
        entry = self.running.get(fd)
        if entry is None:
            return
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if entry[1] is None:           # a thread: its outcome is in its box
            outcome = entry[3][1] if len(entry[3]) > 1 else None
            self._end(fd, outcome if outcome is not None else
                      ("error", None, "%s ended without an answer" % entry[0].what))
            return
        if data:
            entry[3].append(data)
            if sum(len(c) for c in entry[3]) <= ERRAND_MAX_OUTCOME:
                return
        try:
            outcome = marshal.loads(b"".join(entry[3]))
        except (EOFError, ValueError, TypeError):
            outcome = None
        if not (isinstance(outcome, tuple) and len(outcome) >= 2
                and outcome[0] in ("ok", "error")):
            outcome = ("error", None, "%s ended without an answer" % entry[0].what)
        self._end(fd, outcome)

    def _end(self, fd, outcome):
        entry = self.running.pop(fd)
        os.close(fd)
        try:
            entry[4](outcome)
        except Exception as exc:   # one errand's bug must not stop the others
            log("error", "internal error finishing %s: %s"
                % (entry[0].what, describe_exception(exc)))

    def close(self):
        for fd in list(self.running):
            os.close(fd)
        self.running.clear()


# =============================================================================================
# 6. Beside the server: the workload, udhcpc, the power button, the watchdog, the clock, notify
# =============================================================================================


# ---- supervised programs: the workload (--exec), udhcpc -------------------------------------

TIOCSCTTY = {"mips": 0x5480, "mips64": 0x5480}.get(os.uname().machine if hasattr(os, "uname")
                                                   else "", 0x540E)   # <asm/ioctls.h>


def spawn_clean(argv):
    """fork + exec argv with a clean slate: default dispositions for every signal (Python
    ignores SIGPIPE and SIGXFSZ, and our handlers must not leak), an empty signal mask, its
    own session, and the console as controlling terminal when stdin is a tty. Returns the
    pid; raises OSError when fork fails."""
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        signal.set_wakeup_fd(-1)
        for sig in range(1, signal.NSIG):
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass               # 32/33 belong to the C library's threads
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setsid()
        if os.isatty(0):
            libc().ioctl(0, TIOCSCTTY, 1)     # ioctl(TIOCSCTTY): take the console as ctty
        os.execvp(argv[0], argv)
    except BaseException as exc:   # noqa: B902 - nothing may return into the parent's loop
        log("error", "cannot start %s: %s" % (" ".join(argv), exc))
    os._exit(127)


class Supervised(Source):
    """One program the agent starts and watches: the workload (--exec / arcbox.exec=) or
    udhcpc. `exit_policy` says what its exit means: ignore, respawn with a doubling back-off,
    or poweroff, which hands over to `on_finished(status, what happened)` (the agent powers
    off, or stops when not PID 1). stop() ends the supervision when the guest is going down:
    exits are then expected and nothing is respawned."""

    BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
    STABLE_AFTER = 10.0            # a run this long resets the back-off

    def __init__(self, argv, exit_policy, reaper, on_finished, name="workload"):
        self.argv, self.exit_policy, self.name = argv, exit_policy, name
        self.reaper, self.on_finished = reaper, on_finished
        self.pid = None
        self.started = None
        self.backoff = self.BACKOFF_FIRST
        self.respawn_at = None
        self.runs = 0
        self.stopped = False
        self.last_status = None    # exit code (or -signal) of the last run that ended

    def stop(self):
        self.stopped = True
        self.respawn_at = None

    def deadline(self):
        return self.respawn_at

    def tick(self, now):
        if self.respawn_at is not None and now >= self.respawn_at:
            self.start()

    def start(self):
        self.respawn_at = None
        if not self.argv or self.stopped:
            return
        try:
            self.pid = spawn_clean(self.argv)
        except OSError as exc:
            log("error", "cannot start %s: %s" % (" ".join(self.argv), exc))
            self._exited(None, None)
            return
        self.started = time.monotonic()
        self.runs += 1
        self.reaper.watch(self.pid, self._exited)
        log("info", "started %s (pid %d)" % (" ".join(self.argv), self.pid))

    def _exited(self, pid, status):
        self.pid = None
        ran = time.monotonic() - self.started if self.started else 0.0
        how = describe_status(status) if status is not None else "did not start"
        self.last_status = os.waitstatus_to_exitcode(status) if status is not None else 127
        if self.stopped:
            log("debug", "%s %s during shutdown" % (self.name, how))
        elif self.exit_policy == "poweroff":
            self.on_finished(self.last_status, "%s %s after %.1fs" % (self.name, how, ran))
        elif self.exit_policy == "respawn":
            self.backoff = self.BACKOFF_FIRST if ran >= self.STABLE_AFTER else self.backoff
            log("info", "%s %s after %.1fs: respawning in %gs" % (self.name, how, ran,
                                                                self.backoff))
            self.respawn_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, self.BACKOFF_MAX)
        else:
            log("info", "%s %s after %.1fs" % (self.name, how, ran))


# ---- the power button: evdev devices that can report KEY_POWER ------------------------------

# QEMU's system_powerdown, libvirt's `virsh shutdown`, Proxmox, Cloud Hypervisor's
# power-button and Apple Virtualization's requestStop all press a virtual power button and
# wait. The kernel reports it as an input device: the ACPI button driver on x86 ("Power
# Button"), gpio-keys on arm64 `-M virt`. Which keys a device has is a bitmap in sysfs; its
# presses come as struct input_event on /dev/input/eventN. New devices (a module loaded
# late) are announced by a kernel uevent, so the agent listens for those instead of polling.
EV_KEY = 1                        # <linux/input-event-codes.h>
KEY_POWER = 116
KEY_PRESSED = 1                   # input_event.value: 1 press, 0 release, 2 autorepeat

# struct input_event { struct timeval time; __u16 type; __u16 code; __s32 value; }: the
# timeval is two C longs, so 24 bytes on 64-bit and 16 on 32-bit, as native "ll" gives.
_INPUT_EVENT = Struct("llHHi")
_LONG_BITS = Struct("l").size * 8  # sysfs capability words are unsigned longs
NETLINK_KOBJECT_UEVENT = 15       # <linux/netlink.h>; not every Python names it
RESCAN_FALLBACK = 5.0             # without uevents: look for new devices this often


def has_key(capabilities, code):
    """Is key `code` set in a sysfs capabilities/key bitmap ("1000 0 0": hex words, most
    significant first)? Garbage is a no."""
    words = capabilities.split()
    index = len(words) - 1 - code // _LONG_BITS
    if index < 0:
        return False
    try:
        return bool(int(words[index], 16) >> (code % _LONG_BITS) & 1)
    except ValueError:
        return False


def power_presses(data):
    """Whole input events in data -> how many are a press of KEY_POWER; and the bytes left
    over (a short read: never from evdev, so a sign of garbage)."""
    size = _INPUT_EVENT.size
    presses = 0
    for offset in range(0, len(data) - size + 1, size):
        _, _, ev_type, code, value = _INPUT_EVENT.unpack_from(data, offset)
        if ev_type == EV_KEY and code == KEY_POWER and value == KEY_PRESSED:
            presses += 1
    return presses, len(data) % size


class PowerButtons(Source):
    """Opens every input device with KEY_POWER, turns a press into `on_press(device name)`,
    picks up devices that appear later, drops those that go away or misbehave."""

    def __init__(self, on_press, sysfs="/sys/class/input", devices="/dev/input"):
        self.on_press = on_press
        self.sysfs, self.devdir = sysfs, devices
        self.open_fds = {}         # fd -> (eventN, device name)
        self.uevents = None        # netlink socket for kernel uevents, if we could have one
        self.rescan_at = None

    def start(self):
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
            sock.bind((0, 1))      # group 1: the kernel's uevents
            sock.setblocking(False)
            self.uevents = sock
        except (OSError, AttributeError) as exc:
            log("debug", "power button: no uevents (%s); looking for new devices every %gs"
                % (exc, RESCAN_FALLBACK))
        self.scan()
        if not self.open_fds:
            log("info", "power button: no input device with KEY_POWER yet (watching for one)")

    def scan(self):
        self.rescan_at = None if self.uevents else time.monotonic() + RESCAN_FALLBACK
        watched = {event for event, _ in self.open_fds.values()}
        try:
            names = sorted(n for n in os.listdir(self.sysfs) if n.startswith("event"))
        except OSError:
            return
        for event in names:
            if event in watched:
                continue
            base = "%s/%s/device" % (self.sysfs, event)
            if not has_key(_read_text(base + "/capabilities/key"), KEY_POWER):
                continue
            name = _read_text(base + "/name").strip() or event
            try:
                fd = os.open("%s/%s" % (self.devdir, event),
                             os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                log("warn", "power button: cannot open %s/%s (%s): %s"
                    % (self.devdir, event, name, exc.strerror))
                if self.rescan_at is None:     # the node may come a moment after the uevent
                    self.rescan_at = time.monotonic() + 0.5
                continue
            self.open_fds[fd] = (event, name)
            log("info", "power button: watching %s (%s)" % (event, name))

    def wants(self, now):
        keys = [(fd, select.POLLIN, self._on_device, fd) for fd in self.open_fds]
        if self.uevents is not None:
            keys.append((self.uevents.fileno(), select.POLLIN, self._on_uevent, None))
        return keys

    def deadline(self):
        return self.rescan_at

    def tick(self, now):
        if self.rescan_at is not None and now >= self.rescan_at:
            self.scan()

    def _on_uevent(self, _, mask):
        for _ in range(64):        # a burst of uevents (a module load) in one wake-up
            try:
                data = self.uevents.recv(16384)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log("warn", "power button: uevent socket failed (%s); polling instead" % exc)
                self.uevents.close()
                self.uevents = None
                self.rescan_at = time.monotonic()
                return
            if b"SUBSYSTEM=input" in data and b"ACTION=add" in data:
                self.scan()

    def _on_device(self, fd, mask):
        event, name = self.open_fds.get(fd, ("?", "?"))
        try:
            data = os.read(fd, _INPUT_EVENT.size * 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(fd, "%s" % exc.strerror)
            return
        if not data:
            self._drop(fd, "end of file")
            return
        presses, left = power_presses(data)
        if left:
            log_limited("input", event, "warn", "power button: %s gave %d stray bytes; "
                        "ignored" % (event, left))
        if presses:
            self.on_press("%s (%s)" % (event, name))

    def _drop(self, fd, why):
        event, name = self.open_fds.pop(fd)
        os.close(fd)
        log("info", "power button: %s (%s) gone: %s" % (event, name, why))

    def close(self):
        for fd in list(self.open_fds):
            os.close(fd)
        self.open_fds.clear()
        if self.uevents is not None:
            self.uevents.close()
            self.uevents = None


# ---- the watchdog: petted from the loop, armed across the stop ------------------------------

# A hardware watchdog (QEMU's i6300esb, offered by Proxmox VE and libvirt guests) resets the
# VM when nobody pets it in time: the one guard against a PID 1 wedged where no code of its own
# can help. Its timer starts only when the device is opened, so opening it is the guest's
# choice. Two uses, as systemd has them (RuntimeWatchdogSec, off by default; RebootWatchdogSec,
# on by default): the loop pets it while the guest runs, if asked (--watchdog SECONDS), and,
# by default, it is armed as the teardown begins (after every process is gone, so a watchdog
# daemon of the guest's has let go of it), so that a stop that hangs past every bound PID 1
# keeps still ends. A clean exit (not PID 1) disarms it with the magic close ("V").
WATCHDOG_DEVICE = "/dev/watchdog"
WDIOC_SETTIMEOUT = 0xC0045706     # <linux/watchdog.h> _IOWR('W', 6, int)
WDIOC_GETTIMEOUT = 0x80045707     # <linux/watchdog.h> _IOR('W', 7, int)
WATCHDOG_STOP_MARGIN = 5.0        # seconds past the stop's own bounds (sync, reboot)


class Watchdog(Source):
    """/dev/watchdog for PID 1: start() opens and pets it from the loop every half period
    (run time, when configured); arm_for_stop(seconds) sets the stop's time and pets no
    more; close() is the clean exit."""

    def __init__(self, spec, path=WATCHDOG_DEVICE):
        self.running, self.stopping = spec
        self.path = path
        self.fd = -1
        self.period = None
        self.next_pet = None

    def start(self):
        if self.running is None or self.fd >= 0:
            return
        if self._open(self.running):
            self.next_pet = time.monotonic() + self.period / 2
            log("info", "watchdog: %s armed for %gs, petted every %gs from the loop"
                % (self.path, self.period, self.period / 2))

    def _open(self, seconds):
        import ctypes
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                log("info" if exc.errno == errno.ENOENT else "warn", "watchdog: cannot open "
                    "%s: %s; going on without it" % (self.path, exc.strerror))
                return False
        value = ctypes.c_int(int(round(seconds)))
        # int ioctl(int fd, WDIOC_SETTIMEOUT, int *seconds): the driver may round it
        err = libc_call("ioctl", self.fd, ctypes.c_ulong(WDIOC_SETTIMEOUT), ctypes.byref(value))
        if err:
            libc_call("ioctl", self.fd, ctypes.c_ulong(WDIOC_GETTIMEOUT), ctypes.byref(value))
            log("warn", "watchdog: cannot set %gs (%s); it keeps %ds"
                % (seconds, os.strerror(err), value.value))
        self.period = float(value.value or seconds)
        self._pet()
        return True

    def _pet(self):
        try:
            os.write(self.fd, b"\0")
        except OSError as exc:
            log_limited("watchdog", self.path, "warn", "watchdog: pet failed: %s" % exc.strerror)

    def deadline(self):
        return self.next_pet

    def tick(self, now):
        if self.next_pet is not None and now >= self.next_pet:
            self._pet()
            self.next_pet = now + self.period / 2

    def arm_for_stop(self, bounds):
        """The teardown begins: from now on the stop has `stopping` seconds (auto: `bounds`,
        the stop's own, + WATCHDOG_STOP_MARGIN) before the watchdog ends the guest."""
        if self.stopping is None:
            return
        seconds = bounds + WATCHDOG_STOP_MARGIN if self.stopping == "auto" else self.stopping
        self.next_pet = None
        if self._open(seconds):
            log("info", "watchdog: armed for the stop: the guest is reset if it is still up "
                "in %gs" % self.period)

    def close(self):
        """The clean exit (not PID 1): the magic close disarms it."""
        if self.fd >= 0:
            try:
                os.write(self.fd, b"V")
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1
            self.next_pet = None


# ---- the clock keeper: the system clock kept right from the KVM PTP clock or the RTC ---------

# A guest's clock stops while its VM is paused, its host sleeps or its snapshot waits to be
# restored, and wakes up behind. Hosts rarely say so (qemu-ga acts only when asked; libvirt
# sends guest-set-time after a resume when it remembers to). The keeper looks every
# `--clock-check` seconds, from the best source the guest has:
#   - the KVM PTP clock (/dev/ptpN whose clock name says KVM, the ptp_kvm driver): the host's
#     own clock, read in microseconds;
#   - else the RTC, which QEMU keeps on the host's time (-rtc base=utc,clock=host), read the
#     moment its second changes, as hwclock does: tens of milliseconds, not a second.
# (QEMU's RTC ticks at the sub-second moment QEMU set it, not at the host's: it lags the host
# by up to a second, the same for a VM's whole life, restores included -- 0.04 to 0.98 s in
# our runs. The keeper is as exact as its source; the KVM PTP clock has no such lag.)
# The reading runs as an errand in a thread: the RTC's wait for its second's edge never runs
# in PID 1's loop. Below a threshold the difference is jitter and left alone; above it the
# clock is stepped and the step logged (from, to, source). A host that sets the time (an
# ArcBox Ping's timestamp, guest-set-time with a time) wins: the next look learns the source's
# offset from the time the host chose, and only a change of that offset is corrected -- the
# keeper does not fight it. guest-set-time without a time is a look made now. The stop's
# deadlines are monotonic and unaffected. Off (0), the keeper has no deadline: no wake-up.
RTC_RD_TIME = 0x80247009          # <linux/rtc.h> _IOR('p', 0x09, struct rtc_time)
RTC_UIE_ON, RTC_UIE_OFF = 0x7003, 0x7004   # <linux/rtc.h> _IO('p', 3), _IO('p', 4)
_RTC_TIME = Struct("9i")
CLOCK_CHECK = 30.0                # seconds between looks: see docs/clock.md for the choice
CLOCK_JITTER = {"ptp": 0.05, "rtc": 0.5}   # seconds: a smaller difference is left alone
CLOCK_READ_TIMEOUT = 3.0          # a source that does not answer: the look is given up


def days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def read_rtc(path="/dev/rtc0", bound=2.1):
    """The hardware clock's time in seconds since the epoch (UTC, as QEMU keeps it by
    default), read the moment its seconds change, as hwclock does: read between two ticks
    it is up to a second behind. The tick is the RTC's update interrupt (RTC_UIE_ON, then
    poll), or, where the driver has none, the value seen changing. Waits up to `bound`
    seconds: never in PID 1's loop."""
    import ctypes
    buf = ctypes.create_string_buffer(_RTC_TIME.size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def now():
        # int ioctl(int fd, RTC_RD_TIME, struct rtc_time *)
        err = libc_call("ioctl", fd, ctypes.c_ulong(RTC_RD_TIME), buf)
        if err:
            raise OSError(err, os.strerror(err))
        sec, minute, hour, mday, mon, year = _RTC_TIME.unpack(buf.raw)[:6]
        return (days_from_civil(year + 1900, mon + 1, mday) * 86400 + hour * 3600
                + minute * 60 + sec)
    try:
        first, deadline = now(), time.monotonic() + bound
        # int ioctl(int fd, RTC_UIE_ON / RTC_UIE_OFF): update interrupts on, off
        if libc_call("ioctl", fd, ctypes.c_ulong(RTC_UIE_ON), ctypes.c_long(0)) == 0:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                # an interrupt is the edge only if the second changed with it (one that
                # was pending, or delivered late as a VM resumes, comes between two ticks)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                        return now()
                    os.read(fd, 8)     # the interrupt's count and flags (unsigned long)
                    value = now()
                    if value != first:
                        return value
            finally:
                libc_call("ioctl", fd, ctypes.c_ulong(RTC_UIE_OFF), ctypes.c_long(0))
        while time.monotonic() < deadline:
            value = now()
            if value != first:
                return value
            time.sleep(0.005)
        return first
    finally:
        os.close(fd)


RTC_SET_TIME = 0x4024700A         # <linux/rtc.h> _IOW('p', 0x0a, struct rtc_time)


def write_rtc(seconds, path="/dev/rtc0"):
    """Set the RTC to `seconds` since the epoch, in UTC (as the clock keeper reads it): what
    `hwclock -w -u` does. 0 or the errno."""
    import ctypes
    t = time.gmtime(seconds)
    buf = ctypes.create_string_buffer(_RTC_TIME.pack(t.tm_sec, t.tm_min, t.tm_hour,
                                                     t.tm_mday, t.tm_mon - 1,
                                                     t.tm_year - 1900, 0, 0, 0))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno
    try:
        # int ioctl(int fd, RTC_SET_TIME, const struct rtc_time *)
        return libc_call("ioctl", fd, ctypes.c_ulong(RTC_SET_TIME), buf)
    finally:
        os.close(fd)


def rtc_offset(path="/dev/rtc0"):
    """The RTC's time minus the system clock's, in seconds, read at the RTC's second edge."""
    seconds = read_rtc(path)
    return seconds - time.clock_gettime(time.CLOCK_REALTIME)


def ptp_offset(path):
    """The PTP clock's time minus the system clock's, in seconds: the PTP clock read between
    two readings of the system clock, against their middle."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        clock = ((~fd) << 3) | 3   # FD_TO_CLOCKID: a dynamic POSIX clock, <linux/posix-timers.h>
        before = time.clock_gettime_ns(time.CLOCK_REALTIME)
        ptp = time.clock_gettime_ns(clock)
        after = time.clock_gettime_ns(time.CLOCK_REALTIME)
    finally:
        os.close(fd)
    return (ptp - (before + after) // 2) / 1e9


def find_clock_source(ptp_class="/sys/class/ptp", rtc="/dev/rtc0"):
    """The best source the guest has: ("ptp", /dev/ptpN) of the KVM PTP clock, else ("rtc",
    /dev/rtc0), else None."""
    try:
        names = sorted(os.listdir(ptp_class))
    except OSError:
        names = []
    for name in names:
        if "KVM" in _read_text(os.path.join(ptp_class, name, "clock_name")):
            return ("ptp", "/dev/" + name)
    if os.path.exists(rtc):
        return ("rtc", rtc)
    return None


def step_clock(delta):
    """Step the system clock by `delta` seconds; (from, to) in seconds since the epoch."""
    before = time.clock_gettime(time.CLOCK_REALTIME)
    time.clock_settime(time.CLOCK_REALTIME, before + delta)
    return before, before + delta


def _when(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + (
        ".%03d" % int((seconds % 1) * 1000))


class ClockError(Exception):
    """A look a host asked for that could not be made: its text is the answer."""


class ClockKeeper(Source):
    """The keeper described above. start() chooses the source (none: off, said once);
    errand(asked) is one look -- the keeper's own every interval, in a thread, or a host's
    (guest-set-time without a time), whose answer waits for it; host_set() is called when a
    host set the clock. `find()` finds the source (find_clock_source), `measure(source)`
    returns its offset (rtc_offset / ptp_offset) and `step(delta)` steps the clock
    (step_clock): a test passes fakes."""

    def __init__(self, interval, errands, find=None, measure=None, step=None):
        self.interval = interval   # seconds between looks; 0: off, no deadline at all
        self.errands = errands
        self.find = find or find_clock_source
        self.measure = measure or (lambda source: (ptp_offset if source[0] == "ptp"
                                                   else rtc_offset)(source[1]))
        self.step = step or step_clock
        self.source = None
        self.next_at = None
        self.looking = False
        self.baseline = 0.0        # the source's offset from the time the host chose
        self.host_set_at = None    # when a host last set the clock (monotonic)
        self.learned_for = None    # the host setting whose offset `baseline` is

    def start(self):
        if not self.interval:
            return
        self.source = self.find()
        if self.source is None:
            log("info", "clock: no KVM PTP clock and no RTC; not keeping the clock")
            self.interval = 0
            return
        log("debug", "clock: keeping it from the %s every %gs" % (self.source[1],
                                                                 self.interval))
        self.next_at = time.monotonic() + self.interval

    def host_set(self):
        """A host set the clock: it wins. A look one second later learns the source's
        offset from the time the host chose (soon: a pause before that look would be
        learned as the host's choice)."""
        self.host_set_at = time.monotonic()
        if self.next_at is not None:           # started, and on
            self.next_at = min(self.next_at, self.host_set_at + 1.0)

    # the event loop's view (nothing until start(): the source may be a module)
    def deadline(self):
        return self.next_at if not self.looking else None

    def tick(self, now):
        if self.next_at is not None and not self.looking and now >= self.next_at:
            errand = self.errand(asked=False)
            self.errands.run(errand, errand.finish)

    def errand(self, asked):
        """One look: the source read off the loop, then _correct() in PID 1. Asked by a
        host, its finish raises ClockError for an answer that says what went wrong."""
        source = self.source or self.find()
        if source is None:
            raise ClockError("no hardware clock: neither a KVM PTP clock nor /dev/rtc0")
        if not asked:              # (a host's look runs beside the keeper's own)
            self.looking = True
        host_set_before, measure = self.host_set_at, self.measure

        def finish(outcome):
            if not asked:
                self.looking = False
                self.next_at = time.monotonic() + self.interval
            if outcome[0] != "ok":
                if asked:                              # the host is told
                    raise ClockError("cannot read %s: %s" % (source[1], outcome[-1]))
                log("warn", "clock: cannot read %s: %s" % (source[1], outcome[-1]))
                return None
            return self._correct(outcome[1], source, asked, host_set_before)
        return Errand("reading %s" % source[1], lambda: measure(source), CLOCK_READ_TIMEOUT,
                      finish, thread=True)

    def _correct(self, offset, source, asked, host_set_before):
        """Step the clock by what the source says; returns the step in seconds (0.0:
        none). A host's own look takes the source as the truth; the keeper's compares with
        the offset learned after a host set the clock, and leaves jitter alone."""
        if asked:
            self.baseline, self.learned_for = 0.0, self.host_set_at
            delta, jitter = offset, 0.001
        else:
            if self.host_set_at != host_set_before:
                return 0.0         # a host set it while this look read: look again later
            if self.learned_for != self.host_set_at:
                self.baseline, self.learned_for = offset, self.host_set_at
                log("debug", "clock: set by the host; %s is %+.3fs from it" % (source[1],
                                                                             offset))
                return 0.0
            delta, jitter = offset - self.baseline, CLOCK_JITTER[source[0]]
        if abs(delta) < jitter:
            return 0.0
        try:
            before, after = self.step(delta)
        except (OSError, OverflowError, ValueError) as exc:
            if asked:
                raise ClockError("Failed to set time to guest: %s"
                                 % (getattr(exc, "strerror", 0) or exc))
            log("warn", "clock: cannot step it by %+.3fs: %s" % (delta, exc))
            return 0.0
        log("info", "clock: stepped %+.3fs, from %s to %s UTC, by %s (%s)" % (
            delta, _when(before), _when(after), source[1],
            "the KVM PTP clock" if source[0] == "ptp" else "the RTC"))
        return delta


# ---- telling the host: systemd's VM notify protocol -----------------------------------------

# Hosts that speak systemd's VM interface (systemd-vmspawn, mkosi, microvm.nix) pass an
# address as the vmm.notify_socket credential and learn from it that the guest is ready and
# how it ended: newline-separated KEY=VALUE messages (sd_notify(3)), one per datagram or one
# per stream connection (a stream receiver reads to EOF). Every send here is non-blocking
# and bounded; an absent or dead receiver costs nothing and is logged once.
NOTIFY_CONNECT_TIMEOUT = 2.0      # a stream connect still pending then is given up
NOTIFY_WAIT = 0.02               # at power-off, wait at most this for one still in flight
_SOCKET_TYPES = {"dgram": socket.SOCK_DGRAM, "stream": socket.SOCK_STREAM,
                 "seqpacket": getattr(socket, "SOCK_SEQPACKET", -1)}
_SOCK_NONBLOCK_CLOEXEC = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)

# Errors that mean "this socket type is not possible here": try the next one.
_WRONG_TYPE = (errno.EPROTOTYPE, errno.ESOCKTNOSUPPORT, errno.EPROTONOSUPPORT,
               errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.ENODEV, errno.EINVAL)


def notify_credential(cmdline_text, dmi="/sys/firmware/dmi/entries"):
    """The vmm.notify_socket credential, as systemd finds it: the kernel cmdline's
    systemd.set_credential=vmm.notify_socket:ADDR, else an SMBIOS type 11 string
    io.systemd.credential:vmm.notify_socket=ADDR (or .binary: with base64).
    -> (address text, where it came from), or (None, None)."""
    for word in split_cmdline(cmdline_text):
        key, _, value = word.partition("=")
        if key == "systemd.set_credential" and value.startswith("vmm.notify_socket:"):
            return value[len("vmm.notify_socket:"):], "kernel cmdline"
    try:
        entries = sorted(e for e in os.listdir(dmi) if e.startswith("11-"))
    except OSError:
        return None, None          # no SMBIOS in sysfs (no DMI, or not x86/arm64 UEFI)
    for entry in entries:
        try:
            with open("%s/%s/raw" % (dmi, entry), "rb") as f:
                raw = f.read(65536)
        except OSError:
            continue
        for text in smbios_strings(raw):
            for prefix in (b"io.systemd.credential:vmm.notify_socket=",
                           b"io.systemd.credential.binary:vmm.notify_socket="):
                if text.startswith(prefix):
                    value = text[len(prefix):]
                    if b"binary" in prefix:
                        import binascii
                        try:
                            value = binascii.a2b_base64(value)
                        except (binascii.Error, ValueError):
                            log("warn", "SMBIOS type 11 (%s): vmm.notify_socket is not "
                                "base64; ignored" % entry)
                            continue
                    return value.decode("utf-8", "replace").strip(), "SMBIOS type 11"
    return None, None


def smbios_strings(raw):
    """An SMBIOS structure -> its strings: after the formatted area (length in byte 1),
    NUL-terminated strings, ended by an empty one."""
    if len(raw) < 4 or raw[1] < 4 or raw[1] > len(raw):
        return []
    found = []
    for text in raw[raw[1]:].split(b"\0"):
        if not text:
            break
        found.append(text)
    return found


class Notifier(Source):
    """Sends notify messages to one address. Socket types are tried as systemd does (for
    vsock:, datagram, then seqpacket, then stream); the first that works is kept. A stream
    connect that is still in progress waits in the loop, bounded."""

    def __init__(self, addr):
        self.addr = addr
        self.types = list(addr[1])
        self.pending = {}          # fd -> [socket, message bytes, deadline]
        self.failed_once = False

    def _sockaddr(self):
        if self.addr[0] == "vsock":
            return vsock_family(), (self.addr[2], self.addr[3])
        return socket.AF_UNIX, unix_sockaddr(self.addr[2])

    def send(self, text):
        data = text.encode("utf-8", "replace")
        while self.types:
            kind = self.types[0]
            try:
                family, target = self._sockaddr()
                sock = socket.socket(family, _SOCKET_TYPES[kind] | _SOCK_NONBLOCK_CLOEXEC)
            except (OSError, ValueError) as exc:
                if self._next_type(kind, exc):
                    continue
                return
            try:
                sock.connect(target)
            except (BlockingIOError, InterruptedError):
                # EINPROGRESS: a connection over vsock (stream or seqpacket) takes a round
                # trip; the loop finishes it. (A datagram connect never blocks.)
                self.pending[sock.fileno()] = [sock, data, time.monotonic()
                                               + NOTIFY_CONNECT_TIMEOUT]
                return
            except OSError as exc:
                sock.close()
                if self._next_type(kind, exc):
                    continue
                return
            log("debug", "notify %s (%s): %s" % (format_notify_address(self.addr), kind,
                                                 text.replace("\n", " ")))
            if kind != "dgram":
                self._finish(sock, data)
                return
            try:
                sock.send(data)
            except BlockingIOError:
                self._failed("the receiver is not reading; message dropped")
            except OSError as exc:
                self._failed("%s" % exc.strerror)
            sock.close()
            return

    def _next_type(self, kind, exc):
        if exc.errno in _WRONG_TYPE and len(self.types) > 1:
            log("debug", "notify: %s sockets do not work here (%s); trying %s"
                % (kind, exc.strerror, self.types[1]))
            self.types.pop(0)
            return True
        self._failed("%s" % (getattr(exc, "strerror", None) or exc))
        return False

    def _failed(self, why):
        if not self.failed_once:
            log("warn", "notify %s: %s (no further notify errors are logged)"
                % (format_notify_address(self.addr), why))
            self.failed_once = True
        else:
            log("debug", "notify %s: %s" % (format_notify_address(self.addr), why))

    def _finish(self, sock, data):
        """A connected stream or seqpacket socket: one message, then EOF, which ends it for
        a receiver that reads to the end."""
        try:
            sock.send(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._failed("%s" % exc.strerror)
        sock.close()

    def busy(self):
        return bool(self.pending)

    def wants(self, now):
        return [(fd, select.POLLOUT, self._on_connected, fd) for fd in self.pending]

    def deadline(self):
        return min((p[2] for p in self.pending.values()), default=None)

    def _on_connected(self, fd, mask):
        sock, data, _ = self.pending.pop(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            self._failed(os.strerror(err))
        else:
            self._finish(sock, data)

    def tick(self, now):
        for fd, (sock, _, deadline) in list(self.pending.items()):
            if now >= deadline:
                del self.pending[fd]
                sock.close()
                self._failed("no connection within %gs" % NOTIFY_CONNECT_TIMEOUT)

    def close(self):
        for sock, _, _ in self.pending.values():
            sock.close()
        self.pending.clear()


class NoNotifier(Source):
    """No notify address: nothing to tell, never busy."""

    def send(self, text):
        pass

    def close(self):
        pass

    def busy(self):
        return False


# =============================================================================================
# 7. The wire: ArcBox frames and proto3 messages (pure functions)
# =============================================================================================


# ---- the ArcBox wire protocol: message types, frames, Error payloads (pure functions) -------

MSG_EMPTY = 0x0000
MSG_PING = 0x0001
MSG_GET_SYSTEM_INFO = 0x0002
MSG_SHUTDOWN = 0x000A
MSG_ERROR = 0xFFFF
RESPONSE_BIT = 0x1000             # a response is request | 0x1000
REQUEST_MAX = 0x0FFF              # requests are 0x0001..0x0FFF
MESSAGE_NAMES = {
    0x0001: "Ping", 0x0002: "GetSystemInfo", 0x0003: "EnsureRuntime", 0x0004: "RuntimeStatus",
    0x0005: "Kubernetes", 0x0006: "Kubernetes", 0x0007: "Kubernetes", 0x0008: "Kubernetes",
    0x0009: "Kubernetes", 0x000A: "Shutdown",
}
ERROR_INVALID = 400               # the Rust agent's code for "invalid request: ..."
ERROR_FORBIDDEN = 403             # peer not allowed to ask for this
ERROR_INTERNAL = 500              # a bug in the agent, reported instead of a silent close
ERROR_UNSUPPORTED = 501           # a known ArcBox request this agent does not implement
ERROR_UNAVAILABLE = 503           # cannot do it here (not PID 1, not Linux)
_FRAME_HEAD = Struct(">IIH")      # u32 length, u32 type, u16 trace_len (big-endian)
_FRAME_PREFIX = Struct(">II")
_TRACE_LEN = Struct(">H")
_ERROR_HEAD = Struct(">iI")       # i32 code, u32 msg_len
_DOUBLE_LE = Struct("<d")         # proto3 doubles are little-endian
_FIXED64_LE = Struct("<Q")
_FIXED32_LE = Struct("<I")


class ProtocolError(ValueError):
    """Bytes that do not follow the wire protocol. `fatal` means the frame boundary is lost
    and the connection can no longer be trusted."""

    def __init__(self, message, fatal=False):
        ValueError.__init__(self, message)
        self.fatal = fatal


def encode_frame(msg_type, payload=b"", trace=b""):
    return _FRAME_HEAD.pack(6 + len(trace) + len(payload), msg_type, len(trace)) + trace + payload


def decode_frame(buf, max_frame):
    """Take one frame off the front of buf (bytes/bytearray).

    Returns (msg_type, trace, payload, consumed), or None when more bytes are needed.
    Raises ProtocolError(fatal=True) when the length field cannot be honoured (too short to
    hold the type, or over max_frame: never allocated), and a non-fatal ProtocolError with
    `consumed` set when one complete frame is malformed but the stream is still in step.
    """
    if len(buf) < _FRAME_PREFIX.size:
        if len(buf) >= 4:          # judge the length as soon as it is known
            _check_length(int.from_bytes(bytes(buf[:4]), "big"), max_frame)
        return None
    length, msg_type = _FRAME_PREFIX.unpack_from(buf)
    _check_length(length, max_frame)
    end = 4 + length
    if len(buf) < end:
        return None
    body = bytes(buf[8:end])
    if length < 6:
        # Too short for the trace field: like the Rust agent, the 0-1 bytes left are payload.
        return msg_type, b"", body, end
    (trace_len,) = _TRACE_LEN.unpack_from(body)
    if 2 + trace_len > len(body):
        err = ProtocolError("trace length %d overruns the frame (%d bytes left)"
                            % (trace_len, len(body) - 2))
        err.consumed = end
        raise err
    return msg_type, body[2:2 + trace_len], body[2 + trace_len:], end


def _check_length(length, max_frame):
    if length < 4:
        raise ProtocolError("frame length %d is too short to hold a message type" % length,
                            fatal=True)
    if length > max_frame:
        raise ProtocolError("frame length %d exceeds the limit of %d bytes" % (length, max_frame),
                            fatal=True)


def encode_error(code, message):
    data = message.encode("utf-8", "replace")
    return _ERROR_HEAD.pack(code, len(data)) + data


def decode_error(payload):
    """Error payload -> (code, message). Lenient: a short message is returned as found."""
    if len(payload) < _ERROR_HEAD.size:
        raise ProtocolError("error payload of %d bytes is too short" % len(payload))
    code, length = _ERROR_HEAD.unpack_from(payload)
    text = payload[_ERROR_HEAD.size:_ERROR_HEAD.size + length]
    return code, text.decode("utf-8", "replace")


# ---- proto3: a tiny encoder/decoder and the messages' schemas -------------------------------

WT_VARINT, WT_I64, WT_LEN, WT_SGROUP, WT_EGROUP, WT_I32 = 0, 1, 2, 3, 4, 5
_U64 = (1 << 64) - 1
_MAX_GROUP_DEPTH = 32             # bound recursion on (deprecated) group fields
_ONE_BYTE_VARINTS = [bytes((i,)) for i in range(0x80)]   # the common case, precomputed


def encode_varint(value):
    if 0 <= value < 0x80:
        return _ONE_BYTE_VARINTS[value]
    value &= _U64                 # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data, pos):
    """-> (value, new_pos). At most 10 bytes, as protobuf allows."""
    result = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        byte = data[i]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _U64, i + 1
        shift += 7
    if len(data) - pos >= 10:
        raise ProtocolError("varint longer than 10 bytes")
    raise ProtocolError("truncated varint")


def iter_fields(data, _depth=0):
    """Yield (field_number, wire_type, value) for each field; value is an int for varint,
    fixed32 and fixed64, bytes for length-delimited. Groups are skipped whole."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = decode_varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0 or field > 0x1FFFFFFF:
            raise ProtocolError("invalid field number %d" % field)
        if wire == WT_VARINT:
            value, pos = decode_varint(data, pos)
        elif wire == WT_I64:
            if pos + 8 > end:
                raise ProtocolError("truncated fixed64 field %d" % field)
            (value,) = _FIXED64_LE.unpack_from(data, pos)
            pos += 8
        elif wire == WT_I32:
            if pos + 4 > end:
                raise ProtocolError("truncated fixed32 field %d" % field)
            (value,) = _FIXED32_LE.unpack_from(data, pos)
            pos += 4
        elif wire == WT_LEN:
            length, pos = decode_varint(data, pos)
            if length > end - pos:
                raise ProtocolError("field %d: length %d overruns the message" % (field, length))
            value = bytes(data[pos:pos + length])
            pos += length
        elif wire == WT_SGROUP:
            pos = _skip_group(data, pos, field, _depth + 1)
            continue
        else:
            raise ProtocolError("field %d: unexpected wire type %d" % (field, wire))
        yield field, wire, value


def _skip_group(data, pos, group_field, depth):
    if depth > _MAX_GROUP_DEPTH:
        raise ProtocolError("groups nested too deeply")
    end = len(data)
    while pos < end:
        key, pos = decode_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == WT_EGROUP:
            if field != group_field:
                raise ProtocolError("group %d closed by end-group %d" % (group_field, field))
            return pos
        if wire == WT_VARINT:
            _, pos = decode_varint(data, pos)
        elif wire == WT_I64:
            pos += 8
        elif wire == WT_I32:
            pos += 4
        elif wire == WT_LEN:
            length, pos = decode_varint(data, pos)
            pos += length
        elif wire == WT_SGROUP:
            pos = _skip_group(data, pos, field, depth + 1)
        else:
            raise ProtocolError("field %d: unexpected wire type %d" % (field, wire))
        if pos > end:
            raise ProtocolError("truncated field %d inside group %d" % (field, group_field))
    raise ProtocolError("group %d is not closed" % group_field)


# A schema maps field number -> (name, kind). Kinds: string, int64, uint64, uint32, bool,
# doubles (repeated double, packed), strings (repeated string).
PING_REQUEST = {1: ("message", "string"), 2: ("timestamp_secs", "int64")}
PING_RESPONSE = {1: ("message", "string"), 2: ("version", "string")}
SYSTEM_INFO = {
    1: ("kernel_version", "string"), 2: ("os_name", "string"), 3: ("os_version", "string"),
    4: ("arch", "string"), 5: ("total_memory", "uint64"), 6: ("available_memory", "uint64"),
    7: ("cpu_count", "uint32"), 8: ("load_average", "doubles"), 9: ("hostname", "string"),
    10: ("uptime", "uint64"), 11: ("ip_addresses", "strings"),
}
SHUTDOWN_REQUEST = {1: ("timeout_seconds", "uint32")}
SHUTDOWN_RESPONSE = {1: ("accepted", "bool")}
_KIND_DEFAULTS = {"string": "", "int64": 0, "uint64": 0, "uint32": 0, "bool": False}
_ENCODE_PLANS = {}                # id(schema) -> [(name, kind, field key bytes)] in order


def _encode_plan(schema):
    plan = _ENCODE_PLANS.get(id(schema))
    if plan is None:
        plan = _ENCODE_PLANS[id(schema)] = [
            (name, kind, encode_varint(number << 3 | (
                WT_LEN if kind in ("doubles", "strings", "string") else WT_VARINT)))
            for number, (name, kind) in sorted(schema.items())]
    return plan


def encode_message(schema, values):
    """Encode fields in field-number order, omitting proto3 defaults. (The schemas are
    module constants: each one's field order and keys are worked out once.)"""
    out = bytearray()
    for name, kind, key in _encode_plan(schema):
        value = values.get(name)
        if not value:
            continue              # proto3: defaults (0, "", False, empty) are not sent
        if kind == "string":
            data = value.encode("utf-8")
            out += key + encode_varint(len(data)) + data
        elif kind == "strings":
            for item in value:
                data = item.encode("utf-8")
                out += key + encode_varint(len(data)) + data
        elif kind == "doubles":
            packed = b"".join(_DOUBLE_LE.pack(float(v)) for v in value)
            out += key + encode_varint(len(packed)) + packed
        else:                     # int64, uint64, uint32, bool
            out += key + encode_varint(int(value))
    return bytes(out)


def decode_message(schema, data):
    """Decode into {name: value}, defaults filled in, unknown fields skipped. Raises only
    ProtocolError (bad UTF-8 in a string, wrong wire type for a known field, truncation)."""
    result = {}
    for name, kind in schema.values():
        result[name] = [] if kind in ("doubles", "strings") else _KIND_DEFAULTS[kind]
    for number, wire, value in iter_fields(data):
        spec = schema.get(number)
        if spec is None:
            continue
        name, kind = spec
        if kind in ("string", "strings"):
            _expect(wire, WT_LEN, name)
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("field %s is not valid UTF-8" % name)
            if kind == "string":
                result[name] = text
            else:
                result[name].append(text)
        elif kind == "doubles":
            # Parsers must accept both packed and unpacked encodings of repeated scalars.
            if wire == WT_LEN:
                if len(value) % 8:
                    raise ProtocolError("packed doubles in %s: %d bytes is not a multiple of 8"
                                        % (name, len(value)))
                result[name].extend(_DOUBLE_LE.unpack_from(value, i)[0]
                                    for i in range(0, len(value), 8))
            else:
                _expect(wire, WT_I64, name)
                result[name].append(_DOUBLE_LE.unpack(_FIXED64_LE.pack(value))[0])
        else:
            _expect(wire, WT_VARINT, name)
            if kind == "int64":
                value = value - (1 << 64) if value >> 63 else value
            elif kind == "uint32":
                value &= 0xFFFFFFFF   # protobuf truncates an over-long uint32
            elif kind == "bool":
                value = value != 0
            result[name] = value
    return result


def _expect(wire, wanted, name):
    if wire != wanted:
        raise ProtocolError("field %s has wire type %d, expected %d" % (name, wire, wanted))


# =============================================================================================
# 8. The protocols: what a request does, ArcBox and QGA
# =============================================================================================


# ---- the protocol seam: what every protocol offers the server -------------------------------

# A listener speaks one protocol; the Server only moves bytes and keeps the limits. Each
# listener is given as (address, maker), and every protocol (ArcBoxProtocol, QgaProtocol)
# offers the Server the same three things:
#   maker(peer, shared) -> one protocol object per connection; `shared` is True for a
#       persistent stream many host clients take turns on (a serial port), where garbage
#       is skipped instead of answered (the maker closes over the protocol's own
#       collaborators: the request policy, the frame limit, QGA's machine);
#   protocol.take(inbuf) -> None while inbuf holds no complete request, else one turn:
#       (bytes consumed, reply bytes, effect, close after the reply?), where the effect is
#       None, a StopRequest or ClockRequest (the agent acts on it once the reply is
#       queued), or an Errand (work that may block: its reply comes when it is done);
#   protocol.forget(count): the connection dropped a partial request of `count` bytes (a
#       serial stream's client went away mid-request); the next byte starts afresh.
# One request per call, so that the server can stop when the peer is not reading.


# ---- requests: Ping, GetSystemInfo, Shutdown, and who may ask (answers and effects) ------

def _meminfo():
    values = {}
    for line in _read_text("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024   # /proc/meminfo counts kB
    return values


def _ipv4_addresses(fib_trie):
    """Local IPv4 addresses from /proc/net/fib_trie: an address line followed by
    '/32 host LOCAL'. Loopback is left out. No external command, no ioctl."""
    found, last = [], None
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|--"):
            last = text[3:].strip()
        elif "/32 host LOCAL" in text and last:
            if not last.startswith("127.") and last not in found:
                found.append(last)
            last = None
    return found


def _ipv6_addresses(if_inet6):
    """Global IPv6 addresses from /proc/net/if_inet6 (scope 00), loopback/link-local left out."""
    found = []
    for line in if_inet6.splitlines():
        parts = line.split()
        if len(parts) < 6 or len(parts[0]) != 32 or parts[3] != "00":
            continue
        groups = [parts[0][i:i + 4] for i in range(0, 32, 4)]
        addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex("".join(groups)))
        if addr not in found:
            found.append(addr)
    return found


def ip_addresses(fib_trie, if_inet6):
    """The guest's addresses as GetSystemInfo reports them: IPv4 first, then global IPv6;
    loopback and link-local left out. Read per request, so they follow DHCP. (QGA's
    interface list reads netlink instead, in an errand: it needs each interface's prefixes,
    which these files do not carry; GetSystemInfo is answered in the loop, and reading
    procfs text takes no lock a stuck driver could hold, as the RTNL a netlink dump may wait
    for.)"""
    return _ipv4_addresses(fib_trie) + _ipv6_addresses(if_inet6)


def gather_system_info():
    uname = os.uname()
    mem = _meminfo()
    load = []
    for word in _read_text("/proc/loadavg").split()[:3]:
        try:
            load.append(float(word))
        except ValueError:
            pass
    try:
        uptime = int(float(_read_text("/proc/uptime").split()[0]))
    except (ValueError, IndexError):
        uptime = 0
    return {
        "kernel_version": uname.release, "os_name": uname.sysname, "os_version": uname.version,
        "arch": uname.machine, "total_memory": mem.get("MemTotal", 0),
        "available_memory": mem.get("MemAvailable", 0), "cpu_count": os.cpu_count() or 0,
        "load_average": load, "hostname": socket.gethostname(), "uptime": uptime,
        "ip_addresses": ip_addresses(_read_text("/proc/net/fib_trie"),
                                     _read_text("/proc/net/if_inet6")),
    }


def request_name(msg_type):
    return "%s (0x%04X)" % (MESSAGE_NAMES.get(msg_type, "unknown"), msg_type)


def describe_peer(peer):
    """("vsock", cid, port) / ("unix", pid, uid, gid) / ("serial", name) -> log text."""
    if peer[0] == "vsock":
        return "vsock peer cid %d port %d" % (peer[1], peer[2])
    if peer[0] == "unix":
        return "unix peer pid %d uid %d" % (peer[1], peer[2])
    return "serial port %s" % peer[1]


def peer_group(peer):
    """Who, for rate-limiting log lines: a vsock CID, a Unix uid, a serial port (not the
    port or pid, which change with every connection)."""
    if peer[0] == "vsock":
        return "cid %d" % peer[1]
    if peer[0] == "unix":
        return "uid %d" % peer[2]
    return "serial %s" % peer[1]


def peer_allowed(allow, peer):
    """Who may change the machine (Shutdown, the clock): a pure rule of the allow list
    (--allow, parsed) and the peer. The default, cid:2,uid:0,serial, is the host over vsock,
    root over a Unix socket, and the VMM's virtio-serial port (only the VMM reaches it)."""
    if allow["any"]:
        return True
    if peer[0] == "serial":
        return allow["serial"]
    if peer[0] == "vsock":
        return peer[1] in allow["cid"]
    if peer[0] == "unix":
        return peer[2] in allow["uid"]
    return False


# What requests may do here, fixed at start: who is allowed (the parsed --allow), whether this
# agent may power the guest off (PID 1, or --delegate) and whether it owns the clock (PID 1
# only: an agent in a container or a test must not move the machine's time).
RequestPolicy = namedtuple("RequestPolicy", "allow can_power_off owns_clock")

# What a request asks of the machine, done by the agent once the answer is queued; each
# names the request it came from. Plain tuple classes: a namedtuple costs ~45 us at start.
class StopRequest(tuple):
    """Stop the guest: (request, grace, action); a grace of 0 and an action of None mean
    the configured ones."""
    __slots__ = ()
    request, grace, action = (property(itemgetter(0)), property(itemgetter(1)),
                              property(itemgetter(2)))

    def __new__(cls, request, grace, action):
        return tuple.__new__(cls, (request, grace, action))


class ClockRequest(tuple):
    """Set the clock: (request, seconds since the epoch)."""
    __slots__ = ()
    request, seconds = property(itemgetter(0)), property(itemgetter(1))

    def __new__(cls, request, seconds):
        return tuple.__new__(cls, (request, seconds))


def sets_clock(policy, peer):
    """The one rule on who sets the clock (a Ping's timestamp, guest-set-time): only an
    agent that is PID 1 (`owns_clock`), only from the VMM's side (a vsock or virtio-serial
    peer; the VMM owns the serial port). A Unix-socket peer never does: tests run as root on
    real machines."""
    return policy.owns_clock and peer[0] in ("vsock", "serial")


class Refused(Exception):
    """A request the agent understood but will not do; becomes an Error frame."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


_PLAIN_PONG = encode_message(PING_RESPONSE, {"message": "pong", "version": __version__})


def handle_request(msg_type, payload, peer, policy):
    """One request -> (response type, response payload, effect). It changes nothing: the
    effect is what the caller should make happen once the answer is queued: None, a
    StopRequest (Shutdown's timeout_seconds, 0 for the configured grace), or a ClockRequest
    (seconds since the epoch) from a Ping's timestamp. Raises
    ProtocolError for bytes that do not decode and Refused for requests that are not
    allowed or not possible here."""
    if msg_type == MSG_PING:
        if not payload:           # the health check hosts send in a loop: answered as is
            return MSG_PING | RESPONSE_BIT, _PLAIN_PONG, None
        request = decode_message(PING_REQUEST, payload)
        effect = None
        if request["timestamp_secs"] > 0:
            effect = clock_effect(request["timestamp_secs"], peer, policy)
        message = "pong: " + request["message"] if request["message"] else "pong"
        return msg_type | RESPONSE_BIT, encode_message(
            PING_RESPONSE, {"message": message, "version": __version__}), effect
    if msg_type == MSG_GET_SYSTEM_INFO:
        return msg_type | RESPONSE_BIT, encode_message(SYSTEM_INFO, gather_system_info()), None
    if msg_type == MSG_SHUTDOWN:
        request = decode_message(SHUTDOWN_REQUEST, payload)
        check_shutdown_allowed(peer, policy)
        return msg_type | RESPONSE_BIT, encode_message(SHUTDOWN_RESPONSE, {"accepted": True}), \
            StopRequest("Shutdown", request["timeout_seconds"], None)
    if msg_type in MESSAGE_NAMES:
        raise Refused(ERROR_UNSUPPORTED, "unsupported request: %s is not implemented by this "
                      "agent" % request_name(msg_type))
    if msg_type == MSG_EMPTY or msg_type > REQUEST_MAX:
        raise ProtocolError("message type 0x%04X is not a request" % msg_type)
    raise ProtocolError("unknown message type 0x%04X" % msg_type)


def check_shutdown_allowed(peer, policy):
    """Raise Refused (403 or 503) unless this peer may power this guest off."""
    who = describe_peer(peer)
    if not peer_allowed(policy.allow, peer):
        log_limited("refused", peer_group(peer), "warn",
                    "refused Shutdown from %s: not an allowed peer" % who)
        raise Refused(ERROR_FORBIDDEN, "shutdown refused: %s is not allowed to request it "
                      "(see --allow)" % who)
    if not sys.platform.startswith("linux"):
        log("warn", "Shutdown requested, but power-off is only supported on Linux")
        raise Refused(ERROR_UNAVAILABLE, "shutdown refused: power-off is only supported on "
                      "Linux guests")
    if not policy.can_power_off:
        log_limited("refused", peer_group(peer), "warn",
                    "refused Shutdown from %s: not PID 1" % who)
        raise Refused(ERROR_UNAVAILABLE, "shutdown refused: this agent is not PID 1 (pid %d), "
                      "so it will not signal every process on this machine (see --delegate)"
                      % os.getpid())


def clock_effect(seconds, peer, policy):
    """A Ping's timestamp sets the clock as sets_clock() says, and only from an allowed
    peer; a peer sets_clock() leaves out is ignored, never refused. -> a ClockRequest, or
    None when ignored; raises Refused."""
    who = describe_peer(peer)
    if not sets_clock(policy, peer):
        log("debug", "Ping timestamp from %s ignored (clock set only by the host as PID 1)"
            % who)
        return None
    if not peer_allowed(policy.allow, peer):
        log_limited("refused", peer_group(peer), "warn",
                    "refused clock change from %s: not an allowed peer" % who)
        raise Refused(ERROR_FORBIDDEN, "clock change refused: %s is not allowed to set the "
                      "time (see --allow)" % who)
    return ClockRequest("Ping", seconds)


def set_clock(seconds):
    """A ClockRequest's seconds, applied by the agent."""
    try:
        time.clock_settime(time.CLOCK_REALTIME, float(seconds))
        log("debug", "clock set to %d from the host" % seconds)
    except (OSError, OverflowError, ValueError) as exc:
        log("warn", "cannot set the clock to %d: %s" % (seconds, exc))


# ---- the ArcBox protocol on one stream: bytes in, replies and effects out -------------------

class ArcBoxProtocol:
    """Frames in, frames out: handle_request() under `policy` answers each request."""

    __slots__ = ("policy", "max_frame", "peer", "peer_text", "shared", "dropped")

    def __init__(self, policy, max_frame, peer, shared=False):
        self.policy = policy
        self.max_frame = max_frame
        self.peer = peer
        self.peer_text = describe_peer(peer)
        self.shared = shared
        self.dropped = 0           # shared: garbage bytes skipped while resynchronising

    def take(self, buf):
        if self.shared:
            skipped = self._garbage_before(buf)
            if skipped:
                return skipped, b"", None, False
        try:
            frame = decode_frame(buf, self.max_frame)
        except ProtocolError as exc:
            if self.shared:        # resynchronising: drop it, answer nobody (_garbage_before)
                consumed = getattr(exc, "consumed", 1) or 1
                self.dropped += consumed
                return consumed, b"", None, False
            error = encode_frame(MSG_ERROR, encode_error(ERROR_INVALID, "invalid request: %s"
                                                         % exc))
            if exc.fatal:          # the frame boundary is lost: nothing after it can be read
                log_limited("bad frame", peer_group(self.peer), "warn",
                            "bad frame from %s: %s; closing" % (self.peer_text, exc))
                return len(buf), error, None, True
            log("debug", "bad frame from %s: %s" % (self.peer_text, exc))
            return exc.consumed, error, None, False
        if frame is None:
            return None
        msg_type, trace, payload, consumed = frame
        if self.dropped:
            log("info", "%s: back in step after skipping %d bytes"
                % (self.peer_text, self.dropped))
            self.dropped = 0
        rtype, rpayload, effect = self._answer(msg_type, payload)
        return consumed, encode_frame(rtype, rpayload, trace), effect, False

    def forget(self, count):
        self.dropped += count

    def _garbage_before(self, buf):
        """Resynchronise a serial stream, which cannot be closed and reopened like a socket:
        skip bytes while the front does not look like a request header (a request type, a
        length that fits). No Error frame is sent for garbage: on a shared stream it would
        be read as the answer to somebody's next request. Returns how many to skip."""
        skipped, size, max_frame = 0, _FRAME_PREFIX.size, self.max_frame
        while len(buf) - skipped >= size:
            length, msg_type = _FRAME_PREFIX.unpack_from(buf, skipped)
            if 6 <= length <= max_frame and 1 <= msg_type <= REQUEST_MAX:
                break
            skipped += 1
        if skipped and not self.dropped:
            log_limited("garbage", peer_group(self.peer), "warn",
                        "%s: garbage in the stream; resynchronising" % self.peer_text)
        self.dropped += skipped
        return skipped

    def _answer(self, msg_type, payload):
        if _log_level >= LOG_DEBUG:   # the per-frame path: do not even format the line
            log("debug", "%s from %s" % (request_name(msg_type), self.peer_text))
        try:
            return handle_request(msg_type, payload, self.peer, self.policy)
        except ProtocolError as exc:
            log("debug", "invalid %s from %s: %s"
                % (request_name(msg_type), self.peer_text, exc))
            return MSG_ERROR, encode_error(ERROR_INVALID, "invalid request: %s" % exc), None
        except Refused as exc:
            return MSG_ERROR, encode_error(exc.code, str(exc)), None
        except Exception as exc:   # a bug in one handler: answer it, keep the connection
            log("error", "internal error answering %s: %s" % (request_name(msg_type),
                                                              describe_exception(exc)))
            return MSG_ERROR, encode_error(ERROR_INTERNAL, "internal error: %s: %s"
                                           % (type(exc).__name__, exc)), None


# ---- the QEMU guest agent protocol: JSON commands for libvirt, Proxmox VE, KubeVirt ----------

# Management stacks (libvirt, Proxmox VE, KubeVirt, OpenStack, vfkit) talk to a guest through
# the QEMU guest agent protocol (QGA), by default on the virtio-serial port
# org.qemu.guest_agent.0. A request is a JSON object in a byte stream, newlines optional:
# {"execute": NAME, "arguments": {...}, "id": ANY}. The answer is one line,
# {"return": VALUE} or {"error": {"class": ..., "desc": ...}}, with the request's "id" echoed.
# A 0xFF byte from the host means "forget any partial input"; guest-sync-delimited's answer
# starts with 0xFF in turn, so that a host can skip whatever an earlier client left unread.
# Reply shapes follow QEMU's qga/qapi-schema.json (tests/vm compares them with Debian's
# qemu-ga in the same guest). The stdlib's json (and the re it imports) is loaded the first
# time a QGA request arrives: boot, ArcBox serving and the power-off never load it.

QGA_RESET = 0xFF                  # "discard partial input" (invalid in UTF-8, so never data)
QGA_MAX_DEPTH = 64                # JSON nesting refused beyond this, before json recurses
QGA_FAST_BYTES = 4096             # requests up to this size are decoded in one step
QGA_WHITESPACE = b" \t\r\n"
_QGA_GARBAGE_END = b" \t\r\n{[\xff"
QGA_GARBAGE_RUN = 256             # a run of garbage is answered once, or every this many bytes
_QGA_WAIT = object()              # _between_objects: "need more bytes"
_qga_json = None                  # made on first use: decode, encode, structural, raw_decode


def qga_json():
    """JSON decode and encode functions (made once: json.loads and json.dumps with options
    build a new decoder or encoder on every call), the scanner's pattern (the structural
    bytes outside strings, and what ends or escapes inside one) and binascii for base64.
    Imported here, once, so that only QGA pays for them."""
    global _qga_json
    if _qga_json is None:
        import binascii            # base64 for guest-exec and guest-file-* (a C built-in)
        import json
        import re
        decoder = json.JSONDecoder(parse_constant=_reject_constant)
        _qga_json = namedtuple("QgaJson", "decode encode structural raw_decode base64")(
            decode=decoder.decode,
            encode=json.JSONEncoder(separators=(", ", ": "), allow_nan=False).encode,
            structural=re.compile(rb'["\\{}\[\]\xff]'), raw_decode=decoder.raw_decode,
            base64=binascii)
    return _qga_json


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


class QgaError(Exception):
    """A request answered with {"error": {"class": ..., "desc": ...}}; qemu-ga's classes."""

    def __init__(self, desc, klass="GenericError", errno=None):
        Exception.__init__(self, desc)
        self.klass = klass
        self.errno = errno         # the OSError behind it, where a caller tells them apart


# One command: its handler(machine, peer, arguments), its parameters as
# (name, JSON type, required), whether a success is answered (guest-shutdown is not: the
# host waits for the VM to stop instead; its handler returns the effect), whether only an
# allowed peer (--allow) may run it, and bytes sent before the answer.
QgaCommand = namedtuple("QgaCommand", "handler params success_response guarded prefix")
_QGA_TYPES = {"int": (int,), "str": (str,), "bool": (bool,), "list": (list,),
              "number": (int, float), "objects": (list,), "any": (object,)}
_QGA_TYPE_NAMES = {"int": "integer", "str": "string", "bool": "boolean", "list": "array",
                   "number": "number", "objects": "array"}


def qga_arguments(params, args):
    """Check a command's arguments the way QEMU's generated code does: unknown, missing and
    mistyped ones are GenericErrors naming the parameter. (bool is an int in Python: not
    accepted where a JSON integer is wanted.)"""
    known = {name for name, _, _ in params}
    for name in args:
        if name not in known:
            raise QgaError("Parameter '%s' is unexpected" % name)
    for name, kind, required in params:
        if name not in args:
            if required:
                raise QgaError("Parameter '%s' is missing" % name)
            continue
        value = args[name]
        if not isinstance(value, _QGA_TYPES[kind]) or (
                kind not in ("bool", "any") and isinstance(value, bool)):
            raise QgaError("Invalid parameter type for '%s', expected: %s"
                           % (name, _QGA_TYPE_NAMES[kind]))
        for i, item in enumerate(value if kind == "list" else ()):
            if not isinstance(item, str):
                raise QgaError("Invalid parameter type for '%s[%d]', expected: string"
                               % (name, i))
    return args


class QgaProtocol:
    """JSON objects in, one answer line each out (the interface of "the ArcBox protocol on
    one stream"). The stream is scanned incrementally for the end of the first object:
    strings, escapes and nesting are followed, nothing is parsed until the object is whole.
    An object larger than max_frame, or nested deeper than QGA_MAX_DEPTH, is answered with
    an error and its remaining bytes skipped as they come; a 0xFF byte drops what came
    before it; bytes that cannot start an object are answered with one error per run."""

    __slots__ = ("machine", "max_frame", "peer", "peer_text", "scan", "depth", "in_string",
                 "escaped", "skipping")

    def __init__(self, machine, max_frame, peer, shared=False):
        self.machine = machine     # a QgaMachine: the commands and what they act on
        self.max_frame = max_frame
        self.peer = peer
        self.peer_text = describe_peer(peer)
        self._restart(False)

    def _restart(self, skipping):
        self.scan = 0              # bytes of the current object already scanned
        self.depth = 0
        self.in_string = self.escaped = False
        self.skipping = skipping   # answered already (too large or deep): drop to its end

    def take(self, buf):
        if not self.scan and not self.skipping:
            turn = self._between_objects(buf) or self._whole_object(buf)
            if turn is not None:
                return None if turn is _QGA_WAIT else turn
        end = self._scan(buf)
        if end is None:                        # the object goes on beyond buf
            if self.skipping:
                self.scan = 0                  # drop what was scanned; the state goes on
                return len(buf), b"", None, False
            if len(buf) > self.max_frame:
                return self._refuse(len(buf), "JSON object larger than %d bytes (--max-frame)"
                                    % self.max_frame)
            return None
        kind, pos = end
        if kind == "reset":                    # 0xFF: the host asks to drop partial input
            log("debug", "%s: reset (0xFF) after %d bytes" % (self.peer_text, pos))
            self._restart(False)
            return pos + 1, b"", None, False
        if kind == "deep":
            return self._refuse(pos, "JSON nesting deeper than %d" % QGA_MAX_DEPTH)
        skipped = self.skipping
        self._restart(False)
        if skipped:
            return pos, b"", None, False
        if pos > self.max_frame:
            return pos, self._error_line(QgaError("JSON object larger than %d bytes "
                                                  "(--max-frame)" % self.max_frame)), None, False
        reply, effect = self.machine.answer(bytes(buf[:pos]), self.peer, self.peer_text)
        return self._with_whitespace(buf, pos), reply, effect, False

    def _whole_object(self, buf):
        """The common case in one step: a small request that is all there, decoded by json's
        C scanner straight from the front of the buffer. None sends everything else (a 0xFF,
        an incomplete or invalid or large or deep object) to the scanner, which knows where
        such an object ends."""
        head = bytes(buf[:min(QGA_FAST_BYTES, self.max_frame)])
        if QGA_RESET in head or head.count(b"[") + head.count(b"{") > QGA_MAX_DEPTH:
            return None                   # a reset; or maybe too deep: the scanner counts
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 3:
                return None               # invalid inside: the scanner's path answers it
            text = head[:exc.start].decode("utf-8")   # a character cut by the slice
        try:
            request, end = qga_json().raw_decode(text)
        except (ValueError, RecursionError):
            return None
        pos = end if text.isascii() else len(text[:end].encode("utf-8"))
        reply, effect = self.machine.answer_request(request, self.peer, self.peer_text)
        return self._with_whitespace(buf, pos), reply, effect, False

    @staticmethod
    def _with_whitespace(buf, pos):
        """Where the next turn starts: past the usual newline after an object."""
        n = len(buf)
        while pos < n and buf[pos] in QGA_WHITESPACE:
            pos += 1
        return pos

    def forget(self, count):
        self._restart(False)

    def _between_objects(self, buf):
        """Whitespace, a 0xFF, or garbage before the next object: one turn; _QGA_WAIT while a
        run of garbage may go on; None when an object starts here."""
        n = len(buf)
        i = 0
        while i < n and buf[i] in QGA_WHITESPACE:
            i += 1
        if i:
            return i, b"", None, False
        first = buf[0]
        if first == QGA_RESET:
            return 1, b"", None, False
        if first in b"{[":
            return None
        end = 1
        while end < n and buf[end] not in _QGA_GARBAGE_END:
            end += 1
        if end == n and n < QGA_GARBAGE_RUN:
            return _QGA_WAIT               # the run may go on in the next read: one answer
        text = bytes(buf[:min(end, 32)]).decode("utf-8", "replace")
        log_limited("qga garbage", peer_group(self.peer), "warn",
                    "%s: QGA input that is not a JSON object: %r" % (self.peer_text, text))
        return end, self._error_line(QgaError("JSON parse error, stray %r: QMP input must be "
                                              "a JSON object" % text)), None, False

    def _scan(self, buf):
        """Go on from where the last call stopped. None while the object is incomplete;
        else ("end", its length), ("reset", where the 0xFF is) or ("deep", bytes scanned)."""
        search = qga_json().structural.search
        pos, depth, in_string, n = self.scan, self.depth, self.in_string, len(buf)
        if self.escaped:                       # a backslash ended the previous chunk
            if pos >= n:
                return None
            pos += 1
            self.escaped = False
        while True:
            match = search(buf, pos)
            if match is None:
                break
            p = match.start()
            c = buf[p]
            pos = p + 1
            if c == QGA_RESET:
                return "reset", p
            if in_string:
                if c == 0x22:                  # "
                    in_string = False
                elif c == 0x5C:                # backslash: the next byte is escaped
                    if pos >= n:
                        self.escaped = True
                        break
                    pos += 1
            elif c == 0x22:
                in_string = True
            elif c in b"{[":
                depth += 1
                if depth > QGA_MAX_DEPTH and not self.skipping:
                    self.scan, self.depth, self.in_string = pos, depth, in_string
                    return "deep", pos
            elif c in b"}]":
                depth -= 1
                if depth <= 0:
                    return "end", pos
        self.scan, self.depth, self.in_string = n, depth, in_string
        return None

    def _refuse(self, consumed, why):
        """Answer once, then skip the rest of this object as it arrives."""
        log_limited("qga refused", peer_group(self.peer), "warn",
                    "%s: %s; skipping it" % (self.peer_text, why))
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        self._restart(True)
        self.depth, self.in_string, self.escaped = depth, in_string, escaped
        return consumed, self._error_line(QgaError(why)), None, False

    @staticmethod
    def _error_line(exc):
        return qga_reply({"error": {"class": exc.klass, "desc": str(exc)}})


def qga_reply(obj, prefix=b""):
    return prefix + qga_json().encode(obj).encode() + b"\n"


# ---- the QGA commands: what each reads or does -----------------------------------------------

NLMSG_DONE, NLMSG_ERROR = 3, 2    # <linux/netlink.h>
RTM_GETADDR = 22                  # <linux/rtnetlink.h>
NLM_F_REQUEST_DUMP = 0x301        # NLM_F_REQUEST | NLM_F_ROOT | NLM_F_MATCH
IFA_ADDRESS, IFA_LOCAL = 1, 2     # <linux/if_addr.h>: the peer / the local address
_NLMSG_HEADER = Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
_IFADDRMSG = Struct("=BBBBI")     # struct ifaddrmsg: family, prefixlen, flags, scope, index
_RTATTR = Struct("=HH")           # struct rtattr: len, type
USER_PROCESS = 7                  # <utmp.h> ut_type of a logged-in user
# struct utmp (glibc, x86_64 and aarch64 alike, 384 bytes): ut_type (short, padded), ut_pid,
# ut_line[32], ut_id[4], ut_user[32], ut_host[256], ut_exit (2 shorts), ut_session,
# ut_tv (two int32), ut_addr_v6[4], 20 unused bytes.
_UTMP = Struct("=h2xi32s4s32s256s2hi2i16s20x")
QGA_STATISTICS = (("rx-bytes", "rx_bytes"), ("rx-packets", "rx_packets"),
                  ("rx-errs", "rx_errors"), ("rx-dropped", "rx_dropped"),
                  ("tx-bytes", "tx_bytes"), ("tx-packets", "tx_packets"),
                  ("tx-errs", "tx_errors"), ("tx-dropped", "tx_dropped"))
OS_RELEASE_FIELDS = (("ID", "id"), ("NAME", "name"), ("PRETTY_NAME", "pretty-name"),
                     ("VERSION", "version"), ("VERSION_ID", "version-id"),
                     ("VARIANT", "variant"), ("VARIANT_ID", "variant-id"))
QGA_SHUTDOWN_MODES = {"powerdown": "poweroff", "halt": "halt", "reboot": "reboot"}


def parse_utmp(data):
    """Logged-in users from utmp records: [(user, login time)], earliest login per user."""
    first = {}
    for off in range(0, len(data) - _UTMP.size + 1, _UTMP.size):
        fields = _UTMP.unpack_from(data, off)
        if fields[0] != USER_PROCESS:
            continue
        user = fields[4].split(b"\0", 1)[0].decode("utf-8", "replace")
        when = fields[9] + fields[10] / 1e6
        if user and (user not in first or when < first[user]):
            first[user] = when
    return sorted(first.items(), key=lambda item: item[1])


def parse_os_release(text):
    """os-release's KEY=VALUE lines, each value unquoted (os_release_unquote); a value with
    an unterminated quote is left out. (The file named by $QGA_OS_RELEASE, qemu-ga's own
    test hook, replaces /etc/os-release: QEMU's test-qga runs against both agents.)"""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() and not key.startswith("#"):
            unquoted = os_release_unquote(value.strip())
            if unquoted is not None:
                values[key.strip()] = unquoted
    return values


def os_release_unquote(text):
    """A value as os-release(5) writes them, for a shell: "..." where a backslash takes the
    next character as it is (qemu-ga 10 and QEMU's test data agree: \\' is '), '...'
    literal, and outside quotes a backslash escapes any character. (qemu-ga 10 cuts a value
    that is not in double quotes at its first space, quotes and backslashes kept: 'ArcBox
    Linux' comes out as 'ArcBox -- docs/qga.md.) None for an unterminated quote."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                return None
            out.append(text[i + 1:end])
            i = end + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    return None
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n:
                    out.append(text[i + 1])
                    i += 2
                    continue
                out.append(c)
                i += 1
        elif c == "\\":
            if i + 1 < n:
                out.append(text[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def netlink_addresses():
    """Every interface address from the kernel (RTM_GETADDR over NETLINK_ROUTE):
    [(interface index, family, address text, prefix length)]. getifaddrs() without libc."""
    found = []
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.settimeout(2.0)               # the kernel answers at once; never wait forever
        sock.bind((0, 0))
        sock.send(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + _IFADDRMSG.size, RTM_GETADDR,
                                     NLM_F_REQUEST_DUMP, 1, 0)
                  + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        while True:
            data = sock.recv(65536)
            if not data:
                return found
            off = 0
            while off + _NLMSG_HEADER.size <= len(data):
                length, msg_type = _NLMSG_HEADER.unpack_from(data, off)[:2]
                if length < _NLMSG_HEADER.size:
                    return found
                if msg_type in (NLMSG_DONE, NLMSG_ERROR):
                    return found
                if msg_type == RTM_GETADDR - 2:    # RTM_NEWADDR (20): one address
                    found.extend(_ifaddr(data[off + _NLMSG_HEADER.size:off + length]))
                off += (length + 3) & ~3
    finally:
        sock.close()


def _ifaddr(body):
    family, prefix, _, _, index = _IFADDRMSG.unpack_from(body)
    attrs, off = {}, _IFADDRMSG.size
    while off + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, off)
        if length < _RTATTR.size:
            break
        attrs[kind] = body[off + _RTATTR.size:off + length]
        off += (length + 3) & ~3
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return []
    return [(index, family, socket.inet_ntop(family, raw), prefix)]


def _block_device_disk(dev):
    """guest-get-fsinfo's name and disks for the block device `dev` (st_dev of a mount
    point), as qemu-ga finds them: a device of its own (a disk, a partition) is one
    GuestDiskAddress; a virtual one (device-mapper, loop) is the disks under it, followed
    through /sys/.../slaves (a loop device has none: [])."""
    sys_path = os.path.realpath("/sys/dev/block/%d:%d" % (os.major(dev), os.minor(dev)))
    return os.path.basename(sys_path), _disks_under(sys_path, 0)


def _disks_under(sys_path, depth):
    if "/devices/virtual/block/" not in sys_path:
        return [_disk_address(sys_path)]
    found = []
    slaves = os.path.join(sys_path, "slaves")
    try:
        names = os.listdir(slaves) if depth < 8 else []   # (a loop of links: give up)
    except OSError:
        names = []
    for name in names:
        found.extend(_disks_under(os.path.realpath(os.path.join(slaves, name)), depth + 1))
    return found


def _disk_address(sys_path):
    """qemu-ga's GuestDiskAddress of a disk or partition: its PCI address and bus type from
    its sysfs path; `dev` is the node itself (a partition's, not its disk's)."""
    name = os.path.basename(sys_path)
    disk = os.path.basename(os.path.dirname(sys_path)) if os.path.exists(
        os.path.join(sys_path, "partition")) else name
    pci = [part for part in sys_path.split("/") if part.count(":") == 2 and "." in part]
    address = {"bus-type": "virtio" if "/virtio" in sys_path else "unknown",
               "bus": 0, "target": 0, "unit": 0, "dev": "/dev/" + name}
    if pci:
        domain, bus, slot_function = pci[-1].split(":")
        slot, _, function = slot_function.partition(".")
        address["pci-controller"] = {"domain": int(domain, 16), "bus": int(bus, 16),
                                     "slot": int(slot, 16), "function": int(function, 16)}
    else:
        address["pci-controller"] = {"domain": -1, "bus": -1, "slot": -1, "function": -1}
    serial = _read_text("/sys/block/%s/serial" % disk).strip()
    if serial:
        address["serial"] = serial
    return address


# The commands whose work may block on a disk or a device run as errands (a child or a
# thread with a deadline; see "errands"), their answers sent when done; a deadline passed is
# a GenericError. A freeze flushes every dirty page first: tens of MB on a throttled disk take
# tens of seconds, and qemu-ga's hosts wait for it (libvirt blocks on fsfreeze).
QGA_ERRAND_TIMEOUT = 10.0
QGA_FREEZE_TIMEOUT = 300.0


def qga_outcome(outcome):
    """An errand's outcome as a command's value, or the QgaError to answer."""
    if outcome[0] == "ok":
        return outcome[1]
    if outcome[0] == "error":
        raise QgaError(outcome[2], outcome[1] or "GenericError")
    raise QgaError(outcome[1])


def qga_errand(what, body, then=None, timeout=QGA_ERRAND_TIMEOUT):
    """A command's work as an errand: body() in the child, then(value) back in PID 1."""
    return Errand(what, body, timeout,
                  lambda outcome: (then or (lambda value: value))(qga_outcome(outcome)))


def qga_thread(what, body, then=None):
    """qga_errand's twin, its body in a thread of PID 1's: for what only reads (a fork of
    PID 1 costs tens of ms under TCG, more than the reading; KubeVirt polls these) and for
    what works on a descriptor PID 1 keeps (guest-file-*). Stuck on a disk, a thread is left
    there as a child would be."""
    return qga_errand(what, body, then)._replace(thread=True)


def qga_sync(machine, peer, args):
    return args["id"]


def qga_ping(machine, peer, args):
    return {}


def qga_info(machine, peer, args):
    return {"version": __version__, "supported_commands": [
        {"enabled": machine.is_enabled(name), "name": name,
         "success-response": command.success_response}
        for name, command in QGA_COMMANDS.items()]}


def qga_shutdown(machine, peer, args):
    mode = args.get("mode", "powerdown")
    if mode not in QGA_SHUTDOWN_MODES:
        raise QgaError("Parameter 'mode' does not accept value '%s' (powerdown, halt, reboot)"
                       % mode)
    try:
        check_shutdown_allowed(peer, machine.policy)
    except Refused as exc:
        raise QgaError(str(exc))
    return StopRequest("guest-shutdown", 0, QGA_SHUTDOWN_MODES[mode])  # the configured grace


def qga_get_time(machine, peer, args):
    return time.time_ns()


QGA_TIME_YEARS = (1970, 2070)     # guest-set-time's accepted years, as qemu-ga's


def qga_set_time(machine, peer, args):
    """With a time (ns since the epoch): set the clock to it, and the clock keeper learns
    that the host wins. Without: a look of the clock keeper's, made now and taken as the
    truth -- from the KVM PTP clock or the RTC at its second's edge, as `hwclock -s` (after a
    snapshot restore the guest's clock is behind). Only as sets_clock() says."""
    if not sets_clock(machine.policy, peer):
        raise QgaError("guest-set-time refused: the clock is set only by the host (a vsock "
                       "or virtio-serial peer) of an agent that is PID 1")
    given = args.get("time")
    who = describe_peer(peer)
    if given is None:
        try:
            look = machine.clock.errand(asked=True)
        except ClockError as exc:
            raise QgaError(str(exc))

        def finish(outcome):
            try:
                step = look.finish(outcome)
            except ClockError as exc:
                raise QgaError(str(exc))
            log("info", "clock set from the hardware clock by %s (%+.3fs)" % (who, step))
            return {}
        return look._replace(what="guest-set-time", finish=finish)

    try:
        year = time.gmtime(given // 10 ** 9).tm_year
    except (OverflowError, OSError, ValueError):
        year = 0
    if not QGA_TIME_YEARS[0] <= year < QGA_TIME_YEARS[1]:
        raise QgaError("Invalid time")

    def body():                    # then the RTC, as qemu-ga's `hwclock -w` (in UTC: see
        try:                       # docs/qga.md), which may wait on the device
            time.clock_settime_ns(time.CLOCK_REALTIME, given)
        except (OSError, OverflowError, ValueError) as exc:
            raise QgaError("Failed to set time to guest: %s"
                           % (getattr(exc, "strerror", 0) or exc))
        err = write_rtc(given // 10 ** 9) if os.path.exists("/dev/rtc0") else 0
        if err:
            log("warn", "guest-set-time: the clock is set; the RTC is not: %s"
                % os.strerror(err))

    def then(_):
        machine.clock.host_set()
        log("info", "clock set from the host by %s" % who)
        return {}
    return qga_errand("guest-set-time", body, then)


def qga_host_name(machine, peer, args):
    return {"host-name": socket.gethostname()}


def qga_osinfo(machine, peer, args):
    return qga_thread("guest-get-osinfo", os_info)   # /etc/os-release is on the root's disk


def os_info():
    uname = os.uname()
    info = {"kernel-release": uname.release, "kernel-version": uname.version,
            "machine": uname.machine}
    override = os.environ.get("QGA_OS_RELEASE")
    release = parse_os_release(_read_text(override) if override else (
        _read_text("/etc/os-release") or _read_text("/usr/lib/os-release")))
    for key, name in OS_RELEASE_FIELDS:
        if release.get(key):
            info[name] = release[key]
    return info


def qga_timezone(machine, peer, args):
    return qga_thread("guest-get-timezone", timezone)   # the C library reads /etc/localtime


def timezone():
    now = time.localtime()
    answer = {"offset": now.tm_gmtoff}
    if now.tm_zone:
        answer["zone"] = now.tm_zone
    return answer


def qga_users(machine, peer, args):
    return qga_thread("guest-get-users", users)      # /var/run/utmp may be on a disk


def users():
    data = _read_bytes("/run/utmp") or _read_bytes("/var/run/utmp") or b""
    return [{"user": user, "login-time": when} for user, when in parse_utmp(data)]


def qga_vcpus(machine, peer, args):
    base = "/sys/devices/system/cpu"
    try:
        ids = sorted(int(name[3:]) for name in os.listdir(base)
                     if name.startswith("cpu") and name[3:].isdigit())
    except OSError:
        ids = list(range(os.cpu_count() or 1))
    answer = []
    for cpu in ids:
        state = _read_text("%s/cpu%d/online" % (base, cpu)).strip()
        answer.append({"online": state != "0", "can-offline": bool(state),
                       "logical-id": cpu})
    answer.reverse()               # the last first, as qemu-ga 10 lists them
    return answer


def qga_interfaces(machine, peer, args):
    return qga_thread("guest-network-get-interfaces", network_interfaces)


def network_interfaces():
    """guest-network-get-interfaces' answer (a netlink dump, and sysfs)."""
    by_index = {}
    for index, family, address, prefix in netlink_addresses():
        by_index.setdefault(index, []).append({
            "ip-address-type": "ipv4" if family == socket.AF_INET else "ipv6",
            "ip-address": address, "prefix": prefix})
    answer = []
    for index, name in sorted(socket.if_nameindex()):
        base = "/sys/class/net/%s" % name
        entry = {"name": name}
        mac = _read_text(base + "/address").strip()
        if mac:
            entry["hardware-address"] = mac
        if not by_index.get(index):
            answer.append(entry)   # no address, no counters: qemu-ga reads them for each
            continue               # address it lists
        entry["ip-addresses"] = by_index[index]
        stats = {}
        for key, filename in QGA_STATISTICS:
            try:
                stats[key] = int(_read_text("%s/statistics/%s" % (base, filename)))
            except ValueError:
                stats[key] = 0
        entry["statistics"] = stats
        answer.append(entry)
    return answer


def qga_fsinfo(machine, peer, args):
    guest = machine.freezer.guest
    return qga_thread("guest-get-fsinfo", lambda: filesystems_info(guest))


def filesystems_info(guest):
    """guest-get-fsinfo's answer: stat and statvfs of every mount point, which wait on a
    disk that does not answer."""
    answer = []
    for target, fstype, _, dev in reversed(guest.disk_filesystems()):
        name, disks = _block_device_disk(dev)
        entry = {"name": name, "mountpoint": target, "type": fstype, "disk": disks}
        try:
            st = os.statvfs(target)
            used = st.f_blocks - st.f_bfree
            entry["used-bytes"] = used * st.f_frsize
            entry["total-bytes"] = (used + st.f_bavail) * st.f_frsize   # as df counts
            entry["total-bytes-privileged"] = st.f_blocks * st.f_frsize  # root's reserve too
        except OSError:
            pass
        answer.append(entry)
    return answer


def qga_freeze_status(machine, peer, args):
    return "frozen" if machine.freezer.frozen else "thawed"


def qga_freeze(machine, peer, args):
    return machine.freezer.freeze(args.get("mountpoints"), describe_peer(peer))


def qga_thaw(machine, peer, args):
    return machine.freezer.thaw("thaw from " + describe_peer(peer))


# ---- the QGA commands that read the guest's counters: load, CPUs, disks, routes, memory ------

# KubeVirt polls these (load every 120 s, CPU and disk statistics every 20 s, disks and routes
# every 5 min). Each reads /proc or /sys, which never waits on a disk, so most are answered in
# the loop; guest-get-disks reads block devices' sysfs attributes (a driver's attribute may
# take a device's lock) and guest-get-memory-blocks two files per 128 MiB of memory (16,384
# for a guest of 1 TiB): those run in an errand's thread.
SI_LOAD_SHIFT = 16                # <linux/kernel.h>: sysinfo()'s loads are fixed point, 2^16
DISKSTATS_FIELDS = ("read-ios", "read-merges", "read-sectors", "read-ticks", "write-ios",
                    "write-merges", "write-sectors", "write-ticks", "ios-pgr", "total-ticks",
                    "weight-ticks", "discard-ios", "discard-merges", "discard-sectors",
                    "discard-ticks", "flush-ios", "flush-ticks")   # /proc/diskstats' order
CPUSTATS_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
                   "guest", "guestnice")                            # /proc/stat's order
RTF_SIGN = 1 << 31                # an IPv6 route's flags: qemu-ga reads them into an int,
WIDEN = 0xFFFFFFFF00000000        # so a set top bit comes out sign-extended to 64 bits


def qga_load(machine, peer, args):
    """sysinfo(2)'s load averages, exactly what qemu-ga 10 answers (glibc's getloadavg has
    read them there since 2.41; /proc/loadavg rounds them to two decimals)."""
    import ctypes
    info = (ctypes.c_ulong * 32)()   # struct sysinfo: long uptime, unsigned long loads[3], ...
    if libc_call("sysinfo", info):   # int sysinfo(struct sysinfo *)
        raise QgaError("cannot read the load averages")
    scale = float(1 << SI_LOAD_SHIFT)
    return {"load1m": info[1] / scale, "load5m": info[2] / scale, "load15m": info[3] / scale}


def qga_cpustats(machine, peer, args):
    """/proc/stat per CPU, its jiffies as milliseconds (qemu-ga's unit)."""
    per_ms = 1000 / (os.sysconf("SC_CLK_TCK") or 100)
    answer = []
    for line in _read_text("/proc/stat").splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or not fields[0][3:].isdigit():
            continue
        entry = {"type": "linux", "cpu": int(fields[0][3:])}
        for name, value in zip(CPUSTATS_FIELDS, fields[1:]):
            entry[name] = int(int(value) * per_ms)
        answer.append(entry)
    return answer


def qga_diskstats(machine, peer, args):
    """/proc/diskstats, every line, each counter it has (older kernels have fewer)."""
    answer = []
    for line in _read_text("/proc/diskstats").splitlines():
        fields = line.split()
        if len(fields) < 14:
            continue
        stats = {name: int(value) for name, value in zip(DISKSTATS_FIELDS, fields[3:])}
        answer.append({"name": fields[2], "major": int(fields[0]), "minor": int(fields[1]),
                       "stats": stats})
    return answer


def qga_routes(machine, peer, args):
    """/proc/net/route, then /proc/net/ipv6_route, field for field as qemu-ga gives them."""
    answer = []
    for line in _read_text("/proc/net/route").splitlines()[1:]:
        f = line.split()
        if len(f) < 11:
            continue
        ipv4 = lambda word: socket.inet_ntop(socket.AF_INET, int(word, 16).to_bytes(4, "little"))
        answer.append({"iface": f[0], "destination": ipv4(f[1]), "gateway": ipv4(f[2]),
                       "flags": int(f[3], 16), "refcnt": int(f[4]), "use": int(f[5]),
                       "metric": int(f[6]), "mask": ipv4(f[7]), "mtu": int(f[8]),
                       "window": int(f[9]), "irtt": int(f[10]), "version": 4})
    for line in _read_text("/proc/net/ipv6_route").splitlines():
        f = line.split()
        if len(f) < 10:
            continue
        ipv6 = lambda word: socket.inet_ntop(socket.AF_INET6, bytes.fromhex(word))
        flags = int(f[8], 16)
        answer.append({"iface": f[9], "destination": ipv6(f[0]),
                       "desprefixlen": str(int(f[1], 16)), "source": ipv6(f[2]),
                       "srcprefixlen": str(int(f[3], 16)), "nexthop": ipv6(f[4]),
                       "metric": _int32(f[5]), "refcnt": _int32(f[6]), "use": _int32(f[7]),
                       "flags": flags | WIDEN if flags & RTF_SIGN else flags, "version": 6})
    return answer


def _int32(word):
    """A hex field qemu-ga reads into a C int: ffffffff is -1."""
    value = int(word, 16) & 0xFFFFFFFF
    return value - (1 << 32) if value & RTF_SIGN else value


def qga_disks(machine, peer, args):
    return qga_thread("guest-get-disks", block_disks)


def block_disks():
    """guest-get-disks' answer as qemu-ga builds it: every block device of a non-zero size
    in /sys/block, each followed by its partitions, the whole list reversed (qemu-ga prepends
    as it reads); a device's dependencies are its slaves; a device-mapper one's alias is its
    dm name; a virtual one (dm, loop) has no address."""
    answer = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return answer
    for name in names:
        base = "/sys/block/" + name
        if _read_text(base + "/size").strip() in ("", "0"):
            continue
        disk = {"name": "/dev/" + name, "partition": False}
        alias = _read_text(base + "/dm/name").strip()
        if alias:
            disk["alias"] = alias
        answer.append(disk)
        sys_path = os.path.realpath(base)
        if "/devices/virtual/block/" not in sys_path:
            disk["address"] = _disk_address(sys_path)
        try:
            disk["dependencies"] = ["/dev/" + s for s in os.listdir(base + "/slaves")]
        except OSError:
            pass
        try:
            parts = [p for p in os.listdir(base) if p.startswith(name)]
        except OSError:
            parts = []
        for part in parts:
            answer.append({"name": "/dev/" + part, "partition": True,
                           "dependencies": ["/dev/" + name]})
    answer.reverse()
    return answer


MEMORY_BLOCKS = "/sys/devices/system/memory"


def qga_memory_blocks(machine, peer, args):
    return qga_thread("guest-get-memory-blocks", memory_blocks)


def memory_blocks():
    """Every memoryN directory in sysfs' order (qemu-ga's readdir order): online from its
    state, can-offline from its removable flag."""
    answer = []
    for name in _listdir(MEMORY_BLOCKS):
        if not (name.startswith("memory") and name[6:].isdigit()):
            continue
        base = "%s/%s/" % (MEMORY_BLOCKS, name)
        state = _read_bytes(base + "state")
        if state is None:          # a kernel without the file: online, cannot go offline
            answer.append({"phys-index": int(name[6:]), "online": True, "can-offline": False})
            continue
        removable = (_read_bytes(base + "removable") or b"0")[:1]
        answer.append({"phys-index": int(name[6:]), "online": state.startswith(b"online"),
                       "can-offline": removable != b"0"})
    if not answer:
        raise QgaError("guest reported zero memory blocks!")
    return answer


def qga_memory_block_info(machine, peer, args):
    text = _read_text(MEMORY_BLOCKS + "/block_size_bytes").strip()
    try:
        return {"size": int(text, 16)}
    except ValueError:
        raise QgaError("could not read memory block size: %s/block_size_bytes"
                       % MEMORY_BLOCKS)


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


# ---- the QGA commands that change the machine: vCPUs, memory blocks, fstrim, suspend --------

FITRIM = 0xC0185879               # <linux/fs.h> _IOWR('X', 121, struct fstrim_range)
_FSTRIM_RANGE = Struct("=QQQ")    # struct fstrim_range: start, len, minlen (all __u64)
QGA_FSTRIM_TIMEOUT = 300.0        # a trim of a large disk on a slow backend takes minutes
SUSPEND_MODES = {"guest-suspend-ram": "mem", "guest-suspend-disk": "disk",
                 "guest-suspend-hybrid": "disk"}   # what /sys/power/state must offer


def qga_members(items, param, fields):
    """A list of objects (guest-set-vcpus' vcpus, guest-set-memory-blocks' mem-blks)
    checked member by member, with QEMU's error texts: fields are (name, kind, required)."""
    for i, item in enumerate(items):
        where = "%s[%d]" % (param, i)
        if not isinstance(item, dict):
            raise QgaError("Invalid parameter type for '%s', expected: object" % where)
        qga_arguments([(where + "." + name, kind, required) for name, kind, required in fields],
                      {where + "." + name: value for name, value in item.items()})
    return items


def qga_set_vcpus(machine, peer, args):
    vcpus = qga_members(args["vcpus"], "vcpus", (("logical-id", "int", True),
                                                 ("online", "bool", True),
                                                 ("can-offline", "bool", False)))
    wanted = [(cpu["logical-id"], cpu["online"]) for cpu in vcpus]
    return qga_errand("guest-set-vcpus", lambda: set_vcpus(wanted))   # CPU hotplug may wait


def set_vcpus(wanted):
    """Bring each logical CPU online or offline through its sysfs `online` file, as qemu-ga
    does: how many were handled before the first failure; that failure only if none was."""
    done = 0
    for cpu, online in wanted:
        path = "/sys/devices/system/cpu/cpu%d/" % cpu
        try:
            _set_vcpu(path, cpu, online)
        except QgaError:
            if not done:
                raise
            break
        done += 1
    return done


def _set_vcpu(path, cpu, online):
    if not os.path.isdir(path):
        raise QgaError('open("%s"): %s' % (path, os.strerror(errno.ENOENT)))
    try:
        fd = os.open(path + "online", os.O_RDWR)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise QgaError('open("%sonline"): %s' % (path, exc.strerror))
        if not online:         # no `online` file: the boot CPU, which never goes offline
            raise QgaError("logical processor #%d can't be offlined" % cpu)
        return
    try:
        status = os.pread(fd, 1, 0)
        if not status:
            raise QgaError('pread("%sonline"): unexpected EOF' % path)
        if online != (status != b"0"):
            try:
                os.pwrite(fd, b"1" if online else b"0", 0)
            except OSError as exc:
                raise QgaError('pwrite("%sonline"): %s' % (path, exc.strerror))
    finally:
        os.close(fd)


def qga_set_memory_blocks(machine, peer, args):
    blocks = qga_members(args["mem-blks"], "mem-blks", (("phys-index", "int", True),
                                                        ("online", "bool", True),
                                                        ("can-offline", "bool", False)))
    wanted = [(block["phys-index"], block["online"]) for block in blocks]
    return qga_errand("guest-set-memory-blocks", lambda: set_memory_blocks(wanted))


def set_memory_blocks(wanted):
    """Each block online or offline through its sysfs `state`: one response per block."""
    answer = []
    for index, online in wanted:
        result = {"phys-index": index, "response": "success"}
        answer.append(result)
        base = "%s/memory%d/" % (MEMORY_BLOCKS, index)
        if not os.path.isdir(base):
            result["response"], result["error-code"] = "not-found", errno.ENOENT
            continue
        state = _read_bytes(base + "state")
        if state is None:
            if not online:
                result["response"] = "operation-not-supported"
            continue
        if online != state.startswith(b"online"):
            try:
                fd = os.open(base + "state", os.O_WRONLY)
                try:
                    os.write(fd, b"online" if online else b"offline")
                finally:
                    os.close(fd)
            except OSError as exc:
                result["response"] = "operation-failed"
                result["error-code"] = exc.errno
    return answer


def qga_fstrim(machine, peer, args):
    guest, minimum = machine.freezer.guest, args.get("minimum", 0)
    return qga_errand("guest-fstrim", lambda: fstrim(guest, minimum),
                      timeout=QGA_FSTRIM_TIMEOUT)


def fstrim(guest, minimum):
    """FITRIM every mounted disk filesystem, as qemu-ga lists them (the last mounted
    first): the bytes trimmed, or why not."""
    import ctypes
    paths = []
    for target, _, _, _ in reversed(guest.disk_filesystems()):
        result = {"path": target}
        paths.append(result)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result["error"] = "failed to open: %s" % exc.strerror
            continue
        try:
            span = ctypes.create_string_buffer(_FSTRIM_RANGE.pack(0, (1 << 64) - 1, minimum))
            # int ioctl(int fd, FITRIM, struct fstrim_range *): the kernel writes back len
            err = libc_call("ioctl", fd, ctypes.c_ulong(FITRIM), span)
        finally:
            os.close(fd)
        if err in (errno.ENOTTY, errno.EOPNOTSUPP):
            result["error"] = "trim not supported"
        elif err:
            result["error"] = "failed to trim: %s" % os.strerror(err)
        else:
            _, trimmed, minlen = _FSTRIM_RANGE.unpack(span.raw[:_FSTRIM_RANGE.size])
            result["trimmed"], result["minimum"] = trimmed, minlen
    return {"paths": paths}


def qga_suspend(name):
    """guest-suspend-ram / -disk / -hybrid: as qemu-ga does in a guest without systemd or
    pm-utils, through /sys/power (hybrid: `suspend` into /sys/power/disk, then `disk`).
    No answer on success (the guest sleeps); the write is an errand, as it returns only
    when the guest wakes."""
    def handler(machine, peer, args):
        mode = SUSPEND_MODES[name]
        offered = _read_text("/sys/power/state").split()
        if mode not in offered or (name == "guest-suspend-hybrid" and "suspend" not in
                                   _read_text("/sys/power/disk").replace("[", " ").replace(
                                       "]", " ").split()):
            raise QgaError("the requested suspend mode is not supported by the guest")

        def body():
            if name == "guest-suspend-hybrid":
                _write_file("/sys/power/disk", b"suspend")
            _write_file("/sys/power/state", mode.encode())

        def said(outcome):
            if outcome[0] != "ok":
                log("warn", "%s: %s" % (name, outcome[-1]))
            else:
                log("info", "%s: the guest woke up" % name)
        log("info", "%s from %s" % (name, describe_peer(peer)))
        machine.errands.run(Errand(name, body, 24 * 3600.0, said), said)
        return None
    return handler


def _write_file(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ---- credentials: a user's password and SSH keys (off by default) ---------------------------

def passwd_entry(username, path="/etc/passwd"):
    """getpwnam() from /etc/passwd (a busybox guest has no NSS): (uid, gid, home) or None."""
    for line in _read_text(path).splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[0] == username:
            try:
                return int(fields[2]), int(fields[3]), fields[5]
            except ValueError:
                return None
    return None


def _user(username):
    entry = passwd_entry(username)
    if entry is None:
        raise QgaError("failed to lookup user '%s': Success" % username)   # qemu-ga's words
    return entry


def qga_set_user_password(machine, peer, args):
    username, crypted = args["username"], args["crypted"]
    password = qga_base64_decode(args["password"])
    if b"\n" in password:
        raise QgaError("forbidden characters in raw password")
    if "\n" in username or ":" in username:
        raise QgaError("forbidden characters in username")
    chpasswd = find_program("chpasswd")
    if chpasswd is None:
        raise QgaError("cannot find 'passwd' program in PATH")
    argv = [chpasswd, "-e"] if crypted else [chpasswd]
    data = username.encode() + b":" + password + b"\n"

    def body():
        run_command(argv, data, "set user password")
    return qga_errand("guest-set-user-password", lambda: body() or {})


def find_program(name, search=None):
    """`name` in the folders of `search` (a PATH; default this process's, or the usual
    ones): its path, or None."""
    for folder in (search or os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:"
                   "/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        path = os.path.join(folder or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def run_command(argv, data, action):
    """In an errand: run argv with `data` on its stdin, its output (both streams) kept for
    the error, as qemu-ga's ga_run_command: its own session, the same error texts."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, [])   # the errand's handlers are
            os.setsid()                                      # default already (child_signals)
            os.dup2(r_in, 0)
            os.dup2(w_out, 1)
            os.dup2(w_out, 2)
            _close_fds_but(2)
            os.execv(argv[0], argv)
        except OSError as exc:
            os.write(2, ("failed to exec '%s': %s\n" % (argv[0], exc.strerror)).encode())
        os._exit(1)
    os.close(r_in)
    os.close(w_out)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(w_in, view):]
    except OSError:
        pass                       # it stopped reading: its status says why
    os.close(w_in)
    chunks = []
    while True:
        chunk = os.read(r_out, 65536)
        if not chunk:
            break
        if sum(len(c) for c in chunks) < 65536:
            chunks.append(chunk)
    os.close(r_out)
    status = os.waitpid(pid, 0)[1]
    said = b"".join(chunks).decode("utf-8", "replace")
    if not os.WIFEXITED(status):
        raise QgaError("child process has terminated abnormally" + (": " + said if said
                                                                    else ""))
    if os.WEXITSTATUS(status):
        raise QgaError("child process has failed to %s%s" % (action, ": " + said if said
                                                             else ""))


def _authorized_keys(username):
    uid, gid, home = _user(username)
    folder = os.path.join(home, ".ssh")
    return uid, gid, folder, os.path.join(folder, "authorized_keys")


def read_authorized_keys(path):
    """The file's lines (split as g_strsplit on newlines), or the QgaError qemu-ga gives."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").split("\n")
    except OSError as exc:
        raise QgaError("failed to read '%s': Failed to open file “%s”: %s"
                       % (path, path, exc.strerror), errno=exc.errno)


def write_authorized_keys(path, keys, uid, gid):
    """Replace the file (a new file renamed over it, as g_file_set_contents), the user's,
    mode 0600."""
    new = path + ".arcbox-new"
    try:
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, "\n".join(keys).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(new, path)
    except OSError as exc:
        raise QgaError("failed to write to '%s': %s" % (path, exc.strerror))
    try:
        os.chown(path, uid, gid)
    except OSError as exc:
        raise QgaError("failed to set ownership of '%s': %s" % (path, exc.strerror))
    try:
        os.chmod(path, 0o600)
    except OSError as exc:
        raise QgaError("failed to set permissions of '%s': %s" % (path, exc.strerror))


def check_ssh_keys(keys):
    for key in keys:
        if not key or key.startswith("#") or "\n" in key:
            raise QgaError("invalid OpenSSH public key: '%s'" % key)


def qga_ssh_get(machine, peer, args):
    username = args["username"]

    def body():
        _, _, _, path = _authorized_keys(username)
        lines = [line.strip() for line in read_authorized_keys(path)]
        keys = [line for line in lines if line and not line.startswith("#")]
        return {"keys": keys[::-1]}          # the last first, as qemu-ga 10 lists them
    return qga_thread("guest-ssh-get-authorized-keys", body)


def qga_ssh_add(machine, peer, args):
    username, keys, reset = args["username"], args["keys"], args.get("reset", False)
    check_ssh_keys(keys)

    def body():
        uid, gid, folder, path = _authorized_keys(username)
        lines = None
        if not reset:
            try:
                lines = read_authorized_keys(path)
            except QgaError:
                lines = None
        if lines is None:
            lines = []
            if not os.path.isdir(folder):
                try:
                    os.mkdir(folder, 0o700)
                    os.chown(folder, uid, gid)
                    os.chmod(folder, 0o700)
                except OSError as exc:
                    raise QgaError("failed to create directory '%s': %s"
                                   % (folder, exc.strerror))
        for key in keys:
            if key not in lines:
                lines.append(key)
        write_authorized_keys(path, lines, uid, gid)
        return {}
    return qga_errand("guest-ssh-add-authorized-keys", body)


def qga_ssh_remove(machine, peer, args):
    username, keys = args["username"], args["keys"]
    check_ssh_keys(keys)

    def body():
        uid, gid, _, path = _authorized_keys(username)
        try:
            lines = read_authorized_keys(path)
        except QgaError as exc:
            if exc.errno == errno.ENOENT:
                return {}          # nothing to remove
            raise
        write_authorized_keys(path, [line for line in lines if line not in keys], uid, gid)
        return {}
    return qga_errand("guest-ssh-remove-authorized-keys", body)


# ---- programs and files for the host: guest-exec, guest-file-* (off by default) -------------

# guest-exec's programs are PID 1's children like any other: reaped by the reaper, sent
# SIGTERM and, past the grace, SIGKILL by the orderly power-off, named among those who held
# the stop up. The loop makes their pipes; posix_spawn (a vfork and an exec: no copy of
# PID 1's memory, half the time of a fork under TCG) runs in an errand's thread, since the
# exec reads the program's file, which may be on a disk that does not answer. A program that
# exits before that thread's answer reaches the loop is reaped all the same: the reaper keeps
# its status for the watch that comes late. Its output comes through non-blocking pipes the
# loop reads, bounded as qemu-ga bounds it.
QGA_EXEC_MAX_OUTPUT = 16 << 20    # bytes kept of each stream (qemu-ga's GUEST_EXEC_MAX_OUTPUT);
                                  # past it the rest is read and dropped, `truncated` said
QGA_EXEC_MODES = ("none", "stdout", "stderr", "separated", "merged")
QGA_FILE_FIRST_HANDLE = 1000      # qemu-ga's first handle (QGA_PSTATE_DEFAULT_FD_COUNTER)
QGA_FILE_READ_DEFAULT = 4096      # guest-file-read's count when none is given
QGA_FILE_READ_MAX = 48 << 20      # and its largest (qemu-ga's GUEST_FILE_READ_COUNT_MAX)
QGA_FILE_MODES = {                # guest-file-open's modes, qemu-ga's table
    "r": os.O_RDONLY, "rb": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "r+": os.O_RDWR, "rb+": os.O_RDWR, "r+b": os.O_RDWR,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC, "wb+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "w+b": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND, "ab+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "a+b": os.O_RDWR | os.O_CREAT | os.O_APPEND}
QGA_SEEK = {"set": os.SEEK_SET, "cur": os.SEEK_CUR, "end": os.SEEK_END}
QGA_SEEK_CODES = {0: os.SEEK_SET, 1: os.SEEK_CUR, 2: os.SEEK_END}   # QGA_SEEK_SET, _CUR, _END
_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")


def qga_base64_decode(text):
    """qbase64_decode: only base64's characters, else QEMU's error; then as g_base64_decode,
    which decodes whole groups of four and drops an unfinished one."""
    data = text.encode("utf-8", "replace")
    if not set(data) <= _BASE64_CHARS:
        raise QgaError("Base64 data contains invalid characters")
    data = data.replace(b"\n", b"")
    data = data[:len(data) - len(data) % 4]
    try:
        return qga_json().base64.a2b_base64(data)
    except ValueError:             # padding inside: what comes before it
        cut = data.index(b"=")
        return qga_json().base64.a2b_base64(data[:cut - cut % 4])


def qga_base64(data):
    return qga_json().base64.b2a_base64(data, newline=False).decode()


class ExecStream:
    """One captured stream of a guest-exec'd program: what was kept, and whether its pipe
    is still open."""
    __slots__ = ("chunks", "size", "truncated", "open")

    def __init__(self, is_open):
        self.chunks, self.size, self.truncated, self.open = [], 0, False, is_open

    def take(self, data):
        room = QGA_EXEC_MAX_OUTPUT - self.size
        if len(data) > room:
            data, self.truncated = data[:room], True
        if data:
            self.chunks.append(data)
            self.size += len(data)


class ExecProcess:
    __slots__ = ("pid", "argv", "out", "err", "captured", "status", "stdin")

    def __init__(self, pid, argv, captured):
        self.pid, self.argv, self.captured, self.status = pid, argv, captured, None
        self.out, self.err = ExecStream(captured), ExecStream(captured)
        self.stdin = b""           # input-data not yet written


class GuestExec(Source):
    """guest-exec and guest-exec-status: the programs started, their pipes in the loop, each
    one's exit as the reaper tells it; a program's status is given once, then forgotten, as
    qemu-ga does."""

    def __init__(self, reaper):
        self.reaper = reaper
        self.processes = {}        # pid -> ExecProcess, until its exit is told
        self.pipes = {}            # fd -> (ExecProcess, "in" | "out" | "err")

    def start(self, path, argv, env, data, mode):
        """The Errand that starts it (its value: {"pid": N}) or says why not, in qemu-ga's
        words. The pipes are made here; posix_spawn (a vfork, then exec: no copy of PID 1's
        memory) runs in the errand's thread, since the exec reads the program's file."""
        pipes = {}                 # "in" / "out" / "err" -> (PID 1's end, the child's end)
        try:
            if data is not None:
                r, w = os.pipe()
                pipes["in"] = (w, r)
            for name in ("out", "err"):
                if mode in ("separated", "merged" if name == "out" else "-", (
                        "stdout" if name == "out" else "stderr")):
                    r, w = os.pipe()
                    pipes[name] = (r, w)
        except OSError as exc:
            for ends in pipes.values():
                for fd in ends:
                    os.close(fd)
            raise QgaError("Failed to create pipe for communicating with child process (%s)"
                           % exc.strerror)
        null = [(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_RDWR, 0) for fd in (0, 1, 2)]
        actions = [action for action in null if not (
            action[1] == 0 and "in" in pipes or action[1] == 1 and "out" in pipes
            or action[1] == 2 and ("err" in pipes or mode == "merged"))]
        for name, target in (("in", 0), ("out", 1), ("err", 2)):
            if name in pipes:
                actions.append((os.POSIX_SPAWN_DUP2, pipes[name][1], target))
        if mode == "merged":
            actions.append((os.POSIX_SPAWN_DUP2, pipes["out"][1], 2))
        environment = os.environ if env is None else dict(
            item.partition("=")[::2] for item in env)
        defaults = [s for s in signal.valid_signals()
                    if s not in (signal.SIGKILL, signal.SIGSTOP)]

        def body():                # in a thread: the pid, or the errno of the exec
            program = find_program(path, environment.get("PATH")) if "/" not in path \
                else path
            if program is None:
                raise QgaError("Failed to execute child process “%s” (%s)"
                               % (path, os.strerror(errno.ENOENT)))
            spawn = lambda what, args: os.posix_spawn(   # noqa: E731
                what, args, environment, file_actions=actions, setsid=True,
                setsigdef=defaults, setsigmask=())
            try:
                try:
                    return spawn(program, argv)
                except OSError as exc:     # a script without #!: sh runs it, as with glib
                    if exc.errno != errno.ENOEXEC:
                        raise
                    return spawn("/bin/sh", ["/bin/sh", program] + argv[1:])
            except OSError as exc:
                raise QgaError("Failed to execute child process “%s” (%s)"
                               % (path, exc.strerror))

        def finish(outcome):
            for ends in pipes.values():
                os.close(ends[1])                  # the child's ends: its own now
            try:
                pid = qga_outcome(outcome)
            except QgaError:
                for ends in pipes.values():
                    os.close(ends[0])
                raise
            process = ExecProcess(pid, argv, mode != "none")
            process.out.open, process.err.open = "out" in pipes, "err" in pipes
            if data is not None:
                process.stdin = data
            for name, ends in pipes.items():
                os.set_blocking(ends[0], False)
                self.pipes[ends[0]] = (process, name)
            self.processes[pid] = process
            self.reaper.watch(pid, self._exited)   # (reaped already: told at once)
            log("info", "guest-exec: pid %d: %s" % (pid, " ".join(argv)))
            return {"pid": pid}
        return Errand("guest-exec", body, QGA_ERRAND_TIMEOUT, finish, thread=True)

    def _exited(self, pid, status):
        process = self.processes.get(pid)
        if process is not None:
            process.status = status

    def status(self, pid):
        process = self.processes.get(pid)
        if process is None:
            raise QgaError("PID %d does not exist" % pid)
        exited = process.status is not None and not process.out.open and not process.err.open
        answer = {"exited": exited}
        if not exited:
            return answer
        del self.processes[pid]
        status = process.status
        if os.WIFEXITED(status):
            answer["exitcode"] = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            answer["signal"] = os.WTERMSIG(status)
        for key, stream in (("out", process.out), ("err", process.err)):
            if stream.size:
                answer[key + "-data"] = qga_base64(b"".join(stream.chunks))
                answer[key + "-truncated"] = stream.truncated
        return answer

    # the event loop's view
    def wants(self, now):
        return [(fd, select.POLLOUT if which == "in" else select.POLLIN, self._ready, fd)
                for fd, (_, which) in self.pipes.items()]

    def _ready(self, fd, mask):
        entry = self.pipes.get(fd)
        if entry is None:
            return
        process, which = entry
        try:
            if which == "in":
                written = os.write(fd, process.stdin[:65536])
                process.stdin = process.stdin[written:]
                if not process.stdin:
                    self._close(fd)
                return
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:            # EPIPE: it stopped reading its input
            data = b""
        if not data:
            self._close(fd)
            return
        (process.out if which == "out" else process.err).take(data)

    def _close(self, fd):
        process, which = self.pipes.pop(fd)
        os.close(fd)
        if which != "in":
            (process.out if which == "out" else process.err).open = False


def qga_exec(machine, peer, args):
    capture = args.get("capture-output", False)
    if isinstance(capture, bool):
        mode = "separated" if capture else "none"
    elif not isinstance(capture, str):
        raise QgaError("Invalid parameter type for 'capture-output', expected: "
                       "GuestExecCaptureOutput")
    elif capture in QGA_EXEC_MODES:
        mode = capture
    else:
        raise QgaError("Parameter 'capture-output' does not accept value '%s'" % capture)
    data = None
    if "input-data" in args:
        data = qga_base64_decode(args["input-data"])
    path = args["path"]
    argv = [path] + list(args.get("arg", []))
    return machine.execs.start(path, argv, args.get("env"), data, mode)


def qga_exec_status(machine, peer, args):
    return machine.execs.status(args["pid"])


class GuestFiles:
    """guest-file-*: the open files, by handle. Each read, write, seek, flush and close runs
    in a thread of PID 1's with a deadline (the file may be on a disk that does not answer);
    the descriptor stays PID 1's."""

    def __init__(self):
        self.handles = {}          # handle -> fd
        self.next_handle = QGA_FILE_FIRST_HANDLE

    def fd(self, handle):
        fd = self.handles.get(handle)
        if fd is None:
            raise QgaError("handle '%d' has not been found" % handle)
        return fd

    def open(self, path, mode):
        flags = QGA_FILE_MODES.get(mode)
        if flags is None:
            raise QgaError("invalid file open mode '%s'" % mode)

        def body():
            created = False
            try:
                if flags & os.O_CREAT:
                    try:
                        fd = os.open(path, flags | os.O_EXCL | os.O_CLOEXEC, 0o600)
                        created = True
                    except FileExistsError:
                        fd = os.open(path, (flags & ~os.O_CREAT) | os.O_CLOEXEC)
                else:
                    fd = os.open(path, flags | os.O_CLOEXEC)
            except OSError as exc:
                raise QgaError("failed to open file '%s' (mode: '%s'): %s"
                               % (path, mode, exc.strerror))
            if created:            # qemu-ga's DEFAULT_NEW_FILE_MODE, whatever the umask
                os.fchmod(fd, 0o666)
            return fd

        def finish(outcome):
            fd = qga_outcome(outcome)
            handle, self.next_handle = self.next_handle, self.next_handle + 1
            self.handles[handle] = fd
            log("info", "guest-file-open: %s (%s) as handle %d" % (path, mode, handle))
            return handle
        return Errand("guest-file-open", body, QGA_ERRAND_TIMEOUT, finish, thread=True)

    def read(self, handle, count):
        fd = self.fd(handle)
        if count < 0 or count > QGA_FILE_READ_MAX:
            raise QgaError("value '%d' is invalid for argument count" % count)

        def body():
            chunks, left = [], count
            while left > 0:
                try:
                    chunk = os.read(fd, min(left, 1 << 20))
                except OSError as exc:
                    raise QgaError("failed to read file: %s" % exc.strerror)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
            return data, left > 0 and count > 0

        def finish(outcome):
            data, eof = qga_outcome(outcome)
            return {"count": len(data), "buf-b64": qga_base64(data), "eof": eof}
        return Errand("guest-file-read", body, QGA_ERRAND_TIMEOUT, finish, thread=True)

    def write(self, handle, text, count):
        fd = self.fd(handle)
        data = qga_base64_decode(text)
        if count is None:
            count = len(data)
        elif count < 0 or count > len(data):
            raise QgaError("value '%d' is invalid for argument count" % count)
        data = data[:count]

        def body():
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError as exc:
                raise QgaError("failed to write to file: %s" % exc.strerror)
            return {"count": len(data), "eof": False}
        return qga_thread("guest-file-write", body)

    def seek(self, handle, offset, whence):
        fd = self.fd(handle)
        if isinstance(whence, str):
            if whence not in QGA_SEEK:
                raise QgaError("Parameter 'whence' does not accept value '%s'" % whence)
            how = QGA_SEEK[whence]
        elif isinstance(whence, int) and not isinstance(whence, bool):
            if whence not in QGA_SEEK_CODES:
                raise QgaError("invalid whence code %d" % whence)
            how = QGA_SEEK_CODES[whence]
        else:
            raise QgaError("Invalid parameter type for 'whence', expected: GuestFileWhence")

        def body():
            try:
                return {"position": os.lseek(fd, offset, how), "eof": False}
            except OSError as exc:
                raise QgaError("failed to seek file: %s" % exc.strerror)
        return qga_thread("guest-file-seek", body)

    def flush(self, handle):
        self.fd(handle)
        return {}                  # nothing is buffered here: a write is the file's at once

    def close(self, handle):
        fd = self.fd(handle)
        del self.handles[handle]

        def body():
            try:
                os.close(fd)
            except OSError as exc:
                raise QgaError("failed to close handle: %s" % exc.strerror)
            return {}
        return qga_thread("guest-file-close", body)


def qga_file(op):
    def handler(machine, peer, args):
        files = machine.files
        if op == "open":
            return files.open(args["path"], args.get("mode", "r"))
        if op == "read":
            return files.read(args["handle"], args.get("count", QGA_FILE_READ_DEFAULT))
        if op == "write":
            return files.write(args["handle"], args["buf-b64"], args.get("count"))
        if op == "seek":
            return files.seek(args["handle"], args["offset"], args["whence"])
        return getattr(files, op)(args["handle"])
    return handler


# The commands, in guest-info's order (qemu-ga 10.0's on Linux, all 43). `guarded`: only an
# allowed peer (--allow) may run it; the host (vsock CID 2, a serial port) always may.
def _c(handler, params=(), guarded=False, success_response=True, prefix=b""):
    return QgaCommand(handler, params, success_response, guarded, prefix)


QGA_COMMANDS = {
    "guest-sync-delimited": _c(qga_sync, (("id", "int", True),), prefix=b"\xff"),
    "guest-sync": _c(qga_sync, (("id", "int", True),)),
    "guest-ping": _c(qga_ping),
    "guest-info": _c(qga_info),
    "guest-shutdown": _c(qga_shutdown, (("mode", "str", False),), True, False),
    "guest-get-time": _c(qga_get_time),
    "guest-set-time": _c(qga_set_time, (("time", "int", False),), True),
    "guest-get-host-name": _c(qga_host_name),
    "guest-get-osinfo": _c(qga_osinfo),
    "guest-get-timezone": _c(qga_timezone),
    "guest-get-users": _c(qga_users),
    "guest-get-load": _c(qga_load),
    "guest-get-cpustats": _c(qga_cpustats),
    "guest-get-diskstats": _c(qga_diskstats),
    "guest-get-vcpus": _c(qga_vcpus),
    "guest-set-vcpus": _c(qga_set_vcpus, (("vcpus", "objects", True),), True),
    "guest-get-memory-blocks": _c(qga_memory_blocks),
    "guest-get-memory-block-info": _c(qga_memory_block_info),
    "guest-set-memory-blocks": _c(qga_set_memory_blocks, (("mem-blks", "objects", True),),
                                  True),
    "guest-network-get-interfaces": _c(qga_interfaces),
    "guest-network-get-route": _c(qga_routes),
    "guest-get-disks": _c(qga_disks),
    "guest-get-fsinfo": _c(qga_fsinfo),
    "guest-fstrim": _c(qga_fstrim, (("minimum", "int", False),), True),
    "guest-fsfreeze-status": _c(qga_freeze_status),
    "guest-fsfreeze-freeze": _c(qga_freeze, (), True),
    "guest-fsfreeze-freeze-list": _c(qga_freeze, (("mountpoints", "list", False),), True),
    "guest-fsfreeze-thaw": _c(qga_thaw, (), True),
    "guest-suspend-ram": _c(qga_suspend("guest-suspend-ram"), (), True, False),
    "guest-suspend-disk": _c(qga_suspend("guest-suspend-disk"), (), True, False),
    "guest-suspend-hybrid": _c(qga_suspend("guest-suspend-hybrid"), (), True, False),
    "guest-ssh-get-authorized-keys": _c(qga_ssh_get, (("username", "str", True),), True),
    "guest-ssh-add-authorized-keys": _c(qga_ssh_add, (("username", "str", True),
                                                       ("keys", "list", True),
                                                       ("reset", "bool", False)), True),
    "guest-ssh-remove-authorized-keys": _c(qga_ssh_remove, (("username", "str", True),
                                                             ("keys", "list", True)), True),
    "guest-set-user-password": _c(qga_set_user_password, (("username", "str", True),
                                                           ("password", "str", True),
                                                           ("crypted", "bool", True)), True),
    "guest-exec": _c(qga_exec, (("path", "str", True), ("arg", "list", False),
                                ("env", "list", False), ("input-data", "str", False),
                                ("capture-output", "any", False)), True),
    "guest-exec-status": _c(qga_exec_status, (("pid", "int", True),), True),
    "guest-file-open": _c(qga_file("open"), (("path", "str", True), ("mode", "str", False)),
                          True),
    "guest-file-close": _c(qga_file("close"), (("handle", "int", True),), True),
    "guest-file-read": _c(qga_file("read"), (("handle", "int", True), ("count", "int", False)),
                          True),
    "guest-file-write": _c(qga_file("write"), (("handle", "int", True), ("buf-b64", "str", True),
                                               ("count", "int", False)), True),
    "guest-file-seek": _c(qga_file("seek"), (("handle", "int", True), ("offset", "int", True),
                                             ("whence", "any", True)), True),
    "guest-file-flush": _c(qga_file("flush"), (("handle", "int", True),), True),
}
# While the filesystems are frozen only these run, as in qemu-ga (ga_freeze_allowlist): any
# other may write to a frozen disk and wait there, and a backup expects the guest to be idle.
# And guest-shutdown, unlike qemu-ga: the power-off thaws first, and a host that wants the
# guest gone should not have to know that a backup froze it.
QGA_FREEZE_SAFE = frozenset(("guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
                             "guest-fsfreeze-status", "guest-fsfreeze-thaw", "guest-shutdown"))


def qga_enabled(allow, block):
    """The enabled commands: `allow` (None: those on by default; "default" in it stands for
    them) less `block`; qemu-ga's --allow-rpcs / --block-rpcs, a block winning."""
    on = set(QGA_COMMANDS) - QGA_OFF_BY_DEFAULT
    if allow is not None:
        on = set(name for name in allow if name != "default") | (
            on if "default" in allow else set())
    return frozenset(on - set(block or ()))


class QgaMachine:
    """The QGA commands and what they act on: one per agent, shared by every QGA connection.
    `policy` (RequestPolicy) says who may run the guarded commands; `enabled` which commands
    run at all (qga_enabled); `freezer` keeps the fsfreeze state; `execs` the guest-exec'd
    programs; `errands` runs what answers nobody (a suspend). answer() turns one request's
    bytes into an answer line and an effect."""

    def __init__(self, policy, freezer, clock=None, errands=None, execs=None, enabled=None):
        self.policy = policy
        self.freezer = freezer
        self.clock = clock or ClockKeeper(0, None)   # guest-set-time's look, and host_set()
        self.errands = errands
        self.execs = execs
        self.files = GuestFiles()
        self.enabled = qga_enabled(None, ()) if enabled is None else enabled

    def is_enabled(self, name):
        return name in self.enabled and (name in QGA_FREEZE_SAFE or not self.frozen())

    def frozen(self):
        """Frozen once a freeze is done, as qemu-ga's state says. (While one is under way
        the loop answers on; qemu-ga, one thread, answers nothing then.)"""
        return bool(self.freezer.frozen)

    def answer(self, raw, peer, peer_text):
        """One request's bytes -> (answer line or b"", effect or None)."""
        try:
            request = qga_json().decode(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return self._with_id({"error": {"class": "GenericError",
                                            "desc": "JSON parse error, %s" % exc}}, None), None
        return self.answer_request(request, peer, peer_text)

    def answer_request(self, request, peer, peer_text):
        try:
            name, command, args = self._check(request)
            if _log_level >= LOG_DEBUG:
                log("debug", "QGA %s from %s" % (name, peer_text))
            if command.guarded:
                self._check_peer(name, peer)
            value = command.handler(self, peer, qga_arguments(command.params, args))
        except Exception as exc:
            return self._error(exc, request, peer_text, request.get("execute")
                               if isinstance(request, dict) else "?"), None
        if isinstance(value, Errand):         # its work may block: off the loop, answered later
            return b"", value._replace(finish=lambda outcome: self._answer_later(
                value, outcome, request, command, peer_text))
        if not command.success_response:
            return b"", value                 # guest-shutdown: the value is the effect
        return self._with_id({"return": value}, request, command.prefix), None

    def _answer_later(self, errand, outcome, request, command, peer_text):
        """The answer line for an errand's outcome: its finish(outcome) gives the value or
        raises QgaError (qga_outcome does both)."""
        try:
            value = errand.finish(outcome)
        except Exception as exc:
            return self._error(exc, request, peer_text, errand.what)
        return self._with_id({"return": value}, request, command.prefix)

    def _error(self, exc, request, peer_text, name):
        """The error line for a request: a QgaError's own, or a bug's (answered, logged, and
        the agent serves on)."""
        if isinstance(exc, QgaError):
            log("debug", "QGA error for %s: %s: %s" % (peer_text, exc.klass, exc))
            return self._with_id({"error": {"class": exc.klass, "desc": str(exc)}}, request)
        log("error", "internal error answering QGA %s: %s" % (name, describe_exception(exc)))
        return self._with_id({"error": {"class": "GenericError", "desc": "internal error: "
                                        "%s: %s" % (type(exc).__name__, exc)}}, request)

    @staticmethod
    def _with_id(answer, request, prefix=b""):
        if isinstance(request, dict) and "id" in request:
            answer["id"] = request["id"]
        return qga_reply(answer, prefix)

    def _check(self, request):
        """The QMP envelope: an object with "execute", maybe "arguments" and "id"; then
        whether the command is there and enabled, before any argument is looked at."""
        if not isinstance(request, dict):
            raise QgaError("QMP input must be a JSON object")
        for key in request:
            if key not in ("execute", "arguments", "id"):
                raise QgaError("QMP input member '%s' is unexpected" % key)
        if "execute" not in request:
            raise QgaError("QMP input lacks member 'execute'")
        name = request["execute"]
        if not isinstance(name, str):
            raise QgaError("QMP input member 'execute' must be a string")
        args = request.get("arguments", {})
        if not isinstance(args, dict):
            raise QgaError("QMP input member 'arguments' must be an object")
        command = QGA_COMMANDS.get(name)
        if command is None:
            raise QgaError("The command %s has not been found" % name, "CommandNotFound")
        if name not in self.enabled:
            raise QgaError("Command %s has been disabled: the command is not allowed" % name,
                           "CommandNotFound")
        if name not in QGA_FREEZE_SAFE and self.frozen():    # qemu-ga 10 says the same
            raise QgaError("Command %s has been disabled: the command is not allowed" % name,
                           "CommandNotFound")
        return name, command, args

    def _check_peer(self, name, peer):
        if not peer_allowed(self.policy.allow, peer):
            log_limited("refused", peer_group(peer), "warn", "refused QGA %s from %s: not an "
                        "allowed peer" % (name, describe_peer(peer)))
            raise QgaError("%s refused: %s is not allowed to run it (see --allow)"
                           % (name, describe_peer(peer)))


# ---- freezing the disks for a backup, and thawing them when the host forgets -----------------

class Freezer(Source):
    """guest-fsfreeze-*: FIFREEZE the writable disk filesystems in mount order, FITHAW them
    in reverse, each batch as an errand: a freeze flushes the disk first and a thaw may write
    to it, which takes long on a slow disk and forever on one that does not answer. Beyond
    qemu-ga: a freeze the host forgets (a backup job that died between freeze and thaw) is
    thawed after `timeout` seconds (0: never), logged, so that the guest's writers are not
    blocked for good. The power-off thaws every disk itself (ShutdownSequence) and tells
    the freezer to forget()."""

    def __init__(self, timeout, errands, guest=None, kernel=None):
        self.timeout = timeout
        self.errands = errands
        self.guest = guest or GuestMounts()
        self.kernel = kernel or KernelStorage()   # freeze(), thaw(): FIFREEZE, FITHAW
        self.frozen = []           # mount points, in the order they were frozen
        self.frozen_at = None
        self.busy = None           # "freeze" or "thaw" while its errand runs

    def deadline(self):
        if self.frozen and self.timeout and not self.busy:
            return self.frozen_at + self.timeout
        return None

    def tick(self, now):
        if self.frozen and self.timeout and not self.busy and now >= self.frozen_at + self.timeout:
            log("warn", "the host froze %d filesystem(s) %gs ago and did not thaw them; "
                "thawing (--freeze-timeout)" % (len(self.frozen), self.timeout))
            errand = self.thaw("freeze timeout")
            self.errands.run(errand, lambda outcome: self._unasked(errand, outcome))

    @staticmethod
    def _unasked(errand, outcome):
        try:
            errand.finish(outcome)
        except QgaError as exc:
            log("warn", "%s" % exc)

    def freeze(self, wanted, who):
        """The errand that freezes; its value is how many were frozen."""
        if self.busy:
            raise QgaError("a guest-fsfreeze-%s is still under way" % self.busy)
        if self.frozen:
            raise QgaError("the filesystems are frozen already (guest-fsfreeze-thaw first)")
        guest, freeze_one, thaw_one = self.guest, self.kernel.freeze, self.kernel.thaw
        # what it may freeze, for a freeze that times out (mountinfo: no disk is touched)
        targets = [t for t in guest.writable_disks(read_mountinfo())
                   if wanted is None or t in wanted]

        def body():            # disk_filesystems() stats each mount point: not in PID 1
            candidates = guest.disk_filesystems(writable_only=True)
            if wanted is not None:     # one that is not mounted is left out, as by qemu-ga
                candidates = [c for c in candidates if c[0] in wanted]
            frozen = []
            for target, _, _, _ in candidates:
                err = freeze_one(target)
                if err == errno.EOPNOTSUPP:
                    continue           # this filesystem cannot be frozen; qemu-ga skips it too
                if err:
                    for done in reversed(frozen):
                        thaw_one(done)
                    raise QgaError("failed to freeze %s: %s" % (target, os.strerror(err)))
                frozen.append(target)
            return frozen

        def finish(outcome):
            self.busy = None
            if outcome[0] == "timeout":    # it may freeze them yet: thawed when asked, or
                self.frozen, self.frozen_at = list(targets), time.monotonic()  # at the timeout
            frozen = qga_outcome(outcome)
            self.frozen, self.frozen_at = frozen, time.monotonic()
            if frozen:
                log("info", "froze %s for %s%s" % (", ".join(frozen), who, (
                    " (thawed after %gs if the host forgets)" % self.timeout) if self.timeout
                    else ""))
            return len(frozen)
        self.busy = "freeze"
        return Errand("guest-fsfreeze-freeze", body, QGA_FREEZE_TIMEOUT, finish)

    def thaw(self, why):
        """The errand that thaws what we froze, last first, and any other frozen disk
        filesystem (frozen by fsfreeze(8) in the guest, say): the host asked for none of
        them to stay frozen. Its value is how many were thawed."""
        if self.busy:
            raise QgaError("a guest-fsfreeze-%s is still under way" % self.busy)
        ours, guest = list(reversed(self.frozen)), self.guest
        thaw_one, had = self.kernel.thaw, bool(self.frozen)

        def body():                    # EINVAL: it was not frozen
            order = ours + [target for target, _, _, _ in guest.disk_filesystems(True)
                            if target not in ours]
            return sum(1 for target in order if thaw_one(target) == 0)

        def finish(outcome):
            self.busy = None
            count = qga_outcome(outcome)
            if had or count:
                log("info", "thawed %d filesystem(s) (%s)" % (count, why))
            self.frozen, self.frozen_at = [], None
            return count
        self.busy = "thaw"
        return Errand("guest-fsfreeze-thaw", body, QGA_ERRAND_TIMEOUT, finish)

    def forget(self):
        """The power-off thaws every disk itself: nothing is ours to thaw any more."""
        self.frozen, self.frozen_at = [], None


# =============================================================================================
# 9. The server: listeners and connections, two kinds of each
# =============================================================================================


# ---- the server: listeners and connections, two kinds of each -------------------------------

READ_CHUNK = 65536
ACCEPT_BATCH = 64                 # accepts per wake-up, so one listener cannot starve others
LISTEN_BACKLOG = 128
ACCEPT_PAUSE = 0.25               # after EMFILE/ENFILE: no accept() for this long
BIND_RETRY_FIRST, BIND_RETRY_MAX = 0.1, 5.0
# After a transport module, a listener that fails is tried every 10 ms, TRANSPORT_RETRIES
# times (a virtio-serial port's name comes from the host 20-60 ms after virtio_console under
# TCG), then with the usual doubling back-off.
TRANSPORT_RETRY_FIRST = 0.01
TRANSPORT_RETRIES = 10
SERIAL_RECHECK = 0.1              # host side of a serial port not connected: look again then
SERIAL_STALE_FRAME = 0.5          # a partial frame this old on a serial stream is garbage
PENDING_MAX = 8                   # errands' answers one connection may be owed at once
_SO_PEERCRED_SIZE = Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
ServerLimits = namedtuple("ServerLimits",
                          "max_frame max_conns max_output idle_timeout frame_timeout")


def server_limits(config):
    return ServerLimits(config["max_frame"], config["max_conns"], config["max_output"],
                        config["idle_timeout"], config["frame_timeout"])


class Listener:
    """Where connections come from, retried with back-off until it opens. `protocol` is the
    protocol's maker: protocol(peer, shared) (see "the protocol seam")."""

    sock = None                    # a socket to accept() on (SocketListener), or none
    paused_until = 0.0             # accept() paused until then (out of descriptors)
    warned = False                 # a failure to open was logged as a warning once

    def __init__(self, addr, protocol):
        self.addr = addr
        self.protocol = protocol
        self.retry_at = 0.0        # monotonic time of the next open attempt
        self.backoff = BIND_RETRY_FIRST
        self.steady = 0            # failures still retried after `backoff` without doubling
        self.failures = 0

    @property
    def text(self):
        return format_address(self.addr)

    def opened(self):
        self.failures = 0
        self.warned = False
        self.backoff, self.steady = BIND_RETRY_FIRST, 0

    def failed(self, now):
        self.failures += 1
        self.retry_at = now + self.backoff
        if self.steady > 0:
            self.steady -= 1
        else:
            self.backoff = min(self.backoff * 2, BIND_RETRY_MAX)


class SocketListener(Listener):
    """A listening vsock or Unix socket: accept() gives SocketConnections."""

    def __init__(self, addr, protocol):
        Listener.__init__(self, addr, protocol)
        self.starved = False       # accept() is failing for lack of descriptors

    @property
    def is_open(self):
        return self.sock is not None

    def open(self, now):
        """Bind and listen; returns None (nothing to adopt: connections come by accept)."""
        kind = self.addr[0]
        if kind == "vsock":
            sock = socket.socket(vsock_family(), socket.SOCK_STREAM)
            bind_to = (self.addr[1], self.addr[2])
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bind_to = unix_sockaddr(self.addr[1])
            if not is_abstract(self.addr[1]):
                _remove_stale_socket(bind_to)
        # A socket file appears at bind(), before listen(): a client that waits for the file
        # (as supervisors and our tests do) could find it and be refused. So a path is bound
        # and listened on under a name beside it, then renamed into place (atomic), where the
        # name fits in sun_path.
        staged = _staging_name(bind_to) if kind == "unix" and not is_abstract(
            self.addr[1]) else None
        try:
            if staged:
                _remove_stale_socket(staged)
            sock.bind(staged or bind_to)
            if kind == "unix" and not is_abstract(self.addr[1]):
                # Ping and GetSystemInfo are open to every local user; Shutdown is checked by
                # the peer's credentials, not by file modes.
                os.chmod(staged or bind_to, 0o666)
            sock.listen(LISTEN_BACKLOG)
            if staged:
                os.rename(staged, bind_to)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            if staged:
                _remove_stale_socket(staged)
            raise
        self.sock = sock
        return None

    def close(self):
        if self.sock is None:
            return
        self.sock.close()
        self.sock = None
        if self.addr[0] == "unix" and not is_abstract(self.addr[1]):
            _remove_stale_socket(self.addr[1])


class SerialListener(Listener):
    """A virtio-serial port: opening it gives the one SerialStream, reopened (by the retry
    timer) after it is closed."""

    def __init__(self, addr, protocol):
        Listener.__init__(self, addr, protocol)
        self.stream = None

    @property
    def is_open(self):
        return self.stream is not None

    def open(self, now):
        """Open the port; returns the SerialStream for the server to adopt."""
        fd = os.open(resolve_serial_port(self.addr[1]),
                     os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        peer = ("serial", self.addr[1])
        self.stream = SerialStream(fd, peer, now, self.protocol(peer, True), self._stream_closed)
        return self.stream

    def _stream_closed(self):
        self.stream = None
        self.retry_at = time.monotonic() + SERIAL_RECHECK

    def close(self):
        pass                       # the stream is closed with the server's connections


VIRTIO_PORTS = "/sys/class/virtio-ports"   # virtio_console's class: one entry per port


def resolve_serial_port(name):
    """serial:/dev/PATH as given; serial:NAME through /sys/class/virtio-ports/*/name (a
    busybox guest has no udev to make /dev/virtio-ports/NAME). ENOENT until the port exists,
    so the listener retries while virtio_console loads."""
    if name.startswith("/"):
        return name
    try:
        ports = sorted(os.listdir(VIRTIO_PORTS))
    except OSError:
        ports = []
    for port in ports:
        if _read_text("%s/%s/name" % (VIRTIO_PORTS, port)).strip() == name:
            return "/dev/" + port
    raise OSError(errno.ENOENT, "no virtio-serial port named %r (yet)" % name)


SUN_PATH_MAX = 107                # bytes of a socket path, sun_path[108] less its NUL


def _staging_name(path):
    """Where a Unix socket is bound and listened on before it is renamed to `path`: a
    hidden name in the same directory (rename(2) stays on one filesystem), or None when
    that name would not fit in sun_path."""
    head, tail = os.path.split(path)
    staged = os.path.join(head, ".%s.%d" % (tail, os.getpid()))
    return staged if len(os.fsencode(staged)) <= SUN_PATH_MAX else None


def _remove_stale_socket(path):
    import stat
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


class Connection:
    """One byte stream: what came in and is not answered yet, what goes out and is not
    written yet. Two kinds, below; each owns its deadlines and what EOF, an error and close
    mean for it."""

    persistent = False

    def __init__(self, fd, peer, now, protocol):
        self.fd = fd
        self.peer = peer           # ("vsock", cid, port), ("unix", pid, uid, gid), ("serial", n)
        self.peer_text = describe_peer(peer)
        self.protocol = protocol
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.last_active = now
        self.partial_since = None  # when the incomplete request at the front began waiting
        self.paused_until = 0.0    # not polled until then
        self.closing = False       # close once outbuf is flushed
        self.closed = False
        self.eof = False
        # errands' answers still to come, in request order: [answer or None, the bytes of
        # later answers, which go out after it]
        self.pending = []

    def queue(self, reply):
        """An answer goes out now, or after the errands' answers still to come."""
        (self.pending[-1][1] if self.pending else self.outbuf).extend(reply)

    def queued(self):
        if not self.pending:       # the usual case, asked for every connection every turn
            return len(self.outbuf)
        return len(self.outbuf) + sum(len(slot[1]) for slot in self.pending)

    def unflushed(self):
        """True while something queued for the peer has not been written yet."""
        return not self.closed and bool(self.outbuf)


class SocketConnection(Connection):
    """An accepted socket: over at EOF (after answering what came), at an I/O error, when
    idle for --idle-timeout, or when a request stays incomplete for --frame-timeout."""

    def __init__(self, sock, peer, now, protocol):
        Connection.__init__(self, sock.fileno(), peer, now, protocol)
        self.sock = sock

    def deadline(self, limits):
        if self.pending:
            return None            # not idle: the agent owes it an answer
        when = self.last_active + limits.idle_timeout
        if self.partial_since is not None:
            when = min(when, self.partial_since + limits.frame_timeout)
        return when

    def expired(self, now, limits):
        """True when the connection is to be closed now (logged why)."""
        if self.pending:
            return False
        if now - self.last_active >= limits.idle_timeout:
            log("debug", "closing idle connection from %s" % self.peer_text)
            return True
        if self.partial_since is not None and now - self.partial_since >= limits.frame_timeout:
            log("debug", "closing %s: a frame still incomplete after %gs"
                % (self.peer_text, limits.frame_timeout))
            return True
        return False

    def at_eof(self):
        self.eof = True            # answer what was sent, flush, then close
        return True

    def lost(self):
        return True                # an I/O error: over

    def close(self):
        self.sock.close()


class SerialStream(Connection):
    """The persistent stream of a virtio-serial port: it outlives its peers. EOF means the
    host side is not connected right now (look again soon); an error drops what the peer was
    owed (a host retries with a new trace id); a partial request left by a client that went
    away is dropped after SERIAL_STALE_FRAME of silence. `on_closed` tells its listener."""

    persistent = True

    def __init__(self, fd, peer, now, protocol, on_closed):
        Connection.__init__(self, fd, peer, now, protocol)
        self.on_closed = on_closed

    def deadline(self, limits):
        deadlines = [t for t in (self.paused_until, self.partial_since and
                                 self.partial_since + SERIAL_STALE_FRAME) if t]
        return min(deadlines) if deadlines else None

    def expired(self, now, limits):
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
        if self.partial_since is not None and now - self.partial_since >= SERIAL_STALE_FRAME \
                and not self.pending:
            log("debug", "%s: dropping a partial frame of %d bytes after %gs of silence"
                % (self.peer_text, len(self.inbuf), SERIAL_STALE_FRAME))
            self.protocol.forget(len(self.inbuf))
            self.inbuf = bytearray()
            self.partial_since = None
        return False               # never closed for time

    def at_eof(self):
        self.paused_until = time.monotonic() + SERIAL_RECHECK
        return False

    def lost(self):
        self.outbuf = bytearray()
        self.paused_until = time.monotonic() + SERIAL_RECHECK
        return False

    def close(self):
        os.close(self.fd)
        self.on_closed()


def _peer_of(sock):
    if sock.family == AF_VSOCK:
        try:
            cid, port = sock.getpeername()
        except OSError:
            cid, port = -1, -1
        return ("vsock", cid, port)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED_SIZE.size)
        pid, uid, gid = _SO_PEERCRED_SIZE.unpack(raw)
    except (OSError, AttributeError):
        pid, uid, gid = 0, -1, -1
    return ("unix", pid, uid, gid)


class OpenGate:
    """A Server's gate with nothing to wait for: every listener may be tried at once."""
    expecting_failures = False

    @staticmethod
    def may_try(listener):
        return True


class Server(Source):
    """Owns the listeners and the connections: opens listeners (with retries), accepts,
    reads, hands the bytes to each connection's protocol, writes the replies, closes, and
    keeps the limits. What a request wants done to the machine goes to
    `on_effect(effect, conn)`; an Errand (a request whose work may block) goes to `errands`,
    and its answer goes out in its turn: later requests are taken meanwhile, their answers
    queued behind it. `listen` is [(address, protocol maker)]; `policy` decides who may take
    the host's place when the connections run out; `gate` (the start-up) says when a
    listener may be tried (`may_try(listener)`) and whether a failure is expected yet
    (`expecting_failures`); without one, always and no."""

    def __init__(self, listen, limits, policy, on_effect, errands, gate=None):
        self.limits = limits
        self.policy = policy
        self.on_effect = on_effect
        self.errands = errands
        self.listeners = [(SerialListener if addr[0] == "serial" else SocketListener)(addr, make)
                          for addr, make in listen]
        self.conns = {}            # fd -> Connection, in accept order
        self.summary_at = None     # when suppressed log lines are next summarised
        self.first_answer_at = None   # when the first reply was written (it is logged)
        self.gate = gate or OpenGate()

    def open(self):
        now = time.monotonic()
        for listener in self.listeners:
            if not listener.is_open and self.gate.may_try(listener):
                self._try_open(listener, now)

    def add_connection(self, conn):
        self.conns[conn.fd] = conn

    # ---- the event loop's view ------------------------------------------------------------
    def wants(self, now):
        for listener in self.listeners:
            if listener.sock is not None and listener.paused_until <= now:
                yield listener.sock.fileno(), select.POLLIN, self._accept, listener
        out_limit = self.limits.max_output
        for fd, conn in self.conns.items():
            if conn.paused_until > now:
                continue            # poll() reports POLLHUP even for an empty mask
            mask = 0
            if not conn.closing and not conn.eof and conn.queued() < out_limit \
                    and len(conn.pending) < PENDING_MAX:
                mask |= _POLLIN
            if conn.outbuf:
                mask |= _POLLOUT
            yield fd, mask, self._serve, conn

    def deadline(self):
        deadlines = [self.summary_at] if self.summary_at is not None else []
        for listener in self.listeners:
            if not listener.is_open:
                deadlines.append(listener.retry_at)
            elif listener.paused_until:
                deadlines.append(listener.paused_until)
        for conn in self.conns.values():
            when = conn.deadline(self.limits)
            if when is not None:
                deadlines.append(when)
        return min(deadlines) if deadlines else None

    def tick(self, now):
        self.summary_at = log_summaries_due(now)
        for listener in self.listeners:
            if not listener.is_open and now >= listener.retry_at:
                if self.gate.may_try(listener):
                    self._try_open(listener, now)
                else:
                    listener.failed(now)   # not yet: look again after the back-off
            if listener.paused_until and now >= listener.paused_until:
                listener.paused_until = 0.0
        for conn in list(self.conns.values()):
            if conn.expired(now, self.limits):
                self.close_conn(conn)

    # ---- listeners --------------------------------------------------------------------------
    def retry_now(self):
        """Open every listener that is not open yet at once (a transport module just came
        in), instead of at its back-off's next turn; if it still fails, look again soon
        (a virtio-serial port's name arrives from the host a moment after its driver)."""
        now = time.monotonic()
        for listener in self.listeners:
            if not listener.is_open and self.gate.may_try(listener):
                listener.backoff, listener.steady = TRANSPORT_RETRY_FIRST, TRANSPORT_RETRIES
                self._try_open(listener, now)

    def _try_open(self, listener, now):
        try:
            conn = listener.open(now)
        except OSError as exc:
            listener.failed(now)
            # said once, not while its transport module may still be loading (expected)
            level = "debug" if listener.warned or self.gate.expecting_failures else "warn"
            if level == "warn":
                listener.warned = True
                if listener.addr[0] == "serial" and exc.errno == errno.ENOENT:
                    level = "info"  # a port the VMM may not give (QGA's, outside libvirt)
            log(level, "cannot listen on %s: %s; retrying in %gs"
                % (listener.text, exc.strerror or exc, listener.retry_at - now))
            return
        log("info", "listening on %s" % listener.text)
        listener.opened()
        if conn is not None:
            self.add_connection(conn)

    def _accept(self, listener, mask):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the pending connection stays queued and would wake
                    # us again at once. Stop accepting for a moment instead of spinning.
                    listener.paused_until = time.monotonic() + ACCEPT_PAUSE
                    log("debug" if listener.starved else "warn", "accept on %s: %s; pausing %gs"
                        % (listener.text, exc.strerror, ACCEPT_PAUSE))
                    listener.starved = True
                else:
                    log("debug", "accept on %s: %s" % (listener.text, exc))
                return
            if listener.starved:
                log("info", "accept on %s works again" % listener.text)
                listener.starved = False
            peer = _peer_of(sock)
            if len(self.conns) >= self.limits.max_conns and not self._make_room(peer):
                sock.close()
                continue
            sock.setblocking(False)
            conn = SocketConnection(sock, peer, time.monotonic(), listener.protocol(peer, False))
            self.add_connection(conn)
            log("debug", "connection from %s on %s" % (conn.peer_text, listener.text))

    def _make_room(self, peer):
        """At --max-conns. The host must never be locked out by others holding connections
        (any local user can reach the Unix socket, any guest process vsock loopback): a
        newcomer allowed to shut the guest down evicts the oldest connection of a peer that
        is not; a newcomer that is not allowed is refused. True when there is room now."""
        group, limit = peer_group(peer), self.limits.max_conns
        if peer_allowed(self.policy.allow, peer):
            for conn in self.conns.values():           # in accept order: oldest first
                if not conn.persistent and not peer_allowed(self.policy.allow, conn.peer):
                    log_limited("limit", group, "warn", "connection limit (%d) reached: "
                                "closed the oldest connection of %s for %s"
                                % (limit, conn.peer_text, describe_peer(peer)))
                    self.close_conn(conn)
                    return True
        log_limited("limit", group, "warn", "connection limit (%d) reached: closing a new "
                    "connection from %s" % (limit, describe_peer(peer)))
        return False

    # ---- connections ------------------------------------------------------------------------
    def _serve(self, conn, mask):
        if conn.closed:
            return
        if mask & (_POLLIN | _POLLFAIL) and not conn.eof:
            self._read(conn)
        if not conn.closed and conn.outbuf and mask & (_POLLOUT | _POLLFAIL):
            self._write_out(conn)
        if not conn.closed and mask & select.POLLERR and not conn.outbuf:
            self.close_conn(conn)

    def _read(self, conn):
        try:
            data = os.read(conn.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log("debug", "read from %s: %s" % (conn.peer_text, exc))
            self._lost(conn)
            return
        if not data:
            if not conn.at_eof():
                return              # a serial port's host side is away: look again soon
        else:
            conn.inbuf += data
            conn.last_active = time.monotonic()
        self._take_requests(conn)
        self._write_out(conn)

    def _take_requests(self, conn):
        """Hand the bytes to the protocol, one request at a time, until none is complete or
        the peer is not reading (back-pressure: go on when it has read)."""
        out_limit, take = self.limits.max_output, conn.protocol.take
        while not conn.closing and conn.inbuf and conn.queued() < out_limit \
                and len(conn.pending) < PENDING_MAX:
            turn = take(conn.inbuf)
            if turn is None:
                break
            consumed, reply, effect, close = turn
            del conn.inbuf[:consumed]
            conn.queue(reply)
            if close:
                conn.closing = True
                conn.inbuf = bytearray()
            if isinstance(effect, Errand):   # answered when it is done, off the loop; what
                slot = [None, bytearray()]   # comes after it is taken (a guest-shutdown acts
                conn.pending.append(slot)    # at once), its answers queued behind
                self.errands.run(effect, lambda outcome, slot=slot, errand=effect:
                                 self._answer_later(conn, slot, errand, outcome))
            elif effect is not None:  # after the answer is queued: the ack goes out first
                self.on_effect(effect, conn)
        conn.partial_since = (conn.partial_since or time.monotonic()) \
            if conn.inbuf and not conn.pending else None
        if conn.eof and not conn.closing and not conn.pending:
            if conn.inbuf:
                log("debug", "%s closed mid-frame (%d bytes dropped)"
                    % (conn.peer_text, len(conn.inbuf)))
            conn.closing = True     # answer what came, flush, then close

    def _answer_later(self, conn, slot, errand, outcome):
        """An errand's outcome: its answer goes out in its turn, and what waited behind it."""
        slot[0] = errand.finish(outcome)
        if conn.closed:
            return
        while conn.pending and conn.pending[0][0] is not None:
            answer, behind = conn.pending.pop(0)
            conn.outbuf += answer
            conn.outbuf += behind
        conn.last_active = time.monotonic()
        self._write_out(conn)      # and takes what the limits held back

    def _write_out(self, conn):
        while True:
            while conn.outbuf:
                try:
                    sent = os.write(conn.fd, conn.outbuf)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    log("debug", "write to %s: %s" % (conn.peer_text, exc))
                    self._lost(conn)
                    return
                del conn.outbuf[:sent]
                conn.last_active = time.monotonic()
                if self.first_answer_at is None and sent:
                    # stamped once written, not when queued: bench/boot.py compares this
                    # line with the floor's stamp, which its write() precedes
                    self.first_answer_at = conn.last_active
                    log("info", "first answer, to %s" % conn.peer_text)
            if conn.closing:
                self.close_conn(conn)
                return
            if not conn.inbuf and not conn.eof:
                return
            self._take_requests(conn)   # back-pressure lifted: answer what is waiting
            if not conn.outbuf and not conn.closing:
                return

    def _lost(self, conn):
        if conn.lost():
            self.close_conn(conn)

    def close_conn(self, conn):
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.fd, None)
        try:
            conn.close()
        except OSError:
            pass

    def close(self):
        for conn in list(self.conns.values()):
            self.close_conn(conn)
        for listener in self.listeners:
            listener.close()


# =============================================================================================
# 10. The power-off: what happens on Shutdown
# =============================================================================================


# ---- the sequence: a state machine stepped by the event loop --------------------------------

# What happens on Shutdown, in order (each step bounded, none blocks the loop):
#   ack   - the ShutdownResponse is written and flushed (bounded by HOST_REPLY_BUDGET);
#   thaw  - where the guest has disks: thaw the frozen ones (their writers would outlive
#           SIGKILL), as an errand in a thread bounded by THAW_BUDGET: a thaw can hang for
#           good (a filesystem on a suspended device-mapper disk writes its superblock to
#           it);
#   term  - kill(-1, SIGTERM) and kill(-1, SIGCONT), so stopped processes can run their
#           TERM handler; tell the host (X_SYSTEMD_SHUTDOWN, EXIT_STATUS) if it listens;
#           fork the sync/reboot child now, waiting on a pipe, so the fork is off the path;
#           reap on every SIGCHLD; leave as soon as no process is left (ECHILD, or only
#           that child) or the grace ends;
#   kill  - kill(-1, SIGKILL) if anybody is left (the waiting child too), reap for up to
#           kill_wait;
#   notify_wait - only if a notify connection is still in flight: wait for it, 20 ms at most;
#   teardown - in that child (or a new one), bounded by sync_timeout (a hung disk must not
#           hang power-off): the teardown (thaw, sync, passes of swapoff / remount read-only
#           deepest first / loop detach while they make progress, sync; see Teardown), report
#           to PID 1 over a pipe, and go straight on to final (PowerOffChild);
#   final - reboot(cmd) in that child, as busybox does: if the kernel cannot power off it
#           halts and do_exit()s the caller, which then is not PID 1 (if the sync hung, a
#           second child is forked for reboot alone);
#   failed- reboot() returned or timed out: log loudly, and exit so that the kernel's panic
#           setting decides (the Rust agent's fallback).
# Whoever starts it (a request, a signal, the workload's exit) passes the action, the grace
# and a reason to begin(); the caller makes sure it starts once.
# Delegate mode (not PID 1, --delegate): instead of term/kill, signal PID 1 the busybox way
# and, if the guest is still up when the grace is over, go on with sync and final ourselves.
HOST_REPLY_BUDGET = 2.0           # ArcBox host waits 2 s for the ShutdownResponse
HOLDERS_NAMED = 10                # processes named when the grace runs out; then "and N more"
WHAT_IT_DID = {"ignores SIGTERM": "ignores SIGTERM", "blocks SIGTERM": "blocks SIGTERM",
               "handles SIGTERM": "handles SIGTERM and did not exit",
               "default": "did not die of SIGTERM (stopped, or held in the kernel)"}
THAW_BUDGET = 0.5                 # seconds before SIGTERM goes out, thawed or not

# The sequence's bounds, read from the configuration once (a tuple: frozen).
ShutdownTimeouts = namedtuple("ShutdownTimeouts", "kill_wait sync_timeout power_timeout")


def shutdown_timeouts(config):
    return ShutdownTimeouts(config["kill_wait"], config["sync_timeout"], config["power_timeout"])


class ShutdownSequence(Source):
    """The phases, in order: idle, ack, thaw, term (or delegate), kill, notify_wait,
    teardown, final, failed; each is a _step_<phase> method, listed in self.steps. step()
    runs the current one until the phase stops changing.

    Collaborators: the reaper (who is left), the frozen timeouts, `delegate` (not PID 1: ask
    PID 1 instead of signalling everyone), `guest` (which mounts are the guest's: thawed and
    torn down), what to do if power-off fails, the notifier, the power-off child (made here
    if not given), the errands (the thaw; none: no thaw before SIGTERM) and the watchdog
    (armed as the teardown begins; none: no watchdog)."""

    def __init__(self, reaper, timeouts, delegate=False, guest=None,
                 on_failure=None, notifier=None, child=None, errands=None, watchdog=None):
        self.reaper = reaper
        self.errands = errands
        self.watchdog = watchdog
        self.notifier = notifier or NoNotifier()
        self.timeouts = timeouts
        self.delegate = delegate
        self.guest = guest or GuestMounts()
        self.on_failure = on_failure or power_off_failed
        # the teardown's passes stop halfway through PID 1's bound on the child, so the
        # final sync() and its result still fit in it
        self.child = child or PowerOffChild(reaper, self.guest, timeouts.sync_timeout / 2)
        self.steps = {"idle": self._step_idle, "ack": self._step_ack,
                      "thaw": self._step_thaw, "term": self._step_term,
                      "delegate": self._step_delegate, "kill": self._step_kill,
                      "notify_wait": self._step_notify_wait, "teardown": self._step_teardown,
                      "final": self._step_final, "failed": self._step_failed}
        self.phase = "idle"
        self.deadline_at = None    # when the current phase ends at the latest
        self.action = None
        self.grace = None
        self.ack = None            # a function: True while the host's reply is unflushed
        self.started = None        # monotonic time of the request
        self.phase_started = None
        self.exit_status = 0       # told to the host: the workload's, when it ended the guest
        self.notify_waited = False  # the notifier had its chance before the teardown
        self.thawed = False        # the thaw before SIGTERM is over (done, failed, timed out)
        self.torn_down_again = False   # a second power-off child after the first died
        self.term_at = None        # when every process had its SIGTERM
        self.signalled = []        # [(pid, name)] alive when SIGTERM went out
        self.killed = []           # [(pid, name)] still alive at the end of the grace
        self.summary = None        # one line on how the stop went, said before reboot()

    @property
    def active(self):
        return self.phase != "idle"

    def begin(self, action, grace, reason, ack=None, exit_status=0):
        now = time.monotonic()
        self.action, self.grace, self.ack = action, grace, ack
        self.exit_status = exit_status
        self.started = now
        log("info", "shutdown requested (%s): action %s, grace %gs" % (reason, action, grace))
        self._enter("ack", now + HOST_REPLY_BUDGET)   # stepped by the loop's next tick

    # the event loop's view
    def deadline(self):
        return self.deadline_at

    def tick(self, now):
        self.step(now)

    def wants(self, now):
        return self.child.wants(now)

    def _enter(self, phase, deadline=None):
        now = time.monotonic()
        if self.phase_started is not None and self.phase != "idle":
            log("debug", "shutdown phase %s took %.3fs" % (self.phase, now - self.phase_started))
        self.phase, self.deadline_at, self.phase_started = phase, deadline, now

    def step(self, now):
        """Advance as far as possible without blocking. Called after every loop wake-up."""
        while True:
            before = self.phase
            self.steps[self.phase](now)
            if self.phase == before:
                return

    def _step_idle(self, now):
        pass

    def _step_ack(self, now):
        if self.ack is not None and self.ack():
            if now < self.deadline_at:
                return
            log("warn", "shutdown: the reply was not flushed within %gs; going on"
                % HOST_REPLY_BUDGET)
        self.ack = None
        if self.delegate:
            self._ask_pid1(now)
            return
        # A writer blocked on a frozen filesystem outlives even SIGKILL: thaw first, off the
        # loop (the guest's disks only: elsewhere there is nothing to thaw)
        self._enter("thaw", now + THAW_BUDGET)
        guest = self.guest
        if self.errands is None or not guest.writable_disks(read_mountinfo()):
            self.thawed = True
            return
        self.errands.run(Errand("the thaw before SIGTERM",
                                lambda: thaw_filesystems(KernelStorage(), guest),
                                THAW_BUDGET, None, thread=True), self._thaw_over)

    def _thaw_over(self, outcome):
        if self.thawed:
            return                 # too late: SIGTERM went out at the budget
        self.thawed = True
        if outcome[0] != "ok":
            log("warn", "shutdown: %s; sending SIGTERM all the same" % outcome[-1])

    def _step_thaw(self, now):
        if not self.thawed:
            if now < self.deadline_at:
                return
            self._thaw_over(("timeout", "the thaw before SIGTERM did not finish within %gs"
                             % THAW_BUDGET))
        signalled = kill_all(signal.SIGTERM)
        # The grace is counted from the moment every process has its SIGTERM, not from the
        # loop's wake-up before it: signalling can take milliseconds on a slow (TCG) guest.
        self.term_at = time.monotonic()
        self._enter("term", self.term_at + self.grace)
        if signalled:
            log("info", "shutdown: SIGTERM sent to all processes (grace %gs)" % self.grace)
        else:
            log("info", "shutdown: no processes to signal")
        kill_all(signal.SIGCONT)   # a stopped process cannot run its TERM handler
        self._tell_host()
        # forked after the signals went out, so that they do not hit it
        self.child.prepare(self.action, self.started)
        # who got it (read after the child's fork, which leaves it out): for the line that
        # names who held the stop up, and the summary
        self.reaper.reaped_at = {}
        self.signalled = processes(skip=self.reaper.uncounted)
        if self.signalled:
            log("debug", "shutdown: SIGTERM went to %s" % ", ".join(
                "pid %d (%s)" % p for p in self.signalled))
        self.reaper.reap()

    def _tell_host(self):
        """systemd's shutdown notification, sent while the processes handle SIGTERM (so the
        reboot cannot cut it off): which action, and the exit status (the console shows it
        too)."""
        log("info", "shutdown: %s, exit status %d" % (self.action, self.exit_status))
        self.notifier.send("X_SYSTEMD_SHUTDOWN=%s\nEXIT_STATUS=%d\n"
                           % (self.action, self.exit_status))

    def _step_term(self, now):
        if self.reaper.no_children:
            log("info", "shutdown: all processes gone after %.3fs"
                % max(0.0, now - self.phase_started))
            self._start_teardown(now)
        elif now >= self.deadline_at:
            self._name_the_holders(now)
            self._enter("kill", now + self.timeouts.kill_wait)
            kill_all(signal.SIGKILL)
            log("info", "shutdown: grace over, SIGKILL sent to the rest")
            self.child.abandon()          # SIGKILL reached it too; a new one comes at sync
            self.reaper.reap()

    def _name_the_holders(self, now):
        """systemd-shutdown's "Sending SIGKILL to PID N (name)": the processes the grace did
        not end, each with what it did with its SIGTERM, at most HOLDERS_NAMED of them."""
        self.killed = processes(skip=self.reaper.uncounted)
        if not self.killed:
            return
        got = set(self.signalled)
        named = ["pid %d (%s) %s" % (pid, name, "started after SIGTERM"
                                     if (pid, name) not in got else
                                     WHAT_IT_DID.get(sigterm_disposition(pid), "stopped"))
                 for pid, name in self.killed[:HOLDERS_NAMED]]
        more = len(self.killed) - len(named)
        log("warn", "shutdown: the grace (%gs) is over and %d process%s still run%s: %s%s"
            % (self.grace, len(self.killed), "es" if len(self.killed) > 1 else "",
               "" if len(self.killed) > 1 else "s", "; ".join(named),
               "; and %d more" % more if more else ""))

    def _summarise(self, now):
        """One line on how the stop went, up to the teardown (the power-off child adds the
        teardown's time and when it called reboot())."""
        if self.term_at is None:               # delegate mode: PID 1 signalled them
            return "%s asked of PID 1" % self.action
        killed = set(self.killed)
        exited = [p for p in self.signalled if p not in killed]
        reaped = self.reaper.reaped_at or {}
        times = [reaped[pid] for pid, _ in exited if pid in reaped]
        last = max(times) if times else (now if exited else self.term_at)
        text = "%d of %d process%s exited on SIGTERM%s" % (
            len(exited), len(self.signalled), "es" if len(self.signalled) != 1 else "",
            " (the last %.3fs after it)" % (last - self.term_at) if exited else "")
        if self.killed:
            text += "; %d killed at the grace: %s%s" % (
                len(self.killed), ", ".join("pid %d (%s)" % p
                                            for p in self.killed[:HOLDERS_NAMED]),
                " and %d more" % (len(self.killed) - HOLDERS_NAMED)
                if len(self.killed) > HOLDERS_NAMED else "")
        return text

    def _step_kill(self, now):
        if self.reaper.no_children:
            log("info", "shutdown: all processes gone after SIGKILL")
            self._start_teardown(now)
        elif now >= self.deadline_at:
            log("warn", "shutdown: processes remain %gs after SIGKILL (stuck in the kernel?); "
                "going on" % self.timeouts.kill_wait)
            self._start_teardown(now)

    def _ask_pid1(self, now):
        sig = BUSYBOX_INIT_SIGNALS[self.action]
        self._enter("delegate", now + self.grace)
        self._tell_host()
        try:
            os.kill(1, sig)
            log("info", "shutdown: asked PID 1 for %s with signal %d; forcing it after %gs"
                % (self.action, sig, self.grace))
        except OSError as exc:
            log("error", "shutdown: cannot signal PID 1 (%s); forcing %s now"
                % (exc, self.action))
            self.deadline_at = now

    def _step_delegate(self, now):
        if now >= self.deadline_at:
            log("warn", "shutdown: the guest is still up %gs after asking PID 1; forcing it"
                % self.grace)
            self._start_teardown(now)

    def _start_teardown(self, now):
        """Start the power-off child (the prepared one, or a new one). If its result does not
        come within sync_timeout (a hung disk), a second child only calls reboot()."""
        if self.notifier.busy() and not self.notify_waited:
            # a notify connection still in progress: give it a moment, bounded
            self.notify_waited = True
            self._enter("notify_wait", now + NOTIFY_WAIT)
            return
        self._enter("teardown", now + self.timeouts.sync_timeout)
        if self.watchdog is not None and not self.torn_down_again:
            # from here on nothing of the guest's runs: a stop that hangs past the bounds
            # PID 1 keeps (a wedged kernel, a reboot() that never returns) is the watchdog's
            self.watchdog.arm_for_stop(self.timeouts.sync_timeout + self.timeouts.power_timeout)
        if self.summary is None:
            self.summary = self._summarise(now)
        if self.child.start(self.action, self.started, self.summary):
            return
        # no fork possible (no memory, no pids): sync() from a thread, so that a disk that
        # never answers holds the thread and not PID 1, which waits for it within the bound
        synced = start_bounded(os.sync)(self.timeouts.sync_timeout)[0]
        log("info" if synced else "warn", "shutdown: %s (no fork possible: not remounted)"
            % ("filesystems synced" if synced else "sync() did not finish within %gs"
               % self.timeouts.sync_timeout))
        self.child.left_writable = 0

    def _step_notify_wait(self, now):
        if not self.notifier.busy() or now >= self.deadline_at:
            self._start_teardown(now)

    def _step_teardown(self, now):
        child = self.child
        reported = child.left_writable is not None and child.left_writable >= 0  # -1: died first
        if reported and child.running:
            # the child logged how it went, and goes on to reboot() itself
            self._enter("final", now + self.timeouts.power_timeout)
        elif child.left_writable is None and child.running:
            if now < self.deadline_at:
                return
            log("warn", "shutdown: the teardown did not finish within %gs; going on"
                % self.timeouts.sync_timeout)
            self._start_final(now)
        elif reported:                 # it reported, then ended without reboot(): its own
            self._start_final(now)
        elif not self.torn_down_again:
            # Killed before it was done (by whom? a process's kill(-1)): nothing may be lost,
            # so tear down again, once, before reboot().
            log("warn", "shutdown: the power-off child ended before its teardown was done "
                "(%s); once more" % describe_exit_code(child.code))
            self.torn_down_again = True
            self._start_teardown(now)
        else:
            log("warn", "shutdown: the power-off child ended again before its teardown was "
                "done (%s); going on" % describe_exit_code(child.code))
            self._start_final(now)

    def _start_final(self, now):
        """reboot() from a child of its own: after a teardown that did not finish, or when
        the power-off child is gone."""
        self._enter("final", now + self.timeouts.power_timeout)
        self.child.reboot_only(self.action, self.started,
                               (self.summary or self._summarise(now)) + "; no teardown")

    def _step_final(self, now):
        if self.child.running and now < self.deadline_at:
            return
        code = self.child.code
        if self.child.running:
            why = "the guest is still up %gs after reboot()" % self.timeouts.power_timeout
        elif code is not None and code > 0:
            why = "reboot() failed: %s" % os.strerror(code)
        else:
            why = "reboot() returned without powering off (%s)" % describe_exit_code(code)
        self._enter("failed")
        self.on_failure(why)

    def _step_failed(self, now):
        pass


# ---- tearing down what the guest mounted, the way systemd-shutdown does ---------------------

# Once the last process is gone only the kernel holds a filesystem, and it holds some in ways
# a plain remount cannot undo (remount read-only fails with EBUSY while anything has a file on
# it open for writing, the kernel included):
#   - an active swap file keeps its filesystem busy: swapoff(2) it first;
#   - a loop device keeps its backing file open for writing, so the filesystem holding the
#     image cannot go read-only while the loop is bound: make the loop's own filesystem
#     read-only, unmount it, clear the loop (LOOP_CLR_FD), then retry the holder;
#   - a frozen filesystem (FIFREEZE: a backup agent's) blocks writers and sync(): thaw it
#     before anything waits on it (at SIGTERM time, and again here).
# A lazy unmount (MNT_DETACH) would only hide such a mount: its superblock lives on, dirty,
# while the loop or swap area references it. So, after every process is gone, the teardown
# runs passes -- swapoff every swap area; remount every writable filesystem read-only,
# deepest first, unmounting the stacked ones (overlay, a filesystem on a loop device) so that
# what they sit on lets go; clear every loop device that nothing mounts -- and repeats while a
# pass changes anything, at most TEARDOWN_PASSES times and within its time limit. Then the
# filesystems that stayed writable are flushed again and sync() runs, always, so that their
# data is written all the same (and a raw block device's too); each one is logged with what
# held it.
#
# One dead disk must not cost the others their clean state. A disk whose I/O never completes
# (a suspended device-mapper disk, a dead SAN) hangs every call that waits on it -- and
# sync() waits on every disk. So every call runs in a thread of its own with a bound: the
# thaws, all at once; then sync(), the usual and fastest flush; if it has not returned in
# time, each filesystem is flushed on its own (syncfs(2)), all at once, to tell which disks
# answer. A filesystem whose call does not return in time is left alone from then on, named
# in the log with the processes stuck on it, while the others are remounted read-only.
# (Threads, not children: this child forks no more, and a thread stuck in the kernel costs
# nothing but itself.) PID 1 bounds the whole child too, and goes on to reboot() without it.
# Device-mapper and md devices are not detached: their filesystems are remounted read-only
# like any other, and they buffer nothing of their own (dm-cache and dm-writecache aside,
# which this agent does not handle).


# Filesystems made of other filesystems: unmounted once read-only, so what they sit on lets
# go. (A filesystem whose source is a loop device is treated the same way.)
STACKED_FILESYSTEMS = frozenset(("overlay",))
TEARDOWN_PASSES = 16          # systemd-shutdown also stops early when a pass changes nothing
TEARDOWN_FLUSH_SHARE = 0.4    # of the time limit: the first flush, every filesystem at once
TEARDOWN_OP_SHARE = 0.2       # of the time limit: the most any one later call may take
TEARDOWN_OP_MIN = 0.2         # seconds: the least any call gets, however late it starts


def start_bounded(call):
    """call() in a thread of its own, started now -> wait(seconds): (True, its result) once
    it returned, else (False, None). A call stuck in the kernel holds only its thread. For
    the power-off child, which calls reboot() next and forks no more, and for PID 1 when no
    child can be forked at all."""
    done = _thread.allocate_lock()
    done.acquire()
    box = [errno.EIO]

    def run():
        try:
            box[0] = call()
        except Exception as exc:   # the kernel's calls return an errno; this is a bug
            log("error", "shutdown: %s" % describe_exception(exc))
        finally:
            done.release()
    _thread.start_new_thread(run, ())

    def wait(seconds):
        if done.acquire(True, max(0.001, seconds)):
            done.release()             # so that it can be asked again
            return True, box[0]
        return False, None
    return wait


class Teardown:
    """The teardown described above, over a KernelStorage (or a fake), for the mounts that
    `guest` says are the guest's. Contained in a PID namespace, only the swap areas and loop
    devices that live on the guest's own mounts are touched, since /proc/swaps and
    /sys/block are the host's too."""

    def __init__(self, kernel, guest=None, time_limit=5.0, passes=TEARDOWN_PASSES,
                 clock=time.monotonic):
        self.kernel = kernel
        self.guest = guest or GuestMounts()
        self.time_limit = time_limit
        self.passes = passes
        self.clock = clock
        self.failures = {}         # mount point -> the errno its last remount failed with
        self.failed = False        # a remount or unmount failed in the current pass
        self.our_loops = set()     # loop devices that one of our mounts sat on
        self.passes_run = 0
        self.hung = {}             # mount point -> the call that did not return there
        self.ends = None           # time.monotonic() when the time limit is over

    def run(self):
        """Thaw and flush; then, as systemd-shutdown does, each kind of holder let go of in
        turn -- swap areas, mounts, loop devices -- each saying what it changed, repeated
        while something changed and something is still writable; sync() last, always.
        Returns [(mount point, fs type, reason)] for each filesystem of ours left writable.
        The usual case reads mountinfo once: a pass in which every remount and unmount
        worked leaves nothing writable."""
        started = self.clock()
        self.ends = time.monotonic() + self.time_limit
        mounts = self.kernel.mounts()
        self._flush_each(mounts, "sync()", thaw=True)
        left = []
        while self.passes_run < self.passes:
            self.passes_run += 1
            self.failed = False
            changed = self.swapoff_all(mounts)
            changed += self.release_mounts(mounts)
            if self.failed or self.our_loops:
                changed += self.detach_loops()
            if not self.failed:
                left = []
                break                      # every remount and unmount worked: done
            mounts = self.kernel.mounts()
            left = self._writable(mounts)
            if not left or not changed:
                break                      # done, or a pass that changed nothing
            if self.clock() - started > self.time_limit:
                log("warn", "shutdown: teardown passes stopped after %.1fs (limit %gs)"
                    % (self.clock() - started, self.time_limit))
                break
        left = [(target, fstype, self.why_writable(target))
                for _, target, fstype, _, _ in left]
        for target, fstype, why in left:
            log("warn", "shutdown: %s (%s) stays writable: %s (its data is synced all the same)"
                % (target, fstype, why))
        self.final_sync([target for target, _, _ in left])
        fstypes = {m[1]: m[2] for m in mounts}
        return left + [(target, fstypes.get(target, "?"), "%s did not return: the disk does "
                        "not answer in time" % what) for target, what in self.hung.items()]

    # ---- the kinds, one function each: what it changed --------------------------------------
    def swapoff_all(self, mounts):
        """swapoff every swap area of ours. Returns how many were turned off."""
        changed = 0
        for path in self.kernel.swaps():
            if self._on_ours(path, mounts):
                changed += self._do(self.kernel.swapoff, path, None, "swapoff",
                                    "swapoff %s" % path)
        return changed

    def release_mounts(self, mounts):
        """Remount every writable filesystem of ours read-only, deepest first; unmount the
        stacked ones (overlay, a filesystem on a loop device) and all below them, so that
        what they sit on lets go. Sets `failed` when a remount or unmount failed. Returns
        how many were remounted or unmounted."""
        ours = self._ours(mounts)
        # the loop devices under our own mounts, remembered before those are unmounted
        self.our_loops.update(m[4] for m in ours if m[4].startswith("/dev/loop"))
        stacked = [m[1].rstrip("/") + "/" for m in ours if m[1] != "/" and (
            m[2] in STACKED_FILESYSTEMS or m[4].startswith("/dev/loop"))]
        changed = 0
        for entry in reversed(mounts):
            _, target, fstype, readonly, source = entry
            if not self.guest.ours(entry) or target in self.hung:
                continue
            if fstype not in PSEUDO_FILESYSTEMS and not readonly:
                err = self._call(self.kernel.remount_read_only, target, target,
                                 "remount read-only")
                if err:
                    self.failures[target] = err
                    self.failed = True
                    continue
                self.failures.pop(target, None)
                changed += 1
                log("debug", "shutdown: remounted %s (%s) read-only" % (target, fstype))
            if target != "/" and any((target + "/").startswith(s) for s in stacked):
                done = self._do(self.kernel.unmount, target, target, "unmount",
                                "unmount %s (%s on %s)" % (target, fstype, source))
                self.failed = self.failed or not done
                changed += done
        return changed

    def detach_loops(self):
        """Clear every loop device of ours that nothing mounts or swaps on. Returns how many
        were cleared."""
        loops = self.kernel.loops()
        if not loops:
            return 0
        mounts, swaps = self.kernel.mounts(), self.kernel.swaps()
        sources = {m[4] for m in mounts}
        changed = 0
        for device, backing in sorted(loops.items()):
            if device not in sources and device not in swaps and (
                    device in self.our_loops or self._on_ours(backing, mounts)):
                changed += self._do(self.kernel.clear_loop, device, None, "detach",
                                    "detach %s from %s" % (device, backing))
        return changed

    def final_sync(self, left):
        """Whatever stayed writable gets its data out (and a raw block device's writes):
        sync(), bounded, since it waits on every disk; if it does not return, each
        filesystem left writable on its own."""
        began = self.clock()
        if self._bounded(self.kernel.sync, "the final sync()", None)[0]:
            log("info", "shutdown: final sync() took %.2f ms" % ((self.clock() - began) * 1000))
        elif left:
            self._all_at_once([(target, self.kernel.syncfs) for target in left
                               if target not in self.hung], "its final sync",
                              TEARDOWN_OP_SHARE)

    # ---- which are ours -----------------------------------------------------------------------
    def _ours(self, mounts):
        """Our real filesystems, in mount order (but those whose disk does not answer)."""
        return [m for m in mounts if self.guest.ours(m)
                and m[2] not in PSEUDO_FILESYSTEMS and m[1] not in self.hung]

    def _writable(self, mounts):
        return [m for m in self._ours(mounts) if not m[3]]

    def _on_ours(self, path, mounts):
        """May the teardown touch a swap area or loop device at `path`? In a real guest any;
        contained, only one that lives on (or backs) one of our own mounts."""
        if not self.guest.contained:
            return True
        if any(m[4] == path for m in self._ours(mounts)):
            return True
        owner = owning_mount(path, mounts)
        return owner is not None and self.guest.ours(owner)

    # ---- every call bounded: a disk that does not answer costs only itself --------------------
    def _flush_each(self, mounts, what, thaw=False):
        """Thaw (if asked) the writable disk filesystems of ours in `mounts`, then sync();
        if that does not return in time, syncfs each writable filesystem of ours on its own.
        Each step's calls run at once, each in a thread, waited for within a share of the
        limit; a filesystem whose call has not returned by then is hung, and left alone."""
        began = self.clock()
        kernel = self.kernel
        if thaw:
            self._all_at_once([(target, lambda target: thaw_one(kernel, target))
                               for target in self.guest.writable_disks(mounts)
                               if target not in self.hung], "its thaw", TEARDOWN_OP_SHARE)
        synced, _ = self._bounded(kernel.sync, None, None, TEARDOWN_FLUSH_SHARE)
        if not synced:                 # a disk does not answer: which ones do?
            self._all_at_once([(m[1], kernel.syncfs) for m in self._writable(mounts)],
                              "its sync", TEARDOWN_FLUSH_SHARE)
        if what:
            # the disks' time, not ours: the benchmarks report it apart from the agent's
            log("info", "shutdown: %s took %.2f ms" % (what, (self.clock() - began) * 1000))

    def _all_at_once(self, calls, what, share):
        """call(target) for each (target, call), each in a thread, all waited for within
        `share` of the time limit; a target whose call has not returned is hung."""
        bound = max(TEARDOWN_OP_MIN, self.time_limit * share)
        until = time.monotonic() + bound
        waits = [(target, start_bounded(lambda call=call, target=target: call(target)))
                 for target, call in calls]
        for target, wait in waits:
            if not wait(until - time.monotonic())[0]:
                self._hung(target, what, bound)

    def _bounded(self, call, what, target, share=TEARDOWN_OP_SHARE):
        """(True, call()) if it returns within the time left (at least TEARDOWN_OP_MIN, at
        most `share` of the limit), else (False, None): the target hung, named (`what`
        None: nothing said)."""
        seconds = max(TEARDOWN_OP_MIN, min(self.ends - time.monotonic(),
                                           self.time_limit * share))
        done = start_bounded(call)(seconds)
        if not done[0] and what is not None:
            self._hung(target, what, seconds)
        return done

    def _hung(self, target, what, seconds):
        """A call that did not return: its disk does not answer. Named, with who is stuck."""
        if target is not None:
            self.hung[target] = what
        stuck = self.kernel.holders(target) if target is not None else []
        log("warn", "shutdown: %s%s did not finish within %.1fs: the disk does not answer "
            "in time; left as it is%s" % (what, " on " + target if target else "", seconds,
                                 "; stuck on it: " + ", ".join(stuck) if stuck else ""))

    def _call(self, action, arg, target, what):
        """A kernel action, bounded (_bounded): its errno, or EIO when it did not return."""
        done, err = self._bounded(lambda: action(arg), "%s %s" % (what, arg), target)
        return err if done else errno.EIO

    def _do(self, action, arg, target, what, said):
        """_call, logged as `said`: 1 when it worked, else 0."""
        err = self._call(action, arg, target, what)
        log("debug", "shutdown: %s: %s" % (said, os.strerror(err) if err else "done"))
        return 0 if err else 1

    def why_writable(self, target):
        """What kept `target` writable, as precisely as the kernel tells."""
        mounts = self.kernel.mounts()
        entry = next((m for m in mounts if m[1] == target), None)
        held = ["swap area %s is still on" % p for p in self.kernel.swaps()
                if owning_mount(p, mounts) is entry]
        held += ["%s still holds %s" % (dev, backing) for dev, backing
                 in sorted(self.kernel.loops().items()) if owning_mount(backing, mounts) is entry]
        held += ["%s has a file open on it" % who for who in self.kernel.holders(target)]
        err = self.failures.get(target)
        why = os.strerror(err) if err else "not remounted"
        if held:
            return "%s: %s" % (why, "; ".join(held))
        if err == errno.EBUSY:
            return "%s: no process in this guest holds it (one outside it, or the kernel)" % why
        return why


# ---- the power-off child: teardown, then reboot() -------------------------------------------

def reboot_now(action, command, since):
    """The last call: in the process that makes it (a child of PID 1, see PowerOffChild), so
    the log line's time is when reboot() was entered."""
    log("info", "shutdown: calling reboot(%s) after %.3fs" % (action, time.monotonic() - since))
    return min(call_reboot(command), 255)


def power_off_failed(why):
    """reboot() did not end the guest. PID 1 exits: the kernel's panic setting decides."""
    log("error", "POWER-OFF FAILED: %s" % why)
    log("error", "exiting PID 1: the kernel's panic setting decides what happens next")
    deadline = time.monotonic() + 1.0      # the last words, if the console takes them soon
    while not flush_console_backlog() and time.monotonic() < deadline:
        select.select([], [_log_fd], [], 0.05)
    os._exit(1)


GO_SUMMARY_MAX = 3000             # bytes of the summary on the go pipe (PIPE_BUF is 4096)


class PowerOffChild(Source):
    """The child process that ends the guest, as fast as it can: the teardown, one byte to
    PID 1 on a pipe (how many filesystems stayed writable), then reboot(). One fork for
    both, and no round trip through PID 1, which only keeps the bounds.

    prepare() forks it early, waiting for a byte on a second pipe, so that the fork is not
    on the path from "nobody left" to reboot(): that saves 1.19 ms of the agent's own
    Shutdown overhead, median 2.47 ms against 3.68 ms (30 interleaved pairs, every pair
    faster, the median of the differences in 0.97..1.23 ms at 90 %:
    bench/results/early-fork-ab.json), and it is what keeps that overhead within the
    3 ms target (figure 1); start()
    sends that byte, or forks a new child if the prepared one is gone or there is none;
    reboot_only() forks a child that only calls reboot() (after a teardown that did not
    finish). PID 1 learns how it went from `left_writable` (None until the byte comes; -1 if the
    child died first) and `code` (its exit code once reaped). `fork` runs a body in a child
    and returns the pid, or None (run_in_child; tests pass a fake)."""

    def __init__(self, reaper, guest, teardown_limit, fork=None):
        self.reaper = reaper
        self.guest = guest
        self.teardown_limit = teardown_limit   # the passes' time limit
        self.fork = fork or run_in_child
        self.pid = None            # the child, while it runs
        self.code = None           # its exit code (or -signal) once reaped; errno if inline
        self.left_writable = None
        self._result_fd = -1
        self._prepared = None      # (pid, go fd) of a child forked early, waiting

    @property
    def running(self):
        return self.pid is not None

    def prepare(self, action, since):
        """Fork the child now, waiting. Only where "nobody left but this child" can be told
        (/proc/self/task/PID/children): the reaper does not count it as a process left."""
        if self.reaper.children() is None:
            return
        go_fd = self._fork(action, since, wait_for_go=True)
        if go_fd is not None:
            self._prepared = (self.pid, go_fd)

    def abandon(self):
        """The prepared child is dead or dying (SIGKILL reaches it too): from now on it is a
        process like any other, to be reaped before "nobody left"."""
        if self._prepared is not None:
            pid, go_fd = self._prepared
            self._prepared = None
            self.reaper.count(pid)
            os.close(go_fd)

    def start(self, action, since, summary=""):
        """Let the prepared child go on, or fork one that goes at once; `summary` (how the
        stop went so far) is said by the child with the teardown's time just before
        reboot(). False when no child could be forked."""
        self.left_writable = None
        prepared, self._prepared = self._prepared, None
        said = summary.encode("utf-8", "replace")[:GO_SUMMARY_MAX]
        if prepared is not None:
            pid, go_fd = prepared
            try:
                if self.pid != pid:
                    raise OSError(errno.ESRCH, "the prepared child is gone")
                os.write(go_fd, b"g" + said)   # one write under PIPE_BUF: read whole
                return True
            except OSError as exc:
                log("debug", "shutdown: the prepared child is not usable (%s); forking anew"
                    % exc)
                self._close_result()
            finally:
                os.close(go_fd)
        return self._fork(action, since, wait_for_go=False, said=said) is not None

    def reboot_only(self, action, since, summary=""):
        """reboot() from a child of its own; without a child, here (success ends this
        process, which is the goal) with its errno as `code`."""
        command = REBOOT_COMMANDS[action]

        def say_then_reboot():
            if summary:
                log("info", "shutdown: summary: %s; reboot(%s) %.3fs after the request"
                    % (summary, action, time.monotonic() - since))
            return reboot_now(action, command, since)
        self.code = None
        self.pid = self.fork(say_then_reboot)
        if self.pid is None:
            self.code = say_then_reboot()
        else:
            self.reaper.watch(self.pid, self._exited)

    def _fork(self, action, since, wait_for_go, said=b""):
        """Fork the teardown+reboot child; returns the go fd (-1 without wait_for_go), or
        None when a pipe or the fork failed. `said`: the summary so far (a prepared child
        reads it after the go byte)."""
        guest, limit = self.guest, self.teardown_limit
        command = REBOOT_COMMANDS[action]
        try:
            result_r, result_w = os.pipe()
            go_r, go_w = os.pipe() if wait_for_go else (-1, -1)
        except OSError:
            return None

        def teardown_then_reboot():
            signal.set_wakeup_fd(-1)                      # PID 1's pipe is not ours to wake
            _close_fds_but(2, _kmsg_fd, result_w, go_r)   # no dup of a socket outlives PID 1's
            summary = said
            if go_r >= 0:
                go = os.read(go_r, 1 + GO_SUMMARY_MAX)
                if not go:
                    return 0       # PID 1 closed the pipe without a word: not needed
                summary = go[1:]
            started = time.monotonic()
            left = len(Teardown(KernelStorage(), guest, time_limit=limit).run())
            took = time.monotonic() - started
            if left:
                log("warn", "shutdown: filesystems synced in %.3fs; %d stayed writable"
                    % (took, left))
            else:
                log("info", "shutdown: filesystems synced and read-only in %.3fs" % took)
            os.write(result_w, bytes((min(left, 255),)))
            log("info", "shutdown: summary: %s; teardown %.3fs%s; reboot(%s) %.3fs after the "
                "request" % (summary.decode("utf-8", "replace") or "no process to stop", took,
                             " (%d stayed writable)" % left if left else "", action,
                             time.monotonic() - since))
            return reboot_now(action, command, since)

        self.code = None
        self.pid = self.fork(teardown_then_reboot)
        for fd in (result_w, go_r):
            if fd >= 0:
                os.close(fd)
        if self.pid is None:
            for fd in (result_r, go_w):
                if fd >= 0:
                    os.close(fd)
            return None
        self.reaper.watch(self.pid, self._exited, uncounted=wait_for_go)
        os.set_blocking(result_r, False)
        self._close_result()
        self._result_fd = result_r
        return go_w

    def _exited(self, pid, status):
        if pid == self.pid:
            self.pid, self.code = None, os.waitstatus_to_exitcode(status)

    # the event loop's view: the result pipe
    def wants(self, now):
        if self._result_fd >= 0:
            return ((self._result_fd, select.POLLIN, self._on_result, None),)
        return ()

    def _on_result(self, _, mask):
        try:
            data = os.read(self._result_fd, 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._close_result()
        self.left_writable = data[0] if data else -1     # -1: the child died before it said

    def _close_result(self):
        if self._result_fd >= 0:
            os.close(self._result_fd)
            self._result_fd = -1


# =============================================================================================
# 11. The agent: the start-up, the parts wired into one loop, the PID-1 story
# =============================================================================================


# ---- the start-up: each step when the one before it is done --------------------------------

# Loading the cmdline's modules one after another before serving kept the host waiting for
# modules it does not need to talk to the guest (ext4 alone takes ~0.25 s under TCG). A loader
# thread loads them while PID 1's loop turns: first the modules the listeners' transports
# need (virtio-serial, vsock), in the order given, writing "t" on a pipe after each -- the
# loop then tries the listeners at once -- and "T" when they are all in (the agent says it is
# ready); then the rest, in order, and "D". Only then does the agent start what may need any
# module (the network, the workload, the power button). The loop itself never calls
# finit_module(2): a module's init runs in the caller and can wait on its device for good.
#
# Why a thread, in a guest path that is otherwise one thread: a forked child did the same
# and cost the first answer 0.11 s under TCG (saved runs of bench/boot.py, 8 boots each,
# agent - floor per round: bench/results/boot-loader-child.json +0.185 s, p10-p90
# +0.153..+0.200, against boot-loader-pid1.json, the loading done by PID 1 itself, +0.070 s,
# +0.058..+0.090; boot-loader-thread.json, this thread, +0.097 s): the fork's copy-on-write
# faults, on the one vCPU. The thread makes system calls and writes to
# its pipe, blocks every signal (they go to the loop), and holds nothing a fork() could copy
# half-taken: CPython and glibc reset their own locks in a forked child, and it holds no
# Python lock while in the kernel. It outlives a stop if a module hangs; it writes only its
# own end of the pipe, which it alone closes.
SERIAL_TRANSPORT_MODULES = frozenset(("virtio_pci", "virtio_mmio", "virtio_console"))
TRANSPORT_MODULES = SERIAL_TRANSPORT_MODULES | frozenset((
    "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
    "vsock_loopback", "hv_vmbus", "hv_sock", "vmw_vsock_vmci_transport"))
MODULES_TIMEOUT = 120.0           # a module load that hangs must not keep the workload forever


def split_transports(names):
    """(the transport modules, the rest), each in the order given."""
    norm = [n.replace("-", "_") for n in names]
    return ([n for n in norm if n in TRANSPORT_MODULES],
            [n for n in norm if n not in TRANSPORT_MODULES])


class ListenerGate:
    """When the Server may try a listener (its `gate`): a vsock listener once AF_VSOCK
    exists -- socket() of a family the kernel lacks makes it run modprobe (a usermode
    helper) and wait for it, in PID 1, however long it takes (and while modules load it
    takes the guest's CPU from them); while transport modules load (`loading`), a named
    virtio-serial port once virtio_console's class is there -- before it no port can be,
    and each look costs ~10 ms under TCG -- and a failure is expected, said only in debug."""

    def __init__(self):
        self.loading = False

    @property
    def expecting_failures(self):
        return self.loading

    def may_try(self, listener):
        if listener.addr[0] == "vsock":
            protocols = _read_text("/proc/net/protocols")
            return not protocols or "AF_VSOCK" in protocols
        if self.loading and listener.addr[0] == "serial" \
                and not listener.addr[1].startswith("/"):
            return os.path.isdir(VIRTIO_PORTS)
        return True


class StartUp(Source):
    """The agent's start, in the order it happens. Each step runs when the one before it is
    done, in the loop's turns; nothing here waits:
      1. begin(): the loader thread starts on the transport modules, and the listeners that
         can open already open (a Unix socket, a port that is there);
      2. after each transport module: the listeners are tried again at once;
      3. every transport module in: "ready" -- the listeners open or retrying, READY=1 to
         the host (ready());
      4. at the end of that loop turn (or of a first answer's turn before it, or at
         START_HOLD): the console lines held since the start go out, and lo comes up
         (release());
      5. every other module in (or given up on after MODULES_TIMEOUT): the guest's mounts,
         the network and nameservers, the power button, the watchdog, the clock keeper,
         DHCP, the workload (start_the_rest()).
    A stop ends it wherever it is (stop()): nothing more starts. `modules` is (names,
    optional); `load(names, optional)` is load_modules (a test passes a fake)."""

    def __init__(self, modules, server, gate, notifier, errands, is_init, net=None, dns=(),
                 buttons=None, watchdog=None, clock=None, dhcp=None, workload=None,
                 load=None):
        self.transports, self.rest = split_transports(modules[0])
        self.optional = list(modules[1])
        self.load = load or load_modules
        self.server, self.gate, self.notifier, self.errands = server, gate, notifier, errands
        self.is_init = is_init and sys.platform.startswith("linux")
        self.net, self.dns = net, dns
        self.buttons, self.watchdog, self.dhcp, self.workload = buttons, watchdog, dhcp, workload
        self.clock = clock
        self.stage = "idle"        # idle, transports, modules, started, stopped
        self.ready_said = False
        self.released = False
        self.release_at = time.monotonic() + START_HOLD
        self.began = None
        self.thread = None         # the loader thread's id, once started
        self.pipe = -1

    @property
    def loads_any(self):
        return bool(self.transports or self.rest or self.optional)

    # ---- 1. begin ---------------------------------------------------------------------------
    def begin(self):
        """The loader first (it works while we go on), then the listeners that can open."""
        if self.stage == "stopped":            # a stop came while we booted: only listen
            self.server.open()
            return
        self.began = time.monotonic()
        self.stage = "transports"
        self.gate.loading = True
        if self.loads_any and self._start_loader():
            self.server.open()
            return
        self.ready()                           # nothing to load, or no thread for it
        self.start_the_rest()

    def _start_loader(self):
        r, w = os.pipe()
        try:
            self.thread = _thread.start_new_thread(self._load_all, (w,))
        except RuntimeError as exc:
            for fd in (r, w):
                os.close(fd)
            log("error", "cannot start the module loader (%s); going on without the modules"
                % exc)
            return False
        os.set_blocking(r, False)
        self.pipe = r
        log("debug", "modules: loading %s first, then %s"
            % (" ".join(self.transports) or "no transport",
               " ".join(self.rest + self.optional) or "nothing more"))
        return True

    def _load_all(self, w):
        """The loader thread (see above)."""
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            failed = []
            for name in self.transports:
                failed += self.load([name], ())
                os.write(w, b"t")
            os.write(w, b"T")
            failed += self.load(self.rest, self.optional)
            if failed:
                log("warn", "modules not loaded: %s" % ", ".join(failed))
            os.write(w, b"D")
        except OSError as exc:     # EPIPE: the loop closed its end (a stop, the timeout)
            if exc.errno != errno.EPIPE:
                log("warn", "module loader: %s" % describe_exception(exc))
        except Exception as exc:   # a bug: the loop hears the end of the pipe, and goes on
            log("error", "module loader: %s" % describe_exception(exc))
        finally:
            try:
                os.close(w)
            except OSError:
                pass

    # ---- 2. a transport module in -----------------------------------------------------------
    def _on_loader(self, _, mask):
        try:
            data = os.read(self.pipe, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        for mark in data:
            if self.stage not in ("transports", "modules"):
                return             # stopped by one of the calls below
            if mark == ord("t"):
                self.server.retry_now()
            elif mark == ord("T"):
                self.ready()
            elif mark == ord("D"):
                self.start_the_rest()
        if not data and self.stage in ("transports", "modules"):
            log("warn", "the module loader ended before it was done")
            self.ready()
            self.start_the_rest()

    # ---- 3. ready ---------------------------------------------------------------------------
    def ready(self):
        """The modules the listeners need are in: open them now, and say we serve."""
        if self.stage != "transports":
            return
        self.stage = "modules"
        self.gate.loading = False
        if self.transports:        # they were loaded: try the listeners now
            self.server.retry_now()
        else:
            self.server.open()
        self.ready_said = True
        start_step("transports and listeners")
        log("info", "ready (pid %d, version %s)" % (os.getpid(), __version__))
        listening = ",".join(l.text for l in self.server.listeners if l.is_open) or "nothing"
        self.notifier.send("READY=1\nSTATUS=arcbox-agent %s serving on %s\n"
                           "X_SYSTEMD_HOSTNAME=%s\n" % (__version__, listening,
                                                         socket.gethostname()))
        log("info", "start: %s" % start_report(self.is_init))   # after READY: it reads kmsg

    # ---- 4. after the turn of "ready" or of a first answer ----------------------------------
    def release(self):
        """The start-up lines held on the console go out; lo comes up (kernel work: after the
        answer, not before it). Once."""
        if self.released:
            return
        self.released = True
        release_console()
        if self.is_init:
            loopback_up()

    # ---- 5. every module in -----------------------------------------------------------------
    def start_the_rest(self):
        """Every module is in (or given up on): what may need one starts now."""
        self._close_pipe()
        if self.stage != "modules":
            return
        self.stage = "started"
        if self.loads_any:
            log("info", "modules: all in after %.3fs" % (time.monotonic() - self.began))
        self.release()             # lo up, our lines out, before any of this
        if self.is_init:
            mount_filesystems(GUEST_MOUNTS)
            configure_network(self.net)
            if self.dns:
                dns = self.dns
                self.errands.run(Errand("writing the nameservers", lambda: write_nameservers(
                    dns), QGA_ERRAND_TIMEOUT, None), self._written)
        for part in (self.buttons, self.watchdog, self.clock):   # their drivers (evdev, the
            if part is not None:                                 # watchdog's, ptp_kvm) may
                part.start()                                     # have been modules
        for part in (self.dhcp, self.workload):      # the agent serves while DHCP asks
            if part is not None:
                part.start()

    @staticmethod
    def _written(outcome):
        if outcome[0] == "error":              # (a timeout is logged by the errands)
            log("warn", "network: nameservers not written: %s" % outcome[2])

    # ---- a stop -----------------------------------------------------------------------------
    def stop(self):
        """Shutdown: nothing more starts; the loader's next write to the pipe ends it."""
        if self.stage != "started":
            self.stage = "stopped"
        self.gate.loading = False
        self._close_pipe()

    def _close_pipe(self):
        if self.pipe >= 0:
            os.close(self.pipe)
            self.pipe = -1

    # ---- the event loop's view --------------------------------------------------------------
    def wants(self, now):
        if self.pipe >= 0:
            yield self.pipe, select.POLLIN, self._on_loader, None

    def deadline(self):
        times = [] if self.released else [self.release_at]
        if self.stage in ("transports", "modules"):
            times.append(self.began + MODULES_TIMEOUT)
        return min(times) if times else None

    def tick(self, now):
        if self.stage in ("transports", "modules") and now >= self.began + MODULES_TIMEOUT:
            log("warn", "modules still loading after %gs; going on without them"
                % MODULES_TIMEOUT)
            self.ready()
            self.start_the_rest()
        if not self.released and (self.ready_said or now >= self.release_at
                                  or self.server.first_answer_at is not None):
            self.release()

    def close(self):
        self.stop()
        self.release()


# ---- the agent: what a signal, a request or the workload's end starts -----------------------

class Agent:
    """Wires the parts into one loop: the signal inbox, the reaper, the server, the workload
    and the shutdown sequence, and decides what starts a shutdown. Guest side, one thread."""

    def __init__(self, config, is_init, inbox=None, modules=None, load=None):
        self.is_init = is_init
        self.action, self.grace = config["action"], config["grace"]   # what a stop means
        self.delegate = bool(config["delegate"]) and not is_init
        self.can_power_off = is_init or self.delegate
        self.exit_code = None      # set to leave run() (never when PID 1)
        self.inbox = inbox or SignalInbox()
        self.inbox.route = self.on_signal
        self.reaper = Reaper()
        self.errands = Errands(self.reaper)   # what may block runs there, never in the loop
        policy = RequestPolicy(config["allow"], self.can_power_off, owns_clock=is_init)
        max_frame = config["max_frame"]
        # which mounts are the guest's: decided once, for all who touch a filesystem
        guest = GuestMounts.at_start() if self.can_power_off or config["qga"] != "off" \
            else GuestMounts()
        self.freezer = Freezer(config["freeze_timeout"], self.errands, guest)
        # the clock keeper: only in a real VM (in a PID namespace the clock is the host's)
        self.clock = ClockKeeper(config["clock_check"] if is_init and
                                 is_initial_pid_namespace() else 0, self.errands)
        self.execs = GuestExec(self.reaper)        # guest-exec'd programs and their pipes
        qga_machine = QgaMachine(policy, self.freezer, self.clock, self.errands, self.execs,
                                 qga_enabled(config["qga_allow"], config["qga_block"]))

        # Each listener speaks one protocol: an (address, maker) pair (see "the protocol
        # seam"). The --listen addresses speak ArcBox, --qga speaks QGA.
        def arcbox(peer, shared):
            return ArcBoxProtocol(policy, max_frame, peer, shared)

        def qga(peer, shared):
            return QgaProtocol(qga_machine, max_frame, peer, shared)
        gate = ListenerGate()
        self.server = Server([(addr, arcbox) for addr in config["listen"]]
                             + [(addr, qga) for addr in qga_addresses(config["qga"], is_init)],
                             server_limits(config), policy, self.on_request_effect, self.errands,
                             gate)
        self.workload = Supervised(config["exec"], config["on_exit"], self.reaper,
                                   self.on_workload_finished)
        self.dhcp = Supervised(dhcp_client_argv(config["net"]) if is_init else [],
                               "respawn", self.reaper, None, name="udhcpc")
        self.notifier = Notifier(config["notify"]) if config["notify"] else NoNotifier()
        self.watchdog = Watchdog(config["watchdog"]) if is_init else None
        self.buttons = PowerButtons(self.on_power_button) \
            if config["power_button"] and self.can_power_off else None
        self.shutdown = ShutdownSequence(
            self.reaper, shutdown_timeouts(config), delegate=self.delegate,
            guest=guest, notifier=self.notifier, errands=self.errands, watchdog=self.watchdog)
        # PID 1 loads the cmdline's modules (in a thread); `modules` ((names, optional)) and
        # `load` (the loading function) let a test give any agent a fake
        self.start_up = StartUp(
            boot_modules(config) if is_init else (modules or ([], [])), self.server, gate,
            self.notifier, self.errands, is_init, net=config["net"], dns=config["dns"],
            buttons=self.buttons, watchdog=self.watchdog, clock=self.clock, dhcp=self.dhcp,
            workload=self.workload, load=load)
        # The loop ticks the sources in this order after every wake-up, and the order matters:
        # the inbox first (a signal may start the shutdown), the reaper before the workloads
        # and the shutdown sequence (they read what it reaped: "nobody left" must be current
        # when the sequence steps), the sequence after them (it acts on what the others did),
        # the start-up last (what waits for a first answer goes once the turn's answers are
        # written).
        self.loop = EventLoop()
        for source in (self.inbox, ConsoleBacklog(), self.reaper, self.errands, self.execs,
                       self.server, self.buttons, self.notifier, self.watchdog, self.clock,
                       self.freezer,
                       self.workload, self.dhcp, self.shutdown, self.start_up):
            if source is not None:
                self.loop.add(source)

    def start(self):
        """Serve: signals (if main() did not take them already), Ctrl-Alt-Del as SIGINT, a
        signal that came during boot, then the start-up (StartUp)."""
        if self.inbox.wake_r < 0:
            self.inbox.install()
        if self.is_init and sys.platform.startswith("linux"):
            err = call_reboot(LINUX_REBOOT_CMD_CAD_OFF)
            log("debug", "reboot(CAD_OFF): %s" % (os.strerror(err) if err else "Ctrl-Alt-Del "
                                                  "now sends SIGINT"))
        # A signal that came during boot is acted on now, before the workload would start.
        self.inbox.tick(time.monotonic())
        self.start_up.begin()

    def run(self):
        """Serve until exit_code is set (never as PID 1). Nothing escapes: an exception in
        one step is logged and the loop goes on."""
        self.start()
        errors = 0
        while self.exit_code is None:
            try:
                # After an error, wake up again soon but not in a hot loop: a bug that repeats
                # must neither spin the CPU nor flood the console (50 ms doubling to 1.6 s).
                self.loop.run_once(0.05 * 2 ** min(errors - 1, 5) if errors else None)
                errors = 0
            except Exception as exc:   # a bug must not kill init: log it and keep serving
                errors += 1
                log("error", "internal error (kept serving): %s" % describe_exception(exc))
        for part in (self.start_up, self.server, self.errands, self.buttons, self.notifier,
                     self.watchdog, self.inbox):
            if part is not None:
                part.close()
        return self.exit_code

    # ---- what starts a shutdown ---------------------------------------------------------
    def begin_shutdown(self, action, grace, reason, ack=None, exit_status=0):
        """The one door into the shutdown sequence: it starts once; later starts are logged."""
        release_console()          # what led here is on the console before the stop is
        if self.shutdown.active:
            log("info", "%s: shutdown already in progress (phase %s); not restarting"
                % (reason, self.shutdown.phase))
            return
        if not self.can_power_off:
            log("error", "shutdown (%s) ignored: not PID 1 and not --delegate" % reason)
            return
        self.start_up.stop()       # nothing more starts
        self.workload.stop()
        self.dhcp.stop()           # udhcpc is just another process to TERM
        self.freezer.forget()      # the sequence thaws every disk before SIGTERM
        self.shutdown.begin(action, grace, reason, ack, exit_status)

    def on_signal(self, sig):
        if not self.is_init:
            if self.shutdown.active:
                return              # delegating: stay to force the power-off if PID 1 fails
            if sig in (signal.SIGTERM, signal.SIGINT):
                log("info", "signal %d: stopping the agent (not PID 1: no power-off)" % sig)
                self.exit_code = 0
            return
        action = INIT_SIGNAL_ACTIONS.get(sig)
        if action is None:
            return                  # SIGHUP, SIGQUIT: nothing to do, nothing harmful
        if action == "configured":
            action = self.action
        self.begin_shutdown(action, self.grace, "signal %d" % sig)

    def on_request_effect(self, effect, conn):
        """A request's effect (checked already by its protocol): a ClockRequest or a
        StopRequest."""
        if isinstance(effect, ClockRequest):
            set_clock(effect.seconds)
            self.clock.host_set()
        elif isinstance(effect, StopRequest):
            self.begin_shutdown(effect.action or self.action, effect.grace or self.grace,
                                "%s from %s" % (effect.request, conn.peer_text),
                                conn.unflushed)

    def on_power_button(self, device):
        self.begin_shutdown(self.action, self.grace, "power button %s" % device)

    def on_workload_finished(self, status, what):
        if self.can_power_off:
            log("info", "%s: powering off" % what)
            # the host learns the workload's status (EXIT_STATUS=); killed by a signal: 128+N
            self.begin_shutdown(self.action, self.grace, "workload exit",
                                exit_status=status if status >= 0 else 128 - status)
        else:
            log("info", "%s: stopping the agent (not PID 1: no power-off)" % what)
            self.exit_code = 0


# ---- serve_main(): the PID-1 story, top-down ------------------------------------------------

def read_configuration(argv, cmdline_text, is_init):
    """Defaults < kernel cmdline < flags. Returns (config, None), or (None, exit status) when
    an operator asked for --help or typed a bad flag. As PID 1 (where the kernel passes stray
    cmdline words as argv) problems are logged and the defaults kept: init must not exit."""
    flags, problems, wants_help = parse_serve_flags(argv)
    cmdline, cmd_problems = parse_cmdline(cmdline_text)
    config, value_problems = build_config(flags, cmdline)
    flag_problems = problems + [text for origin, text in value_problems if origin == "flag"]
    if not is_init:
        if wants_help:
            _write(1, usage_text())
            return None, EXIT_OK
        if flag_problems:
            _write(2, "%s: %s\n(try --help)\n" % (PROG, "; ".join(flag_problems)))
            return None, EXIT_USAGE
    set_log_level(config["log"])
    if config["kmsg"]:
        enable_kmsg()
    for problem in flag_problems + cmd_problems:
        log("warn", problem)
    for origin, text in value_problems:
        if origin == "cmdline":
            log("warn", "kernel cmdline " + text)
    if not config["notify"] and (is_init or config["delegate"]):
        text, where = notify_credential(cmdline_text)
        if text is not None:
            try:
                config["notify"] = parse_notify_address(text)
            except ConfigError as exc:
                log("warn", "vmm.notify_socket from the %s: %s; not notifying" % (where, exc))
    if config["notify"]:
        log("info", "notify: telling the host at %s" % format_notify_address(config["notify"]))
    return config, None


def serve_main(argv, is_init, cmdline_path="/proc/cmdline", inbox=None, kept=None):
    """The agent's life, in order. Each stage is best-effort: a failure is logged, never fatal.
    `inbox`: PID 1's, taken by run_as_init() before it called us; `kept` (a dict) receives
    the configuration, for PID 1's fallback should serving fail."""
    # 1. Take the signals before anything else: a PID 1 without handlers loses them, and a
    #    poweroff sent while we boot must end in a power-off once the loop runs.
    inbox = inbox or SignalInbox().install()
    # 2. Hold the console's info lines until the agent is ready or the host has its first
    #    answer (StartUp.release).
    hold_console()
    try:
        # 3. Early boot (PID 1): stdio, /proc, /sys, /dev and friends, then the console again.
        if is_init:
            early_boot()
        start_step("early boot")
        # 4. Configuration: defaults < kernel cmdline (needs /proc) < flags.
        config, status = read_configuration(
            argv, _read_text(cmdline_path) if cmdline_path else "", is_init)
        if config is None:
            inbox.close()
            return status
        if kept is not None:
            kept["config"] = config
        start_step("configuration")
        # 5. Boot duties that need the configuration (PID 1): the hostname. (Kernel modules
        #    load in the background while the agent serves; see StartUp.)
        if is_init:
            boot_duties(config)
        start_step("boot duties")
        # 6. Serve: the start-up (StartUp), then one loop until power-off (PID 1) or a stop
        #    signal (not PID 1).
        return Agent(config, is_init, inbox).run()
    finally:
        release_console()


# =============================================================================================
# 12. The host client: ping, info, shutdown, rehearse
# =============================================================================================


# ---- talking to an agent --------------------------------------------------------------------

class ClientError(Exception):
    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


class Client:
    """A blocking client with one deadline for the whole exchange.

    Every request carries a trace id of its own, which the agent echoes (the ArcBox agent
    does too). An answer with another trace id belongs to somebody else (on a shared
    virtio-serial stream: a client that gave up earlier, or garbage) and is skipped. An Error
    frame without one (a stream-level error) is reported if the agent then closes."""

    _counter = 0

    def __init__(self, addr, timeout):
        if addr[0] == "serial":
            raise ClientError(EXIT_USAGE, "serial: is a guest-side address; on the host use "
                              "the VMM's socket for the port, e.g. unix:PATH")
        self.addr = addr
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.sock = None
        self.buf = bytearray()

    def _remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ClientError(EXIT_TIMEOUT, "timed out after %gs talking to %s"
                              % (self.timeout, format_address(self.addr)))
        return left

    def connect(self):
        self.sock = connect_stream(self.addr, self._remaining, self.timeout)
        if self.addr[0] == "hvsock":
            self._hybrid_handshake()

    def _hybrid_handshake(self):
        port = self.addr[2]
        self._send_all(("CONNECT %d\n" % port).encode())
        line = self._read_line(128)
        if not line.startswith(b"OK "):
            what = ("closed the connection" if not line else "answered %r"
                    % line[:40].decode("ascii", "replace").strip())
            raise ClientError(EXIT_UNREACHABLE, "%s: the VMM %s instead of OK: is the guest "
                              "agent listening on vsock port %d?"
                              % (format_address(self.addr), what, port))

    def _read_line(self, limit):
        while b"\n" not in self.buf:
            if len(self.buf) > limit:
                break
            chunk = self._recv()
            if not chunk:
                break
            self.buf += chunk
        line, nl, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return line + nl if nl else line

    def _recv(self):
        try:
            self.sock.settimeout(self._remaining())
            return self.sock.recv(65536)
        except socket.timeout:
            raise ClientError(EXIT_TIMEOUT, "no answer from %s within %gs"
                              % (format_address(self.addr), self.timeout))
        except OSError as exc:
            raise ClientError(EXIT_UNREACHABLE, "%s: %s" % (format_address(self.addr),
                                                            exc.strerror or exc))

    def _send_all(self, data):
        try:
            self.sock.settimeout(self._remaining())
            self.sock.sendall(data)
        except socket.timeout:
            raise ClientError(EXIT_TIMEOUT, "sending to %s timed out" % format_address(self.addr))
        except OSError as exc:
            raise ClientError(EXIT_UNREACHABLE, "%s: %s" % (format_address(self.addr),
                                                            exc.strerror or exc))

    def request(self, msg_type, payload=b"", trace=None):
        """Send one request, return the response payload; an Error frame raises."""
        if trace is None:
            Client._counter += 1
            trace = ("c%x.%x.%x" % (os.getpid(), int(time.time() * 1000) & 0xFFFFFF,
                                    Client._counter)).encode()
        self._send_all(encode_frame(msg_type, payload, trace))
        stream_error = None
        while True:
            try:
                frame = self._next_frame()
            except ClientError:
                if stream_error is None:
                    raise
                frame = stream_error     # the agent said why, then closed
            if frame[1] == trace or frame is stream_error:
                break
            if frame[0] == MSG_ERROR and not frame[1]:
                stream_error = frame
        rtype, _, rpayload, _ = frame
        if rtype == MSG_ERROR:
            try:
                code, text = decode_error(rpayload)
            except ProtocolError as exc:
                raise ClientError(EXIT_PROTOCOL, "unreadable error frame: %s" % exc)
            raise ClientError(EXIT_REFUSED, "agent error %d: %s" % (code, text))
        if rtype != msg_type | RESPONSE_BIT:
            raise ClientError(EXIT_PROTOCOL, "expected a response of type 0x%04X, got 0x%04X"
                              % (msg_type | RESPONSE_BIT, rtype))
        return rpayload

    def _next_frame(self):
        while True:
            try:
                frame = decode_frame(self.buf, 16 << 20)   # the ArcBox host's own limit
            except ProtocolError as exc:
                raise ClientError(EXIT_PROTOCOL, "bad answer from %s: %s"
                                  % (format_address(self.addr), exc))
            if frame is not None:
                del self.buf[:frame[3]]
                return frame
            chunk = self._recv()
            if not chunk:
                raise ClientError(EXIT_PROTOCOL, "%s closed the connection without answering"
                                  % format_address(self.addr))
            self.buf += chunk

    def keepalive(self):
        """An empty Ping while waiting (its answer is read by wait_until_gone)."""
        self._send_all(encode_frame(MSG_PING, b"", b"keepalive"))

    def close(self):
        if self.sock is not None:
            self.sock.close()


def connect_stream(addr, remaining, timeout):
    """A connected stream socket to `addr` (vsock, or a Unix socket for unix: and hvsock:),
    within remaining() seconds. ClientError: EXIT_UNREACHABLE or EXIT_TIMEOUT."""
    where = format_address(addr)
    if addr[0] == "vsock":
        if AF_VSOCK is None:
            raise ClientError(EXIT_UNREACHABLE, "%s: this system has no AF_VSOCK" % where)
        sock, target = socket.socket(AF_VSOCK, socket.SOCK_STREAM), (addr[1], addr[2])
    else:
        sock, target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), unix_sockaddr(addr[1])
    while True:
        try:
            sock.settimeout(remaining())
            sock.connect(target)
            return sock
        except socket.timeout:
            sock.close()
            raise ClientError(EXIT_TIMEOUT, "%s: connect timed out after %gs" % (where, timeout))
        except BlockingIOError:
            # A Unix socket whose listen backlog is full answers EAGAIN at once instead
            # of waiting: the agent is busy accepting. Wait for it, within the timeout.
            time.sleep(0.005)
        except ClientError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise ClientError(EXIT_UNREACHABLE, "%s: cannot connect: %s"
                              % (where, exc.strerror or exc))


def _decode_reply(schema, payload):
    try:
        return decode_message(schema, payload)
    except ProtocolError as exc:
        raise ClientError(EXIT_PROTOCOL, "bad response payload: %s" % exc)


# ---- talking to a QEMU guest agent: ours, or qemu-ga ----------------------------------------

QGA_MODES = {"poweroff": "powerdown", "halt": "halt", "reboot": "reboot"}


class QgaClient:
    """The host's side of QGA, for any guest that runs a QEMU guest agent, so that one tool
    compares ours and qemu-ga on the same guest. Every exchange starts with
    guest-sync-delimited (a 0xFF first: the agent drops any partial input; its answer comes
    after a 0xFF of its own, and everything before it is a stale answer). One deadline for
    the whole exchange, as Client."""

    def __init__(self, addr, timeout):
        self.addr, self.timeout = addr, timeout
        self.deadline = time.monotonic() + timeout
        self.sock = None
        self.buf = bytearray()
        self.sync_id = (os.getpid() << 16) ^ int(time.time() * 1000) & 0x7FFFFFFF

    def _remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ClientError(EXIT_TIMEOUT, "timed out after %gs talking to %s"
                              % (self.timeout, format_address(("qga", self.addr))))
        return left

    def connect(self):
        self.sock = connect_stream(self.addr, self._remaining, self.timeout)
        self.sync()

    def _send(self, obj, prefix=b""):
        import json
        try:
            self.sock.settimeout(self._remaining())
            self.sock.sendall(prefix + json.dumps(obj).encode() + b"\n")
        except socket.timeout:
            raise ClientError(EXIT_TIMEOUT, "sending to %s timed out"
                              % format_address(("qga", self.addr)))
        except OSError as exc:
            raise ClientError(EXIT_UNREACHABLE, "%s: %s" % (
                format_address(("qga", self.addr)), exc.strerror or exc))

    def _next(self):
        """The next JSON object the agent sent (a line), skipping 0xFF bytes."""
        import json
        while True:
            line, nl, rest = bytes(self.buf).partition(b"\n")
            if nl:
                self.buf = bytearray(rest)
                line = line.replace(b"\xff", b"").strip()
                if not line:
                    continue
                try:
                    return json.loads(line.decode("utf-8", "replace"))
                except ValueError:
                    raise ClientError(EXIT_PROTOCOL, "not JSON from %s: %r"
                                      % (format_address(("qga", self.addr)), line[:80]))
            try:
                self.sock.settimeout(self._remaining())
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise ClientError(EXIT_TIMEOUT, "no answer from %s within %gs"
                                  % (format_address(("qga", self.addr)), self.timeout))
            except OSError as exc:
                raise ClientError(EXIT_UNREACHABLE, "%s: %s" % (
                    format_address(("qga", self.addr)), exc.strerror or exc))
            if not chunk:
                raise ClientError(EXIT_PROTOCOL, "%s closed the connection without answering"
                                  % format_address(("qga", self.addr)))
            self.buf += chunk

    def sync(self):
        """guest-sync-delimited: answers queued for somebody else are skipped."""
        self.sync_id = (self.sync_id + 1) & 0x7FFFFFFF
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": self.sync_id}},
                   prefix=b"\xff")
        while True:
            answer = self._next()
            if isinstance(answer, dict) and answer.get("return") == self.sync_id:
                return

    def call(self, name, arguments=None):
        """One command; its "return" value, or ClientError(EXIT_REFUSED) with the agent's
        error class and text."""
        request = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._send(request)
        answer = self._next()
        return self._value(name, answer)

    def _value(self, name, answer):
        if isinstance(answer, dict) and "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            raise ClientError(EXIT_REFUSED, "%s: %s: %s" % (
                name, error.get("class", "error"), error.get("desc", answer["error"])))
        if not isinstance(answer, dict) or "return" not in answer:
            raise ClientError(EXIT_PROTOCOL, "%s: unexpected answer %r" % (name, answer))
        return answer["return"]

    def shutdown(self, mode):
        """guest-shutdown has no answer when it works (the guest goes down); a guest agent
        that cannot do it answers an error (qemu-ga in a busybox guest: "child process has
        failed to shutdown"). So: send it, then a guest-sync-delimited -- agents answer in
        order, so an error comes before the sync's answer, and the sync's answer alone means
        the stop is under way."""
        self._send({"execute": "guest-shutdown", "arguments": {"mode": mode}})
        self.sync_id = (self.sync_id + 1) & 0x7FFFFFFF
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": self.sync_id}},
                   prefix=b"\xff")
        while True:
            answer = self._next()
            if isinstance(answer, dict) and "error" in answer:
                self._value("guest-shutdown", answer)
            if isinstance(answer, dict) and answer.get("return") == self.sync_id:
                return

    def keepalive(self):
        """A guest-ping while waiting (its answer is read by wait_until_gone)."""
        self._send({"execute": "guest-ping"})

    def close(self):
        if self.sock is not None:
            self.sock.close()


# ---- waiting until the guest is gone ----------------------------------------------------------

# How the end of a guest shows on each transport: the agent keeps the requester's connection
# open through the stop, so its end marks the end of the guest -- the VMM's socket for a
# virtio-serial port or hybrid vsock closes when the VMM exits (EOF), a vsock connection is
# reset, a namespace guest's socket closes with its PID 1. An end is confirmed by connecting
# again: nothing listens any more (refused, no such file, reset). Meanwhile a keep-alive
# (Ping, guest-ping) every WAIT_KEEPALIVE s keeps the agent's idle timeout away and tells when
# the guest last answered.
WAIT_KEEPALIVE = 0.5
WAIT_RECONNECTS = 3               # an agent that closed our connection but still answers


def wait_until_gone(client, deadline):
    """Block until the guest behind `client` is gone, or `deadline`. Returns (gone at, how
    it was seen, last answer at): `gone at` None when still up at the deadline."""
    last_answer, reconnects = None, 0
    next_keepalive = time.monotonic() + WAIT_KEEPALIVE
    while True:
        now = time.monotonic()
        if now >= deadline:
            return None, "still up", last_answer
        try:
            ready = select.select([client.sock], [], [], max(0.0, min(next_keepalive,
                                                                    deadline) - now))[0]
            if ready:
                data = client.sock.recv(65536)
                if data:
                    last_answer = time.monotonic()
                    continue
                how = "the connection closed"
            else:
                next_keepalive = time.monotonic() + WAIT_KEEPALIVE
                client.deadline = deadline
                client.keepalive()
                continue
        except ClientError as exc:
            if exc.code == EXIT_TIMEOUT:       # the keep-alive met the deadline
                return None, "still up", last_answer
            if exc.code != EXIT_UNREACHABLE:
                return None, str(exc), last_answer
            how = "the connection failed (%s)" % exc
        except OSError as exc:
            how = "the connection was reset" if exc.errno == errno.ECONNRESET else \
                "the connection failed (%s)" % (exc.strerror or exc)
        gone = time.monotonic()
        client.close()
        # confirm: does anything still listen there?
        try:
            client.deadline = min(deadline, time.monotonic() + 2.0)
            client.sock = connect_stream(client.addr, client._remaining, 2.0)
        except ClientError as exc:
            return gone, "%s, and nothing listens any more (%s)" % (
                how, str(exc).rsplit(": ", 1)[-1]), last_answer
        reconnects += 1
        if reconnects > WAIT_RECONNECTS:
            return None, "%s, but the address still takes connections (%d times)" % (
                how, reconnects), last_answer


# ---- the commands, for one guest or several at once ------------------------------------------

def arcbox_ping(client, args):
    sent = time.monotonic()
    payload = encode_message(PING_REQUEST, {
        "message": args.message, "timestamp_secs": int(time.time()) if args.set_clock else 0})
    reply = _decode_reply(PING_RESPONSE, client.request(MSG_PING, payload))
    reply["rtt_ms"] = round((time.monotonic() - sent) * 1000, 3)
    return reply, "%s (agent %s) in %.2f ms" % (reply["message"], reply["version"] or "?",
                                                reply["rtt_ms"])


def arcbox_info(client, args):
    info = _decode_reply(SYSTEM_INFO, client.request(MSG_GET_SYSTEM_INFO))
    gib = 1024.0 ** 3
    lines = [
        "hostname      %s" % info["hostname"],
        "kernel        %s %s (%s)" % (info["os_name"], info["kernel_version"], info["arch"]),
        "version       %s" % info["os_version"],
        "cpus          %d" % info["cpu_count"],
        "memory        %.2f GiB total, %.2f GiB available" % (info["total_memory"] / gib,
                                                           info["available_memory"] / gib),
        "load          %s" % " ".join("%.2f" % v for v in info["load_average"]),
        "uptime        %d s" % info["uptime"],
        "addresses     %s" % (", ".join(info["ip_addresses"]) or "-"),
    ]
    return info, "\n".join(lines)


def arcbox_shutdown(client, args):
    grace = 0 if args.grace is None else max(1, int(round(args.grace)))
    payload = encode_message(SHUTDOWN_REQUEST, {"timeout_seconds": grace})
    reply = _decode_reply(SHUTDOWN_RESPONSE, client.request(MSG_SHUTDOWN, payload))
    if not reply["accepted"]:
        raise ClientError(EXIT_REFUSED, "the agent did not accept the shutdown")
    return reply, "shutdown accepted (grace %s)" % ("%ds" % grace if grace else "default")


def qga_ping(client, args):
    sent = time.monotonic()
    client.call("guest-ping")
    rtt = round((time.monotonic() - sent) * 1000, 3)
    return {"rtt_ms": rtt}, "guest-ping answered in %.2f ms" % rtt


def qga_info(client, args):
    info = {"guest-info": client.call("guest-info")}
    for name in ("guest-get-osinfo", "guest-get-host-name"):
        try:
            info[name] = client.call(name)
        except ClientError as exc:       # an agent without it: say so, show the rest
            if exc.code != EXIT_REFUSED:
                raise
            info[name] = {"error": str(exc)}
    osinfo, agent_info = info["guest-get-osinfo"], info["guest-info"]
    lines = [
        "hostname      %s" % info["guest-get-host-name"].get("host-name", "?"),
        "kernel        %s %s (%s)" % (osinfo.get("kernel-release", "?"),
                                      osinfo.get("kernel-version", ""), osinfo.get("machine", "?")),
        "os            %s" % osinfo.get("pretty-name", osinfo.get("error", "?")),
        "guest agent   %s, %d commands" % (agent_info.get("version", "?"),
                                           len(agent_info.get("supported_commands", ()))),
    ]
    return info, "\n".join(lines)


def qga_shutdown_request(client, args):
    mode = QGA_MODES[args.action or "poweroff"]
    client.shutdown(mode)
    return {"mode": mode}, "guest-shutdown (mode %s) under way" % mode


CLIENT_COMMANDS = {
    "ping": ("check that the agent answers (Ping; QGA: guest-ping)", arcbox_ping, qga_ping),
    "info": ("show the guest's system information (GetSystemInfo; QGA: guest-info, "
             "guest-get-osinfo, guest-get-host-name)", arcbox_info, qga_info),
    "shutdown": ("ask the guest to power off in order (Shutdown; QGA: guest-shutdown)",
                 arcbox_shutdown, qga_shutdown_request),
}
WAIT_BOUNDS = 35.0                # after the grace: the guest's teardown and reboot() bounds + 15


def run_one(command, addr, args, timeout):
    """One guest: (exit status, result for --json, text)."""
    started = time.monotonic()
    qga = addr[0] == "qga"
    client = QgaClient(addr[1], timeout) if qga else Client(addr, timeout)
    result = {"to": format_address(addr)}
    try:
        client.connect()
        asked = time.monotonic()
        value, text = CLIENT_COMMANDS[command][2 if qga else 1](client, args)
        result.update(value if isinstance(value, dict) else {"value": value})
        if not getattr(args, "wait", False):
            return EXIT_OK, result, text
        acked = time.monotonic()
        gone, how, last = wait_until_gone(client, started + timeout)
        result.update({"accepted_after_s": round(acked - asked, 3), "seen": how,
                       "gone": gone is not None})
        if last is not None:
            result["last_answer_after_s"] = round(last - asked, 3)
        if gone is None:
            result["exit_status"] = EXIT_TIMEOUT
            seen = ("it last answered %.2f s after the request" % (last - asked)
                    if last is not None else "no answer since the request was accepted")
            return EXIT_TIMEOUT, result, "%s %.2f s after the request (%s)" % (
                how, time.monotonic() - asked, seen)
        result["gone_after_s"] = round(gone - asked, 3)
        verb = {"reboot": "rebooted", "halt": "halted"}.get(args.action, "powered off")
        return EXIT_OK, result, "%s %.2f s after the request (%s)" % (verb, gone - asked, how)
    except ClientError as exc:
        result.update({"ok": False, "error": str(exc), "exit_status": exc.code})
        return exc.code, result, str(exc)
    finally:
        client.close()


def parse_client_address(text):
    """parse_address, plus qga:ADDR (a QEMU guest agent: qga:unix:PATH, qga:vsock:CID:PORT)."""
    if text.lower().startswith("qga:"):
        inner = parse_address(text[4:], default_port=None)
        if inner[0] not in ("unix", "vsock"):
            raise ConfigError("%r: QGA is reached over unix: or vsock: here" % text)
        if inner[0] == "vsock" and inner[2] is None:
            raise ConfigError("%r: a QGA vsock address needs its port (qga:vsock:CID:PORT)"
                              % text)
        return ("qga", inner)
    return parse_address(text)


def client_main(argv):
    import argparse
    import json
    command = argv[0]
    parser = argparse.ArgumentParser(
        prog="%s %s" % (PROG, command), description=CLIENT_COMMANDS[command][0],
        epilog=ADDRESS_HELP + "\n  qga:unix:PATH, qga:vsock:CID:PORT  a QEMU guest agent "
        "(ours or qemu-ga), spoken in QGA\n\nexit status: 0 ok (with --wait: the guest is "
        "gone), 1 the agent refused, 2 usage, 3 unreachable, 4 timeout (with --wait: still "
        "up), 5 protocol error; with several --to, the worst",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", metavar="ADDR", action="append",
                        help="agent address; repeat it for several guests, asked at once "
                        "(default: $ARCBOX_AGENT_TO)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=None,
                        help="give up after this long, connect included (default 5; with "
                        "--wait: the grace + %g)" % WAIT_BOUNDS)
    parser.add_argument("--json", action="store_true",
                        help="print each answer as one line of JSON")
    if command == "ping":
        parser.add_argument("--message", default="", help="text the agent echoes back")
        parser.add_argument("--set-clock", action="store_true",
                            help="send this machine's time (the guest, as PID 1, sets its clock "
                            "from it only for an allowed vsock peer or virtio-serial port)")
    if command == "shutdown":
        parser.add_argument("--grace", metavar="SECONDS", type=float, default=None,
                            help="SIGTERM grace before SIGKILL (default: the guest's, 25 s; "
                            "ArcBox only: QGA's guest-shutdown has none)")
        parser.add_argument("--action", choices=sorted(QGA_MODES), default=None,
                            help="QGA only: guest-shutdown's mode (default poweroff); ArcBox's "
                            "Shutdown carries none: the guest's --action applies")
        parser.add_argument("--wait", action="store_true",
                            help="after the guest accepts, wait until it is gone and say after "
                            "how long (exit 4 if it is still up at --timeout)")
    args = parser.parse_args(argv[1:])
    targets = args.to or ([os.environ["ARCBOX_AGENT_TO"]]
                          if os.environ.get("ARCBOX_AGENT_TO") else [])
    if not targets:
        parser.error("no address: give --to ADDR (or set ARCBOX_AGENT_TO)")
    if args.timeout is None:
        grace = getattr(args, "grace", None)
        args.timeout = ((grace or 25.0) + WAIT_BOUNDS) if getattr(args, "wait", False) else 5.0
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    if getattr(args, "grace", None) is not None and not 0 <= args.grace < 2 ** 32:
        parser.error("--grace must be between 0 and 4294967295 seconds")
    addrs = []
    for text in targets:
        try:
            addr = parse_client_address(text)
        except ConfigError as exc:
            parser.error(str(exc))
        if addr[0] == "serial":
            parser.error("%s: serial: is a guest-side address; on the host use the VMM's "
                         "socket for the port, e.g. unix:PATH" % text)
        if command == "shutdown" and addr[0] == "qga" and args.grace is not None:
            parser.error("%s: --grace: QGA's guest-shutdown carries no grace (the guest's "
                         "own applies)" % text)
        if command == "shutdown" and addr[0] != "qga" and args.action is not None:
            parser.error("%s: --action: ArcBox's Shutdown carries no action (the guest's "
                         "--action applies)" % text)
        addrs.append(addr)
    several = len(addrs) > 1

    def report(status, result, text):
        line = ("%s: %s" % (result["to"], text)) if several else text
        if status != EXIT_OK:
            sys.stderr.write("%s %s: %s\n" % (PROG, command, line))
        if args.json:
            result.setdefault("exit_status", status)
            print(json.dumps(result, sort_keys=True), flush=True)
        elif status == EXIT_OK:
            print(line, flush=True)

    if not several:
        status, result, text = run_one(command, addrs[0], args, args.timeout)
        report(status, result, text)
        return status
    # several guests: each in a thread of its own (the host side, not PID 1), one line as
    # each finishes; the exit status is the worst
    import threading
    done, lock = [], threading.Lock()

    def one(addr):
        outcome = run_one(command, addr, args, args.timeout)
        with lock:
            done.append(outcome[0])
            report(*outcome)
    threads = [threading.Thread(target=one, args=(addr,), daemon=True) for addr in addrs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return max(done, key=lambda code: (code != EXIT_OK, code))


# ---- rehearse: a workload's real power-off in a namespace, no VM ------------------------------

# `rehearse -- CMD` runs CMD as the workload of this very agent, PID 1 of a new PID namespace
# -- the code path of a guest, not a simulation -- then stops it the way busybox's poweroff
# does (SIGUSR2 to PID 1) and tells each process's fate from the agent's own log. The
# namespaces: a user namespace (so that no root is needed where unprivileged ones are
# allowed; the caller's uid is root inside it), a PID namespace (kill(-1) reaches only the
# workload; reboot(2) there ends only the namespace: its init is killed by SIGINT), a mount
# namespace with its own /proc and private propagation (the agent's GuestMounts then counts
# every mount as the host's: none is remounted), a network and a UTS namespace (lo, the
# hostname). The host's /dev/watchdog and input devices are never opened (--watchdog off,
# --power-button off). Only sync(2) reaches the host's disks, as any process's may.
CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000    # <linux/sched.h>
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18                   # <sys/mount.h>
EXIT_NO_NAMESPACE = 6             # rehearse: the namespaces it needs cannot be made here
REHEARSE_BOUNDS = 30.0            # after the grace: the agent's teardown and reboot() bounds


def own_command():
    """How to run this very agent again: its .pyz (zipimport's archive) or agent.py."""
    archive = getattr(globals().get("__loader__"), "archive", None)
    return [sys.executable, "-S", archive or os.path.abspath(__file__)]


def _unshare_for_rehearsal():
    """In the runner: the namespaces, and root inside the user namespace. Returns None, or
    why it cannot be done (then nothing was changed that matters)."""
    uid, gid = os.geteuid(), os.getegid()
    err = libc_call("unshare", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET
                    | CLONE_NEWUTS)
    if err == 0:
        try:
            for path, text in (("/proc/self/uid_map", "0 %d 1" % uid),
                               ("/proc/self/setgroups", "deny"),
                               ("/proc/self/gid_map", "0 %d 1" % gid)):
                with open(path, "w") as f:
                    f.write(text)
        except OSError as exc:
            return "cannot map this user into the user namespace: %s" % (exc.strerror or exc)
        return None
    why = "unshare(CLONE_NEWUSER) failed: %s" % os.strerror(err)
    # real root (the initial user namespace's whole uid range) needs no user namespace
    if _read_text("/proc/self/uid_map").split() == ["0", "0", "4294967295"]:
        err = libc_call("unshare", CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWUTS)
        if err == 0:
            return None
        why = "unshare(CLONE_NEWPID) failed: %s" % os.strerror(err)
    return why


def _rehearsal_init(argv, log_w):
    """PID 1 of the new namespace: its own /proc, then exec the agent."""
    if os.getpid() != 1:
        os.write(2, b"rehearse: not PID 1 of a new namespace; not starting the agent\n")
        os._exit(EXIT_NO_NAMESPACE)
    for args in ((None, b"/", None, MS_REC | MS_PRIVATE, None),   # nothing leaks to the host
                 (b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)):
        err = libc_call("mount", *args)
        if err:
            os.write(2, ("rehearse: mount %s: %s\n" % (args[1].decode(), os.strerror(err)))
                     .encode())
            os._exit(EXIT_NO_NAMESPACE)
    os.dup2(log_w, 2)
    os.execv(argv[0], argv)


def start_rehearsal(argv):
    """Fork the runner, which makes the namespaces and forks their PID 1 (the agent,
    `argv`). Returns (runner pid, PID 1's pid as seen here, the agent's log fd), or raises
    ClientError(EXIT_NO_NAMESPACE)."""
    log_r, log_w = os.pipe()
    info_r, info_w = os.pipe()
    runner = os.fork()
    if runner == 0:
        try:
            os.close(log_r)
            os.close(info_r)
            why = _unshare_for_rehearsal()
            if why:
                os.write(info_w, ("!" + why).encode())
                os._exit(EXIT_NO_NAMESPACE)
            init = os.fork()
            if init == 0:
                os.close(info_w)
                _rehearsal_init(argv, log_w)
            os.close(log_w)
            os.write(info_w, str(init).encode())
            os.close(info_w)
            status = os.waitpid(init, 0)[1]
            # how the namespace's PID 1 ended, as a signal number (or 128 + exit code)
            os._exit(os.WTERMSIG(status) if os.WIFSIGNALED(status)
                     else 128 + os.WEXITSTATUS(status))
        except BaseException as exc:
            os.write(2, ("rehearse: %s\n" % describe_exception(exc)).encode())
            os._exit(EXIT_NO_NAMESPACE)
    os.close(log_w)
    os.close(info_w)
    said = b""
    while True:
        chunk = os.read(info_r, 4096)
        if not chunk:
            break
        said += chunk
    os.close(info_r)
    if not said.isdigit():
        os.waitpid(runner, 0)
        os.close(log_r)
        raise ClientError(EXIT_NO_NAMESPACE, "rehearse needs a PID namespace of its own, and "
                          "a user namespace for it unless run as root: %s. (Unprivileged user "
                          "namespaces may be off: sysctl user.max_user_namespaces, "
                          "kernel.unprivileged_userns_clone, or an AppArmor/SELinux rule.)"
                          % (said[1:].decode(errors="replace") or "the runner died"))
    return runner, int(said), log_r


class AgentLog:
    """The agent's log, read as it comes: its lines, each (seconds since boot, message)."""

    def __init__(self, fd):
        self.fd, self.text, self.events, self.closed = fd, b"", [], False

    def read(self, until):
        """Read what came, until the fd closes or `until` (monotonic) passes."""
        while not self.closed:
            left = until - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.closed = True
                return
            self.text += chunk
            *lines, self.text = self.text.split(b"\n")
            for line in lines:
                head, sep, message = line.decode("utf-8", "replace").partition(": ")
                stamp = head[1:head.find("]")] if head.startswith("[") else ""
                try:
                    self.events.append((float(stamp), message if sep else head))
                except ValueError:
                    self.events.append((None, line.decode("utf-8", "replace")))

    def wait_for(self, needle, until):
        while True:
            found = next((e for e in self.events if e[1].startswith(needle)), None)
            if found or self.closed or time.monotonic() >= until:
                return found
            self.read(min(until, time.monotonic() + 0.1))


def rehearsal_report(events):
    """The timeline and each process's fate, from the agent's log events."""
    import re
    process = re.compile(r"pid (\d+) \((.*?)\)(?: ([^;]*))?")
    t0 = next((t for t, m in events if m.startswith("shutdown requested (")), None)
    fates, timeline = {}, []
    if t0 is None:
        return None, [], fates
    term_at = grace_over = None
    for t, m in events:
        if t is None or t < t0:
            continue
        at = t - t0
        if m.startswith("shutdown requested ("):
            reason = m.split("(", 1)[1].split(")")[0]
            timeline.append((at, "stop requested: " + (
                "SIGUSR2, as busybox's poweroff sends" if reason == "signal %d" % signal.SIGUSR2
                else reason)))
        elif m.startswith("shutdown: SIGTERM sent to all processes"):
            term_at = at
            timeline.append((at, "SIGTERM and SIGCONT sent to every process"))
        elif m.startswith("shutdown: SIGTERM went to "):
            for pid, name, _ in process.findall(m[len("shutdown: SIGTERM went to "):]):
                fates[int(pid)] = {"pid": int(pid), "name": name, "fate": "exited",
                                   "after_s": None, "how": "exited on SIGTERM"}
        elif m.startswith("reaped pid "):
            pid = int(m.split()[2])
            how = m.split("(", 1)[1].rstrip(")") if "(" in m else ""
            if pid in fates and fates[pid]["fate"] == "exited" and grace_over is None:
                fates[pid].update(after_s=round(at - (term_at or 0.0), 3), status=how)
                timeline.append((at, "pid %d (%s) exited on SIGTERM (its status: %s)"
                                 % (pid, fates[pid]["name"], how)))
            elif pid in fates and fates[pid]["fate"] == "killed":
                timeline.append((at, "pid %d (%s) killed (%s)" % (pid, fates[pid]["name"], how)))
        elif m.startswith("shutdown: the grace (") and " is over and " in m:
            grace_over = at
            for pid, name, what in process.findall(m.split(": ", 2)[2]):
                entry = fates.setdefault(int(pid), {"pid": int(pid), "name": name})
                entry.update(fate="killed", after_s=None,
                             how="killed at the grace (%s)" % (what or "still running"))
            timeline.append((at, "grace over: " + m.split(": ", 2)[2]))
        elif m.startswith("shutdown: grace over, SIGKILL sent"):
            timeline.append((at, "SIGKILL sent to the rest"))
        elif m.startswith("shutdown: all processes gone"):
            timeline.append((at, "every process gone"))
        elif m.startswith("shutdown: filesystems synced"):
            timeline.append((at, "teardown: " + m[len("shutdown: "):]))
        elif m.startswith("shutdown: calling reboot("):
            timeline.append((at, "reboot() called"))
        elif m.startswith("shutdown: summary: "):
            timeline.append((at, "the agent's summary: " + m[len("shutdown: summary: "):]))
    for entry in fates.values():
        if entry["fate"] == "exited" and entry["after_s"] is None:
            entry["how"] = "exited on SIGTERM (reaped by its parent)"
    return t0, timeline, fates


def rehearse_main(argv):
    import argparse
    import json
    parser = argparse.ArgumentParser(
        prog="%s rehearse" % PROG,
        description="Run CMD as the workload of this agent, PID 1 of a new PID namespace (no "
        "VM, no root where unprivileged user namespaces are allowed), stop it after --after "
        "seconds the way busybox's poweroff does, and print the timeline and each process's "
        "fate.",
        epilog="exit status: 0 every process exited on SIGTERM within the grace, 1 some had to "
        "be killed, 2 usage, 3 the agent did not start, 4 the stop did not end within "
        "--timeout, 6 no namespaces here (the message says why)")
    parser.add_argument("--grace", metavar="SECONDS", type=float, default=5.0,
                        help="SIGTERM grace before SIGKILL (default 5)")
    parser.add_argument("--after", metavar="SECONDS", type=float, default=1.0,
                        help="how long the workload runs before the stop (default 1)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=None,
                        help="give up after this long (default: --after + --grace + %g)"
                        % REHEARSE_BOUNDS)
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    args = parser.parse_args(argv[1:])
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no workload: give -- CMD [ARG...]")
    if not (0 <= args.grace < 2 ** 31 and 0 <= args.after < 2 ** 31):
        parser.error("--grace and --after must be 0 or more seconds")
    timeout = args.timeout or args.after + args.grace + REHEARSE_BOUNDS
    agent_argv = own_command() + [
        "serve", "--log", "debug", "--grace", "%g" % args.grace, "--listen",
        "unix:@arcbox-rehearse-%d" % os.getpid(), "--qga", "off", "--watchdog", "off",
        "--power-button", "off", "--exec"] + command
    started = time.monotonic()
    try:
        runner, init, log_fd = start_rehearsal(agent_argv)
    except ClientError as exc:
        sys.stderr.write("%s rehearse: %s\n" % (PROG, exc))
        return exc.code
    log = AgentLog(log_fd)
    status, end = EXIT_OK, started + timeout
    try:
        begun = log.wait_for("started ", end) or log.wait_for("cannot start", end)
        if begun is None or begun[1].startswith("cannot start"):
            status = EXIT_UNREACHABLE
            sys.stderr.write("%s rehearse: the workload did not start: %s\n" % (
                PROG, begun[1] if begun else "no word from the agent"))
        log.read(min(end, time.monotonic() + args.after))
        os.kill(init, signal.SIGUSR2)           # busybox's poweroff
        log.read(end)
    finally:
        if not log.closed:                       # over time: end the namespace
            status = status or EXIT_TIMEOUT
            try:
                os.kill(init, signal.SIGKILL)
            except OSError:
                pass
        code = os.waitpid(runner, 0)[1]
        os.close(log_fd)
    ended = os.waitstatus_to_exitcode(code)
    t0, timeline, fates = rehearsal_report(log.events)
    killed = [f for f in fates.values() if f["fate"] == "killed"]
    powered_off = ended == signal.SIGINT          # reboot(POWER_OFF) in a PID namespace
    if status == EXIT_OK:
        status = EXIT_REFUSED if killed else EXIT_OK
        if not powered_off:
            status = EXIT_TIMEOUT
    outcome = ("every process exited on SIGTERM within the grace" if status == EXIT_OK else
               "%d process%s had to be killed at the grace" % (len(killed), "es" * (len(killed) != 1))
               if status == EXIT_REFUSED else "the stop did not end in a power-off")
    if args.json:
        print(json.dumps({"command": command, "grace": args.grace, "after": args.after,
                          "timeline": [[round(t, 3), what] for t, what in timeline],
                          "processes": sorted(fates.values(), key=lambda f: f["pid"]),
                          "powered_off": powered_off, "outcome": outcome,
                          "exit_status": status}, sort_keys=True))
        return status
    lines = ["rehearse: %s as the workload of %s, PID 1 of a new PID namespace; stopped after "
             "%gs as busybox's poweroff does, grace %gs" % (" ".join(command), PROG,
                                                             args.after, args.grace)]
    lines += ["timeline (seconds from the stop request):"]
    lines += ["  %+8.3f s  %s" % (t, what) for t, what in timeline]
    lines += ["processes:"] + (["  pid %d (%s): %s%s" % (
        f["pid"], f["name"], f["how"], " after %.3f s" % f["after_s"]
        if f.get("after_s") is not None else "")
        for f in sorted(fates.values(), key=lambda f: f["pid"])] or ["  (none)"])
    lines += ["outcome: %s%s" % (outcome, "" if powered_off else " (PID 1 ended with %s)"
                                 % describe_exit_code(ended))]
    print("\n".join(lines))
    return status


# =============================================================================================
# 13. main() and the entry point
# =============================================================================================


# ---- which command; PID 1's entry, which never returns --------------------------------------

def main(argv=None, is_init=False, inbox=None, kept=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in CLIENT_COMMANDS:
        return client_main(argv)
    if argv and argv[0] == "rehearse":
        return rehearse_main(argv)
    if len(argv) == 1 and argv[0] in UDHCPC_EVENTS and "interface" in os.environ:
        return udhcpc_script(argv[0], os.environ)      # run by udhcpc as its script
    if argv and argv[0] == "--version":
        _write(1, "%s %s\n" % (PROG, __version__))
        return EXIT_OK
    if argv and argv[0] == "serve":
        argv = argv[1:]
    return serve_main(argv, is_init, inbox=inbox, kept=kept)


def fallback_configs(config):
    """What PID 1 serves with after serving failed outright, in order: the user's
    configuration -- the action, the grace, who may ask, notify, the listeners, the power
    button -- but nothing that starts something (the workload, the network, the modules):
    one of those may be what failed; then the same without listeners; with no configuration
    read at all, the defaults without listeners."""
    if config is None:
        return [dict(default_config(), listen=[], qga="off")]
    calm = dict(config, exec=[], net=("none",), dns=[], modules=[])
    return [calm, dict(calm, listen=[], qga="off")]


def run_as_init():
    """PID 1 must never return or raise: either would panic the kernel. If serving fails
    outright, fall back to reaping, signals, the power button and the listeners with the
    user's configuration (fallback_configs). One signal inbox for PID 1's whole life: a
    poweroff that came while serving failed is still in it, and the fallback acts on it."""
    inbox, kept = None, {}
    try:
        inbox = SignalInbox().install()
        main(is_init=True, inbox=inbox, kept=kept)
    except BaseException as exc:   # noqa: B902 - including SystemExit and KeyboardInterrupt
        log("error", "agent failed: %s" % describe_exception(exc))
    configs = fallback_configs(kept.get("config"))
    while True:
        config = configs.pop(0) if len(configs) > 1 else configs[0]
        log("error", "serving stopped; falling back to reaping, signals%s with action %s, "
            "grace %gs; no workload, network or modules" % (
                " and " + ",".join(format_address(a) for a in config["listen"])
                if config["listen"] else "", config["action"], config["grace"]))
        try:
            if inbox is None:
                inbox = SignalInbox()
            if inbox.wake_r < 0:
                inbox.install()    # closed (or never opened): the pending signals stay
            Agent(config, is_init=True, inbox=inbox).run()
        except BaseException as exc:   # noqa: B902
            log("error", "fallback loop failed: %s" % describe_exception(exc))
            time.sleep(1)


def entry():
    """Entry point of the .pyz and the console script. Whether this is init is decided here,
    once: PID 1 has duties (and must never exit); anything else is a plain service."""
    if os.getpid() == 1:
        run_as_init()
    return main()


# Everything the module made lives as long as the process: moved out of the cyclic
# collector's reach (gc.freeze, made for this), so that no collection ever walks it again --
# nor writes to its pages, which a forked child (the module loader, the power-off child)
# shares copy-on-write with PID 1 -- and the interpreter's exit does not either.
gc.freeze()
start_step("agent module")


if __name__ == "__main__":
    raise SystemExit(entry())
