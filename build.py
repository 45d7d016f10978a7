#!/usr/bin/env python3
"""Build dist/arcbox-agent.pyz (and optionally the shiv variant), then prove it starts.

    python3 build.py                    # dist/arcbox-agent.pyz, checked with --version
    python3 build.py --python "/usr/local/bin/python3 -S"
    python3 build.py --shiv             # also dist/arcbox-agent-shiv.pyz (pip installs shiv)
    python3 build.py --demo             # build, then power off a PID-namespace "guest"

The .pyz is the stdlib zipapp format: a shebang line, then a zip holding agent.py, an
unchecked-hash agent.pyc compiled by the shebang's interpreter when it exists here (else by
this one), and a __main__.py that propagates main()'s exit status. The same inputs give byte-identical output: entries
are sorted, timestamps come from SOURCE_DATE_EPOCH (default 1980-01-01), modes are fixed,
and the pyc is hash-based instead of timestamp-based.
"""

import argparse
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import time
import zipapp

HERE = os.path.dirname(os.path.abspath(__file__))
DIST = os.path.join(HERE, "dist")
PYZ = os.path.join(DIST, "arcbox-agent.pyz")
SHIV_PYZ = os.path.join(DIST, "arcbox-agent-shiv.pyz")

# /usr/bin/python3 is where Debian, Ubuntu, Alpine and our busybox guest images put it.
# One combined flag word, because the kernel passes everything after the interpreter path as
# a single argument: "-S" skips site.py (measured in the README: most of the start-up cost
# on a stock interpreter); -I is left out because it implies -E, which would ignore
# PYTHONHASHSEED=0 from the kernel cmdline (the cure for an early-boot entropy stall).
DEFAULT_INTERPRETER = "/usr/bin/python3 -S"
ZIP_EPOCH_MIN = 315532800          # 1980-01-01T00:00:00Z, the earliest time a zip can hold

MAIN_PY = '''\
# Entry of arcbox-agent.pyz. zipapp's own "-m" main would drop main()'s return value.
from agent import entry
raise SystemExit(entry())
'''


def source_date_epoch():
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return ZIP_EPOCH_MIN
    try:
        return max(int(raw), ZIP_EPOCH_MIN)
    except ValueError:
        sys.exit("build.py: SOURCE_DATE_EPOCH=%r is not a whole number of seconds" % raw)


def compile_pyc(source, target, interpreter):
    """Compile agent.py to an unchecked-hash pyc, with the target interpreter when it
    exists here (its magic number must match, or zipimport ignores the pyc and compiles the
    source at every start). Returns the interpreter used. Docstrings are left out
    (optimize=2; agent.py uses neither __doc__ nor assert): 10% fewer bytes to unmarshal,
    ~10 ms of a guest's start under TCG; agent.py, in the same archive, keeps them."""
    exe = interpreter.split()[0]
    code = ("import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], "
            "dfile='agent.py', doraise=True, optimize=2, "
            "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)")
    if os.access(exe, os.X_OK):
        subprocess.run([exe, "-I", "-S", "-c", code, source, target], check=True)
        return exe
    py_compile.compile(source, target, dfile="agent.py", doraise=True, optimize=2,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    return sys.executable


def build_pyz(output=PYZ, interpreter=DEFAULT_INTERPRETER, with_pyc=True, compressed=False):
    """Write the zipapp; returns a short description of what went in."""
    epoch = source_date_epoch()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="arcbox-build-") as stage:
        shutil.copyfile(os.path.join(HERE, "agent.py"), os.path.join(stage, "agent.py"))
        with open(os.path.join(stage, "__main__.py"), "w") as f:
            f.write(MAIN_PY)
        compiled_by = None
        if with_pyc:
            compiled_by = compile_pyc(os.path.join(stage, "agent.py"),
                                      os.path.join(stage, "agent.pyc"), interpreter)
        for name in os.listdir(stage):
            path = os.path.join(stage, name)
            os.chmod(path, 0o644)
            os.utime(path, (epoch, epoch))
        # zipfile stores local time: pin the zone so the bytes do not depend on the builder's.
        saved_tz = os.environ.get("TZ")
        os.environ["TZ"] = "UTC"
        time.tzset()
        try:
            tmp = output + ".tmp"
            zipapp.create_archive(stage, tmp, interpreter=interpreter, compressed=compressed)
            os.chmod(tmp, 0o755)
            os.replace(tmp, output)
        finally:
            if saved_tz is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = saved_tz
            time.tzset()
    parts = ["agent.py", "__main__.py"] + (["agent.pyc (%s)" % compiled_by] if compiled_by else [])
    return ", ".join(parts)


def ensure_shiv():
    if shutil.which("shiv"):
        return shutil.which("shiv")
    print("build.py: shiv is not installed; installing it with pip (build-time only)")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "shiv"])
    exe = shutil.which("shiv") or os.path.join(os.path.dirname(sys.executable), "shiv")
    if result.returncode != 0 or not os.access(exe, os.X_OK):
        sys.exit("build.py: --shiv needs shiv (pip install shiv), and installing it failed")
    return exe


