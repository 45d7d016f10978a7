"""The QEMU guest agent protocol without a guest: the stream scanner (objects split anywhere,
strings with braces and escapes, 0xFF resets, limits), the QMP envelope and argument checks,
the clock and utmp arithmetic, and the Freezer's order and timeout with a fake kernel."""

import calendar
import errno
import json
import os
import subprocess
import sys

import pytest

import agent
from helpers import utmp_record

PEER = ("unix", 1, 0, 0)


class NoFreezer:
    guest = agent.GuestMounts()
    frozen = []


def protocol(max_frame=65536, peer=PEER, allow="cid:2,uid:0,serial", can_power_off=True):
    policy = agent.RequestPolicy(agent._parse_allow(allow), can_power_off, owns_clock=False)
    return agent.QgaProtocol(agent.QgaMachine(policy, NoFreezer()), max_frame, peer)


def feed(proto, chunks):
    """Push chunks through take() as the server does; returns (answers, effects)."""
    buf = bytearray()
    out, effects = [], []
    for chunk in chunks:
        buf += chunk
        while buf:
            turn = proto.take(buf)
            if turn is None:
                break
            consumed, reply, effect, close = turn
            assert consumed > 0 and not close
            del buf[:consumed]
            if reply:
                out.append(reply)
            if effect is not None:
                effects.append(effect)
    return out, effects, bytes(buf)


def answers(raw_replies):
    found = []
    for raw in raw_replies:
        assert raw.endswith(b"\n")
        found.append(json.loads(raw.lstrip(b"\xff")))
    return found


def test_an_object_split_at_every_byte_with_braces_quotes_and_escapes_in_strings():
    request = (b'{"execute": "guest-sync", "id": "a}\\"{[\\\\", '
               b'"arguments": {"id": 7}}')
    out, _, rest = feed(protocol(), [bytes([b]) for b in request])
    assert answers(out) == [{"return": 7, "id": 'a}"{[\\'}] and rest == b""


def test_several_objects_in_one_read_without_newlines_each_answered_in_order():
    out, _, _ = feed(protocol(), [b'{"execute":"guest-sync","arguments":{"id":1}}'
                                  b'{"execute":"guest-ping"}\r\n\t{"execute":"guest-sync",'
                                  b'"arguments":{"id":3}}'])
    assert answers(out) == [{"return": 1}, {"return": {}}, {"return": 3}]


def test_ff_drops_partial_input_even_inside_a_string_and_the_next_request_is_answered():
    out, _, _ = feed(protocol(), [b'{"execute": "guest-sync", "arguments": {"id": "ab',
                                  b'\xff', b'{"execute":"guest-sync","arguments":{"id":2}}'])
    assert answers(out) == [{"return": 2}]


def test_sync_delimited_answers_with_a_leading_ff():
    out, _, _ = feed(protocol(), [b'\xff{"execute":"guest-sync-delimited","arguments":{"id":9}}'])
    assert out == [b'\xff{"return": 9}\n']


@pytest.mark.parametrize("bad,desc", [
    (b'xyz ', "stray 'xyz'"),
    (b'{"execute": "guest-ping",}', "JSON parse error"),
    (b'{"execute": NaN}', "JSON parse error"),
    (b'{"execute": "guest-ping"\xc3\x28}', "JSON parse error"),
    (b'[1, 2]', "must be a JSON object"),
    (b'{"arguments": {}}', "lacks member 'execute'"),
    (b'{"execute": 5}', "'execute' must be a string"),
    (b'{"execute": "guest-ping", "arguments": []}', "'arguments' must be an object"),
    (b'{"execute": "guest-ping", "bogus": 1}', "member 'bogus' is unexpected"),
    (b'{"execute": "guest-sync"}', "Parameter 'id' is missing"),
    (b'{"execute": "guest-sync", "arguments": {"id": "1"}}', "for 'id', expected: integer"),
    (b'{"execute": "guest-sync", "arguments": {"id": true}}', "for 'id', expected: integer"),
    (b'{"execute": "guest-ping", "arguments": {"x": 1}}', "Parameter 'x' is unexpected"),
    (b'{"execute": "guest-fsfreeze-freeze-list", "arguments": {"mountpoints": [1]}}',
     "for 'mountpoints[0]', expected: string"),
    (b'{"execute": "guest-shutdown", "arguments": {"mode": "explode"}}', "'mode'"),
    (b'[' * 65 + b']' * 65, "nesting deeper than 64"),
])
def test_bad_input_gets_a_generic_error_and_the_next_request_is_answered(bad, desc):
    after = b'{"execute":"guest-sync","arguments":{"id":5}}'
    out, _, rest = feed(protocol(), [bad, after])
    got = answers(out)
    assert len(got) == 2, got
    assert got[0]["error"]["class"] == "GenericError" and desc in got[0]["error"]["desc"], got
    assert got[1] == {"return": 5} and rest == b""
    # whole (json's one-step path) or a byte at a time (the scanner): the same answers
    out, _, _ = feed(protocol(), [bytes([b]) for b in bad + after])
    assert answers(out) == got


