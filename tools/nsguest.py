"""Run the real arcbox-agent.pyz as PID 1 of a new PID namespace: a "guest" with no VM.

`unshare --pid --fork --mount-proc` gives the agent a real PID 1 life: kill(-1) reaches only
the namespace, every orphan is re-parented to it, and reboot(2) works as the oracle: the
kernel kills the namespace's init, and its parent sees "killed by SIGINT" for power-off and
halt, SIGHUP for reboot. Needs root (CAP_SYS_ADMIN for the namespaces, CAP_SYS_BOOT).

Used by the namespace tests, the benchmarks and `build.py --demo`.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys

from guestctl import GuestProcess

POWER_OFF_RETURNCODE = -signal.SIGINT   # the namespace init killed by SIGINT
REBOOT_RETURNCODE = -signal.SIGHUP


def why_namespaces_unavailable():
    """None when a PID namespace can be made here, else the reason in one line."""
    if not sys.platform.startswith("linux"):
        return "PID namespaces are a Linux feature; this is %s" % sys.platform
    if shutil.which("unshare") is None:
        return "the unshare command is missing (Debian: apt-get install util-linux)"
    if os.geteuid() != 0:
        return ("not root: a PID namespace whose init may call reboot(2) needs CAP_SYS_ADMIN "
                "and CAP_SYS_BOOT (run as root, e.g. sudo)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return "unshare --pid --fork --mount-proc failed: %s" % (probe.stderr.strip() or
                                                               "exit %d" % probe.returncode)
    return None


class NamespaceGuest(GuestProcess):
    """The agent as PID 1 of its own PID namespace, listening on a Unix socket.

    `setup` is shell run by the namespace's first process before it execs the agent, so the
    processes it starts in the background become the agent's children. `init`, if given, is
    shell exec'd instead of the agent (a fake PID 1 for delegate mode); $AGENT holds the
    agent's command line there. A new UTS namespace keeps hostname changes inside; with
    net=True a new network namespace keeps addresses and routes inside too.
    """

    what = "the namespace"

    def __init__(self, pyz, workdir, setup="", agent_args=(), python=None, log_level="debug",
                 init=None, redirect="", net=False):
        GuestProcess.__init__(self, workdir, os.path.join(workdir, "agent.sock"),
                              os.path.join(workdir, "agent.log"))
        self.pyz = os.path.abspath(pyz)
        self.setup = setup
        self.agent_args = list(agent_args)
        self.python = python or sys.executable
        self.log_level = log_level
        self.init = init
        self.redirect = redirect
        self.net = net             # a network namespace of its own too (lo down, no links)

    def command(self):
        agent_cmd = " ".join(shlex.quote(a) for a in [
            self.python, self.pyz, "--listen", self.address, "--log", self.log_level]
            + self.agent_args)
        if self.init:
            script = "%s\nAGENT=%s exec %s\n" % (self.setup, shlex.quote(agent_cmd), self.init)
        else:
            script = "%s\nexec %s %s\n" % (self.setup, agent_cmd, self.redirect)
        # --kill-child: if unshare dies (a test aborted), the namespace dies with it.
        return ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "--kill-child"] + (
            ["--net"] if self.net else []) + ["sh", "-c", script]

    def popen_options(self):
        return {"cwd": self.workdir}

    def init_pid(self):
        """The agent's pid as the host sees it (unshare's only child)."""
        for pid in _children(self.proc.pid):
            return pid
        return None

    def processes(self):
        """{host pid: state letter} for every process in the namespace but its init."""
        init = self.init_pid()
        result = {}
        todo = _children(init) if init else []
        while todo:
            pid = todo.pop()
            state = _state(pid)
            if state is not None:
                result[pid] = state
                todo.extend(_children(pid))
        return result


    def commands(self):
        """{host pid: command line} for every process in the namespace but its init (the
        agent's own power-off helper shows up as the agent's command line)."""
        found = {}
        for pid in self.processes():
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    found[pid] = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            except OSError:
                pass
        return found


def _children(pid):
    found = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                found.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    return found


def _state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
