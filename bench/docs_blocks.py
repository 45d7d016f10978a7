#!/usr/bin/env python3
"""The docs' figures, written from the saved runs, never by hand.

Every figure in README.md and docs/*.md sits in a block that names what makes it:

    <!-- figures: bench/boot.py published_paragraph bench/results/boot.json -->
    ...the text that function makes of that saved result...
    <!-- end figures -->

`python3 bench/docs_blocks.py` writes every block again from its saved result;
tests/figures/test_published_blocks.py makes each block again and compares the whole text
(whitespace aside: paragraphs are wrapped here), so no number in a block can change alone,
and a block whose result measured another agent.py must say so (provenance.says()).

    python3 bench/docs_blocks.py [--check]
"""

import argparse
import importlib.util
import json
import os
import re
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BEGIN = re.compile(r"<!-- figures: (\S+) (\S+) (\S+) -->\n")
END = "<!-- end figures -->"
WIDTH = 95


def documents():
    docs = os.path.join(REPO, "docs")
    return [os.path.join(REPO, "README.md")] + sorted(
        os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md"))


def blocks(text):
    """[(script, function, result path, start, end)]: start/end delimit the block's text."""
    out = []
    for m in BEGIN.finditer(text):
        end = text.index(END, m.end())
        out.append((m.group(1), m.group(2), m.group(3), m.end(), end))
    return out


_modules = {}


def module(script):
    if script not in _modules:
        sys.path.insert(0, os.path.dirname(os.path.join(REPO, script)))
        spec = importlib.util.spec_from_file_location(
            "figures_" + os.path.basename(script)[:-3], os.path.join(REPO, script))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _modules[script] = mod
    return _modules[script]


def render(script, function, result_path):
    """The block's text: the function's markdown, its paragraphs wrapped."""
    with open(os.path.join(REPO, result_path)) as f:
        result = json.load(f)
    return wrap(getattr(module(script), function)(result))


def wrap(markdown):
    out = []
    for para in markdown.strip("\n").split("\n\n"):
        if any(line.startswith(("|", "- ", "```")) for line in para.splitlines()):
            out.append(para)               # a table or a list: as made
        else:
            out.append(textwrap.fill(" ".join(para.split()), WIDTH, break_on_hyphens=False,
                                     break_long_words=False))
    return "\n\n".join(out) + "\n"


def same(a, b):
    return " ".join(a.split()) == " ".join(b.split())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a "
                        "block differs from what its saved result makes")
    args = parser.parse_args()
    stale = 0
    for path in documents():
        with open(path) as f:
            text = f.read()
        new, last = [], 0
        for script, function, result, start, end in blocks(text):
            try:
                made = render(script, function, result)
            except (KeyError, OSError, ValueError) as exc:   # left as it is, and said
                stale += 1
                print("%s: %s %s %s cannot be made: %s: %s" % (
                    os.path.relpath(path, REPO), script, function, result,
                    type(exc).__name__, exc))
                made = text[start:end]
            if not same(made, text[start:end]):
                stale += 1
                print("%s: %s %s %s differs" % (os.path.relpath(path, REPO), script, function,
                                                result))
            new += [text[last:start], made]
            last = end
        new.append(text[last:])
        if not args.check and "".join(new) != text:
            with open(path, "w") as f:
                f.write("".join(new))
    if args.check and stale:
        sys.exit(1)
    print("%d block(s) %s" % (stale, "differ" if args.check else "written again"))


if __name__ == "__main__":
    main()
