"""The import rule (DESIGN.md §2), held by the shipped .pyz as PID 1: boot, ArcBox serving and
the power-off never import json (nor re, argparse, base64, binascii, subprocess, which a
minimal guest need not carry); the first QGA request is the one place that loads json.

The agent runs under an interpreter whose import system refuses those modules: a finder
first on sys.meta_path that writes the module's name, and the agent's frames that asked for
it, to a file, then raises ImportError. The .pyz itself runs through runpy as `python3
arcbox-agent.pyz` runs it (the zip first on sys.path, its __main__ run as the main module),
so this is the shipped artifact (its optimize=2 agent.pyc)."""

import os
import stat

import pytest

import agent
from helpers import connect_when_listening, wait_for
from nsguest import POWER_OFF_RETURNCODE

pytestmark = pytest.mark.namespace

FORBIDDEN = ("json", "re", "argparse", "base64", "binascii", "subprocess")
HOOK = '''
import os, sys

FORBIDDEN = %r
MARKER = %r


class Refuse:
    """Write who imported a forbidden module, then refuse it."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in FORBIDDEN:
            return None
        frame, where = sys._getframe(1), []
        while frame is not None:
            if "agent" in frame.f_code.co_filename:
                where.append(frame.f_code.co_name)
            frame = frame.f_back
        fd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, ("%%s imported from %%s\\n" %% (name, " < ".join(where))).encode())
        os.close(fd)
        raise ImportError("the import rule: %%s is not for this path" %% name)


sys.meta_path.insert(0, Refuse())
import runpy
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0])      # what `python3 -S arcbox-agent.pyz` does with a zip
runpy._run_module_as_main("__main__", alter_argv=False)
'''


@pytest.fixture
def refusing_python(tmp_path):
    """(an interpreter for NamespaceGuest's `python`, the marker file it writes)."""
    marker = str(tmp_path / "imported")
    hook = tmp_path / "refuse_imports.py"
    hook.write_text(HOOK % (FORBIDDEN, marker))
    python = tmp_path / "python-refusing"
    python.write_text("#!/bin/sh\nexec /usr/bin/python3 -S %s \"$@\"\n" % hook)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return str(python), marker


def test_boot_arcbox_serving_and_the_power_off_import_no_json(guest, tmp_path,
                                                              refusing_python):
    python, marker = refusing_python
    g = guest(setup="sh -c 'trap \"exit 0\" TERM; while :; do sleep 0.05; done' & ",
              python=python, agent_args=["--grace", "2"])
    pong = agent.decode_message(agent.PING_RESPONSE, g.request(agent.MSG_PING))
    assert pong["message"] == "pong"
    info = agent.decode_message(agent.SYSTEM_INFO, g.request(agent.MSG_GET_SYSTEM_INFO))
    assert info["hostname"]
    assert g.shutdown(grace=2) is True
    assert g.wait(timeout=30) == POWER_OFF_RETURNCODE, g.log()
    assert not os.path.exists(marker), open(marker).read()
    assert "import rule" not in g.log(), g.log()
    assert "all processes gone" in g.log() and "calling reboot(poweroff)" in g.log(), g.log()


def test_the_first_qga_request_is_what_loads_json(guest, tmp_path, refusing_python):
    """The same hook sees the one path that does import json (so the test above can fail);
    refused here, the request fails and PID 1 goes on serving."""
    python, marker = refusing_python
    sock = str(tmp_path / "qga.sock")
    g = guest(python=python, agent_args=["--qga", "unix:" + sock])
    assert not os.path.exists(marker)                            # booted and serving
    with connect_when_listening(sock) as s:
        s.sendall(b'{"execute": "guest-ping"}\n')
        wait_for(lambda: os.path.exists(marker), 10, "the json import")
    with open(marker) as f:
        assert " imported from qga_json" in f.read(), "the QGA request loaded nothing"
    assert agent.decode_message(agent.PING_RESPONSE, g.request(agent.MSG_PING))["message"] \
        == "pong"
