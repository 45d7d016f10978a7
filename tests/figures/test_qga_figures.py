"""The QGA figures in docs/performance.md and qga.md against the saved run they quote, bench/results/qga.json: the
round-trip medians and ratios are recomputed here from the raw samples, the memory from the
readings, the side-by-side from the saved replies, so a hand-edited figure or a re-run
without updating the pages fails."""

import json
import statistics

from helpers import doc, saved_result


def load():
    return saved_result("qga.json"), doc("performance.md", "## QGA against qemu-ga", "\n## ")


def test_the_round_trips_and_memory_published_are_the_saved_run():
    data, text = load()
    boots = data["samples_ms_per_boot"]
    assert len(boots) >= 3 and all(len(b["qemu-ga"]) >= 400 for b in boots)
    ours = [statistics.median(b["arcbox-agent"]) for b in boots]
    real = [statistics.median(b["qemu-ga"]) for b in boots]
    assert "arcbox-agent %s ms" % "/".join("%.2f" % x for x in ours) in text
    assert "qemu-ga %s ms" % "/".join("%.2f" % x for x in real) in text
    assert "(ratio %s)" % "/".join("%.2f" % (a / q) for a, q in zip(ours, real)) in text
    for who in ("arcbox-agent", "qemu-ga"):
        everything = [t for b in boots for t in b[who]]
        assert "%s %.2f ms (p10" % (who, statistics.median(everything)) in text
    rss = {who: "/".join(str(m[who]["rss_kib"]) for m in data["memory_per_boot"])
           for who in ("arcbox-agent", "qemu-ga")}
    assert "arcbox-agent %s KiB" % rss["arcbox-agent"] in text
    assert "qemu-ga, which only answers QGA, %s KiB" % rss["qemu-ga"] in text
    assert "commit %s" % data["commit"] in text


def test_the_side_by_side_is_what_qemu_ga_answered():
    data, text = saved_result("qga.json"), doc("qga.md", "**In a busybox guest, side by side**", "**Beyond qemu-ga.**")
    shutdown = data["replies"]["guest-shutdown"]
    assert shutdown["qemu-ga: guest still running 2 s later"] is True
    assert shutdown["arcbox-agent: QEMU exit status"] == 0
    assert "`%s`" % json.dumps(shutdown["qemu-ga"]) in text
    assert "qemu-ga %s" % data["qemu_ga_version"] in text


def test_the_exec_and_fsinfo_paragraph_is_the_saved_run_on_the_agent_that_ships():
    """docs/qga.md's guest-exec / guest-get-fsinfo paragraph is regenerated whole from the
    saved run (bench/qga_exec.py's published_paragraph), and that run measured this agent.py
    (its sha256)."""
    import hashlib
    import os
    import sys
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
    sys.path.insert(0, bench)
    import qga_exec
    data = saved_result("qga-exec.json")
    assert len(data["boots"]) >= 3 and all(
        len(b["samples_ms"][kind][who]) >= 200 for b in data["boots"]
        for kind in ("exec", "fsinfo") for who in ("arcbox-agent", "qemu-ga"))
    text = doc("qga.md", "**guest-exec and guest-get-fsinfo against")
    assert text == qga_exec.published_paragraph(data)
    with open(os.path.join(bench, "..", "agent.py"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == data["sha256"]["agent.py"], \
            "the published exec/fsinfo figures were measured on another agent.py"
