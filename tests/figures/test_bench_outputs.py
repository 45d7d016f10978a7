"""The published figures: docs/performance.md's table is exactly what `bench/run.py
--markdown` makes of the saved run (tests/figures/test_published_blocks.py); every row made
from samples is made again here from them (medians, ranges, ratios), independently of
bench/run.py's formatting, and every target's verdict is checked against its interval by the
rule (met: the whole 90 % interval meets the target; missed: none of it; else not
established); the run says which code and interpreters it measured; the chart can be drawn
from it (matplotlib is a bench-only dependency, installed by .ci/run)."""

import json
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
SAVED = os.path.join(ROOT, "bench", "results", "bench.json")

import chart  # noqa: E402
from helpers import doc  # noqa: E402


def saved_run():
    with open(SAVED) as f:
        return json.load(f)


def test_the_published_run_is_a_full_one_and_each_row_says_its_verdict():
    data = saved_run()
    assert not data["meta"]["quick"], "the docs must quote a full run"
    for target in data["targets"]:
        assert ": %s" % target["verdict"] in target["target"], target
    assert "<!-- figures: bench/run.py markdown bench/results/bench.json -->" in doc(
        "performance.md")


def rule(low, high, target, n):
    if n < 5:
        return "not established (only %d readings)" % n
    if "max" in target:
        return "met" if high <= target["max"] else "missed" if low > target["max"] \
            else "not established"
    return "met" if low >= target["min"] else "missed" if high < target["min"] \
        else "not established"


def test_the_chart_draws_from_the_saved_run(tmp_path):
    out = str(tmp_path / "chart.png")
    chart.draw(saved_run(), out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 20000


def median_text(xs, scale, kind):
    """The median as the row prints it, and the min-max and n for "stats"."""
    xs = sorted(xs)
    if kind == "median0":
        return ["%.0f" % statistics.median(xs)]
    return ["%.2f" % (statistics.median(xs) * scale),
            "(%.2f-%.2f, n=%d)" % (xs[0] * scale, xs[-1] * scale, len(xs))]


def test_every_row_with_samples_is_made_again_from_them():
    data = saved_run()
    rows, raws = data["rows"], data["raw_rows"]
    assert len(rows) == len(raws)
    checked = targets = 0
    for row, raw in zip(rows, raws):
        if not raw:
            continue
        checked += 1
        scale, kind = raw.get("scale", 1), raw.get("format", "stats")
        for key, column in (("value", 2), ("baseline", 3)):
            if key in raw and (key == "value" or raw.get("baseline_shown", True)):
                for part in median_text(raw[key], scale, kind):
                    assert part in row[column], (row, key, part)
        ratio = None
        if raw.get("ratio"):
            v, b = statistics.median(raw["value"]), statistics.median(raw["baseline"])
            ratio = v / b if raw["ratio"] == "value/baseline" else b / max(v, 1e-6)
            printed = re.search(r"[0-9]+(?:\.([0-9]+))?", row[4])
            decimals = len(printed.group(1) or "")
            assert abs(float(printed.group(0)) - ratio) <= 0.5 * 10 ** -decimals + 1e-9, row
        if raw.get("growth"):
            kib, fds = raw["growth"]["kib"], raw["growth"]["fds"]
            assert "%+d KiB, fds %d -> %d" % (kib[1] - kib[0], fds[0], fds[1]) == row[2]
            met = kib[1] - kib[0] <= raw["growth"]["max_kib"] and fds[0] == fds[1]
            assert row[5].endswith(("met" if met else "missed") + " (one reading)"), row
            targets += 1
        target = raw.get("target")
        if target:
            listed = [t for t in data["targets"] if t["case"] == row[1]]
            assert len(listed) == 1, row
            low, high = listed[0]["interval"]
            if target["on"] == "ratio":
                on = statistics.median(raw["value"]) / statistics.median(raw["baseline"])
                if raw.get("ratio") == "baseline/value":
                    on = 1 / on
            else:
                on = statistics.median(raw["value"])
            assert low <= on <= high, (row, on, low, high)
            n = min(len(raw["value"]), len(raw.get("baseline") or raw["value"]))
            expected = rule(low, high, target, n)
            assert listed[0]["verdict"] == expected, (row, listed[0], expected)
            assert ": %s (90%% CI " % expected in row[5], row
            targets += 1
    assert checked >= 20 and targets == len(data["targets"]), (checked, targets)


def test_the_run_says_what_it_measured():
    data = saved_run()
    meta, p = data["meta"], data["provenance"]
    assert re.fullmatch(r"[0-9a-f]{7,}", p["commit"]) and not p["differs_from_commit"]
    assert set(p["sha256"]) >= {"agent.py", "build.py", "bench/run.py", "bench/verdict.py"}
    assert meta["agent_python"] and meta["runner_python"] and meta["cpu_model"]
    assert "commit %s, agent.py sha256 %s" % (p["commit"], p["sha256"]["agent.py"][:12]) \
        in doc("performance.md")
