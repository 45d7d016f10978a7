"""Shared fixtures. Tiers: tests/unit (pure, no privileges), tests/namespace (the real .pyz
as PID 1 of a PID namespace: needs root, which CI has; fails loudly, never skips)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import build  # noqa: E402


@pytest.fixture(scope="session")
def pyz(tmp_path_factory):
    """A freshly built arcbox-agent.pyz (default interpreter line, with agent.pyc)."""
    out = str(tmp_path_factory.mktemp("dist") / "arcbox-agent.pyz")
    build.build_pyz(out)
    return out


@pytest.fixture(scope="session")
def namespaces():
    """Fail (not skip) when PID namespaces cannot be made: a skipped test proves nothing."""
    import nsguest
    reason = nsguest.why_namespaces_unavailable()
    if reason:
        pytest.fail("namespace tests cannot run here: " + reason, pytrace=False)
    return True


_FIGURES = {}


@pytest.fixture
def figures(request):
    """Soak tests record what they measured here; it is printed at the end of the run and
    written to dist/soak-figures.json."""
    table = {}
    _FIGURES[request.node.name] = table
    return table


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    import json
    terminalreporter.section("soak figures")
    for name, table in _FIGURES.items():
        terminalreporter.write_line("%s: %s" % (name, json.dumps(table, sort_keys=True)))
    os.makedirs(os.path.join(ROOT, "dist"), exist_ok=True)
    with open(os.path.join(ROOT, "dist", "soak-figures.json"), "w") as f:
        json.dump(_FIGURES, f, indent=1, sort_keys=True)
