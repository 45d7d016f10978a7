"""The published figures: the README's performance table is exactly what `bench/run.py
--markdown` makes of the saved run, and the chart can be drawn from it (matplotlib is a
bench-only dependency, installed by .ci/run)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
SAVED = os.path.join(ROOT, "bench", "results", "bench.json")

import chart  # noqa: E402
import run  # noqa: E402


def saved_run():
    with open(SAVED) as f:
        return json.load(f)


def test_the_readme_table_is_generated_from_the_saved_run():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = run.markdown(saved_run())
    assert run.README_BEGIN + "\n" + table + run.README_END in readme
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
