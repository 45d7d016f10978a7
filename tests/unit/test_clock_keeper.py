"""The clock keeper (ClockKeeper) with fake sources: the source's choice (the KVM PTP clock
over the RTC; none: off, said once), the RTC read at its second's edge on a fake device, the
jitter threshold, a host that set the time winning (its offset learned, never fought), a
host's own look taken as the truth, and no deadline at all when off."""

import os
import time

import pytest

import agent


class InlineErrands:
    """Runs an errand's body at once, as the errands would off the loop."""

    def __init__(self):
        self.runs = []

    def run(self, errand, on_done):
        self.runs.append((errand.what, errand.thread))
        try:
            outcome = ("ok", errand.body())
        except Exception as exc:
            outcome = ("error", None, str(exc))
        on_done(outcome)


def keeper(offsets, interval=30.0, source=("rtc", "/dev/rtc0")):
    """A keeper whose source reads `offsets` in turn; returns (keeper, steps, errands)."""
    steps, errands, readings = [], InlineErrands(), iter(offsets)

    def step(delta):
        steps.append(round(delta, 3))
        return 1000.0, 1000.0 + delta
    k = agent.ClockKeeper(interval, errands, find=lambda: source,
                          measure=lambda s: next(readings), step=step)
    k.start()
    return k, steps, errands


def due(k):
    k.tick(k.deadline())


def test_the_kvm_ptp_clock_wins_over_the_rtc_and_none_is_off_said_once(tmp_path, logged):
    ptp = tmp_path / "ptp"
    for name, clock in (("ptp0", "ptp_vmw"), ("ptp1", "KVM virtual PTP")):
        (ptp / name).mkdir(parents=True)
        (ptp / name / "clock_name").write_text(clock + "\n")
    rtc = tmp_path / "rtc0"
    rtc.write_text("")
    assert agent.find_clock_source(str(ptp), str(rtc)) == ("ptp", "/dev/ptp1")
    (ptp / "ptp1" / "clock_name").write_text("ptp_vmw\n")
    assert agent.find_clock_source(str(ptp), str(rtc)) == ("rtc", str(rtc))
    assert agent.find_clock_source(str(tmp_path / "none"), str(tmp_path / "none")) is None
    k = agent.ClockKeeper(30.0, InlineErrands(), find=lambda: None)
    k.start()
    assert k.deadline() is None and k.interval == 0
    assert sum("not keeping the clock" in m for m in logged) == 1


def test_off_the_keeper_never_wakes_the_loop():
    k = agent.ClockKeeper(0, InlineErrands(), find=lambda: ("rtc", "/dev/rtc0"))
    k.start()
    assert k.deadline() is None


def test_before_it_starts_the_keeper_neither_wakes_nor_fails_the_loop():
    """It starts once the modules are in (ptp_kvm may be one): until then the loop ticks
    it like every source, and a host may set the clock."""
    errands = InlineErrands()
    k = agent.ClockKeeper(30.0, errands, find=lambda: ("rtc", "/dev/rtc0"),
                          measure=lambda s: 20.0, step=lambda d: (0.0, d))
    k.tick(time.monotonic())
    k.host_set()
    k.tick(time.monotonic() + 100)
    assert k.deadline() is None and errands.runs == []
    k.start()
    assert k.deadline() is not None


def test_behind_by_a_pause_the_clock_is_stepped_in_a_thread_and_said(logged):
    k, steps, errands = keeper([20.04])
    assert k.deadline() == pytest.approx(time.monotonic() + 30.0, abs=1)
    due(k)
    assert steps == [20.04] and errands.runs == [("reading /dev/rtc0", True)]
    said = [m for m in logged if m.startswith("clock: stepped +20.040s, from ")]
    assert said and said[0].endswith("UTC, by /dev/rtc0 (the RTC)"), logged
    assert k.deadline() == pytest.approx(time.monotonic() + 30.0, abs=1)


@pytest.mark.parametrize("kind,offset,stepped", [("rtc", 0.4, False), ("rtc", 0.6, True),
                                                 ("ptp", 0.04, False), ("ptp", 0.06, True)])
def test_jitter_below_the_threshold_is_left_alone(kind, offset, stepped):
    k, steps, _ = keeper([offset], source=(kind, "/dev/x"))
    due(k)
    assert bool(steps) == stepped


