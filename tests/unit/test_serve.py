"""The serving loop over a Unix socket, the agent not PID 1 (no privileges needed)."""

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest

import agent
from helpers import RawClient, start_agent


@pytest.fixture
def served(pyz, tmp_path):
    proc = start_agent(pyz, tmp_path, "--idle-timeout", "2")
    yield proc
    proc.stop()


def ping_payload(message=""):
    return agent.encode_message(agent.PING_REQUEST, {"message": message})


def error_of(frame):
    assert frame[0] == agent.MSG_ERROR, frame
    return agent.decode_error(frame[2])


def test_many_exchanges_on_one_connection_and_trace_ids_echoed(served):
    c = RawClient(served.sock)
    for i in range(50):
        rtype, trace, payload = c.request(agent.MSG_PING, ping_payload(str(i)), b"t%d" % i)
        assert (rtype, trace) == (0x1001, b"t%d" % i)
        assert agent.decode_message(agent.PING_RESPONSE, payload)["message"] == "pong: %d" % i
    c.close()


def test_pipelined_and_byte_by_byte_requests(served):
    c = RawClient(served.sock)
    frames = b"".join(agent.encode_frame(agent.MSG_PING, ping_payload(str(i))) for i in range(5))
    c.send(frames)
    assert [agent.decode_message(agent.PING_RESPONSE, c.frame()[2])["message"]
            for _ in range(5)] == ["pong: %d" % i for i in range(5)]
    for byte in agent.encode_frame(agent.MSG_GET_SYSTEM_INFO, b"", b"slow"):
        c.send(bytes([byte]))
        time.sleep(0.001)
    rtype, trace, payload = c.frame()
    assert (rtype, trace) == (0x1002, b"slow")
    info = agent.decode_message(agent.SYSTEM_INFO, payload)
    assert info["kernel_version"] == os.uname().release and info["os_name"] == "Linux"
    assert len(info["load_average"]) == 3 and info["total_memory"] > info["available_memory"] > 0
    assert info["cpu_count"] == os.cpu_count() and info["uptime"] > 0
    c.close()


@pytest.mark.parametrize("msg_type,code,text", [
    (0x0777, 400, "unknown message type 0x0777"),
    (0x1001, 400, "0x1001 is not a request"),
    (0x0000, 400, "0x0000 is not a request"),
    (0xFFFF, 400, "0xFFFF is not a request"),
    (0x0003, 501, "EnsureRuntime (0x0003) is not implemented"),
])
def test_unknown_and_unsupported_types_get_an_error_and_the_connection_stays(served, msg_type,
                                                                              code, text):
    c = RawClient(served.sock)
    got_code, message = error_of(c.request(msg_type, b"", b"tr"))
    assert got_code == code and text in message
    assert c.request(agent.MSG_PING)[0] == 0x1001        # still in step
    c.close()


def test_malformed_protobuf_gets_error_400_and_the_connection_stays(served):
    c = RawClient(served.sock)
    code, message = error_of(c.request(agent.MSG_PING, b"\x0a\x05ab"))
    assert code == 400 and message.startswith("invalid request: ") and "overruns" in message
    assert c.request(agent.MSG_PING)[0] == 0x1001
    c.close()


def test_trace_overrun_gets_error_and_stream_stays_in_step(served):
    c = RawClient(served.sock)
    c.send(struct.pack(">IIH", 7, agent.MSG_PING, 40) + b"x")
    assert "trace length" in error_of(c.frame())[1]
    assert c.request(agent.MSG_PING)[0] == 0x1001
    c.close()


def test_oversized_frame_gets_error_then_close_without_allocating(served):
    c = RawClient(served.sock)
    c.send(struct.pack(">II", 0xFFFFFFF0, agent.MSG_PING))
    code, message = error_of(c.frame())
    assert code == 400 and "exceeds the limit of 65536" in message
    assert c.frame() is None                              # closed: the stream is lost
    c.close()
    assert served.proc.poll() is None
    assert RawClient(served.sock).request(agent.MSG_PING)[0] == 0x1001