def test_unknown_commands_are_command_not_found_with_the_id_echoed():
    for name in ("guest-nonsense", "guest-file-delete", "nonsense"):
        out, _, _ = feed(protocol(), [json.dumps({"execute": name, "id": [1, "x"]}).encode()])
        assert answers(out) == [{"error": {"class": "CommandNotFound", "desc": "The command "
                                           "%s has not been found" % name}, "id": [1, "x"]}]


def test_disabled_commands_answer_before_any_argument_is_looked_at():
    # off by default: qemu-ga 10's answer for a blocked command, the id echoed
    for name in ("guest-exec", "guest-file-open", "guest-set-user-password"):
        out, _, _ = feed(protocol(), [json.dumps({"execute": name, "arguments": {"x": 1},
                                                  "id": [1, "x"]}).encode()])
        assert answers(out) == [{"error": {"class": "CommandNotFound", "desc": "Command %s "
                                           "has been disabled: the command is not allowed"
                                           % name}, "id": [1, "x"]}]


def test_the_allow_and_block_lists():
    default = agent.qga_enabled(None, ())
    assert default == set(agent.QGA_COMMANDS) - agent.QGA_OFF_BY_DEFAULT
    assert agent.qga_enabled(("guest-ping",), ()) == {"guest-ping"}          # strict
    assert agent.qga_enabled(("default", "guest-exec"), ()) == default | {"guest-exec"}
    assert agent.qga_enabled(("default", "guest-exec"), ("guest-exec", "guest-ping")) == \
        default - {"guest-ping"}                                               # block wins
    assert agent.qga_enabled(None, ("guest-get-load",)) == default - {"guest-get-load"}
    parse = dict((o[0], o[2]) for o in agent.SERVE_OPTIONS)
    assert parse["qga_allow"]("default,guest-exec") == ("default", "guest-exec")
    with pytest.raises(agent.ConfigError, match="'guest-exce' is not a QGA command"):
        parse["qga_allow"]("default,guest-exce")
    with pytest.raises(agent.ConfigError, match="'default' is not a QGA command"):
        parse["qga_block"]("default")
    # the names the configuration knows are the commands there are
    assert set(agent.QGA_COMMAND_NAMES) == set(agent.QGA_COMMANDS)
    assert agent.QGA_OFF_BY_DEFAULT <= set(agent.QGA_COMMANDS)


def test_os_release_values_are_unquoted_as_os_release_5_says():
    text = ('NAME="Arc \\"Box\\""\nID=arc\nPRETTY_NAME=\'It\'\\\'\'s\'\n'
            'VARIANT="A \\$dollar \\\\ and \\q \\\' "\nVERSION=unquoted\\ words\n'
            'VERSION_ID="open\n# comment\n')
    values = agent.parse_os_release(text)
    assert values == {"NAME": 'Arc "Box"', "ID": "arc", "PRETTY_NAME": "It's",
                      "VARIANT": "A $dollar \\ and q ' ", "VERSION": "unquoted words"}


def test_base64_is_as_lenient_and_as_strict_as_qemus():
    assert agent.qga_base64_decode("aGVsbG8=") == b"hello"
    assert agent.qga_base64_decode("aGVsbG8") == b"hel"        # an unfinished group dropped
    assert agent.qga_base64_decode("aGVs\nbG8=\n") == b"hello"
    with pytest.raises(agent.QgaError, match="Base64 data contains invalid characters"):
        agent.qga_base64_decode("aGVs bG8=")