def build_shiv(output=SHIV_PYZ, interpreter=DEFAULT_INTERPRETER):
    shiv = ensure_shiv()
    with tempfile.TemporaryDirectory(prefix="arcbox-shiv-") as site:
        shutil.copyfile(os.path.join(HERE, "agent.py"), os.path.join(site, "agent.py"))
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(source_date_epoch()))
        subprocess.run([shiv, "--site-packages", site, "-e", "agent:entry", "-o", output,
                        "-p", interpreter, "--reproducible", "--uncompressed"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    return output


def check_artifact(path, interpreter):
    """Run the artifact once (--version) to prove it starts; through its shebang when that
    interpreter exists here, else with this Python."""
    exe = interpreter.split()[0]
    cmd = [path, "--version"] if os.access(exe, os.X_OK) else [sys.executable, path, "--version"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or not result.stdout.startswith("arcbox-agent "):
        sys.exit("build.py: %s does not start: exit %d\n%s%s" % (path, result.returncode,
                                                               result.stdout, result.stderr))
    return " ".join(cmd), result.stdout.strip()


def install_into(rootfs, pyz):
    """Install the .pyz into a guest root filesystem directory the way the README says:
    ROOTFS/sbin/arcbox-agent, and ROOTFS/sbin/init pointing at it. An /sbin/init that is
    something else (a distribution's init) is left alone: boot with init=/sbin/arcbox-agent
    then. Returns what was done, one line per step."""
    if not os.path.isdir(rootfs):
        raise SystemExit("build.py: --install-into %s: not a directory (the guest's root "
                         "filesystem, e.g. a mounted image or an unpacked rootfs)" % rootfs)
    sbin = os.path.join(rootfs, "sbin")
    if os.path.islink(sbin):                     # merged-/usr: sbin -> usr/sbin
        sbin = os.path.join(rootfs, os.readlink(sbin).lstrip("/"))
    os.makedirs(sbin, exist_ok=True)
    target = os.path.join(sbin, "arcbox-agent")
    shutil.copyfile(pyz, target + ".tmp")
    os.chmod(target + ".tmp", 0o755)
    os.replace(target + ".tmp", target)
    done = ["installed %s" % os.path.relpath(target, rootfs)]
    init = os.path.join(sbin, "init")
    if os.path.islink(init) and os.readlink(init) == "arcbox-agent":
        done.append("sbin/init already points at arcbox-agent")
    elif os.path.lexists(init):
        done.append("sbin/init exists (%s): left alone; boot with init=/sbin/arcbox-agent"
                    % (os.readlink(init) if os.path.islink(init) else "a file"))
    else:
        os.symlink("arcbox-agent", init)
        done.append("sbin/init -> arcbox-agent")
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Build dist/arcbox-agent.pyz, the single-file guest agent.",
        epilog="Put dist/arcbox-agent.pyz in a guest (see README: shiv's artifact extracts "
        "itself to ~/.shiv and fails on a read-only root).")
    parser.add_argument("--python", default=DEFAULT_INTERPRETER, metavar="'PATH [FLAGS]'",
                        help="interpreter line for the shebang (default: %(default)s)")
    parser.add_argument("-o", "--output", default=PYZ, help="where to write (default: dist/)")
    parser.add_argument("--no-pyc", action="store_true",
                        help="leave out the precompiled agent.pyc (source only)")
    parser.add_argument("--compress", action="store_true",
                        help="deflate the entries (smaller; the guest python then needs zlib)")
    parser.add_argument("--shiv", action="store_true",
                        help="also build dist/arcbox-agent-shiv.pyz with shiv")
    parser.add_argument("--install-into", metavar="ROOTFS",
                        help="also install the .pyz into a guest root filesystem directory: "
                        "sbin/arcbox-agent, and sbin/init -> it unless an init is there")
    parser.add_argument("--demo", nargs="?", const="auto", choices=["auto", "vm", "namespace"],
                        help="after building, power off a demo guest: a QEMU VM when QEMU is "
                        "installed, else (or with 'namespace') a PID namespace (root)")
    parser.add_argument("--demo-grace", type=float, default=2.0, metavar="SECONDS",
                        help="grace the demo asks for (default 2)")
    args = parser.parse_args(argv)
    if not args.python.startswith("/"):
        parser.error("--python needs an absolute path: a kernel running the .pyz as init has "
                     "no PATH to search, and '#!/usr/bin/env python3 -S' would look for a "
                     "program named 'python3 -S'")
    contents = build_pyz(args.output, args.python, not args.no_pyc, args.compress)
    print("built %s (%d bytes): %s" % (os.path.relpath(args.output), os.path.getsize(args.output),
                                       contents))
    how, version = check_artifact(args.output, args.python)
    print("checked: %s -> %s" % (how, version))
    if args.install_into:
        for step in install_into(args.install_into, args.output):
            print("%s: %s" % (args.install_into, step))
    if args.shiv:
        out = build_shiv(interpreter=args.python)
        print("built %s (%d bytes) with shiv" % (os.path.relpath(out), os.path.getsize(out)))
    if args.demo:
        sys.path.insert(0, os.path.join(HERE, "tools"))
        import demo
        return demo.run(args.output, grace=args.demo_grace, mode=args.demo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
