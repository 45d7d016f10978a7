"""The front door and the reference stay what they promise: the README is a short read whose
configuration table lists every serve option with its flag, its cmdline key and its default;
every relative link in the README and docs/ leads to a file (and a section, where it names
one); project history stays in the git log."""

import os
import re

import agent
from helpers import ROOT

DOCS = os.path.join(ROOT, "docs")
PAGES = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def read(path):
    with open(path) as f:
        return f.read()


def test_the_readme_is_a_short_read():
    assert len(read(PAGES[0]).splitlines()) <= 300


def test_the_configuration_table_lists_every_serve_option_with_its_default():
    rows = [line for line in read(PAGES[0]).splitlines() if line.startswith("| `--")]
    for name, _, _, default, _ in agent.SERVE_OPTIONS:
        flag, key = "`--%s" % name.replace("_", "-"), "`arcbox.%s=" % name
        row = next((r for r in rows if r.startswith("| " + flag)), None)
        assert row is not None, "no row for " + flag
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[1].startswith(key), (flag, cells[1])
        if default and default not in ("0",):
            assert cells[2] == "`%s`" % default or default in ("on",) and cells[2] == "on", \
                (flag, cells[2], default)


def anchor(title):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_every_relative_link_leads_to_a_file_and_its_section():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, section = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(page), path))
            assert os.path.exists(full), (page, target)
            if section:
                titles = re.findall(r"(?m)^#+ (.*)$", read(full))
                assert section in [anchor(t) for t in titles], (page, target)


def test_no_project_history_in_the_reference():
    for page in PAGES:
        text = read(page)
        for word in ("audit", "before main", "issue 2", "issue 1"):
            assert word not in text, (page, word)