def test_exec_output_is_kept_up_to_the_limit_then_said_truncated(monkeypatch):
    monkeypatch.setattr(agent, "QGA_EXEC_MAX_OUTPUT", 10)
    stream = agent.ExecStream(True)
    for chunk in (b"12345", b"67890ab", b"cd"):
        stream.take(chunk)
    assert b"".join(stream.chunks) == b"1234567890" and stream.truncated


def test_an_ipv6_route_field_is_read_as_qemu_ga_reads_it_into_an_int():
    assert agent._int32("ffffffff") == -1
    assert agent._int32("00000100") == 256


def test_an_object_over_the_frame_limit_is_refused_once_while_it_dribbles_in():
    proto = protocol(max_frame=1024)
    big = b'{"execute": "guest-sync", "arguments": {"id": 1, "pad": "' + b"}" * 5000 + b'"}}'
    chunks = [big[i:i + 7] for i in range(0, len(big), 7)]
    out, _, rest = feed(proto, chunks + [b'{"execute":"guest-sync","arguments":{"id":6}}'])
    got = answers(out)
    assert [a.get("return") for a in got] == [None, 6], got
    assert "larger than 1024 bytes" in got[0]["error"]["desc"]
    assert rest == b""


def test_deep_nesting_is_skipped_to_its_end_without_recursing():
    out, _, _ = feed(protocol(), [b'{"a":' + b'[' * 100000, b']' * 100000 + b'}',
                                  b'{"execute":"guest-ping"}'])
    got = answers(out)
    assert len(got) == 2 and "nesting" in got[0]["error"]["desc"] and got[1] == {"return": {}}


def test_guest_shutdown_has_no_answer_and_its_effect_carries_the_mode():
    out, effects, _ = feed(protocol(), [b'{"execute":"guest-shutdown","arguments":'
                                        b'{"mode":"reboot"}}{"execute":"guest-shutdown"}'])
    assert out == [] and effects == [("guest-shutdown", 0, "reboot"), ("guest-shutdown", 0, "poweroff")]


def test_guarded_commands_follow_the_allow_list_and_power_off_needs_pid1():
    out, effects, _ = feed(protocol(allow="cid:2"), [b'{"execute":"guest-shutdown"}',
                                                     b'{"execute":"guest-fsfreeze-thaw"}',
                                                     b'{"execute":"guest-ping"}'])
    got = answers(out)
    assert effects == [] and "not allowed" in got[0]["error"]["desc"]
    assert "not allowed" in got[1]["error"]["desc"] and got[2] == {"return": {}}
    out, effects, _ = feed(protocol(can_power_off=False), [b'{"execute":"guest-shutdown"}'])
    assert effects == [] and "not PID 1" in answers(out)[0]["error"]["desc"]


def test_set_time_is_refused_to_a_unix_peer_and_to_an_agent_that_is_not_pid1():
    for peer in (PEER, ("serial", "org.qemu.guest_agent.0")):
        out, _, _ = feed(protocol(peer=peer), [b'{"execute":"guest-set-time"}'])
        assert "clock is set only by the host" in answers(out)[0]["error"]["desc"]


def test_guest_info_lists_every_command_kubevirt_requires():
    out, _, _ = feed(protocol(), [b'{"execute":"guest-info"}'])
    info = answers(out)[0]["return"]
    names = {c["name"]: c for c in info["supported_commands"]}
    for name in ("guest-ping", "guest-get-time", "guest-info", "guest-shutdown",
                 "guest-network-get-interfaces", "guest-get-fsinfo", "guest-get-host-name",
                 "guest-get-users", "guest-get-timezone", "guest-get-osinfo"):
        assert names[name]["enabled"] is True
    assert names["guest-shutdown"]["success-response"] is False
    assert info["version"] == agent.__version__


def test_days_from_civil_is_timegm():
    for year in (1969, 1970, 1999, 2000, 2024, 2038, 2100, 2400):
        for month in (1, 2, 3, 12):
            for day in (1, 28):
                assert agent.days_from_civil(year, month, day) * 86400 == \
                    calendar.timegm((year, month, day, 0, 0, 0))


