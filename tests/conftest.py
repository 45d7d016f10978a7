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


@pytest.fixture
def logged(monkeypatch):
    """The agent's log messages, recorded as they are logged (any thread), not read back
    from a captured stderr: threads a test leaves behind can cut what capfd keeps."""
    import agent
    messages = []
    monkeypatch.setattr(agent, "log", lambda level, message: messages.append(message))
    return messages


_FIGURES = {}      # test name -> the figures it recorded
_PASSED = set()
_FILES = {}        # test name -> its file, for the figures' provenance


@pytest.fixture
def figures(request):
    """Soak tests record what they measured here. Only a test that passed publishes them
    (printed at the end of the run and written to dist/soak-figures.json): a figure from a
    failed check is not a figure."""
    table = {}
    _FIGURES[request.node.name] = table
    _FILES[request.node.name] = os.path.relpath(str(request.node.fspath), ROOT)
    return table


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed:
        _PASSED.add(item.name)


def pytest_terminal_summary(terminalreporter):
    published = {name: table for name, table in _FIGURES.items() if name in _PASSED}
    if not published:
        return
    import json
    terminalreporter.section("soak figures (tests that passed)")
    for name, table in published.items():
        terminalreporter.write_line("%s: %s" % (name, json.dumps(table, sort_keys=True)))
    # what measured them: agent.py, build.py and the tests' files, by sha256 (bench/provenance.py);
    # `python3 bench/soak_table.py --publish` keeps the run and makes it the published one
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import provenance
    published["provenance"] = provenance.collect(sorted(
        {_FILES[name] for name in published} | {"tests/conftest.py", "tests/helpers.py"}))
    os.makedirs(os.path.join(ROOT, "dist"), exist_ok=True)
    with open(os.path.join(ROOT, "dist", "soak-figures.json"), "w") as f:
        json.dump(published, f, indent=1, sort_keys=True)
