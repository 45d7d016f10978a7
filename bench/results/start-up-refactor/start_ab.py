"""A/B: `.pyz --version` start-up, the agent before and after issue 26's change, interleaved."""
import json, random, statistics, subprocess, sys, time
rnd = random.Random(26)
out = {"before": [], "after": []}
for i in range(int(sys.argv[1])):
    order = ["before", "after"]; rnd.shuffle(order)
    for name in order:
        t = time.perf_counter()
        subprocess.run(["/usr/bin/python3", "-S", "/tmp/ab/%s.pyz" % name, "--version"],
                       stdout=subprocess.DEVNULL, check=True)
        out[name].append(time.perf_counter() - t)
json.dump({"commit": subprocess.check_output(["git", "-C", "/work/main", "rev-parse", "--short", "HEAD"]).decode().strip(),
           "variants": {"before": "05001ae agent.py", "after": sys.argv[3]},
           "command": "/usr/bin/python3 -S PYZ --version", "samples_s": out}, open(sys.argv[2], "w"), indent=1)
d = [a - b for a, b in zip(out["after"], out["before"])]
rnd2 = random.Random(1); bs = sorted(statistics.median(rnd2.choices(d, k=len(d))) for _ in range(10000))
print("before %.2f ms, after %.2f ms, paired diff median %+.3f ms (90%% %+.3f..%+.3f)" % (
    statistics.median(out["before"]) * 1000, statistics.median(out["after"]) * 1000,
    statistics.median(d) * 1000, bs[500] * 1000, bs[9500] * 1000))
