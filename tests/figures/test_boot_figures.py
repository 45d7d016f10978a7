"""docs/performance.md's boot-to-first-answer block against its saved run,
bench/results/boot.json, made again here independently of bench/boot.py's wording: every
median and difference from the raw samples, the verdicts from their intervals by the rule
(met: the whole interval within the target; missed: none of it; else not established), so a
hand-edited figure, a verdict the interval does not give, or a run too small fails."""

import statistics

from helpers import doc, saved_result

TARGET = 0.15


def load():
    return saved_result("boot.json"), doc("performance.md", "**Boot to first answer**")


def rule(low, high, n):
    if n < 5:
        return "not established (only %d readings)" % n
    return "met" if high <= TARGET else "missed" if low > TARGET else "not established"


def test_the_page_quotes_the_saved_boot_run():
    data, text = load()
    assert len(data["x86_64"]["handoff_to_first_answer_s"]["agent"]) >= 20
    assert "aarch64" in data
    assert "commit %s" % data["provenance"]["commit"] in text
    assert not data["provenance"]["differs_from_commit"]
    for arch in ("x86_64", "aarch64"):
        guest = data[arch]["handoff_to_first_answer_s"]
        med = {v: statistics.median(xs) for v, xs in guest.items()}
        assert "median agent %.3f s, floor %.3f s, seed %.3f s" % (
            med["agent"], med["floor"], med["seed"]) in text, arch
        assert len(guest["floor"]) == len(guest["agent"]) == len(guest["seed"])


def test_each_verdict_is_what_its_interval_gives():
    data, text = load()
    for arch in ("x86_64", "aarch64"):
        guest = data[arch]["handoff_to_first_answer_s"]
        n = len(guest["agent"])
        diffs = sorted(a - f for a, f in zip(guest["agent"], guest["floor"]))
        by_medians = statistics.median(guest["agent"]) - statistics.median(guest["floor"])
        for label, value, judged in (
                ("in a random order) ", statistics.median(diffs), data[arch]["per_round"]),
                ("by the difference of the medians ", by_medians,
                 data[arch]["difference_of_medians"])):
            low, high = judged["interval"]
            assert low <= value <= high, (arch, label, value, judged)
            assert judged["verdict"] == rule(low, high, n), (arch, judged)
            assert "%s%+.3f s, 90 %% interval %+.3f…%+.3f s: %s" % (
                label, value, low, high, judged["verdict"]) in text, (arch, label)
        p10, p90 = diffs[int(0.1 * (n - 1) + 0.5)], diffs[int(0.9 * (n - 1) + 0.5)]
        assert "(p10 %+.3f s, p90 %+.3f s)" % (p10, p90) in text, arch
