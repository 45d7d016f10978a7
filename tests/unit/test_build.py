"""build.py: the artifact runs, propagates exit codes, is reproducible, carries a pyc the
target interpreter really loads."""

import os
import subprocess
import sys
import zipfile

import pytest

import build


def test_artifact_runs_through_its_shebang_and_propagates_exit_codes(pyz, tmp_path):
    with open(pyz, "rb") as f:
        assert f.readline() == b"#!" + build.DEFAULT_INTERPRETER.encode() + b"\n"
    assert os.access(pyz, os.X_OK)
    out = subprocess.run([pyz, "--version"], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, "arcbox-agent 0.1.0\n")
    assert subprocess.run([pyz, "--no-such-flag"], capture_output=True,
                          timeout=30).returncode == 2
    assert subprocess.run([pyz, "ping", "--to", "unix:%s/nobody" % tmp_path],
                          capture_output=True, timeout=30).returncode == 3


def test_two_builds_are_byte_identical_and_honour_source_date_epoch(tmp_path, monkeypatch):
    a, b, c = (str(tmp_path / n) for n in ("a.pyz", "b.pyz", "c.pyz"))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    build.build_pyz(a)
    monkeypatch.setenv("TZ", "Pacific/Auckland")          # the builder's zone must not matter
    build.build_pyz(b)
    assert open(a, "rb").read() == open(b, "rb").read()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # 2023-11-14T22:13:20Z
    build.build_pyz(c)
    assert open(a, "rb").read() != open(c, "rb").read()
    with zipfile.ZipFile(c) as z:
        assert {i.date_time for i in z.infolist()} == {(2023, 11, 14, 22, 13, 20)}
        assert sorted(z.namelist()) == ["__main__.py", "agent.py", "agent.pyc"]


def test_the_target_interpreter_loads_the_precompiled_agent(pyz):
    code = "import sys; sys.path.insert(0, sys.argv[1]); import agent; print(agent.__file__)"
    out = subprocess.run(["/usr/bin/python3", "-S", "-c", code, pyz], capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.strip().endswith("arcbox-agent.pyz/agent.pyc"), out


def test_build_script_checks_the_artifact_and_rejects_relative_interpreters(tmp_path):
    out = subprocess.run([sys.executable, build.__file__, "-o", str(tmp_path / "x.pyz")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "checked:" in out.stdout and "arcbox-agent 0.1.0" in out.stdout
    out = subprocess.run([sys.executable, build.__file__, "--python", "python3 -S", "-o",
                          str(tmp_path / "y.pyz")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "absolute path" in out.stderr


def test_install_into_a_rootfs_directory(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr" / "sbin").mkdir(parents=True)
    (rootfs / "sbin").symlink_to("usr/sbin")                  # a merged-/usr guest
    pyz = str(tmp_path / "a.pyz")
    build.build_pyz(pyz)
    steps = build.install_into(str(rootfs), pyz)
    agent_file = rootfs / "usr" / "sbin" / "arcbox-agent"
    assert agent_file.read_bytes() == open(pyz, "rb").read()
    assert os.access(str(agent_file), os.X_OK)
    assert os.readlink(str(rootfs / "usr" / "sbin" / "init")) == "arcbox-agent"
    assert steps[-1] == "sbin/init -> arcbox-agent"
    assert build.install_into(str(rootfs), pyz)[-1] == "sbin/init already points at arcbox-agent"


def test_install_into_leaves_another_init_alone(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "sbin").mkdir(parents=True)
    (rootfs / "sbin" / "init").symlink_to("../lib/systemd/systemd")
    pyz = str(tmp_path / "a.pyz")
    build.build_pyz(pyz)
    steps = build.install_into(str(rootfs), pyz)
    assert os.readlink(str(rootfs / "sbin" / "init")) == "../lib/systemd/systemd"
    assert "init=/sbin/arcbox-agent" in steps[-1]
    with pytest.raises(SystemExit):
        build.install_into(str(tmp_path / "missing"), pyz)


def test_the_image_builders_say_exactly_what_is_missing(tmp_path, monkeypatch):
    import guestimage
    monkeypatch.setattr(guestimage.shutil, "which", lambda name: None)
    with pytest.raises(guestimage.ImageError, match="mkfs.ext4 is missing .apt-get install "
                       "e2fsprogs."):
        guestimage.build_rootfs(str(tmp_path / "a.pyz"), str(tmp_path / "root.img"))
    with pytest.raises(guestimage.ImageError, match="no guest architecture 'sparc64'"):
        guestimage.fetch_packages("sparc64")
