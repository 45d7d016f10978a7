#!/usr/bin/env python3
"""docs/reliability.md's soak table, "measured (one run)" column, from the soak figures a test run
saved (tests/conftest.py writes dist/soak-figures.json; a published copy lives in
bench/results/soak-figures.json). tests/figures/test_soak_figures.py checks that the page
says exactly this.

    python3 bench/soak_table.py [FIGURES.json]    # print the column's cells
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SAVED = os.path.join(HERE, "results", "soak-figures.json")


def mib(kib):
    return "%.1f" % (kib / 1024)


def cells(figures):
    """{row name in the table: the measured cell}."""
    f = figures
    out = {}
    m = f.get("test_100k_random_and_mutated_frames_then_ping_and_power_off")
    if m:
        out["random + mutated frames"] = (
            "%s frames, %s decoded and answered (%s responses, %s Errors); %d broke the "
            "framing; %d connections in %.2f s; fds %d → %d, RSS %s → %s MiB; Ping median "
            "%.2f ms (max %.2f); %d crashes" % (
                "{:,}".format(m["frames"]), "{:,}".format(m["decoded_and_answered"]),
                "{:,}".format(m["answered_response"]), "{:,}".format(m["answered_error"]),
                m["breaking"], m["connections"], m["seconds"], m["pid1_before"]["fds"],
                m["pid1_after"]["fds"], mib(m["pid1_before"]["rss_kib"]),
                mib(m["pid1_after"]["rss_kib"]), m["ping_ms_median"], m["ping_ms_max"],
                m["crashes"]))
    m = f.get("test_1000_idle_connections_and_slowloris_are_closed_while_pings_stay_fast")
    if m:
        out["idle + slowloris"] = (
            "%d of %d idle and %d of %d slow closed; a separate client's Ping median %.2f ms, "
            "p99 %.2f ms" % (m["closed_idle"], m["idle"], m["closed_slow"], m["slowloris"],
                             m["ping_ms_median"], m["ping_ms_p99"]))
    m = f.get("test_a_client_that_floods_and_never_reads_cannot_grow_pid1")
    if m:
        out["flood, never read"] = (
            "back-pressure after %d KB (the 256 KiB bound), RSS %+.1f MiB, others' Ping "
            "%.2f ms" % (m["pushed_until_backpressure"] // 1000,
                         (m["pid1_during"]["rss_kib"] - m["pid1_before"]["rss_kib"]) / 1024,
                         m["ping_ms_median"]))
    m = f.get("test_5000_orphans_while_pings_keep_being_answered")
    if m:
        out["orphans"] = (
            "none left %.1f s after the burst began (the generator's pace); %s Pings, median "
            "%.2f ms, p99 %.2f ms" % (m["seconds_to_none_left"], "{:,}".format(m["pings"]),
                                     m["ping_ms_median"], m["ping_ms_p99"]))
    m = f.get("test_a_signal_storm_during_the_grace_makes_exactly_one_teardown")
    if m:
        out["signal storm"] = "%s signals, %d teardown" % ("{:,}".format(m["signals_sent"]),
                                                         m["teardowns"])
    m = f.get("test_a_process_forking_during_the_grace_is_gone_by_the_end")
    if m:
        out["fork during the grace"] = "%d processes at the request" % m["processes_at_request"]
    m = f.get("test_a_slow_sync_is_bounded")
    if m:
        out["slow sync"] = "at the bound after %d ms" % round(m["sync_bound_hit_after_s"] * 1000)
    return out


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else SAVED
    with open(path) as f:
        for name, cell in cells(json.load(f)).items():
            print("%s: %s" % (name, cell))


if __name__ == "__main__":
    main()