def test_eof_mid_frame_and_silent_clients_do_not_hurt(served):
    c = RawClient(served.sock)
    c.send(agent.encode_frame(agent.MSG_PING, ping_payload("x"))[:7])
    c.close()
    silent = RawClient(served.sock, timeout=10)
    started = time.monotonic()
    assert silent.frame() is None                         # closed by the idle timeout (2 s)
    assert time.monotonic() - started >= 1.5
    assert RawClient(served.sock).request(agent.MSG_PING)[0] == 0x1001
    assert "closed mid-frame" in served.log() and "idle connection" in served.log()


def test_shutdown_is_refused_when_not_pid1_and_nothing_is_signalled(served):
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        code, message = error_of(RawClient(served.sock).request(
            agent.MSG_SHUTDOWN, agent.encode_message(agent.SHUTDOWN_REQUEST,
                                                     {"timeout_seconds": 1})))
        assert code == 503 and "not PID 1" in message
        time.sleep(0.3)
        assert sentinel.poll() is None and served.proc.poll() is None
        assert RawClient(served.sock).request(agent.MSG_PING)[0] == 0x1001
    finally:
        sentinel.kill()
        sentinel.wait()


@pytest.fixture
def served_public(pyz):
    """An agent whose socket directory an unprivileged user can reach (tmp_path is 0700)."""
    workdir = tempfile.mkdtemp(prefix="arcbox-public-")
    os.chmod(workdir, 0o755)
    proc = start_agent(pyz, workdir)
    yield proc
    proc.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def test_shutdown_from_a_non_root_peer_is_refused_with_the_reason(served_public):
    served = served_public
    # Import first, then drop to nobody: the interpreter's own files may be unreadable to it.
    code = ("import sys; sys.path.insert(0, %r); import os, agent, helpers;"
            "os.setgid(65534); os.setuid(65534);"
            "c = helpers.RawClient(%r);"
            "f = c.request(agent.MSG_SHUTDOWN);"
            "print(f[0], agent.decode_error(f[2]))") % (os.path.dirname(__file__) + "/..",
                                                       served.sock)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("65535 (403, ") and "uid 65534 is not allowed" in out.stdout


def test_sigterm_stops_an_agent_that_is_not_pid1_and_removes_its_socket(served):
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(10) == 0
    assert not os.path.exists(served.sock)
    assert "no power-off" in served.log()


