#!/usr/bin/env python3
"""The figures the tests measured, in the docs: docs/reliability.md's soak table,
docs/never-wedged.md's hung-disk and slow-freeze figures, docs/clock.md's clock after a pause.
A test run writes what its passing tests measured, with the code's provenance, to
dist/soak-figures.json (tests/conftest.py); `--publish` keeps that run in
bench/results/runs/tests/ and makes it bench/results/soak-figures.json, from which
`python3 bench/docs_blocks.py` writes the docs' blocks (tests/figures/ checks them).

    python3 bench/soak_table.py [FIGURES.json]            # print the soak column's cells
    python3 bench/soak_table.py --publish [FIGURES.json]  # keep and publish a full run's figures
"""

import json
import os
import statistics
import sys

import provenance

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


ROWS = [   # (row, inputs, asserted): the table's fixed columns; the last is measured
    ("random + mutated frames", "100,000 frames in batches of 20 on 50 connections: mutations "
     "of Ping, GetSystemInfo, Shutdown, EnsureRuntime (type, trace, payload, an overrunning "
     "trace length) that keep the length right; one batch in twenty ends with a frame that "
     "breaks the framing, then the client closes its side", "every framed frame answered "
     "exactly once, counted from the replies; 0 crashes; Ping median < 50 ms; PID 1 fds ≤ +2, "
     "RSS < +8 MiB; power-off by SIGUSR2"),
    ("idle + slowloris", "1,000 idle connections + 50 sending one byte per 50 ms, "
     "`--idle-timeout 3 --frame-timeout 2`", "all 1,000 and all 50 closed by the timeouts; "
     "Ping median < 50 ms; PID 1 < 20 fds after"),
    ("flood, never read", "one client pushing Pings without reading", "back-pressure happens; "
     "RSS < +8 MiB; others' Ping median < 50 ms; the flooder closed"),
    ("orphans", "5,000 double-forked orphans while another client pings", "none left within "
     "30 s; no Ping error; Ping median < 50 ms"),
    ("signal storm", "CHLD, HUP, USR2, TERM, INT at PID 1 during a 2 s grace", "exactly one "
     "teardown; power-off reached; no internal error"),
    ("fork during the grace", "a TERM-ignoring shell forking a child every 10 ms", "more than 5 "
     "processes at the request; all gone after SIGKILL; power-off"),
    ("busy mount", "a file on the guest's tmpfs held open for writing from outside", "logged "
     "as staying writable with the reason, never unmounted, the final sync after it; "
     "power-off"),
    ("slow sync", "300 MB dirty on a loop-mounted ext4, `--sync-timeout 0.005`", "the agent "
     "stops waiting within 2 s and calls reboot()"),
    ("out of descriptors", "`RLIMIT_NOFILE` 16 and 30 clients (`tests/unit/test_serve.py`)",
     "one warning; < 30 ticks (0.3 s) of CPU per second; service resumes"),
    ("hostile peers and extreme graces (`test_hostile_peers.py`, `test_wire_graces.py`)",
     "200 idle connections of uid 65534; 10,000 bad frames; every wire grace (0, 1, 2³¹−1, "
     "2³²−1)", "root still pings and powers off; ≤ 100 log lines, first of each kind logged; "
     "no poll overflow, no spin"),
]
HUNG = "test_hung_disks_still_power_off_and_the_healthy_one_comes_back_clean[%s]"
FLUSH = "test_while_a_freeze_flushes_a_slow_disk_pid1_answers_pets_its_watchdog_and_stops"
WATCHDOG = "test_a_stop_that_hangs_past_its_bounds_is_ended_by_the_watchdog"
CLOCK = "test_the_keeper_brings_the_clock_back_after_a_pause_and_a_restore"
NEEDED = [HUNG % h for h in ("arcbox-shutdown", "power-button", "qga-shutdown")] + [
    FLUSH, WATCHDOG, CLOCK, "test_100k_random_and_mutated_frames_then_ping_and_power_off"]


