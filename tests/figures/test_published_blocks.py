"""Every figure block in README.md and docs/*.md (`<!-- figures: SCRIPT FUNCTION RESULT -->`)
is exactly what its function makes of its saved result, whole; a block whose result measured
another agent.py says so; every saved result the docs name is quoted through a block or named
as history. With the provenance and verdict rules themselves (bench/provenance.py,
bench/verdict.py) shown to be able to fail."""

import json
import os
import re
import shutil
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import docs_blocks  # noqa: E402
import provenance  # noqa: E402
import verdict  # noqa: E402


def all_blocks():
    found = []
    for path in docs_blocks.documents():
        with open(path) as f:
            text = f.read()
        for script, function, result, start, end in docs_blocks.blocks(text):
            found.append(pytest.param(script, function, result, text[start:end],
                                      id="%s:%s:%s" % (os.path.basename(path), function,
                                                       os.path.basename(result))))
    return found


BLOCKS = all_blocks()


def test_the_docs_hold_the_blocks_they_should():
    named = {(p.values[0], p.values[1], p.values[2]) for p in BLOCKS}
    for needed in [("bench/run.py", "markdown", "bench/results/bench.json"),
                   ("bench/run.py", "teardown_paragraph", "bench/results/bench.json"),
                   ("bench/startup.py", "published_text", "bench/results/startup.json"),
                   ("bench/boot.py", "published_paragraph", "bench/results/boot.json"),
                   ("bench/qga.py", "published_paragraph", "bench/results/qga.json"),
                   ("bench/qga_exec.py", "published_paragraph", "bench/results/qga-exec.json"),
                   ("bench/fleet.py", "published_paragraph", "bench/results/fleet.json"),
                   ("bench/soak_table.py", "reliability_table",
                    "bench/results/soak-figures.json"),
                   ("bench/soak_table.py", "never_wedged_paragraph",
                    "bench/results/soak-figures.json"),
                   ("bench/soak_table.py", "clock_paragraph", "bench/results/soak-figures.json")]:
        assert needed in named, needed


@pytest.mark.parametrize("script, function, result, text", BLOCKS)
def test_a_block_is_what_its_saved_result_makes(script, function, result, text):
    made = docs_blocks.render(script, function, result)
    assert docs_blocks.same(made, text), (
        "%s differs from what %s %s makes of it: run `python3 bench/docs_blocks.py`\n"
        "made:\n%s" % (result, script, function, made))


@pytest.mark.parametrize("script, function, result, text", BLOCKS)
def test_a_block_whose_run_measured_another_agent_says_so(script, function, result, text):
    with open(os.path.join(ROOT, result)) as f:
        saved = json.load(f)
    if provenance.agent_changed_since(saved):
        assert provenance.CHANGED in " ".join(text.split()), result
    else:
        assert provenance.CHANGED not in " ".join(text.split()), result


def test_no_saved_result_is_quoted_outside_a_block():
    """A page may name a saved result only in a block's marker, where it says how one is made
    (--publish), or as a run it says is kept "for the record" (not a figure of this
    agent)."""
    for path in docs_blocks.documents():
        with open(path) as f:
            text = f.read()
        for script, function, result, start, end in reversed(docs_blocks.blocks(text)):
            text = text[:text.rindex("<!--", 0, start)] + text[end:]
        for paragraph in text.split("\n\n"):
            for m in re.finditer(r"bench/results/([\w./-]+\.json)", paragraph):
                assert "for the record" in paragraph or "--publish" in paragraph, (
                    path, m.group(0), paragraph)


def test_a_changed_agent_is_said_and_an_unchanged_one_is_not(tmp_path):
    agent_copy = str(tmp_path / "agent.py")
    shutil.copy(os.path.join(ROOT, "agent.py"), agent_copy)
    result = {"provenance": {"commit": "abc1234", "when": "2026-12-05 07:00 UTC",
                             "differs_from_commit": [],
                             "sha256": {"agent.py": provenance.sha256(agent_copy)}}}
    assert provenance.CHANGED not in provenance.says(result, agent_copy)
    with open(agent_copy, "a") as f:
        f.write("# one byte more\n")
    assert provenance.CHANGED in provenance.says(result, agent_copy)
    assert provenance.CHANGED in provenance.says({"commit": "abc1234"}, agent_copy)


def test_provenance_names_the_code_machine_and_interpreters():
    p = provenance.collect(["bench/boot.py"])
    assert set(p["sha256"]) == {"agent.py", "build.py", "bench/boot.py"}
    assert p["sha256"]["agent.py"] == provenance.sha256(os.path.join(ROOT, "agent.py"))
    assert re.fullmatch(r"[0-9a-f]{7,}", p["commit"]) and p["machine"]["cpus"] >= 1
    assert p["python"]["runner"] and p["python"][provenance.AGENT_PYTHON]


def test_a_kept_run_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "RUNS", str(tmp_path))
    run = {"provenance": {"commit": "abc1234", "differs_from_commit": []}, "x": 1}
    first = provenance.keep("demo", run)
    second = provenance.keep("demo", dict(run, x=2))
    assert first != second
    with open(first) as f:
        assert json.load(f)["x"] == 1


@pytest.mark.parametrize("samples, bound, expected", [
    ([2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.2, 2.3, 2.1], 3.0, "met"),
    ([3.5, 3.6, 3.7, 3.8, 3.9, 3.6, 3.7, 3.5, 3.6, 3.8], 3.0, "missed"),
    ([2.0, 4.0, 2.2, 3.8, 2.9, 3.1, 2.5, 3.5, 2.8, 3.2], 3.0, "not established"),
])
def test_the_verdict_rule(samples, bound, expected):
    j = verdict.judge("median", [samples], at_most=bound)
    assert j["verdict"] == expected, j
    low, high = j["interval"]
    assert low <= j["value"] <= high


def test_too_few_readings_give_no_verdict():
    assert verdict.judge("median", [[1.0, 1.0, 1.0]], at_most=3.0)["verdict"].startswith(
        "not established")


def test_a_paired_interval_follows_the_pairs():
    """Paired differences with a steady +1 under a common drift: the paired interval is
    narrow around 1, while the unpaired difference of medians is wide."""
    drift = [float(i) for i in range(20)]
    a, b = [x + 1 for x in drift], drift
    paired = verdict.interval(verdict.median_of_differences, [a, b], paired=True)
    unpaired = verdict.interval(verdict.difference_of_medians, [a, b])
    assert paired == (1.0, 1.0)
    assert unpaired[1] - unpaired[0] > 5
