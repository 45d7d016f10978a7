"""Targets judged by what the data establish, the same rule for every target row.

A target is "met" only when the far end of the statistic's 90 % interval lies inside it,
"missed" when the near end lies outside, and otherwise "not established"; the interval is
given with every verdict. The interval is a percentile bootstrap (RESAMPLES resamples, seeded,
so a saved run's verdict can be made again exactly): each sample list resampled with
replacement on its own, or, for paired samples (the same round measured both ways), the
pairs resampled together.

Below MIN_SAMPLES readings no verdict is given ("not established"): the bootstrap's
interval of a median cannot be wider than the readings' range, and the range of n readings
holds the true median only with probability 1 - 2 * 0.5**n -- 75 % for three, 94 % for five.

Where a figure has no spread to resample (one reading of a deterministic bound, such as
memory growth), the interval is the range of the readings, and the row says so.
"""

import random
import statistics

CONFIDENCE = 0.90
RESAMPLES = 4000
SEED = 20261205
MIN_SAMPLES = 5
MEANING = ("90 %% percentile bootstrap (%d resamples, seeded); met: the whole interval meets "
           "the target; missed: none of it does; otherwise not established" % RESAMPLES)


def median(xs):
    return statistics.median(xs)


def ratio_of_medians(a, b):
    return statistics.median(a) / statistics.median(b)


def difference_of_medians(a, b):
    return statistics.median(a) - statistics.median(b)


def median_of_differences(a, b):
    return statistics.median([x - y for x, y in zip(a, b)])


def interval(statistic, samples, paired=False, resamples=RESAMPLES, seed=SEED):
    """(low, high): the 90 % percentile bootstrap interval of statistic(*samples)."""
    rnd = random.Random(seed)
    values = []
    n = len(samples[0])
    for _ in range(resamples):
        if paired:
            picks = [rnd.randrange(n) for _ in range(n)]
            drawn = [[s[i] for i in picks] for s in samples]
        else:
            drawn = [[s[rnd.randrange(len(s))] for _ in s] for s in samples]
        values.append(statistic(*drawn))
    values.sort()
    tail = (1 - CONFIDENCE) / 2
    return values[int(tail * resamples)], values[int((1 - tail) * resamples) - 1]


def verdict(low, high, at_most=None, at_least=None):
    """met / missed / not established, for an interval against a bound."""
    if at_most is not None:
        return "met" if high <= at_most else "missed" if low > at_most else "not established"
    return "met" if low >= at_least else "missed" if high < at_least else "not established"


STATISTICS = {"median": (median, 1), "ratio": (ratio_of_medians, 2),
              "difference": (difference_of_medians, 2),
              "paired difference": (median_of_differences, 2)}


def judge(on, samples, at_most=None, at_least=None):
    """{"statistic", "value", "interval", "verdict"} for a target on `on`: "median" (of one
    sample list), "ratio" or "difference" (of the medians of two), "paired difference" (the
    median of per-pair differences), or "range" (no resampling: the readings' own range)."""
    if on == "range":
        low, high, value = min(samples[0]), max(samples[0]), statistics.median(samples[0])
    else:
        statistic, arity = STATISTICS[on]
        samples = samples[:arity]
        value = statistic(*samples)
        low, high = interval(statistic, samples, paired=on == "paired difference")
    few = min(len(s) for s in samples) < MIN_SAMPLES and on != "range"
    return {"statistic": on, "value": value, "interval": [low, high],
            "verdict": "not established (only %d readings)" % min(len(s) for s in samples)
            if few else verdict(low, high, at_most, at_least)}
