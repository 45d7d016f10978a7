"""docs/performance.md's artifact start-up table is the one the saved run printed
(bench/results/startup.txt), word for word, and that run measured the same .pyz as the
published benchmark run (bench/results/bench.json): same size, same commit."""

import re

from helpers import doc, saved_result

# what bench/startup.py prints above the block: runs saved before the docs moved say README
MARKS = ("for docs/performance.md (tests/figures/test_startup_figures.py checks it is there):",
         "for the README (tests/unit/test_startup_figures.py checks it is there):")


def test_the_published_artifact_table_is_the_saved_startup_run():
    saved = saved_result("startup.txt")
    MARK = next(mark for mark in MARKS if mark in saved)
    block = saved.split(MARK + "\n", 1)[1].strip()
    assert block in doc("performance.md")
    # the medians of the text table above the block are the block's
    for line in saved.split(MARK)[0].splitlines():
        m = re.match(r"(.+?)\s+([0-9.]+)ms\s+([0-9.]+)-\s*([0-9.]+)ms\s+([0-9.]+)x$", line)
        if m:
            assert "%s ms" % m.group(2) in block or "%s ms**" % m.group(2) in block, line
    bench = saved_result("bench.json")
    size = int(re.search(r"sizes: \.pyz ([0-9]+) bytes", saved).group(1))
    assert size == bench["memory"]["pyz_bytes"], (size, bench["memory"]["pyz_bytes"])
    assert "commit %s;" % bench["meta"]["commit"] in block
