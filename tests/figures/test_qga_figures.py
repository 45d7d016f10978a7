"""The QGA figures in docs/performance.md and docs/qga.md against the saved runs they quote
(bench/results/qga.json, qga-exec.json), made again here independently of the benches'
wording: the round-trip medians and ratios from the raw samples, the memory ratios and their
verdicts from the readings, the side by side from the saved replies."""

import json
import statistics

from helpers import doc, saved_result

MEMORY_TARGET = 1.2


def load():
    return saved_result("qga.json"), doc("performance.md", "## QGA against qemu-ga", "\n## ")


def test_the_round_trips_published_are_the_saved_run():
    data, text = load()
    boots = data["samples_ms_per_boot"]
    assert len(boots) >= 5 and all(len(b["qemu-ga"]) >= 400 for b in boots)
    ours = [statistics.median(b["arcbox-agent"]) for b in boots]
    real = [statistics.median(b["qemu-ga"]) for b in boots]
    assert "arcbox-agent %s ms" % "/".join("%.2f" % x for x in ours) in text
    assert "qemu-ga %s ms" % "/".join("%.2f" % x for x in real) in text
    assert "(ratio %s)" % "/".join("%.2f" % (a / q) for a, q in zip(ours, real)) in text
    for who in ("arcbox-agent", "qemu-ga"):
        everything = [t for b in boots for t in b[who]]
        assert "%s %.2f ms (p10" % (who, statistics.median(everything)) in text


def test_the_memory_beside_the_card_floor_and_its_verdicts():
    data, text = load()
    before, after = data["memory_before_qga_per_boot"], data["memory_per_boot"]
    rss = lambda rows, who: "/".join(str(r[who]["rss_kib"]) for r in rows)   # noqa: E731
    assert "waiting — %s;" % rss(after, "floor") in text
    assert "only QGA: %s." % rss(after, "qemu-ga") in text
    for rows, what in ((before, "request) "), (after, "first request) ")):
        ratios = [r["arcbox-agent"]["rss_kib"] / r["floor"]["rss_kib"] for r in rows]
        verdict = "met" if max(ratios) <= MEMORY_TARGET else "missed" \
            if min(ratios) > MEMORY_TARGET else "not established"
        shown = "%s%s, %.2f–%.2f× the floor's" if what == "request) " else "%s%s, %.2f–%.2f×"
        assert shown % (what, rss(rows, "arcbox-agent"), min(ratios), max(ratios)) in text
        assert ": %s" % verdict in text.split(rss(rows, "arcbox-agent"), 1)[1][:200]


def test_the_side_by_side_is_what_qemu_ga_answered():
    data = saved_result("qga.json")
    text = doc("qga.md", "**In a busybox guest, side by side**", "<!-- end figures -->")
    shutdown = data["replies"]["guest-shutdown"]
    assert shutdown["qemu-ga: guest still running 2 s later"] is True
    assert shutdown["arcbox-agent: QEMU exit status"] == 0
    assert "`%s`" % json.dumps(shutdown["qemu-ga"]) in text
    assert "qemu-ga %s" % data["qemu_ga_version"] in text


def test_the_exec_and_fsinfo_paragraph_is_the_saved_run():
    data = saved_result("qga-exec.json")
    text = doc("qga.md", "**guest-exec and guest-get-fsinfo against")
    assert len(data["boots"]) >= 3 and all(
        len(b["samples_ms"][kind][who]) >= 200 for b in data["boots"]
        for kind in ("exec", "fsinfo") for who in ("arcbox-agent", "qemu-ga"))
    for kind in ("exec", "fsinfo"):
        med = [(statistics.median(b["samples_ms"][kind]["arcbox-agent"]),
                statistics.median(b["samples_ms"][kind]["qemu-ga"])) for b in data["boots"]]
        assert "arcbox-agent %s ms, qemu-ga %s ms (ratio %s)" % (
            "/".join("%.1f" % a for a, _ in med), "/".join("%.1f" % q for _, q in med),
            "/".join("%.2f" % (a / q) for a, q in med)) in text, kind
