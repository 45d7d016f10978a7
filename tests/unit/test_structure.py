"""agent.py reads in the order of its story: no top-level name is used in a section above
the one that defines it (a section is a `# N. title` banner between `# ====` lines), and the
table of contents in the module docstring lists every section and sub-section."""

import ast
import os
import re
import symtable

HERE = os.path.dirname(os.path.abspath(__file__))
AGENT = os.path.join(HERE, "..", "..", "agent.py")
SECTION = re.compile(r"^# (\d+)\. (.+)$")
SUBSECTION = re.compile(r"^# ---- (.+?) -+$")


def read():
    with open(AGENT) as f:
        return f.read()


def sections(lines):
    """[(first line number, section number)] in order."""
    return [(i + 1, int(m.group(1))) for i, line in enumerate(lines)
            for m in [SECTION.match(line)] if m and i and lines[i - 1].startswith("# ====")]


def section_of(lineno, starts):
    current = 0
    for first, number in starts:
        if first <= lineno:
            current = number
    return current


def globals_used(table):
    """Names a function or class body (and what it nests) takes from module scope."""
    names = {s.get_name() for s in table.get_symbols() if s.is_referenced() and s.is_global()}
    for child in table.get_children():
        names |= globals_used(child)
    return names


def test_no_name_is_used_above_the_section_that_defines_it():
    text = read()
    lines = text.splitlines()
    starts = sections(lines)
    tree = ast.parse(text)
    defined = {}                                  # top-level name -> section
    for node in tree.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for n in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(n, ast.Name):     # not x[k] = ...: that uses x and k
                        targets.append(n.id)
        for name in targets:
            defined.setdefault(name, section_of(node.lineno, starts))
    tables = {t.get_lineno(): t for t in symtable.symtable(text, AGENT, "exec").get_children()}
    early = []
    for node in tree.body:
        here = section_of(node.lineno, starts)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            line = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            used = globals_used(tables.get(line) or tables[node.lineno])
            # default values, bases and decorators run at module level, in this section
            extra = node.decorator_list + (
                node.bases if isinstance(node, ast.ClassDef) else
                node.args.defaults + [d for d in node.args.kw_defaults if d is not None])
            used |= {n.id for e in extra for n in ast.walk(e) if isinstance(n, ast.Name)}
        else:
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Load)}
        for name in used:
            if defined.get(name, 0) > here:
                early.append("line %d (section %d) uses %s from section %d"
                             % (node.lineno, here, name, defined[name]))
    assert early == [], "\n".join(sorted(early))


def test_the_table_of_contents_lists_every_section_and_sub_section():
    text = read()
    doc = ast.get_docstring(ast.parse(text))
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = SECTION.match(line)
        if m and i and lines[i - 1].startswith("# ===="):
            assert "%s. %s" % (m.group(1), m.group(2)) in doc, m.group(0)
        m = SUBSECTION.match(line)
        if m:
            assert m.group(1) in doc, "the table of contents lacks: " + m.group(1)


def test_nothing_relies_on_what_the_shipped_pyc_leaves_out():
    """build.py compiles agent.pyc with optimize=2, as the guest runs it: asserts are gone,
    docstrings are None and `if __debug__:` blocks never run. agent.py must not need them: no
    assert statement, no __doc__ or __debug__ read (a --help built from a docstring would be
    empty in the guest). tests/namespace/test_shipped_artifact.py shows the tiers above this
    one run that pyc."""
    tree = ast.parse(read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            found.append("assert at line %d" % node.lineno)
        elif isinstance(node, ast.Name) and node.id in ("__doc__", "__debug__"):
            found.append("%s at line %d" % (node.id, node.lineno))
        elif isinstance(node, ast.Attribute) and node.attr == "__doc__":
            found.append(".__doc__ at line %d" % node.lineno)
        elif isinstance(node, ast.Constant) and node.value in ("__doc__", "__debug__"):
            found.append("%r (getattr?) at line %d" % (node.value, node.lineno))
    assert not found, found
