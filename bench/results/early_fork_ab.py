"""A/B: Shutdown to reboot() with and without the early-forked power-off child."""
import json, random, sys, os, subprocess
sys.path.insert(0, "/work/main/bench")
import run
work = "/tmp/ab/work"; os.makedirs(work, exist_ok=True)
rnd = random.Random(20261205)
out = {"with_prepare": [], "no_prepare": []}
N = int(sys.argv[1])
for i in range(N):
    order = ["with_prepare", "no_prepare"]; rnd.shuffle(order)
    phase = rnd.uniform(0, run.PHASE)
    for name in order:
        s = run.one_shutdown("/tmp/ab/%s.pyz" % name, work, phase)
        out[name].append(s)
    print(i, {k: round(v[-1]["overhead"]*1000, 2) for k, v in out.items()}, flush=True)
json.dump({"commit": subprocess.check_output(["git","-C","/work/main","rev-parse","--short","HEAD"]).decode().strip(),
           "variants": {"with_prepare": "HEAD's agent.py", "no_prepare": "HEAD's agent.py with PowerOffChild.prepare() returning at once"},
           "samples": out}, open(sys.argv[2], "w"), indent=1)
