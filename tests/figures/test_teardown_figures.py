"""docs/performance.md's teardown paragraph against the run it quotes, figure 8 of
bench/results/bench.json: every number made again here from the raw samples, independently of
bench/run.py's wording."""

import statistics

from helpers import doc, saved_result


def ms(xs):
    return "%.0f ms median (%.0f–%.0f)" % (statistics.median(xs) * 1000, min(xs) * 1000,
                                         max(xs) * 1000)


def test_the_page_quotes_the_saved_teardown_run():
    data = saved_result("bench.json")
    text = doc("performance.md", "**What it costs** (figure 8")
    mounts, simple = data["vm"]["mounts"], data["vm"]["ours"]["teardown_exits"]
    ours, busybox = mounts["ours"], mounts["busybox"]
    assert len(ours["stop"]) == len(busybox["stop"]) >= 5
    assert "takes %s with every mount kind" % ms(ours["teardown"]) in text
    assert "against %s in a guest with no disks" % ms(simple) in text
    assert "in the same image takes %s (its clock" % ms(busybox["teardown"]) in text
    clean = lambda e: sum(1 for p in e["problems"] if not p)      # noqa: E731
    n = len(ours["problems"])
    assert "every byte in %d of %d boots (ours: %d of %d)" % (clean(busybox), n, clean(ours),
                                                              n) in text
    assert "(grace 1 s): %.2f s against busybox init's %.2f s" % (
        statistics.median(ours["stop"]), statistics.median(busybox["stop"])) in text
