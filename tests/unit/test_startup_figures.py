"""The README's artifact start-up table is the one the saved run printed
(bench/results/startup.txt), word for word, and that run measured the same .pyz as the
published benchmark run (bench/results/bench.json): same size, same commit."""

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "bench", "results")
MARK = "for the README (tests/unit/test_startup_figures.py checks it is there):"


def test_the_readme_artifact_table_is_the_saved_startup_run():
    with open(os.path.join(RESULTS, "startup.txt")) as f:
        saved = f.read()
    block = saved.split(MARK + "\n", 1)[1].strip()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert block in readme
    # the medians of the text table above the block are the block's
    for line in saved.split(MARK)[0].splitlines():
        m = re.match(r"(.+?)\s+([0-9.]+)ms\s+([0-9.]+)-\s*([0-9.]+)ms\s+([0-9.]+)x$", line)
        if m:
            assert "%s ms" % m.group(2) in block or "%s ms**" % m.group(2) in block, line
    with open(os.path.join(RESULTS, "bench.json")) as f:
        bench = json.load(f)
    size = int(re.search(r"sizes: \.pyz ([0-9]+) bytes", saved).group(1))
    assert size == bench["memory"]["pyz_bytes"], (size, bench["memory"]["pyz_bytes"])
    assert "commit %s;" % bench["meta"]["commit"] in block
