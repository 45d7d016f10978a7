"""`arcbox-agent rehearse -- CMD`: the real agent as PID 1 of a new PID namespace runs CMD,
stops it as busybox's poweroff does and tells each process's fate. A polite workload exits 0;
one with a TERM-ignoring child exits 1 and names it; it works as an unprivileged user (here
unprivileged user namespaces are allowed); where user namespaces are off it says so (6); bad
usage is 2; nothing of the host is touched: its mounts, its processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.namespace

POLITE = ["sh", "-c", "sleep 100 & sleep 101 & wait"]
STUBBORN = ["sh", "-c", "sleep 100 & (trap '' TERM; exec sleep 102) & wait"]


def rehearse(pyz, *args, python=sys.executable, user=None, timeout=60):
    cmd = [python, pyz, "rehearse"] + list(args)
    if user is not None:
        cmd = ["setpriv", "--reuid=%d" % user, "--regid=%d" % user, "--clear-groups"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")


def test_a_polite_workload_exits_0_and_the_timeline_names_each_process(pyz, namespaces):
    out = rehearse(pyz, "--grace", "2", "--after", "0.3", "--", *POLITE)
    assert out.returncode == 0, (out.stdout, out.stderr)
    text = out.stdout
    assert "stop requested: SIGUSR2, as busybox's poweroff sends" in text
    assert text.count(": exited on SIGTERM") >= 3, text        # sh and both sleeps
    assert "outcome: every process exited on SIGTERM within the grace" in text
    assert "killed" not in text.split("processes:")[1]


def test_a_term_ignoring_child_is_named_killed_at_the_grace_and_exit_1(pyz, namespaces):
    began = time.monotonic()
    out = rehearse(pyz, "--grace", "1", "--after", "0.3", "--json", "--", *STUBBORN)
    took = time.monotonic() - began
    assert out.returncode == 1, (out.stdout, out.stderr)
    result = json.loads(out.stdout)
    fates = {p["name"] + ("*" if p["fate"] == "killed" else ""): p for p in result["processes"]}
    killed = [p for p in result["processes"] if p["fate"] == "killed"]
    assert len(killed) == 1 and killed[0]["name"] == "sleep", result["processes"]
    assert killed[0]["how"] == "killed at the grace (ignores SIGTERM)"
    assert "sh" in fates and fates["sh"]["fate"] == "exited"
    assert result["powered_off"] is True and result["exit_status"] == 1
    assert any("grace over" in what for _, what in result["timeline"])
    assert took < 0.3 + 1 + 10                    # about a second and a half, not a VM boot


def test_it_needs_no_root_where_user_namespaces_are_allowed(pyz, namespaces):
    python = "/usr/bin/python3"                   # pyenv's shims are not for other users
    if not os.access(python, os.X_OK):
        pytest.fail("%s is missing (apt-get install python3)" % python, pytrace=False)
    shared = tempfile.mkdtemp(prefix="arcbox-rehearse-")   # pytest's own are root's only
    try:
        os.chmod(shared, 0o755)
        copy = os.path.join(shared, "arcbox-agent.pyz")
        shutil.copy(pyz, copy)
        os.chmod(copy, 0o755)
        out = rehearse(copy, "--grace", "1", "--after", "0.3", "--", *POLITE, python=python,
                       user=65534)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "every process exited on SIGTERM" in out.stdout


def test_where_user_namespaces_are_off_it_says_so(pyz, namespaces):
    # a user namespace of the test's own, in which no further one may be made
    script = ("echo 0 > /proc/sys/user/max_user_namespaces && exec %s %s rehearse -- true"
              % (sys.executable, pyz))
    out = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 6, (out.stdout, out.stderr)
    assert "unshare(CLONE_NEWUSER) failed: No space left on device" in out.stderr
    assert "user.max_user_namespaces" in out.stderr


@pytest.mark.parametrize("args,needle", [([], "no workload"),
                                         (["--grace", "-1", "--", "true"], "--grace"),
                                         (["--after", "x", "--", "true"], "invalid float")])
def test_bad_usage_is_2(pyz, args, needle):
    out = rehearse(pyz, *args)
    assert out.returncode == 2 and needle in out.stderr, out.stderr


def test_nothing_of_the_host_is_touched(pyz, namespaces, tmp_path):
    with open("/proc/self/mountinfo") as f:
        before = f.read()
    sentinel = subprocess.Popen(["sleep", "1000"])
    try:
        out = rehearse(pyz, "--grace", "1", "--after", "0.2", "--", *STUBBORN)
        assert out.returncode == 1, out.stderr
        assert sentinel.poll() is None                # not signalled: kill(-1) stayed inside
    finally:
        sentinel.send_signal(signal.SIGKILL)
        sentinel.wait()
    with open("/proc/self/mountinfo") as f:
        after = f.read()
    assert after == before                            # nothing remounted, nothing mounted