def test_utmp_records_give_each_user_once_with_the_first_login():
    """The records packed field by field from glibc's <bits/utmp.h> (tests/helpers.py), not
    with the agent's own struct: a wrong layout of ours fails here."""
    def record(kind, user, sec, usec=0):
        return utmp_record(user, "pts/0", 1, sec, usec, kind=kind)
    data = (record(7, "root", 200) + record(8, "gone", 50)     # 7 USER_, 8 DEAD_PROCESS
            + record(7, "alice", 100, 500000) + record(7, "root", 150))
    assert len(data) == 4 * 384
    assert agent.parse_utmp(data) == [("alice", 100.5), ("root", 150.0)]


class FakeDisks:
    def __init__(self, fail=None, unsupported=()):
        self.calls, self.fail, self.unsupported, self.frozen = [], fail, unsupported, set()

    def freeze(self, target):
        self.calls.append(("freeze", target))
        if target in self.unsupported:
            return errno.EOPNOTSUPP
        if target == self.fail:
            return errno.EIO
        self.frozen.add(target)
        return 0

    def thaw(self, target):
        self.calls.append(("thaw", target))
        if target not in self.frozen:
            return errno.EINVAL                    # the kernel's answer: it was not frozen
        self.frozen.discard(target)
        return 0


def outcome_of(errand):
    """An errand's outcome, its body run here and now (a test's stand-in for the child)."""
    try:
        return ("ok", errand.body())
    except agent.QgaError as exc:
        return ("error", exc.klass, str(exc))


def done(errand):
    """An errand run here: its finish() on its body's outcome."""
    return errand.finish(outcome_of(errand))


class InlineErrands:
    def run(self, errand, on_done):
        on_done(outcome_of(errand))


@pytest.fixture
def three_disks(monkeypatch):
    mounts = [("/", "ext4", False, 1), ("/data", "ext4", False, 2), ("/data/x", "xfs", False, 3),
              ("/odd", "vfat", False, 4)]
    monkeypatch.setattr(agent.GuestMounts, "disk_filesystems",
                        lambda self, writable_only=False: mounts)


def test_freeze_in_mount_order_thaw_in_reverse_and_skip_what_cannot_freeze(three_disks):
    disks = FakeDisks(unsupported={"/odd"})
    freezer = agent.Freezer(600, InlineErrands(), kernel=disks)
    assert done(freezer.freeze(None, "test")) == 3
    assert freezer.frozen == ["/", "/data", "/data/x"]
    with pytest.raises(agent.QgaError):            # frozen already
        freezer.freeze(None, "test")
    assert done(freezer.thaw("test")) == 3
    thaws = [t for kind, t in disks.calls if kind == "thaw"]
    assert thaws[:3] == ["/data/x", "/data", "/"] and freezer.frozen == []


def test_a_failed_freeze_thaws_what_was_frozen_and_says_which(three_disks):
    disks = FakeDisks(fail="/data/x")
    freezer = agent.Freezer(600, InlineErrands(), kernel=disks)
    with pytest.raises(agent.QgaError, match="failed to freeze /data/x"):
        done(freezer.freeze(None, "test"))
    assert freezer.frozen == [] and ("thaw", "/data") in disks.calls


def test_freeze_list_freezes_only_guest_disks_and_leaves_the_rest_out(three_disks):
    # as qemu-ga: a mount point that is not one of them is left out, not an error
    disks = FakeDisks()
    freezer = agent.Freezer(600, InlineErrands(), kernel=disks)
    assert done(freezer.freeze(["/proc", "/nowhere"], "test")) == 0
    assert disks.calls == []
    done(freezer.thaw("test"))
    disks.calls.clear()
    assert done(freezer.freeze(["/data"], "test")) == 1 and freezer.frozen == ["/data"]


def test_a_forgotten_freeze_is_thawed_at_its_deadline(three_disks, monkeypatch):
    disks = FakeDisks()
    freezer = agent.Freezer(30, InlineErrands(), kernel=disks)
    done(freezer.freeze(["/data"], "test"))
    due = freezer.deadline()
    assert due == pytest.approx(freezer.frozen_at + 30)
    freezer.tick(due - 0.01)
    assert freezer.frozen == ["/data"]
    freezer.tick(due)
    assert freezer.frozen == [] and ("thaw", "/data") in disks.calls
    assert freezer.deadline() is None
    never = agent.Freezer(0, InlineErrands(), kernel=disks)
    done(never.freeze(["/data"], "test"))
    assert never.deadline() is None


