"""Network basics as PID 1, in network namespaces of the test's own (nothing leaves them):
lo brought up with ioctls, a static address and default route on a veth, and the .pyz as
udhcpc's script applying a lease (and refusing bad ones)."""

import os
import shlex
import subprocess
import sys

import pytest

import agent
from helpers import wait_for

pytestmark = pytest.mark.namespace
# sysfs shows the network namespace of whoever mounts it: mount our own (the mount
# namespace is private), so that /sys/class/net is the guest's
OWN_SYSFS = "mount -t sysfs sysfs /sys\n"


def test_pid1_brings_lo_up_before_the_workload(guest, tmp_path):
    before, after, connect = (str(tmp_path / n) for n in ("before", "after", "connect"))
    probe = ("import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); "
             "socket.create_connection(s.getsockname(), timeout=5); print('LO-OK')")
    g = guest(OWN_SYSFS + "cat /sys/class/net/lo/flags > %s" % shlex.quote(before), net=True,
              agent_args=["--exec", "/bin/sh", "-c", "cat /sys/class/net/lo/flags > %s; %s -c "
                          "%s > %s 2>&1" % (shlex.quote(after), shlex.quote(sys.executable),
                                            shlex.quote(probe), shlex.quote(connect))])
    wait_for(lambda: os.path.exists(connect) and open(connect).read(), what="the probe")
    assert int(open(before).read(), 16) & 1 == 0, "lo was already up: the test proves nothing"
    assert int(open(after).read(), 16) & 1 == 1
    assert open(connect).read().strip() == "LO-OK"
    assert "network: lo up" in g.messages()


def test_a_static_address_and_default_route_on_a_veth(guest, tmp_path):
    out = str(tmp_path / "ip")
    g = guest(OWN_SYSFS + "ip link add v0 type veth peer name v1", net=True,
              agent_args=["--net", "v0:192.0.2.10/24:192.0.2.1", "--exec", "/bin/sh", "-c",
                          "{ ip -4 -o addr show v0; ip route show default; } > %s"
                          % shlex.quote(out)])
    wait_for(lambda: os.path.exists(out) and "default" in open(out).read(), what="ip output")
    text = open(out).read()
    assert "inet 192.0.2.10/24" in text and "default via 192.0.2.1 dev v0" in text, text
    assert "network: v0 192.0.2.10/24 via 192.0.2.1" in g.messages()
    info = agent.decode_message(agent.SYSTEM_INFO, g.request(agent.MSG_GET_SYSTEM_INFO))
    assert info["ip_addresses"] == ["192.0.2.10"]


def udhcpc_event(pyz, tmp_path, env, event="bound"):
    """Run the .pyz as udhcpc would, in a new network and mount namespace with a veth,
    /etc/resolv.conf bind-mounted from a file of the test's and a tmpfs on /run (the host's
    files are never touched)."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("")
    assigns = " ".join("%s=%s" % (k, shlex.quote(v)) for k, v in env.items())
    script = ("ip link add v0 type veth peer name v1 && mount -t tmpfs tmpfs /run && "
              "mount --bind %s /etc/resolv.conf && "
              "env %s %s %s %s; echo EXIT=$?; ip -4 -o addr show v0; ip route show default"
              % (shlex.quote(str(resolv)), assigns, shlex.quote(sys.executable),
                 shlex.quote(pyz), event))
    out = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr, resolv.read_text()


def test_the_pyz_as_udhcpc_script_applies_exactly_the_lease(pyz, tmp_path, namespaces):
    out, resolv = udhcpc_event(pyz, tmp_path, {
        "interface": "v0", "ip": "10.9.8.7", "subnet": "255.255.255.0",
        "router": "10.9.8.1 10.9.8.2", "dns": "10.9.8.53 10.9.8.54", "lease": "3600"})
    assert "EXIT=0" in out, out
    assert "inet 10.9.8.7/24" in out and "default via 10.9.8.1 dev v0" in out, out
    assert "dhcp: v0 10.9.8.7/24 via 10.9.8.1" in out
    assert resolv == "nameserver 10.9.8.53\nnameserver 10.9.8.54\n"


@pytest.mark.parametrize("env,why", [
    ({"ip": "10.9.8.777", "mask": "24"}, "is not an IPv4 address"),
    ({"ip": "10.9.8.7", "mask": "99"}, "prefix 99 is out of range"),
    ({"ip": "10.9.8.7", "subnet": "255.0.255.0"}, "is not a netmask"),
    ({"ip": "10.9.8.7", "mask": "24", "router": "gateway"}, "is not an IPv4 address"),
])
def test_bad_lease_values_are_refused_with_a_log_line(pyz, tmp_path, namespaces, env, why):
    out, resolv = udhcpc_event(pyz, tmp_path, dict(env, interface="v0"))
    assert "EXIT=1" in out and "lease refused" in out and why in out, out
    assert "inet " not in out and "default via" not in out, out      # nothing applied
    assert resolv == ""


def test_a_crashing_udhcpc_is_retried_with_back_off_and_nothing_else_suffers(guest, tmp_path):
    """udhcpc that dies at once (a fake bind-mounted over busybox, in this namespace only):
    respawned with a doubling back-off, logged each time; serving and power-off unaffected."""
    fake = tmp_path / "fake-udhcpc"
    fake.write_text("#!/bin/sh\necho fake udhcpc $*\nexit 1\n")
    fake.chmod(0o755)
    g = guest(OWN_SYSFS + "ip link add v0 type veth peer name v1\n"
              "mount --bind %s /bin/busybox" % shlex.quote(str(fake)), net=True,
              agent_args=["--net", "dhcp:v0"])
    wait_for(lambda: sum("udhcpc exited with status 1" in m for m in g.messages()) >= 3,
             timeout=20, what="three udhcpc exits")
    backoffs = [m.split("respawning in ")[1] for m in g.messages()
                if m.startswith("udhcpc exited with status 1") and "respawning in" in m]
    assert backoffs[:3] == ["0.5s", "1s", "2s"], backoffs
    # and it waits that long: each exit to the next start, on the log's stamps
    events = g.events()
    exits = [t for t, _, m in events if m.startswith("udhcpc exited with status 1")]
    starts = [t for t, _, m in events if m.startswith("started ") and "udhcpc" in m]
    gaps = [next(s for s in starts if s > e) - e for e in exits[:2]]
    for gap, wanted in zip(gaps, (0.5, 1.0)):
        assert wanted - 0.001 <= gap <= wanted + 0.1, (gaps, exits, starts)
    assert g.request(agent.MSG_PING)
    assert g.shutdown(grace=5) is True
    assert g.wait(timeout=30) == -2
    assert "internal error" not in g.log()


def test_no_udhcpc_is_said_once_and_nothing_else_suffers(guest, tmp_path):
    plain = tmp_path / "not-executable"
    plain.write_text("")
    g = guest(OWN_SYSFS + "ip link add v0 type veth peer name v1\n"
              "mount --bind %s /bin/busybox" % shlex.quote(str(plain)), net=True,
              agent_args=["--net", "dhcp:v0"])
    assert sum("there is no udhcpc" in m for m in g.messages()) == 1, g.messages()
    assert g.shutdown(grace=5) is True
    assert g.wait(timeout=30) == -2
