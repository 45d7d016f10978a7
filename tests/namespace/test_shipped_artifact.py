"""The tiers above the unit tier run the shipped artifact, not the source: the .pyz that
build.py makes, whose agent.pyc is compiled with optimize=2 (asserts and docstrings gone).
Here: the interpreters that run it -- this tier's (NamespaceGuest's default, sys.executable)
and the guests' (/usr/bin/python3, Debian's, as in the VM images) -- load agent from that
pyc, not from the agent.py beside it in the zip. tests/unit/test_structure.py checks that
agent.py relies on nothing the pyc leaves out."""

import subprocess
import sys

import pytest

import build

pytestmark = pytest.mark.namespace

PROBE = ("import sys; sys.path.insert(0, sys.argv[1]); import agent; "
         "print(agent.__doc__ is None, agent.early_boot.__doc__ is None, "
         "agent.__spec__.cached or agent.__spec__.origin)")


def probe(python, pyz):
    out = subprocess.run([python, "-S", "-c", PROBE, pyz], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"])
def test_the_pyz_runs_its_optimised_pyc_not_the_source(pyz, python, tmp_path):
    module_doc_gone, function_doc_gone, origin = probe(python, pyz)
    assert (module_doc_gone, function_doc_gone) == ("True", "True"), (python, origin)
    assert origin.startswith(pyz), origin
    # a .pyz without the pyc (the source compiled at start) keeps them: the probe tells
    source_only = str(tmp_path / "source-only.pyz")
    build.build_pyz(source_only, with_pyc=False)
    assert probe(python, source_only)[:2] == ["False", "False"]
