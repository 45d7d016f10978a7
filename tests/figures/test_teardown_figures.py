"""docs/performance.md's teardown paragraph against the saved run it
quotes, bench/results/vm-teardown.json: every number is recomputed here from the raw samples,
so a hand-edited figure or a re-run without updating the page fails."""

import statistics

from helpers import doc, saved_result


def load():
    return saved_result("vm-teardown.json"), doc("performance.md",
        "**What it costs** (`bench/results/vm-teardown", "\n## ")


def ms(xs):
    return "%.0f ms median (%.0f–%.0f)" % (statistics.median(xs) * 1000, min(xs) * 1000,
                                         max(xs) * 1000)


def test_the_page_quotes_the_saved_teardown_run():
    data, text = load()
    mounts, simple = data["vm"]["mounts"], data["vm"]["ours"]["teardown_exits"]
    ours, busybox = mounts["ours"], mounts["busybox"]
    assert "commit %s" % data["meta"]["commit"] in text
    assert "takes %s with every mount kind" % ms(ours["teardown"]) in text
    assert "against %.0f ms (%.0f–%.0f) in a guest with no disks" % (
        statistics.median(simple) * 1000, min(simple) * 1000, max(simple) * 1000) in text
    bb = busybox["teardown"]
    assert "takes %.0f ms (%.0f–%.0f, its clock" % (statistics.median(bb) * 1000,
                                                    min(bb) * 1000, max(bb) * 1000) in text
    clean = lambda e: sum(1 for p in e["problems"] if not p)
    n = len(ours["problems"])
    assert "every byte in %d of %d boots (ours: %d of %d)" % (clean(busybox), n, clean(ours),
                                                              n) in text
    both = sum(1 for p in busybox["problems"] if "vda: the journal needs recovery" in p
               and "vdb: the journal needs recovery" in p)
    assert both == n and "both disks' journals to recover every time" in text
    lost = sum(1 for p in busybox["problems"] if any("e2fsck" in x and "loop.img" in x for x in p)
               and any(x.startswith("vda/loop.img:/c: 0 of") for x in p))
    assert "in %d boots, loop.img failing `e2fsck` with its files lost" % lost in text
    assert "(grace 1 s): %.2f s against busybox init's %.2f s" % (
        statistics.median(ours["stop"]), statistics.median(busybox["stop"])) in text
