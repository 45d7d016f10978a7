"""A guest root is read-only unless the cmdline says rw: the .pyz must start from a read-only
filesystem with HOME unwritable. shiv's artifact, which extracts itself to ~/.shiv on first
run, cannot: this is why the README tells you to put the plain .pyz in a guest."""

import shlex
import subprocess

import pytest

import build

pytestmark = pytest.mark.namespace


@pytest.fixture(scope="session")
def shiv_pyz(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shiv") / "arcbox-agent-shiv.pyz")
    build.build_shiv(out)
    return out


def run_on_readonly_tmpfs(files, commands):
    """Copy files onto a tmpfs, remount it read-only, run commands (HOME on it too) in a
    private mount namespace. Returns the shell's CompletedProcess."""
    script = ["set -e", "ro=$(mktemp -d)", "mount -t tmpfs -o size=32m tmpfs \"$ro\""]
    script += ["cp %s \"$ro\"/" % shlex.quote(f) for f in files]
    script += ["mount -o remount,ro \"$ro\"", "export HOME=\"$ro\"", "unset SHIV_ROOT",
               "set +e"] + commands
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           "\n".join(script)], capture_output=True, text=True, timeout=120)


def test_the_pyz_starts_from_a_readonly_root_and_shiv_does_not(pyz, shiv_pyz, namespaces):
    out = run_on_readonly_tmpfs([pyz, shiv_pyz], [
        'touch "$ro/probe" 2>/dev/null && echo WRITABLE',
        '"$ro/arcbox-agent.pyz" --version; echo "pyz=$?"',
        '"$ro/arcbox-agent.pyz" ping --to unix:/nonexistent >/dev/null 2>&1; echo "ping=$?"',
        '"$ro/arcbox-agent-shiv.pyz" --version 2>&1 | tail -n 1; echo "shiv=$?"',
        '/usr/bin/python3 -S "$ro/arcbox-agent-shiv.pyz" --version >/dev/null 2>&1; '
        'echo "shiv_rc=$?"',
    ])
    assert "WRITABLE" not in out.stdout, "the tmpfs should be read-only"
    assert "arcbox-agent 0.1.0\npyz=0" in out.stdout, out.stdout + out.stderr
    assert "ping=3" in out.stdout
    assert "shiv_rc=0" not in out.stdout, "shiv started on a read-only HOME?"
    assert "Read-only file system" in out.stdout, out.stdout
