"""What a saved result measured, and every run kept.

collect() is what each benchmark writes into its result as "provenance": the sha256 of
agent.py, build.py and the harness files that made it (not only a commit: a harness edited
and not yet committed is seen), the commit and the files that differed from it, the machine,
the interpreters, the date. keep() saves a run's whole result under
bench/results/runs/BENCH/, a new file per run that is never overwritten, so a published run
is one of a recorded series (the runs before it, kept or missed, beside it).

says() is what the docs print with a figure: its commit, and, when agent.py is no longer the
one measured, "the agent has changed since". The figures tests compare the docs with it, so
a change to agent.py fails them until the figures are measured again or say so.
"""

import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUNS = os.path.join(HERE, "results", "runs")
AGENT_PYTHON = "/usr/bin/python3"
CHANGED = "the agent has changed since"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _out(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return ""


def collect(harness, interpreters=(AGENT_PYTHON,)):
    """The provenance of a run made by the files `harness` (paths relative to the repo)."""
    files = ["agent.py", "build.py"] + [h for h in harness if h not in ("agent.py", "build.py")]
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    changed = _out(["git", "-C", REPO, "status", "--porcelain", "--"] + files)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]),
        "differs_from_commit": [line[3:] for line in changed.splitlines()],
        "sha256": {name: sha256(os.path.join(REPO, name)) for name in files},
        "machine": {"arch": os.uname().machine, "kernel": os.uname().release,
                    "cpus": os.cpu_count(), "cpu_model": model},
        "python": dict({"runner": sys.version.split()[0]}, **{
            path: _out([path, "-c", "import sys; print(sys.version.split()[0])"])
            for path in interpreters}),
    }


def keep(bench, result):
    """Save the run in bench/results/runs/BENCH/ under a name of its own; its path."""
    p = result["provenance"]
    folder = os.path.join(RUNS, bench)
    os.makedirs(folder, exist_ok=True)
    stem = "%s-%s%s" % (time.strftime("%Y-%m-%dT%H%M%S", time.gmtime()), p["commit"],
                        "-uncommitted" if p["differs_from_commit"] else "")
    for n in range(100):
        path = os.path.join(folder, stem + ("-%d" % n if n else "") + ".json")
        try:
            with open(path, "x") as f:        # never over a kept run
                json.dump(result, f, indent=1, sort_keys=True)
                f.write("\n")
            return path
        except FileExistsError:
            continue
    raise SystemExit("bench/results/runs/%s: no free name for %s" % (bench, stem))


def publish(result, path):
    """The published copy a doc quotes (bench/results/NAME.json): a run that was kept."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")


def of(result):
    """A result's provenance; for results saved before provenance existed, what they had."""
    if "provenance" in result:
        return result["provenance"]
    meta = result.get("meta", result)
    return {"commit": str(meta.get("commit", "?")).split("+")[0],
            "when": meta.get("when") or meta.get("date") or "date not recorded",
            "sha256": meta.get("sha256") or {}}


def agent_changed_since(result, agent_path=os.path.join(REPO, "agent.py")):
    """True when agent.py is not the one the result measured (or the result cannot say)."""
    recorded = of(result)["sha256"].get("agent.py")
    return recorded != sha256(agent_path)


def says(result, agent_path=os.path.join(REPO, "agent.py")):
    """"commit X, agent.py sha256 0123456789ab, DATE" -- and, when agent.py is not the one
    measured, "; measured on commit X: the agent has changed since"."""
    p = of(result)
    digest = p["sha256"].get("agent.py")
    text = "commit %s%s, %s" % (p["commit"], ", agent.py sha256 %s" % digest[:12]
                                if digest else "", p["when"])
    if p.get("differs_from_commit"):
        text += " (with uncommitted changes to %s)" % ", ".join(p["differs_from_commit"])
    if agent_changed_since(result, agent_path):
        text += "; measured on commit %s: %s" % (p["commit"], CHANGED)
    return text
