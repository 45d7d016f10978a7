"""The seed's own platform: an aarch64 guest (QEMU -M virt, TCG, Debian's arm64 kernel), the
same busybox initramfs with the .pyz as /init. What is arch-specific gets proven here: the
finit_module syscall number (273), struct input_event and the gpio-keys power button, PSCI
power-off (QEMU must exit by itself), and the stdlib set derived from the x86_64 one."""

import pytest

import agent
from vmchecks import assert_powered_off

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 180             # TCG emulating another architecture
STOP_TIMEOUT = 60


def test_aarch64_serves_loads_modules_and_shuts_down_in_order(boot, arm_image):
    vm = boot("arcbox.exec=\"/bin/sh -c '(sleep 1000 &) && exec /test/ignore_term.sh'\"",
              image=arm_image, log_level="debug")
    vm.wait_ready(BOOT_TIMEOUT)
    info = agent.decode_message(agent.SYSTEM_INFO, vm.request(agent.MSG_GET_SYSTEM_INFO))
    assert info["arch"] == "aarch64" and info["hostname"] == "arcbox"
    vm.wait_log("modules: all in", BOOT_TIMEOUT)               # they load while it serves
    lines = vm.messages()
    for module in ("virtio_console", "vsock_loopback", "gpio_keys"):
        assert "module %s loaded" % module in lines, lines   # finit_module, not a modprobe
    assert "listening on vsock:any:1024" in lines             # the vsock modules work
    vm.wait_log("IGNORING-TERM", BOOT_TIMEOUT)
    assert vm.shutdown(grace=1) is True
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))             # PSCI SYSTEM_OFF ended QEMU
    lines = vm.messages()
    assert any(l.startswith("reaped pid") and "killed by signal 15" in l for l in lines)
    assert "shutdown: grace over, SIGKILL sent to the rest" in lines
    assert any(l.startswith("shutdown: calling reboot(poweroff)") for l in lines)


def test_aarch64_busybox_poweroff_goes_through_the_agent(boot, arm_image):
    vm = boot('arcbox.exec="/bin/sh -c \'sleep 1; exec poweroff\'" arcbox.grace=5',
              image=arm_image)
    assert_powered_off(vm, vm.wait(BOOT_TIMEOUT + STOP_TIMEOUT))
    assert any(l.startswith("shutdown requested (signal 12): action poweroff")
               for l in vm.messages())


def test_aarch64_gpio_power_button_powers_off_in_order(boot, arm_image):
    """On -M virt QEMU's system_powerdown raises the gpio-keys power key (device tree): 24-byte
    input events on a 64-bit guest, read through evdev."""
    vm = boot("arcbox.grace=2", image=arm_image)
    vm.wait_ready(BOOT_TIMEOUT)
    vm.wait_log("power button: watching", BOOT_TIMEOUT)   # armed once its modules are in
    assert any(l.startswith("power button: watching") and "gpio-keys" in l
               for l in vm.messages()), vm.messages()
    vm.monitor_command("system_powerdown")
    assert_powered_off(vm, vm.wait(STOP_TIMEOUT))
    lines = vm.messages()
    assert any(l.startswith("shutdown requested (power button") for l in lines), lines
    assert any(l.startswith("shutdown: calling reboot(poweroff)") for l in lines)
