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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import agent  # noqa: E402  (the codec, for pinging without a subprocess)

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


class NamespaceGuest:
    """The agent as PID 1 of its own PID namespace, listening on a Unix socket.

    `setup` is shell run by the namespace's first process before it execs the agent, so the
    processes it starts in the background become the agent's children. `init`, if given, is
    shell exec'd instead of the agent (a fake PID 1 for delegate mode); $AGENT holds the
    agent's command line there. A new UTS namespace keeps hostname changes inside.
    """

    def __init__(self, pyz, workdir, setup="", agent_args=(), python=None, log_level="debug",
                 init=None, redirect=""):
        self.pyz = os.path.abspath(pyz)
        self.workdir = workdir
        self.sock = os.path.join(workdir, "agent.sock")
        self.log_path = os.path.join(workdir, "agent.log")
        self.setup = setup
        self.agent_args = list(agent_args)
        self.python = python or sys.executable
        self.log_level = log_level
        self.init = init
        self.redirect = redirect
        self.proc = None
        self.started = None

    @property
    def address(self):
        return "unix:" + self.sock

    def start(self):
        agent_cmd = " ".join(shlex.quote(a) for a in [
            self.python, self.pyz, "--listen", self.address, "--log", self.log_level]
            + self.agent_args)
        if self.init:
            script = "%s\nAGENT=%s exec %s\n" % (self.setup, shlex.quote(agent_cmd), self.init)
        else:
            script = "%s\nexec %s %s\n" % (self.setup, agent_cmd, self.redirect)
        self.log_file = open(self.log_path, "wb")
        self.started = time.monotonic()
        # --kill-child: if unshare dies (a test aborted), the namespace dies with it.
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "--kill-child", "sh", "-c",
             script],
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
            cwd=self.workdir)
        return self

    def wait_ready(self, timeout=20.0):
        """Ping until the agent answers; returns the seconds it took."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the namespace exited (%s) before the agent was ready:\n%s"
                                   % (self.proc.returncode, self.log()))
            try:
                self.request(agent.MSG_PING, b"", timeout=1.0)
                return time.monotonic() - self.started
            except (OSError, agent.ClientError) as exc:
                last = exc
                time.sleep(0.01)
        raise RuntimeError("agent not ready after %gs (%s):\n%s" % (timeout, last, self.log()))

    def request(self, msg_type, payload=b"", timeout=5.0):
        return request(self.sock, msg_type, payload, timeout)

    def shutdown(self, grace=0, timeout=5.0):
        return ask_shutdown(self.sock, grace, timeout)

    def wait(self, timeout=60.0):
        """Wait for the namespace to end; returns unshare's returncode (-2: power-off)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("the namespace did not end within %gs:\n%s" % (timeout,
                                                                             self.log()))

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()       # --kill-child takes the namespace down with it
            self.proc.wait(10)

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
        if getattr(self, "log_file", None):
            self.log_file.close()


def request(unix_path, msg_type, payload=b"", timeout=5.0):
    """One request to the agent behind a Unix socket (or a QEMU chardev); the answer's
    payload, or agent.ClientError."""
    client = agent.Client(("unix", unix_path), timeout)
    try:
        client.connect()
        return client.request(msg_type, payload)
    finally:
        client.close()


def ask_shutdown(unix_path, grace=0, timeout=5.0):
    payload = agent.encode_message(agent.SHUTDOWN_REQUEST, {"timeout_seconds": grace})
    reply = request(unix_path, agent.MSG_SHUTDOWN, payload, timeout)
    return agent.decode_message(agent.SHUTDOWN_RESPONSE, reply)["accepted"]


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


def log_events(text):
    """Agent log lines -> [(seconds since boot, level, message)]."""
    events = []
    for line in text.splitlines():
        if not line.startswith("[") or "] arcbox-agent " not in line:
            continue
        stamp, _, rest = line[1:].partition("] arcbox-agent ")
        level, _, message = rest.partition(": ")
        try:
            events.append((float(stamp), level, message))
        except ValueError:
            pass
    return events


def boot_clock():
    """The clock the agent stamps its log lines with (seconds since boot)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)