def test_bad_flags_exit_2_with_a_reason(pyz):
    out = subprocess.run([sys.executable, pyz, "--grace", "forever"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "--grace: 'forever' is not a duration" in out.stderr
    out = subprocess.run([sys.executable, pyz, "--help"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "--listen ADDR" in out.stdout and "hvsock:" in out.stdout


def test_a_listener_that_cannot_bind_is_retried_while_the_others_serve(pyz, tmp_path):
    late_dir = tmp_path / "not-yet"
    late = str(late_dir / "late.sock")
    proc = start_agent(pyz, tmp_path, "--listen", "unix:" + str(tmp_path / "agent.sock"),
                        "--listen", "unix:" + late)
    try:
        assert RawClient(proc.sock).request(agent.MSG_PING)[0] == 0x1001   # serves meanwhile
        time.sleep(0.3)
        late_dir.mkdir()                    # the "transport" appears, as vsock does on load
        deadline = time.monotonic() + 15
        while not os.path.exists(late):
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.05)
        assert RawClient(late).request(agent.MSG_PING)[0] == 0x1001
        log = proc.log()
        assert "warn: cannot listen on unix:%s" % late in log and "retrying in 0.1s" in log
        assert "listening on unix:%s" % late in log
    finally:
        proc.stop()


def test_a_failing_handler_gets_error_500_and_the_agent_keeps_serving(tmp_path):
    sock = str(tmp_path / "a.sock")
    code = ("import sys; sys.path.insert(0, %r); import agent\n"
            "def boom(): raise RuntimeError('injected fault')\n"
            "agent.gather_system_info = boom\n"
            "sys.exit(agent.main(['--listen', 'unix:' + %r]))"
            % (os.path.dirname(agent.__file__), sock))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        c = RawClient(sock)
        code_, message = error_of(c.request(agent.MSG_GET_SYSTEM_INFO))
        assert code_ == 500 and "RuntimeError: injected fault" in message
        assert c.request(agent.MSG_PING)[0] == 0x1001          # same connection, still served
        c.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert b"internal error answering GetSystemInfo" in proc.stderr.read()


def test_power_off_is_refused_off_linux_with_a_warning(monkeypatch):
    pol = agent.RequestPolicy(agent.default_config()["allow"], True, True)
    monkeypatch.setattr(agent.sys, "platform", "darwin")
    with pytest.raises(agent.Refused, match="only supported on Linux"):
        agent.handle_request(agent.MSG_SHUTDOWN, b"", ("unix", 1, 0, 0), pol)


def test_out_of_descriptors_does_not_spin_and_service_resumes(pyz, tmp_path):
    """RLIMIT_NOFILE 16: connections beyond it wait in the backlog while accept() fails
    with EMFILE; the agent must not spin on them, and must serve again once fds free up."""
    import resource
    sock = str(tmp_path / "a.sock")

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))

    proc = subprocess.Popen([sys.executable, pyz, "--listen", "unix:" + sock],
                            stderr=subprocess.PIPE, preexec_fn=low_limit)
    clients = []
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        for _ in range(30):                 # more than the agent can hold
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(sock)
            clients.append(c)
        time.sleep(0.5)

        def cpu_ticks():
            with open("/proc/%d/stat" % proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])      # utime + stime

        before = cpu_ticks()
        time.sleep(1.0)
        used = cpu_ticks() - before
        assert used < 30, "the agent spun: %d ticks of CPU in 1 s while out of fds" % used
        for c in clients:
            c.close()
        clients = []
        deadline = time.monotonic() + 10
        while True:                         # service resumes once descriptors are free
            try:
                assert RawClient(sock, timeout=1).request(agent.MSG_PING)[0] == 0x1001
                break
            except OSError:
                assert time.monotonic() < deadline, "service did not resume"
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(10)
    lines = proc.stderr.read().decode().splitlines()
    first = next(i for i, l in enumerate(lines) if "Too many open files" in l)
    recovered = next(i for i, l in enumerate(lines) if "works again" in l)
    # one warning for the whole starved second, not one per retry
    assert [l for l in lines[first:recovered] if "accept on" in l] == [lines[first]], lines


def test_boot_time_waits_are_bounded():
    """modprobe at boot runs before the event loop: a stuck one is killed at the bound."""
    pid = agent.run_in_child(lambda: os.execv("/bin/sleep", ["sleep", "30"]))
    started = time.monotonic()
    assert agent._wait_bounded(pid, 0.3) is None
    assert time.monotonic() - started < 5
    pid = agent.run_in_child(lambda: os.execv("/bin/sh", ["sh", "-c", "exit 3"]))
    assert os.waitstatus_to_exitcode(agent._wait_bounded(pid, 10)) == 3


def test_a_unix_socket_path_appears_only_once_it_listens(tmp_path, monkeypatch):
    """A client that waits for the socket file (supervisors do; so do our tests) must never
    find it refusing connections: the path is bound and listened on under another name and
    renamed into place. Checked at the moment of listen(): the path is not there yet."""
    path = str(tmp_path / "agent.sock")
    seen_at_listen = []

    class Watched(socket.socket):
        def listen(self, *args):
            seen_at_listen.append(os.path.exists(path))
            return super().listen(*args)
    monkeypatch.setattr(agent.socket, "socket", Watched)
    listener = agent.SocketListener(("unix", path), None)
    listener.open(time.monotonic())
    monkeypatch.undo()
    try:
        assert seen_at_listen == [False]
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o666)
        assert os.listdir(str(tmp_path)) == ["agent.sock"]        # nothing staged left
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.close()
    finally:
        listener.close()
    assert not os.path.exists(path)


def test_a_unix_socket_path_too_long_to_stage_is_bound_in_place(tmp_path):
    """The staging name is longer than the path: where it would not fit in sun_path, the
    path is bound directly, as before, and still serves."""
    folder = tmp_path / ("d" * (agent.SUN_PATH_MAX - len(str(tmp_path)) - 12))
    folder.mkdir()
    path = str(folder / "a.sock")
    assert len(path) <= agent.SUN_PATH_MAX and agent._staging_name(path) is None
    listener = agent.SocketListener(("unix", path), None)
    listener.open(time.monotonic())
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.close()
    finally:
        listener.close()