def test_json_is_imported_only_when_qga_is_first_used():
    code = r"""
import sys
sys.path.insert(0, sys.argv[1])
import agent
proto = agent.ArcBoxProtocol(agent.RequestPolicy(agent._parse_allow("any"), False, False),
                             65536, ("unix", 1, 0, 0))
assert proto.take(bytearray(agent.encode_frame(agent.MSG_PING))) is not None
agent.Agent(agent.default_config(), False)
before = "json" in sys.modules
qga = agent.QgaProtocol(agent.QgaMachine(None, None), 65536, ("unix", 1, 0, 0))
qga.take(bytearray(b'{"execute":"guest-ping"}'))
print(before, "json" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code,
                          os.path.dirname(os.path.abspath(agent.__file__))],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "True"], out.stderr


def test_vsock_peers_follow_the_allow_list():
    host, local = ("vsock", 2, 1234), ("vsock", 1, 1234)
    out, effects, _ = feed(protocol(peer=local), [b'{"execute":"guest-shutdown"}'])
    assert effects == [] and "vsock peer cid 1" in answers(out)[0]["error"]["desc"]
    out, effects, _ = feed(protocol(peer=host), [b'{"execute":"guest-shutdown"}'])
    assert out == [] and effects == [("guest-shutdown", 0, "poweroff")]


@pytest.mark.parametrize("text,expected", [
    ("auto", "auto"), ("off", "off"), ("none", "off"),
    ("serial:org.qemu.guest_agent.0", ("serial", "org.qemu.guest_agent.0")),
    ("vsock:any:9999", ("vsock", agent.VMADDR_CID_ANY, 9999)),
    ("unix:/run/qga.sock", ("unix", "/run/qga.sock")),
])
def test_qga_addresses_parse(text, expected):
    assert agent._parse_qga(text) == expected


@pytest.mark.parametrize("text", ["vsock:any", "hvsock:/tmp/v.sock:1", "tcp:1", ""])
def test_bad_qga_addresses_are_refused_with_a_reason(text):
    with pytest.raises(agent.ConfigError):
        agent._parse_qga(text)


def test_qga_is_on_the_usual_port_as_pid1_only_unless_told():
    assert agent.qga_addresses("auto", True) == [("serial", agent.QGA_PORT_NAME)]
    assert agent.qga_addresses("auto", False) == []
    assert agent.qga_addresses("off", True) == []
    assert agent.qga_addresses(("unix", "/x"), False) == [("unix", "/x")]
    config, problems = agent.build_config({}, {"qga": "vsock:any"})
    assert config["qga"] == "auto" and "needs a port" in problems[0][1]
    config, problems = agent.build_config({"freeze_timeout": ["0"]}, {})
    assert config["freeze_timeout"] == 0.0 and problems == []


def test_a_suspend_the_kernel_does_not_offer_is_refused_in_qemu_gas_words(monkeypatch):
    offered = {"/sys/power/state": "freeze mem\n", "/sys/power/disk": "[platform] shutdown\n"}
    monkeypatch.setattr(agent, "_read_text", lambda path, limit=1 << 20: offered.get(path, ""))
    started = []

    class Errands:
        def run(self, errand, on_done):
            started.append(errand.what)
    machine = agent.QgaMachine(None, None, errands=Errands())
    for name in ("guest-suspend-disk", "guest-suspend-hybrid"):
        with pytest.raises(agent.QgaError, match="^the requested suspend mode is not "
                                                 "supported by the guest$"):
            agent.qga_suspend(name)(machine, PEER, {})
    assert started == []
    assert agent.qga_suspend("guest-suspend-ram")(machine, PEER, {}) is None   # no answer
    offered["/sys/power/state"] = "freeze mem disk\n"
    with pytest.raises(agent.QgaError):          # hybrid needs `suspend` in /sys/power/disk
        agent.qga_suspend("guest-suspend-hybrid")(machine, PEER, {})
    agent.qga_suspend("guest-suspend-disk")(machine, PEER, {})
    offered["/sys/power/disk"] = "[platform] shutdown reboot suspend\n"
    agent.qga_suspend("guest-suspend-hybrid")(machine, PEER, {})
    assert started == ["guest-suspend-ram", "guest-suspend-disk", "guest-suspend-hybrid"]
