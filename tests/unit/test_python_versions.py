"""The guest may run Python 3.9: check it with a tool (vermin) and by running it."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENT = os.path.join(ROOT, "agent.py")


def find_python39():
    """A real 3.9 binary: pyenv's own (its shims on PATH may point elsewhere), else PATH."""
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    if found:
        return found[-1]
    on_path = shutil.which("python3.9")
    return on_path if on_path and "/shims/" not in on_path else None


def test_vermin_says_the_agent_needs_at_most_python_3_9():
    run_vermin = "import sys; from vermin.main import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", run_vermin, "--no-tips", "--violations",
                          "-t=3.9-", "--eval-annotations", AGENT],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, "vermin found code newer than 3.9:\n" + out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", run_vermin, "--no-tips", AGENT],
                         capture_output=True, text=True, timeout=120)
    assert "Minimum required versions: 3." in out.stdout, out.stdout + out.stderr


def test_the_agent_runs_under_python_3_9(tmp_path):
    py39 = find_python39()
    if py39 is None:
        pytest.fail("no python3.9 on this machine (pyenv install 3.9 or put python3.9 on "
                    "PATH): the guest-path check cannot run", pytrace=False)
    sock = str(tmp_path / "a.sock")
    agent_proc = subprocess.Popen([py39, "-S", AGENT, "--listen", "unix:" + sock],
                                  stderr=subprocess.PIPE)
    try:
        out = None
        for _ in range(200):
            out = subprocess.run([py39, "-S", AGENT, "info", "--to", "unix:" + sock, "--json"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0:
                break
        assert out.returncode == 0, out.stderr
        assert '"os_name": "Linux"' in out.stdout
    finally:
        agent_proc.terminate()
        assert agent_proc.wait(10) == 0
