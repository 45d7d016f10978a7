"""docs/reliability.md's soak table quotes the saved soak run (bench/results/soak-figures.json) cell
for cell, as bench/soak_table.py makes the cells: a re-run without updating the page, or a
figure typed by hand, fails here. The frames soak's own arithmetic is checked too."""

import os
import sys

from helpers import ROOT, doc, saved_result

sys.path.insert(0, os.path.join(ROOT, "bench"))
import soak_table  # noqa: E402


def test_the_published_soak_column_is_the_saved_run():
    figures = saved_result("soak-figures.json")
    rows = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[-1]
            for line in doc("reliability.md").splitlines() if line.startswith("| ") and line.count(" | ") == 3}
    cells = soak_table.cells(figures)
    assert len(cells) == 7
    for name, cell in cells.items():
        assert rows.get(name) == cell, (name, rows.get(name), cell)
    frames = figures["test_100k_random_and_mutated_frames_then_ping_and_power_off"]
    assert frames["decoded_and_answered"] == frames["answered_response"] \
        + frames["answered_error"] == frames["framed"]
    assert frames["framed"] + frames["breaking"] == frames["frames"]
