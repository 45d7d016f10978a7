"""The watchdog's option and its source against a stand-in device (a plain file: what was
written to it is what a driver would have seen; its timeout ioctls fail there, as on a driver
that cannot set one, and the agent goes on with what it asked for)."""

import pytest

import agent


def test_the_watchdog_option():
    assert agent.parse_watchdog("off") == (None, None) == agent.parse_watchdog("0")
    assert agent.parse_watchdog("stop") == (None, "auto")
    assert agent.parse_watchdog("30") == (30.0, "auto")
    assert agent.parse_watchdog("30:off") == (30.0, None)
    assert agent.parse_watchdog("stop:8") == (None, 8.0)
    for bad in ("yes", "30:x", "0.5", "7200", ":", "stop:0"):
        with pytest.raises(agent.ConfigError):
            agent.parse_watchdog(bad)
    assert agent.default_config()["watchdog"] == (None, "auto")    # armed across the stop only
    for spec in ("off", "stop", "30", "30:off", "stop:8"):
        described = agent._describe("watchdog", agent.parse_watchdog(spec))
        assert agent.parse_watchdog(described) == agent.parse_watchdog(spec)


def written(path):
    with open(path, "rb") as f:
        return f.read()


def test_petted_from_the_loop_at_half_its_period_then_armed_for_the_stop(tmp_path):
    device = tmp_path / "watchdog"
    device.write_bytes(b"")
    dog = agent.Watchdog(agent.parse_watchdog("10"), path=str(device))
    assert dog.deadline() is None
    dog.start()
    assert written(device) == b"\0"                    # opened: armed and petted at once
    due = dog.deadline()
    dog.tick(due - 0.1)
    assert written(device) == b"\0"
    dog.tick(due)
    assert written(device) == b"\0\0" and dog.deadline() == pytest.approx(due + 5.0)
    dog.arm_for_stop(20.0)                             # auto: the stop's bounds + the margin
    assert dog.period == 20.0 + agent.WATCHDOG_STOP_MARGIN
    assert written(device) == b"\0\0\0" and dog.deadline() is None   # no more pets
    dog.close()
    assert written(device).endswith(b"V")              # the magic close


def test_by_default_untouched_until_the_stop(tmp_path):
    device = tmp_path / "watchdog"
    device.write_bytes(b"")
    dog = agent.Watchdog(agent.default_config()["watchdog"], path=str(device))
    dog.start()
    assert written(device) == b"" and dog.fd < 0 and dog.deadline() is None
    dog.arm_for_stop(20.0)
    assert dog.fd >= 0 and written(device) == b"\0"
    off = agent.Watchdog(agent.parse_watchdog("off"), path=str(device))
    off.start()
    off.arm_for_stop(20.0)
    assert off.fd < 0
    missing = agent.Watchdog(agent.parse_watchdog("stop"), path=str(tmp_path / "none"))
    missing.arm_for_stop(20.0)                         # no device: a log line, nothing else
    assert missing.fd < 0
    dog.close()
