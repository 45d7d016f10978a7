"""Configuration: defaults < kernel cmdline (arcbox.*) < flags; bad values fall back."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import agent


def config_of(argv=(), cmdline=""):
    flags, problems, _ = agent.parse_serve_flags(list(argv))
    found, cmd_problems = agent.parse_cmdline(cmdline)
    config, value_problems = agent.build_config(flags, found)
    return config, problems + cmd_problems + [t for _, t in value_problems]


def test_defaults():
    config, problems = config_of()
    assert problems == []
    assert config["listen"] == [("vsock", agent.VMADDR_CID_ANY, 1024)]
    assert config["grace"] == 25.0 and config["action"] == "poweroff"
    assert config["allow"] == {"cid": {2}, "uid": {0}, "any": False, "serial": True}


def test_cmdline_keys_and_flags_win():
    cmdline = ("BOOT_IMAGE=/vmlinuz console=ttyS0 quiet arcbox.grace=5 arcbox.action=reboot "
               "arcbox.listen=unix:/run/a.sock arcbox.listen=vsock:any:2000 init=/init")
    config, problems = config_of(["--grace", "7s"], cmdline)
    assert problems == []
    assert config["grace"] == 7.0                 # the flag wins
    assert config["action"] == "reboot"           # from the cmdline
    assert config["listen"] == [("unix", "/run/a.sock"), ("vsock", agent.VMADDR_CID_ANY, 2000)]


def test_repeated_listen_flags_replace_the_default_and_add_up():
    config, _ = config_of(["--listen", "unix:/a", "--listen=vsock:3:99,unix:@abs"])
    assert config["listen"] == [("unix", "/a"), ("vsock", 3, 99), ("unix", "@abs")]


@pytest.mark.parametrize("word,key,expected", [
    ("arcbox.grace=soon", "grace", 25.0),
    ("arcbox.grace=-1", "grace", 25.0),
    ("arcbox.grace=nan", "grace", 25.0),
    ("arcbox.action=explode", "action", "poweroff"),
    ("arcbox.listen=tcp:1.2.3.4", "listen", [("vsock", agent.VMADDR_CID_ANY, 1024)]),
    ("arcbox.listen=vsock:any:99999999999", "listen", [("vsock", agent.VMADDR_CID_ANY, 1024)]),
    ("arcbox.max_frame=1", "max_frame", 65536),
    ("arcbox.allow=cid:x", "allow", {"cid": {2}, "uid": {0}, "any": False, "serial": True}),
    ("arcbox.log=loud", "log", "info"),
])
def test_bad_cmdline_values_are_named_and_the_default_kept(word, key, expected):
    config, problems = config_of(cmdline="quiet " + word)
    assert config[key] == expected
    assert len(problems) == 1
    assert problems[0].startswith("arcbox.%s: " % key) and "keeping" in problems[0]


def test_unknown_and_valueless_cmdline_keys_are_reported():
    _, problems = config_of(cmdline="arcbox.colour=blue arcbox.grace")
    assert any("unknown key arcbox.colour" in p for p in problems)
    assert any("arcbox.grace needs =VALUE" in p for p in problems)


def test_bad_flags_are_reported_not_raised():
    _, problems = config_of(["--nope", "--grace"])
    assert "unknown argument '--nope'" in problems[0]
    assert "--grace needs a value" in problems[1]


@pytest.mark.parametrize("text,addr", [
    ("vsock:3", ("vsock", 3, 1024)),
    ("vsock:host:5000", ("vsock", 2, 5000)),
    ("vsock:any:1024", ("vsock", 0xFFFFFFFF, 1024)),
    ("unix:/run/x.sock", ("unix", "/run/x.sock")),
    ("hvsock:/tmp/fc.vsock", ("hvsock", "/tmp/fc.vsock", 1024)),
    ("hvsock:/tmp/fc.vsock:52", ("hvsock", "/tmp/fc.vsock", 52)),
    ("hvsock:/tmp/a:b.vsock", ("hvsock", "/tmp/a:b.vsock", 1024)),
])
def test_addresses(text, addr):
    assert agent.parse_address(text) == addr


@pytest.mark.parametrize("text", ["", "vsock", "vsock:", "tcp:1:2", "vsock:x", "vsock:3:-1"])
def test_bad_addresses(text):
    with pytest.raises(agent.ConfigError):
        agent.parse_address(text)


def test_a_guest_does_not_listen_on_hybrid_vsock():
    _, problems = config_of(["--listen", "hvsock:/x"])
    assert "host-side address" in problems[0]


@pytest.mark.parametrize("text,seconds", [("25", 25.0), ("1.5", 1.5), ("2s", 2.0),
                                          ("500ms", 0.5)])
def test_durations(text, seconds):
    assert agent.parse_seconds(text) == seconds


def test_quoted_cmdline_values_are_one_word_like_the_kernel_makes_them():
    assert agent.split_cmdline('a "b c" arcbox.exec="/bin/sh -l" x="" ') == [
        "a", "b c", "arcbox.exec=/bin/sh -l", "x="]
    config, problems = config_of(cmdline='quiet arcbox.exec="/bin/sh -l" arcbox.on_exit=respawn')
    assert problems == [] and config["exec"] == ["/bin/sh", "-l"]
    assert config["on_exit"] == "respawn"


def test_exec_takes_the_rest_of_the_command_line_and_switches_take_no_value():
    config, problems = config_of(["--delegate", "--kmsg", "--exec", "sh", "-c", "echo --grace 1"])
    assert problems == []
    assert config["exec"] == ["sh", "-c", "echo --grace 1"] and config["grace"] == 25.0
    assert config["delegate"] is True and config["kmsg"] is True
    _, problems = config_of(["--exec"])
    assert problems == ["--exec needs a command"]


@pytest.mark.parametrize("word,key,expected", [
    ("arcbox.modules=vsock_loopback,virtio_console", "modules",
     ["vsock_loopback", "virtio_console"]),
    ("arcbox.hostname=guest-1", "hostname", "guest-1"),
    ("arcbox.delegate=yes", "delegate", True),
    ("arcbox.allow=cid:2,cid:1,uid:1000", "allow", {"cid": {1, 2}, "uid": {1000}, "any": False, "serial": False}),
])
def test_pid1_keys(word, key, expected):
    config, problems = config_of(cmdline=word)
    assert problems == [] and config[key] == expected


@pytest.mark.parametrize("word,key,expected", [
    ("arcbox.on_exit=explode", "on_exit", "ignore"),
    ("arcbox.hostname=" + "x" * 65, "hostname", ""),
    ("arcbox.delegate=maybe", "delegate", False),
])
def test_bad_pid1_keys_keep_the_default(word, key, expected):
    config, problems = config_of(cmdline=word)
    assert config[key] == expected and len(problems) == 1 and "keeping" in problems[0]


def test_modules_dep_orders_dependencies_first(tmp_path):
    (tmp_path / "modules.dep").write_text(
        "kernel/net/vmw_vsock/vsock_loopback.ko: kernel/net/vmw_vsock/"
        "vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko\n"
        "kernel/net/vmw_vsock/vsock.ko:\n"
        "kernel/drivers/char/virtio-console.ko.xz:\n")
    table = agent.modules_dep(str(tmp_path))
    base = str(tmp_path) + "/kernel/net/vmw_vsock/"
    assert table["vsock_loopback"] == [base + "vsock.ko",
                                       base + "vmw_vsock_virtio_transport_common.ko",
                                       base + "vsock_loopback.ko"]
    assert table["virtio_console"] == [str(tmp_path) + "/kernel/drivers/char/virtio-console.ko.xz"]


@pytest.mark.parametrize("text,words", [
    ("/bin/sh -c 'sleep 1; exec poweroff'", ["/bin/sh", "-c", "sleep 1; exec poweroff"]),
    ('echo "a b" c\\ d \'e"f\'', ["echo", "a b", "c d", 'e"f']),
    ("echo a,b  ''", ["echo", "a,b", ""]),
])
def test_exec_is_split_like_a_shell_would(text, words):
    assert agent.split_command(text) == words


def test_an_unterminated_quote_is_a_clear_error():
    config, problems = config_of(cmdline="arcbox.exec=\"/bin/sh -c 'oops\"")
    assert config["exec"] == [] and "unterminated ' quote" in problems[0]


def test_config_from_a_fake_cmdline_file_as_serve_reads_it(tmp_path):
    fake = tmp_path / "cmdline"
    fake.write_bytes(b'BOOT_IMAGE=/vmlinuz console=ttyS0 quiet panic=-1 arcbox.grace=3s '
                     b'arcbox.action=reboot arcbox.exec="/bin/sh -c \'echo hi\'" '
                     b'arcbox.log=loud arcbox.max_conns=0 arcbox.nope=1\n')
    found, problems = agent.parse_cmdline(agent._read_text(str(fake)))
    config, value_problems = agent.build_config({}, found)
    assert config["grace"] == 3.0 and config["action"] == "reboot"
    assert config["exec"] == ["/bin/sh", "-c", "echo hi"]
    assert config["log"] == "info" and config["max_conns"] == 128       # bad: defaults kept
    assert problems == ["kernel cmdline: unknown key arcbox.nope (ignored)"]
    assert sorted(t.split(":")[0] for _, t in value_problems) == ["arcbox.log",
                                                                  "arcbox.max_conns"]


@pytest.mark.parametrize("text,parsed", [
    ("none", ("none",)), ("", ("none",)),
    ("dhcp", ("dhcp", "eth0")), ("dhcp:ens3", ("dhcp", "ens3")),
    ("eth0:10.0.0.5/24", ("static", "eth0", "10.0.0.5", 24, None)),
    ("eth1:192.0.2.9/28:192.0.2.1", ("static", "eth1", "192.0.2.9", 28, "192.0.2.1")),
])
def test_net_modes(text, parsed):
    assert agent.parse_net(text) == parsed


@pytest.mark.parametrize("text", ["eth0", "eth0:10.0.0.5", "eth0:10.0.0.256/24",
                                  "eth0:10.0.0.5/33", "eth0:10.0.0.5/x", "dhcp:a/b",
                                  "thisnameiswaytoolong:1.2.3.4/8", "eth0:1.2.3.4/8:gw"])
def test_bad_net_values_say_why(text):
    with pytest.raises(agent.ConfigError):
        agent.parse_net(text)


def test_a_bad_net_value_on_the_cmdline_keeps_the_default_and_says_so():
    config, problems = agent.build_config({}, {"net": "eth0:10.0.0.999/24"})
    assert config["net"] == ("none",)
    assert problems and "arcbox.net" in problems[0][1] and "keeping none" in problems[0][1]


# Any kernel cmdline and any argv: as PID 1 a bad value must be a log line and the default,
# never an exception (one escaping here used to drop PID 1 into its no-listener fallback).
KEYS = [name for name, _, _, _, _ in agent.SERVE_OPTIONS]
VALUE = st.one_of(st.text(max_size=24), st.sampled_from(
    ["", "0", "-1", "none", "dhcp:", "unix:", "vsock:", "vsock:2", "vsock:x:1", "@", "/",
     "4294967296", "1e999", "nan", "eth0:1.2.3.4/99", "a,b,,c", '"', "'"]))
CMDLINE_WORD = st.one_of(
    st.builds("arcbox.{}={}".format, st.sampled_from(KEYS), VALUE),
    st.builds("systemd.set_credential=vmm.notify_socket:{}".format, VALUE),
    st.sampled_from(["arcbox.grace", "arcbox.", "arcbox.=1", "quiet", '"']),
    st.text(max_size=16))
FLAG_WORD = st.one_of(
    st.sampled_from([agent.flag_name(k) for k in KEYS]),
    st.builds("{}={}".format, st.sampled_from([agent.flag_name(k) for k in KEYS]), VALUE),
    VALUE)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(argv=st.lists(FLAG_WORD, max_size=6), cmdline=st.lists(CMDLINE_WORD, max_size=8))
def test_any_cmdline_and_argv_give_a_config_as_pid1(argv, cmdline):
    saved = agent._log_level, agent.enable_kmsg
    agent.enable_kmsg = lambda: None        # never write to the host's kernel log
    try:
        config, status = agent.read_configuration(argv, " ".join(cmdline), is_init=True)
    finally:
        agent._log_level, agent.enable_kmsg = saved
    assert status is None and set(config) == set(agent.default_config())
    for name in config:                     # every value can be described in a log line
        agent._describe(name, config[name])


def test_an_interface_name_no_ioctl_can_name_is_refused_when_read():
    """A flag's bytes that are not UTF-8 arrive as surrogates: such a --net used to parse,
    then make configure_network raise at start and drop PID 1 into its fallback."""
    bad = b"eth\xff".decode("utf-8", "surrogateescape")
    for text in (bad + ":10.0.0.2/24", "dhcp:" + bad, "eth\x01:10.0.0.2/24",
                 "\u00e9" * 8 + ":10.0.0.2/24"):              # 16 bytes: too long for IFNAMSIZ
        with pytest.raises(agent.ConfigError, match="not an interface name"):
            agent.parse_net(text)
    config, problems = agent.build_config({"net": [bad + ":10.0.0.2/24"]}, {})
    assert config["net"] == ("none",)
    assert problems and "not an interface name (not UTF-8)" in problems[0][1]
