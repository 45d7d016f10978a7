"""Who may ask: Shutdown and clock-setting Pings, judged by the peer (vsock CID, Unix uid,
serial port). peer_allowed() is a pure rule; handle_request() applies it with a policy, and
nothing here can signal or power off anything (a Shutdown only returns its effect)."""

import pytest

import agent

DEFAULT_ALLOW = agent.default_config()["allow"]      # the real default, not a copy of it


def policy(allow=None, can_power_off=True, owns_clock=True):
    return agent.RequestPolicy(DEFAULT_ALLOW if allow is None else agent._parse_allow(allow),
                               can_power_off, owns_clock)


def shutdown_request(peer, pol, seconds=5):
    payload = agent.encode_message(agent.SHUTDOWN_REQUEST, {"timeout_seconds": seconds})
    return agent.handle_request(agent.MSG_SHUTDOWN, payload, peer, pol)


@pytest.mark.parametrize("peer,allowed", [
    (("vsock", 2, 1234), True),          # the host
    (("vsock", 1, 1234), False),         # the guest itself through vsock_loopback
    (("vsock", 3, 1234), False),         # another guest
    (("unix", 10, 0, 0), True),          # root
    (("unix", 10, 1000, 1000), False),
    (("unix", 0, -1, -1), False),        # credentials unknown
    (("serial", "org.arcbox.agent"), True),
])
def test_the_default_rule(peer, allowed):
    assert agent.peer_allowed(DEFAULT_ALLOW, peer) is allowed


@pytest.mark.parametrize("peer,allowed", [
    (("vsock", 2, 1234), True), (("vsock", 3, 1234), False),
    (("unix", 10, 0, 0), True), (("unix", 10, 1000, 1000), False),
    (("serial", "org.arcbox.agent"), True),
])
def test_shutdown_returns_its_effect_only_for_allowed_peers(peer, allowed):
    pol = policy()
    if allowed:
        rtype, payload, effect = shutdown_request(peer, pol)
        assert rtype == agent.MSG_SHUTDOWN | agent.RESPONSE_BIT
        assert agent.decode_message(agent.SHUTDOWN_RESPONSE, payload) == {"accepted": True}
        assert effect == ("Shutdown", 5, None)
    else:
        with pytest.raises(agent.Refused) as err:
            shutdown_request(peer, pol)
        assert err.value.code == 403 and "is not allowed to request it" in str(err.value)


def test_configured_peers_and_any():
    allow = agent._parse_allow("cid:1,uid:1000")
    assert agent.peer_allowed(allow, ("vsock", 1, 5))
    assert agent.peer_allowed(allow, ("unix", 1, 1000, 1000))
    assert not agent.peer_allowed(allow, ("vsock", 2, 5))
    assert not agent.peer_allowed(allow, ("serial", "x"))
    assert agent.peer_allowed(agent._parse_allow("any"), ("vsock", 77, 5))
    assert shutdown_request(("vsock", 1, 5), policy("cid:1"), 0)[2] == ("Shutdown", 0, None)


def test_not_pid1_refuses_shutdown_with_503():
    with pytest.raises(agent.Refused, match="not PID 1") as err:
        shutdown_request(("unix", 1, 0, 0), policy(can_power_off=False))
    assert err.value.code == 503


def test_the_clock_is_set_only_by_an_allowed_vsock_or_serial_peer_of_pid1():
    pol = policy()
    assert agent.clock_effect(1781740800, ("vsock", 2, 9), pol) == ("Ping", 1781740800)
    assert agent.clock_effect(1781740801, ("serial", "p"), pol) == ("Ping", 1781740801)
    assert agent.clock_effect(1781740802, ("unix", 1, 0, 0), pol) is None  # ignored, not refused
    with pytest.raises(agent.Refused, match="clock change refused"):
        agent.clock_effect(1781740803, ("vsock", 3, 9), pol)
    assert agent.clock_effect(1781740804, ("vsock", 2, 9), policy(owns_clock=False)) is None


def test_handle_request_sets_no_clock_itself_the_agent_applies_the_effect(monkeypatch):
    calls = []
    monkeypatch.setattr(agent.time, "clock_settime", lambda clock, t: calls.append(t))
    payload = agent.encode_message(agent.PING_REQUEST, {"timestamp_secs": 1781740800})
    _, _, effect = agent.handle_request(agent.MSG_PING, payload, ("vsock", 2, 9), policy())
    assert effect == ("Ping", 1781740800) and calls == []
    config = dict(agent.default_config(), listen=[])
    a = agent.Agent(config, False)
    try:
        a.on_request_effect(effect, None)
    finally:
        a.inbox.close()
    assert calls == [1781740800.0]
