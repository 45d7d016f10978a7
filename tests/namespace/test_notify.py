"""systemd's VM notify protocol from the real .pyz as PID 1: READY=1 once it serves, and at
shutdown X_SYSTEMD_SHUTDOWN with EXIT_STATUS (the workload's own status when its exit ends
the guest), to Unix receivers of every kind; a receiver that is missing or never reads costs
nothing."""

import socket
import time

import pytest

from nsguest import POWER_OFF_RETURNCODE, REBOOT_RETURNCODE

pytestmark = pytest.mark.namespace


def messages_at(sock, count, timeout=20):
    sock.settimeout(timeout)
    return [sock.recv(65536).decode() for _ in range(count)]


def fields(message):
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


def workload_ends_the_guest(guest, tmp_path, script):
    """A guest whose workload (sh -c script) ends it, told to a datagram receiver: (the
    guest, once powered off, the READY message, the shutdown message)."""
    path = str(tmp_path / "notify.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    g = guest(agent_args=["--notify", path, "--on-exit", "poweroff",
                          "--exec", "sh", "-c", script], wait_ready=False)
    ready, down = messages_at(rx, 2)
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    return g, ready, down


def test_ready_then_shutdown_with_the_workloads_exit_status_to_a_datagram_receiver(
        guest, tmp_path):
    g, ready, down = workload_ends_the_guest(guest, tmp_path, "sleep 0.5; exit 3")
    ready, down = fields(ready), fields(down)
    assert ready["READY"] == "1" and "serving on unix:" in ready["STATUS"]
    assert ready["X_SYSTEMD_HOSTNAME"]
    assert down == {"X_SYSTEMD_SHUTDOWN": "poweroff", "EXIT_STATUS": "3"}
    log = g.messages()
    assert "shutdown: poweroff, exit status 3" in log          # the console says it too
    assert log.index("shutdown: poweroff, exit status 3") < next(
        i for i, m in enumerate(log) if m.startswith("shutdown: calling reboot("))


def test_a_stream_receiver_gets_one_message_per_connection(guest, tmp_path):
    path = str(tmp_path / "notify.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rx.bind(path)
    rx.listen(4)
    rx.settimeout(20)
    g = guest("sleep 1000 &", agent_args=["--notify", "unix:" + path, "--action", "reboot"])
    got = []
    for _ in range(2):
        if len(got) == 1:
            g.shutdown(grace=5)
        conn, _ = rx.accept()
        data = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break                                          # one message, then EOF
            data += chunk
        got.append(fields(data.decode()))
        conn.close()
    assert g.wait(timeout=30) == REBOOT_RETURNCODE
    assert got[0]["READY"] == "1"
    assert got[1] == {"X_SYSTEMD_SHUTDOWN": "reboot", "EXIT_STATUS": "0"}


@pytest.mark.parametrize("receiver", ["missing", "never reads"])
def test_a_missing_or_stalled_receiver_costs_nothing(guest, tmp_path, receiver):
    path = str(tmp_path / "notify.sock")
    if receiver == "never reads":
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        rx.bind(path)
        rx.listen(0)                                           # never accepts, never reads
    g = guest("sleep 1000 &", agent_args=["--notify", path])
    asked = time.monotonic()
    assert g.shutdown(grace=30) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE
    assert time.monotonic() - asked < 2.0
    events = g.events()
    took = next(t for t, _, m in events if "calling reboot(" in m) - next(
        t for t, _, m in events if "shutdown requested" in m)
    assert took < 0.1, "the notify delayed power-off by %.3fs" % took
    warnings = [m for _, level, m in events if level == "warn" and "notify" in m]
    if receiver == "missing":
        assert len(warnings) == 1 and "no further notify errors" in warnings[0], warnings
    assert "internal error" not in g.log()


def test_a_workload_killed_by_a_signal_is_exit_status_128_plus_n(guest, tmp_path):
    """The README's EXIT_STATUS rule: a workload that dies of signal N ends the guest with
    EXIT_STATUS=128+N (here SIGKILL: 137), as a shell reports it."""
    g, _, down = workload_ends_the_guest(guest, tmp_path, "sleep 0.5; kill -KILL $$")
    assert fields(down) == {"X_SYSTEMD_SHUTDOWN": "poweroff", "EXIT_STATUS": "137"}
    assert "shutdown: poweroff, exit status 137" in g.messages()
