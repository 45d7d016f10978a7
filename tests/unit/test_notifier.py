"""The notify protocol's pieces: addresses, the vmm.notify_socket credential from the
cmdline and from SMBIOS type 11, the Notifier against real Unix receivers."""

import socket
import struct
import time

import pytest

import agent

EVENT = struct.Struct("llHHi")


def event(ev_type, code, value):
    return EVENT.pack(0, 0, ev_type, code, value)


# --- addresses and the credential ---------------------------------------------------------

@pytest.mark.parametrize("text,parsed", [
    ("vsock:2:9999", ("vsock", ("dgram", "seqpacket", "stream"), 2, 9999)),
    ("vsock-stream:2:1", ("vsock", ("stream",), 2, 1)),
    ("vsock-dgram:host:7", ("vsock", ("dgram",), 2, 7)),
    ("vsock-seqpacket:3:7", ("vsock", ("seqpacket",), 3, 7)),
    ("/run/host/notify", ("unix", ("dgram", "seqpacket", "stream"), "/run/host/notify")),
    ("@notify", ("unix", ("dgram", "seqpacket", "stream"), "@notify")),
    ("unix:/tmp/n", ("unix", ("dgram", "seqpacket", "stream"), "/tmp/n")),
    ("", None), ("none", None),
])
def test_notify_addresses(text, parsed):
    assert agent.parse_notify_address(text) == parsed


@pytest.mark.parametrize("text", ["vsock:2", "tcp:1.2.3.4:5", "relative/path", "vsock:x:1",
                                  "vsock:2:99999999999", "@"])
def test_bad_notify_addresses_say_why(text):
    with pytest.raises(agent.ConfigError):
        agent.parse_notify_address(text)


def smbios_type11(*strings):
    body = b"".join(s + b"\0" for s in strings) + b"\0"
    return bytes([11, 5, 0, 0, len(strings)]) + body


def test_the_credential_from_the_cmdline_wins_over_smbios(tmp_path):
    (tmp_path / "11-0").mkdir()
    (tmp_path / "11-0" / "raw").write_bytes(smbios_type11(
        b"io.systemd.credential:vmm.notify_socket=vsock:2:1000"))
    cmdline = 'quiet systemd.set_credential=vmm.notify_socket:vsock-stream:2:42 ro'
    assert agent.notify_credential(cmdline, str(tmp_path)) == ("vsock-stream:2:42",
                                                               "kernel cmdline")
    assert agent.notify_credential("quiet", str(tmp_path)) == ("vsock:2:1000", "SMBIOS type 11")


def test_smbios_strings_other_credentials_binary_and_garbage(tmp_path):
    import base64
    entries = {"11-0": smbios_type11(b"io.systemd.credential:other=x", b"vendor string"),
               "11-1": b"\x0b",                                 # truncated: ignored
               "11-2": smbios_type11(b"io.systemd.credential.binary:vmm.notify_socket="
                                     + base64.b64encode(b"vsock:2:77"))}
    for name, raw in entries.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "raw").write_bytes(raw)
    assert agent.notify_credential("", str(tmp_path)) == ("vsock:2:77", "SMBIOS type 11")
    assert agent.notify_credential("", str(tmp_path / "missing")) == (None, None)
    assert agent.smbios_strings(b"\x0b\xff\x00") == []


# --- the Notifier against real receivers ------------------------------------------------------

def receiver(path, kind):
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(path)
    if kind != socket.SOCK_DGRAM:
        s.listen(4)
    s.settimeout(5)
    return s


def test_datagram_receiver_gets_one_message_per_send(tmp_path):
    path = str(tmp_path / "n")
    r = receiver(path, socket.SOCK_DGRAM)
    n = agent.Notifier(agent.parse_notify_address(path))
    n.send("READY=1\nSTATUS=x\n")
    n.send("X_SYSTEMD_SHUTDOWN=poweroff\nEXIT_STATUS=3\n")
    assert r.recv(4096) == b"READY=1\nSTATUS=x\n"
    assert r.recv(4096) == b"X_SYSTEMD_SHUTDOWN=poweroff\nEXIT_STATUS=3\n"
    assert not n.busy()


def test_stream_receiver_reads_one_message_to_eof(tmp_path):
    path = str(tmp_path / "n")
    r = receiver(path, socket.SOCK_STREAM)
    n = agent.Notifier(agent.parse_notify_address(path))   # dgram, seqpacket fail: stream
    n.send("READY=1\n")
    conn, _ = r.accept()
    got = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            break
        got += chunk
    assert got == b"READY=1\n" and n.types == ["stream"]


def test_missing_and_stalled_receivers_cost_nothing(tmp_path, capfd):
    n = agent.Notifier(agent.parse_notify_address(str(tmp_path / "nobody")))
    started = time.monotonic()
    n.send("READY=1\n")
    n.send("READY=1\n")
    assert time.monotonic() - started < 0.5 and not n.busy()
    path = str(tmp_path / "stalled")
    r = receiver(path, socket.SOCK_DGRAM)                   # never reads
    n = agent.Notifier(agent.parse_notify_address(path))
    started = time.monotonic()
    for _ in range(2000):                                   # fills its queue, then drops
        n.send("X" * 200)
    assert time.monotonic() - started < 2.0 and not n.busy()
    r.close()
    err = capfd.readouterr().err
    assert err.count("notify %s" % path) == 1, err          # logged once
