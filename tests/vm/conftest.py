"""The VM tier: a busybox guest under QEMU (TCG) with the built .pyz as /init. Fails loudly,
never skips, when QEMU or the guest packages are missing: .ci/run installs them."""

import os

import pytest

import guestimage
import vm as vmtool

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def guest_image(pyz, tmp_path_factory):
    reason = vmtool.why_vm_unavailable()
    if reason:
        pytest.fail("VM tests cannot run here: " + reason, pytrace=False)
    out = str(tmp_path_factory.mktemp("guest") / "initramfs.cpio")
    with open(os.path.join(HERE, "guest_vsock_client.py"), "rb") as f:
        client = f.read()
    extra = {"/test/vsock_client.py": client,
             # a process that ignores SIGTERM (the disposition survives exec)
             "/test/ignore_term.sh": b"#!/bin/sh\ntrap '' TERM\necho IGNORING-TERM\nexec sleep 1000\n"}
    extra.update(guestimage.notify_receiver_files())
    info = guestimage.build_initramfs(pyz, out, extra_files=extra)
    info["kernel"] = guestimage.vmlinux(guestimage.fetch_packages())
    info["initramfs"] = out
    return info


@pytest.fixture
def boot(guest_image, tmp_path):
    """boot(cmdline="", disk=None, log_level, qemu_args) -> a started VM; every VM is killed
    at the end."""
    machines = []

    def start(cmdline="", disk=None, log_level="info", qemu_args=()):
        machine = vmtool.VM(str(tmp_path), guest_image["initramfs"], guest_image["kernel"],
                            cmdline=cmdline, disk=disk, log_level=log_level,
                            qemu_args=qemu_args)
        machines.append(machine)
        return machine.start()

    yield start
    for machine in machines:
        machine.__exit__(None, None, None)
