"""Drive a running arcbox-agent: the one helper behind every kind of guest we start.

A GuestProcess is a process that runs the agent, writes the agent's log somewhere we can
read, and can be reached on a Unix socket: a plain agent subprocess (AgentProcess, below), a
PID-namespace guest (nsguest.NamespaceGuest) or a QEMU VM whose virtio-serial port QEMU
exposes as a socket (vm.VM). Start it, wait until it answers a Ping, send requests, read its
log as events, wait for it to end. Used by the tests, the benchmarks and `build.py --demo`.
"""

import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import agent  # noqa: E402  (the codec and the client)

# "[   12.345678] arcbox-agent info: message": the agent's log line, on a console or a file
_LOG_LINE = re.compile(r"\[\s*([\d.]+)\] %s (\w+): ([^\r\n]*)" % re.escape(agent.PROG))


def log_events(text):
    """The agent's log lines in text (a log file or a console with kernel lines between)
    -> [(seconds since boot, level, message)]."""
    return [(float(stamp), level, message) for stamp, level, message in _LOG_LINE.findall(text)]


def boot_clock():
    """The clock the agent stamps its log lines with (seconds since boot)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


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


class GuestProcess:
    """A started agent we talk to over `sock`. Subclasses say how to start it (command(),
    and after_start() to wait for something) and where its log is (log_path); output_path
    receives the process's own output (the log itself, unless the log is elsewhere)."""

    what = "the agent"
    ready_timeout = 20.0           # default for wait_ready()
    request_timeout = 5.0          # default for request() and shutdown()

    def __init__(self, workdir, sock, log_path, output_path=None):
        self.workdir = workdir
        self.sock = sock
        self.log_path = log_path
        self.output_path = output_path or log_path
        self.proc = None
        self.started = None
        self._output = None

    @property
    def address(self):
        return "unix:" + self.sock

    def command(self):
        raise NotImplementedError

    def popen_options(self):
        return {}

    def after_start(self):
        pass

    def start(self):
        self._output = open(self.output_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=self._output, stderr=subprocess.STDOUT,
                                     **self.popen_options())
        self.after_start()
        return self

    def wait_for_socket(self, timeout):
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited (%s) before making %s:\n%s"
                                   % (self.what, self.proc.returncode, self.sock, self.tail()))
            if time.monotonic() > deadline:
                raise RuntimeError("%s made no %s within %gs:\n%s"
                                   % (self.what, self.sock, timeout, self.tail()))
            time.sleep(0.01)

    def wait_ready(self, timeout=None, try_timeout=1.0):
        """Ping until the agent answers (each try waiting try_timeout for the answer);
        returns the seconds since start()."""
        timeout = timeout or self.ready_timeout
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s ended (%s) before the agent answered:\n%s"
                                   % (self.what, self.proc.returncode, self.tail()))
            try:
                self.request(agent.MSG_PING, b"", timeout=try_timeout)
                return time.monotonic() - self.started
            except (OSError, agent.ClientError) as exc:
                last = exc
                time.sleep(0.01)
        raise RuntimeError("the agent did not answer within %gs (%s):\n%s"
                           % (timeout, last, self.tail()))

    def wait_log(self, needle, timeout=60.0):
        """Wait until needle appears in the log (the process may end meanwhile)."""
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if self.proc.poll() is not None and needle not in self.log():
                raise RuntimeError("%s ended (%s) before %r appeared:\n%s"
                                   % (self.what, self.proc.returncode, needle, self.tail()))
            if time.monotonic() > deadline:
                raise RuntimeError("no %r within %gs:\n%s" % (needle, timeout, self.tail()))
            time.sleep(0.05)

    def request(self, msg_type, payload=b"", timeout=None):
        return request(self.sock, msg_type, payload, timeout or self.request_timeout)

    def shutdown(self, grace=0, timeout=None):
        return ask_shutdown(self.sock, grace, timeout or self.request_timeout)

    def wait(self, timeout=60.0):
        """Wait for the process to end; returns its returncode. Kills it at the timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("%s did not end within %gs:\n%s" % (self.what, timeout,
                                                                    self.tail()))

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, chars=4000):
        return self.log()[-chars:]

    def events(self):
        return log_events(self.log())

    def messages(self):
        """The agent's log messages, without time and level."""
        return [message for _, _, message in self.events()]

    def close(self):
        self.kill()
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class ServerProcess(GuestProcess):
    """Any command that serves the wire protocol on a Unix socket, not as PID 1: the agent
    (AgentProcess) or a baseline server in the benchmarks. Ready once the socket exists."""

    what = "the server"

    def __init__(self, command, sock, log_path=os.devnull):
        GuestProcess.__init__(self, os.path.dirname(sock), sock, log_path)
        self._command = list(command)

    def command(self):
        return self._command

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        return GuestProcess.start(self)

    def after_start(self):
        self.wait_for_socket(30)

    def stop(self):
        """SIGTERM (the agent not as PID 1 stops on it), then the returncode."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close()
        return self.proc.returncode


class AgentProcess(ServerProcess):
    """The agent as a plain process (not PID 1) on workdir/agent.sock, logging to
    workdir/agent.log: serving, never powering off."""

    what = "the agent"

    def __init__(self, pyz, workdir, *args, python=None, log_level="debug"):
        workdir = str(workdir)
        sock = os.path.join(workdir, "agent.sock")
        ServerProcess.__init__(self, list(python or [sys.executable]) + [
            pyz, "--listen", "unix:" + sock, "--log", log_level] + list(args), sock,
            os.path.join(workdir, "agent.log"))
