"""docs/performance.md's artifact start-up table against its saved run,
bench/results/startup.json, made again here from the raw samples (medians, ranges, ratios to
the bare interpreter), and that run built the same .pyz as the published benchmark run when
both measured the same agent.py and build.py."""

import statistics

from helpers import doc, saved_result


def test_the_artifact_table_is_the_saved_startup_run():
    data = saved_result("startup.json")
    text = doc("performance.md", "Measured with `python3 bench/startup.py", "<!-- end figures -->")
    rows = data["rows"]
    assert len(rows) == 8 and all(len(times) == data["runs"] >= 20 for _, times in rows)
    base = statistics.median(rows[0][1])
    for name, times in rows:
        med = statistics.median(times)
        cells = "%.1f ms" % (med * 1000), "%.1f–%.1f" % (min(times) * 1000, max(times) * 1000), \
            "%.2f×" % (med / base)
        assert " | ".join(cells).replace(" ms |", " ms** |") in text \
            or " | ".join(cells) in text, (name, cells)


def test_the_pyz_measured_is_the_one_the_benchmarks_measured():
    startup, bench = saved_result("startup.json"), saved_result("bench.json")
    same = all(startup["provenance"]["sha256"][f] == bench["provenance"]["sha256"][f]
               for f in ("agent.py", "build.py"))
    assert same, "startup.json and bench.json measured different code: run both again"
    assert startup["sizes"][0] == bench["memory"]["pyz_bytes"]
