"""`arcbox-agent shutdown --wait` against real .pyz guests, each PID 1 of its own PID
namespace: the client waits until the guest is gone and says after how long; a guest still
up at --timeout gives exit 4 and what was last seen; several guests at once, one line each and
the worst status; the same over QGA (`--to qga:unix:PATH`) with guest-shutdown."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from nsguest import POWER_OFF_RETURNCODE, NamespaceGuest

pytestmark = pytest.mark.namespace

IGNORE_TERM = "(trap '' TERM; exec sleep 1000) &"
POLITE = "sleep 1000 &"


def client(pyz, *args, timeout=120):
    return subprocess.run([sys.executable, pyz] + list(args), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def guests(pyz, tmp_path, namespaces):
    """guests(n, setup, agent_args) -> n started guests, each in a directory of its own."""
    made = []

    def make(n, setup=POLITE, agent_args=()):
        out = []
        for i in range(n):
            work = tmp_path / ("g%d" % (len(made) + i))
            work.mkdir()
            g = NamespaceGuest(pyz, str(work), setup=setup, agent_args=list(agent_args))
            g.start()
            out.append(g)
        made.extend(out)
        for g in out:
            g.wait_ready()
        return out
    yield make
    for g in made:
        g.close()


def test_wait_says_when_the_guest_went_down(pyz, guests):
    g, = guests(1, IGNORE_TERM)
    began = time.monotonic()
    out = client(pyz, "shutdown", "--to", g.address, "--grace", "1", "--wait")
    took = time.monotonic() - began
    assert out.returncode == 0, out.stderr
    # (the connection's end shows as EOF or as a reset, as the kernel's teardown falls)
    m = re.match(r"powered off ([0-9.]+) s after the request \(the connection (closed|was "
                 r"reset), and nothing listens any more \(.*\)\)$", out.stdout.strip())
    assert m, out.stdout
    after = float(m.group(1))
    assert 1.0 <= after <= took                       # the grace, then the teardown
    assert g.wait(timeout=10) == POWER_OFF_RETURNCODE  # it really is gone


def test_json_carries_the_facts_and_timings(pyz, guests):
    g, = guests(1)
    out = client(pyz, "shutdown", "--to", g.address, "--grace", "2", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["gone"] is True and result["exit_status"] == 0 and result["accepted"]
    assert 0 <= result["accepted_after_s"] <= result["gone_after_s"] < 2.0  # polite: no grace
    assert result["to"] == g.address and "nothing listens" in result["seen"]


def test_a_timeout_shorter_than_the_grace_gives_4_and_what_was_seen(pyz, guests):
    g, = guests(1, IGNORE_TERM)
    out = client(pyz, "shutdown", "--to", g.address, "--grace", "5", "--wait",
                 "--timeout", "1.5")
    assert out.returncode == 4, (out.returncode, out.stdout, out.stderr)
    assert "still up" in out.stderr and "it last answered" in out.stderr, out.stderr
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE  # it goes down all the same, later


def test_three_guests_at_once_one_line_each(pyz, guests):
    three = guests(3, IGNORE_TERM)
    args = ["shutdown", "--grace", "1", "--wait"]
    for g in three:
        args += ["--to", g.address]
    began = time.monotonic()
    out = client(pyz, *args)
    took = time.monotonic() - began
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert sorted(line.split(": ", 1)[0] for line in lines) == sorted(g.address for g in three)
    assert all(": powered off " in line for line in lines), lines
    assert took < 1.0 + 10.0                          # at once, not one after another (3 x 1 s)
    for g in three:
        assert g.wait(timeout=10) == POWER_OFF_RETURNCODE


def test_the_worst_status_wins_among_several(pyz, guests, tmp_path):
    g, = guests(1)
    out = client(pyz, "shutdown", "--wait", "--to", g.address,
                 "--to", "unix:" + str(tmp_path / "nobody.sock"))
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "powered off" in out.stdout and "cannot connect" in out.stderr


def test_qga_guest_shutdown_waits_the_same_way(pyz, guests, tmp_path):
    qga = str(tmp_path / "qga.sock")
    g, = guests(1, POLITE, ["--qga", "unix:" + qga])
    ping = client(pyz, "ping", "--to", "qga:unix:" + qga)
    assert ping.returncode == 0 and "guest-ping answered" in ping.stdout, ping.stderr
    info = client(pyz, "info", "--to", "qga:unix:" + qga)
    assert info.returncode == 0 and "arcbox-agent" not in info.stderr, info.stderr
    assert re.search(r"guest agent\s+\S+, \d+ commands", info.stdout), info.stdout
    out = client(pyz, "shutdown", "--to", "qga:unix:" + qga, "--wait")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("powered off "), out.stdout
    assert g.wait(timeout=10) == POWER_OFF_RETURNCODE
    log = g.messages()
    assert any(m.startswith("shutdown requested (guest-shutdown from") for m in log), log


def test_usage_errors_name_what_qga_and_arcbox_cannot_carry(pyz, tmp_path):
    sock = "unix:" + str(tmp_path / "x.sock")
    for args, needle in ((["--to", "qga:" + sock, "--grace", "3"], "carries no grace"),
                         (["--to", sock, "--action", "reboot"], "carries no action"),
                         (["--to", "qga:vsock:3"], "needs its port"),
                         (["--to", "qga:hvsock:/x:3"], "unix: or vsock:")):
        out = client(pyz, "shutdown", *args)
        assert out.returncode == 2 and needle in out.stderr, (args, out.stderr)
