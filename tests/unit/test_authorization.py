"""Who may ask: Shutdown and clock-setting Pings, judged by the peer (vsock CID, Unix uid,
serial port), with fake peers and a fake PID 1 (is_init=True, nothing is ever signalled:
request_shutdown only starts the sequence object, which these tests inspect)."""

import pytest

import agent


class Peer:
    def __init__(self, *peer):
        self.peer = peer
        self.peer_text = "peer %r" % (peer,)
        self.outbuf = bytearray()
        self.closed = False


def pid1(allow="cid:2,uid:0,serial"):
    a = agent.Agent(dict(agent.default_config(), listen=[], allow=agent._parse_allow(allow)),
                    is_init=True)
    a.shutdown.begin = lambda grace, reason, conn: setattr(a, "begun", (grace, reason))
    return a


@pytest.mark.parametrize("peer,allowed", [
    (("vsock", 2, 1234), True),          # the host
    (("vsock", 1, 1234), False),         # the guest itself through vsock_loopback
    (("vsock", 3, 1234), False),         # another guest
    (("unix", 10, 0, 0), True),          # root
    (("unix", 10, 1000, 1000), False),
    (("serial", "org.arcbox.agent"), True),
])
def test_default_shutdown_rule(peer, allowed):
    a = pid1()
    if allowed:
        a.request_shutdown(5, "test", Peer(*peer))
        assert a.begun == (5, "test")
    else:
        with pytest.raises(agent.Refused) as err:
            a.request_shutdown(5, "test", Peer(*peer))
        assert err.value.code == 403 and "is not allowed to request it" in str(err.value)
        assert not hasattr(a, "begun")


def test_configured_peers_and_any():
    a = pid1("cid:1,uid:1000")
    a.request_shutdown(None, "t", Peer("vsock", 1, 5))
    assert a.begun == (25.0, "t")                     # 0/None -> the configured grace
    with pytest.raises(agent.Refused):
        pid1("cid:1,uid:1000").request_shutdown(1, "t", Peer("vsock", 2, 5))
    with pytest.raises(agent.Refused):
        pid1("cid:1").request_shutdown(1, "t", Peer("serial", "x"))
    pid1("any").request_shutdown(1, "t", Peer("vsock", 77, 5))


def test_the_clock_is_set_only_by_an_allowed_vsock_or_serial_peer_of_pid1(monkeypatch):
    calls = []
    monkeypatch.setattr(agent.time, "clock_settime", lambda clock, t: calls.append(t))
    a = pid1()
    a.maybe_set_clock(Peer("vsock", 2, 9), 1781740800)
    a.maybe_set_clock(Peer("serial", "p"), 1781740801)
    a.maybe_set_clock(Peer("unix", 1, 0, 0), 1781740802)        # ignored, never refused
    with pytest.raises(agent.Refused, match="clock change refused"):
        a.maybe_set_clock(Peer("vsock", 3, 9), 1781740803)
    not_init = agent.Agent(dict(agent.default_config(), listen=[]), is_init=False)
    not_init.maybe_set_clock(Peer("vsock", 2, 9), 1781740804)   # not PID 1: ignored
    assert calls == [1781740800.0, 1781740801.0]
