"""Serving while the kernel modules load (ModuleLoader): in a real guest, with the VM tests'
module list and a large module last (btrfs, with raid6_pq and xor, which benchmark themselves
when they load), the host's first Ping is answered before that module is in, the workload
starts only after it, and a Shutdown sent while it loads ends in an orderly power-off."""

import pytest

from vmchecks import assert_powered_off

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 120
WORKLOAD = 'arcbox.exec="/bin/sh -c \'echo WORKLOAD-STARTED-$((40+2)); exec sleep 1000\'"'


def first(messages, start):
    return next((i for i, m in enumerate(messages) if m.startswith(start)), None)


def test_the_first_ping_is_answered_while_a_big_module_loads_and_the_workload_waits(
        boot, big_module_image):
    vm = boot(WORKLOAD, image=big_module_image, modules=["btrfs"], log_level="debug")
    vm.wait_ready(BOOT_TIMEOUT, try_timeout=0.1)
    vm.wait_log("WORKLOAD-STARTED-42", BOOT_TIMEOUT)
    msgs = vm.messages()
    order = [first(msgs, start) for start in (
        "module virtio_console loaded", "listening on serial:org.arcbox.agent",
        "Ping (0x0001) from serial port", "module btrfs loaded", "modules: all in after",
        "started /bin/sh")]
    assert None not in order and order == sorted(order), list(zip(order, msgs))
    # ready (READY=1) once the vsock transports are in too, still before the big module
    assert first(msgs, "listening on vsock:any:1024") < first(msgs, "ready (pid") \
        < first(msgs, "module btrfs loaded"), msgs
    assert vm.shutdown(grace=1) is True
    assert_powered_off(vm, vm.wait(60))


def test_a_shutdown_while_modules_load_powers_off_in_order_and_starts_nothing(
        boot, big_module_image):
    vm = boot(WORKLOAD, image=big_module_image, modules=["btrfs"], log_level="debug")
    vm.wait_ready(BOOT_TIMEOUT, try_timeout=0.1)
    assert vm.shutdown(grace=2) is True
    assert_powered_off(vm, vm.wait(60))
    msgs = vm.messages()
    assert first(msgs, "modules: all in") is None, msgs      # the load was cut short
    assert first(msgs, "shutdown: SIGTERM sent to all processes") is not None
    assert first(msgs, "shutdown: calling reboot(poweroff)") is not None
    assert "WORKLOAD-STARTED-42" not in vm.console()