def reliability_table(figures):
    """docs/reliability.md's soak table, every cell: the fixed columns and the measured one."""
    measured = cells(figures)
    lines = ["The last column is one test run's (%s)." % provenance.says(figures), "",
             "| soak | inputs | asserted | measured (one run) |", "|---|---|---|---|"]
    for row, inputs, asserted in ROWS:
        lines.append("| %s | %s | %s | %s |" % (row, inputs, asserted,
                                                 measured.get(row, "as asserted")))
    return "\n".join(lines)


def never_wedged_paragraph(figures):
    """docs/never-wedged.md's measured hung-disk and slow-freeze figures, from one test run."""
    stops = [(how, figures[HUNG % key]["stop_seconds"]) for how, key in (
        ("ArcBox Shutdown", "arcbox-shutdown"), ("the ACPI power button", "power-button"),
        ("QGA guest-shutdown (sent behind a guest-fsfreeze-freeze of the dead disk that can "
         "never finish)", "qga-shutdown"))]
    bound = figures[HUNG % "arcbox-shutdown"]["bound_seconds"]
    pings = figures[FLUSH]["ping_ms_during_flush"]
    return (
        "Measured (one test run: %s; x86_64 under TCG). `tests/vm/test_never_wedged.py`, one "
        "boot per way of stopping with both kinds of dead disk and a healthy one holding 21 "
        "files written without sync; grace 1 s, kill-wait 0.5 s, sync-timeout 4 s: %s — each "
        "ended with QEMU exiting by itself, within the asserted bound of grace + kill-wait + "
        "sync-timeout + power-timeout + 1 s (%g s), the healthy disk clean on the host "
        "(`e2fsck -fn`, no journal to recover) with all 21 files byte for byte. A freeze "
        "flushing 32 MB to a disk QEMU throttles to 2 MB/s: %d ArcBox Pings over 7 s answered, "
        "median %.1f ms (the TCG serial round trip), the slowest %.1f ms (asserted: < 500 ms); "
        "the watchdog was petted for %.1f of its periods; a stop hanging past its bounds with "
        "the watchdog armed for it was ended %.2f s after the arming."
        % (provenance.says(figures), "; ".join("%s %.2f s after the request" % (how, took)
                                              for how, took in stops), bound, len(pings),
           statistics.median(pings), max(pings), figures[FLUSH]["watchdog_periods_petted"],
           figures[WATCHDOG]["watchdog_ended_after_seconds"]))


def clock_paragraph(figures):
    """docs/clock.md's measured clock, from one test run."""
    c = figures[CLOCK]
    return (
        "Measured (`tests/vm/test_clock_vm.py`, one test run: %s; TCG, so the RTC): after a "
        "20 s pause the guest was %.3f s behind the host at first, within 1 s of it %.2f s "
        "later, then %.3f s behind; after a snapshot restored 30 s later, %.3f s behind at "
        "first, within 1 s %.2f s later, then %.3f s behind (the test asserts within 1 s)."
        % (provenance.says(figures), c["after_pause"]["behind_first_s"],
           c["after_pause"]["within_1s_after_s"], c["after_pause"]["behind_then_s"],
           c["after_restore"]["behind_first_s"], c["after_restore"]["within_1s_after_s"],
           c["after_restore"]["behind_then_s"]))


def main():
    args = sys.argv[1:]
    publish = "--publish" in args
    args = [a for a in args if a != "--publish"]
    path = args[0] if args else (os.path.join(HERE, "..", "dist", "soak-figures.json")
                                 if publish else SAVED)
    with open(path) as f:
        figures = json.load(f)
    if publish:
        missing = [name for name in NEEDED if name not in figures]
        if missing or "provenance" not in figures:
            raise SystemExit("not a whole test run's figures (missing %s): run the whole "
                             "suite, then publish" % (missing or "provenance"))
        print("kept %s" % provenance.keep("tests", figures))
        provenance.publish(figures, SAVED)
        print("published %s; now `python3 bench/docs_blocks.py`" % SAVED)
        return
    for name, cell in cells(figures).items():
        print("%s: %s" % (name, cell))


if __name__ == "__main__":
    main()