def test_a_host_that_set_the_time_wins_and_is_never_fought():
    # the host sets the clock an hour back; the keeper learns the RTC is +3600 s from it,
    # then corrects only a later change (a pause of 20 s)
    k, steps, _ = keeper([3600.2, 3600.3, 3620.3])
    k.host_set()
    assert k.deadline() <= time.monotonic() + 1.0        # learned soon after, not in 30 s
    due(k)                                               # learns: no step
    due(k)                                               # +0.1 s: jitter
    assert steps == []
    due(k)                                               # 20 s more behind the host's time
    assert steps == [20.1]


def test_a_host_setting_during_a_look_makes_it_stale():
    steps, errands = [], InlineErrands()
    k = None

    def measure(source):
        k.host_set()                                     # the host set it meanwhile
        return 50.0
    k = agent.ClockKeeper(30.0, errands, find=lambda: ("rtc", "/dev/rtc0"), measure=measure,
                          step=lambda d: steps.append(d) or (0.0, d))
    k.start()
    due(k)
    assert steps == []


def test_a_hosts_own_look_takes_the_source_as_the_truth():
    k, steps, _ = keeper([3600.0, 0.2])
    k.host_set()
    due(k)                                               # learned: the host's time wins
    look = k.errand(asked=True)                          # guest-set-time without a time
    assert look.finish(("ok", look.body())) == pytest.approx(0.2)
    assert steps == [0.2] and k.baseline == 0.0
    with pytest.raises(agent.ClockError, match="cannot read /dev/rtc0: timeout"):
        k.errand(asked=True).finish(("timeout", "timeout"))


def fake_rtc(monkeypatch, seconds, interrupts):
    """/dev/rtc0 faked for read_rtc: it reads `seconds` in turn; with `interrupts`, update
    interrupts exist and each poll has one (their words are in a pipe); returns the polls'
    timeouts as they are made."""
    seconds, polls = iter(seconds), []
    monkeypatch.setattr(agent, "libc_call", lambda name, fd, request, *rest: 1
                        if request.value == agent.RTC_UIE_ON and not interrupts else 0)
    r, w = os.pipe()
    os.write(w, b"\0" * 8 * interrupts)
    os.close(w)
    monkeypatch.setattr(agent.os, "open", lambda *a, **k: r)   # read_rtc closes it
    monkeypatch.setattr(agent, "days_from_civil", lambda *a: 0)

    class Poller:
        def register(self, fd, mask):
            pass

        def poll(self, ms):
            polls.append(ms)
            return [(r, 1)]
    monkeypatch.setattr(agent.select, "poll", Poller)

    class Fake:
        size = agent._RTC_TIME.size

        @staticmethod
        def unpack(raw):
            return (next(seconds), 0, 0, 1, 0, 70, 0, 0, 0)
    monkeypatch.setattr(agent, "_RTC_TIME", Fake)
    return polls


def test_the_rtc_is_read_at_its_seconds_edge_on_a_fake_device(monkeypatch):
    """A driver without update interrupts: the value is read until it changes (the edge),
    which is returned, never the stale second."""
    real = agent.days_from_civil
    fake_rtc(monkeypatch, [7, 7, 7, 8, 8], interrupts=0)
    assert agent.read_rtc("/dev/fake", bound=1.0) == 8
    assert real(1970, 1, 1) == 0


def test_an_update_interrupt_without_a_new_second_is_not_the_edge(monkeypatch):
    """An update interrupt that was pending, or delivered late, comes between two ticks: the
    read waits for the interrupt with which the second changes."""
    # before, at the stale interrupt, at the edge
    polls = fake_rtc(monkeypatch, [7, 7, 8], interrupts=2)
    assert agent.read_rtc("/dev/fake") == 8 and len(polls) == 2


def test_a_hosts_look_beside_the_keepers_own_does_not_end_it():
    """The keeper's look is still out when a host asks: the host's finishing first must not
    let the keeper start a second look of its own meanwhile."""
    k, steps, errands = keeper([])
    k.tick(k.deadline())                       # a first look (its reading fails)
    own = k.errand(asked=False)
    asked = k.errand(asked=True)
    asked.finish(("ok", 0.0))
    assert k.deadline() is None                # the keeper's own look is still out
    own.finish(("ok", 0.0))
    assert k.deadline() is not None
