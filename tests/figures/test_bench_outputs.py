"""The published figures: docs/performance.md's table is exactly what `bench/run.py
--markdown` makes of the saved run; every row made from samples is made again here from
them (medians, ranges, ratios, met or MISSED), independently of bench/run.py's formatting;
the run says which commit and interpreters it measured; the chart can be drawn from it
(matplotlib is a bench-only dependency, installed by .ci/run)."""

import json
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
SAVED = os.path.join(ROOT, "bench", "results", "bench.json")

import chart  # noqa: E402
import run  # noqa: E402
from helpers import doc  # noqa: E402


def saved_run():
    with open(SAVED) as f:
        return json.load(f)


def test_the_published_table_is_generated_from_the_saved_run():
    table = run.markdown(saved_run())
    assert run.TABLE_BEGIN + "\n" + table + run.TABLE_END in doc("performance.md")
    data = saved_run()
    assert not data["meta"]["quick"], "the README must quote a full run"
    for target in data["targets"]:                      # missed targets say so
        assert ("met" if target["met"] else "MISSED") in target["target"]


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
            assert row[5].endswith("met" if met else "MISSED"), row
            targets += 1
        target = raw.get("target")
        if target:
            on = ratio if target["on"] == "ratio" else statistics.median(raw["value"])
            met = on <= target["max"] if "max" in target else on >= target["min"]
            assert row[5].endswith(": met" if met else ": MISSED"), (row, on, target)
            listed = [t for t in data["targets"] if t["case"] == row[1]]
            assert listed and listed[0]["met"] == met, row
            targets += 1
    assert checked >= 20 and targets == len(data["targets"]), (checked, targets)


def test_the_run_says_what_it_measured():
    meta = saved_run()["meta"]
    assert re.fullmatch(r"[0-9a-f]{7,}", meta["commit"]) and not meta["dirty"]
    assert meta["agent_python"] and meta["runner_python"] and meta["cpu_model"]
    assert "at commit %s on %s" % (meta["commit"], meta["cpu_model"]) in doc("performance.md")
