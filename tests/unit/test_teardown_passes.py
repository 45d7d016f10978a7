"""The power-off teardown's pass loop (agent.Teardown) against a fake kernel that keeps the
rules that bite: remount read-only fails with EBUSY while a swap area or a loop device's
backing file lives on the filesystem or a process holds a file on it; a loop device cannot
be cleared while it is mounted; a mount with mounts below it cannot be unmounted."""

import errno

import pytest

import agent


class FakeKernel:
    def __init__(self, mounts, swaps=(), loops=None, holders=None, frozen=(),
                 stuck_loops=(), stuck_swaps=()):
        self.table = [list(m) for m in mounts]      # id, target, fstype, ro, source
        self.swap_list = list(swaps)
        self.loop_map = dict(loops or {})
        self.holder_map = dict(holders or {})
        self.frozen = set(frozen)
        self.stuck_loops, self.stuck_swaps = set(stuck_loops), set(stuck_swaps)
        self.calls = []

    # reads
    def mounts(self):
        return [tuple(m) for m in self.table]

    def swaps(self):
        return list(self.swap_list)

    def loops(self):
        return dict(self.loop_map)

    def holders(self, target):
        return list(self.holder_map.get(target, ()))

    def _mount_of(self, path):
        return agent.owning_mount(path, self.mounts())

    def _entry(self, target):
        return next(m for m in reversed(self.table) if m[1] == target)

    # actions
    def remount_read_only(self, target):
        self.calls.append(("remount", target))
        entry = self._entry(target)
        same = [m for m in self.table if m[4] == entry[4]]      # bind mounts: one superblock
        busy = (any(self._mount_of(p)[4] == entry[4] for p in self.swap_list)
                or any(self._mount_of(b)[4] == entry[4] for b in self.loop_map.values())
                or self.holder_map.get(target))
        if busy:
            return errno.EBUSY
        for m in same:
            m[3] = True
        return 0

    def unmount(self, target):
        self.calls.append(("unmount", target))
        if any(m[1].startswith(target.rstrip("/") + "/") for m in self.table):
            return errno.EBUSY
        self.table.remove(self._entry(target))
        return 0

    def swapoff(self, path):
        self.calls.append(("swapoff", path))
        if path in self.stuck_swaps:
            return errno.ENOMEM
        self.swap_list.remove(path)
        return 0

    def clear_loop(self, device):
        self.calls.append(("clear", device))
        if device in self.stuck_loops or any(m[4] == device for m in self.table):
            return errno.EBUSY
        del self.loop_map[device]
        return 0

    def thaw(self, target):
        self.calls.append(("thaw", target))
        if target in self.frozen:
            self.frozen.discard(target)
            return 0
        return errno.EINVAL

    def sync(self):
        self.calls.append(("sync",))

    def syncfs(self, target):
        self.calls.append(("syncfs", target))
        return 0


BASE = [(1, "/", "rootfs", False, "rootfs"), (2, "/proc", "proc", False, "proc"),
        (3, "/dev", "devtmpfs", False, "devtmpfs")]


def full_stack():
    """What the issue's guest mounts: a disk, a nested disk, a loop image on the disk, a
    swap file on the nested disk, a second swap file on the loop filesystem, a bind mount of
    the nested disk and an overlay whose upper directory is on it."""
    return FakeKernel(BASE + [
        (10, "/data", "ext4", False, "/dev/vda"),
        (11, "/data/inner", "ext4", False, "/dev/vdb"),
        (12, "/mnt/loop", "ext4", False, "/dev/loop0"),
        (13, "/mnt/bind", "ext4", False, "/dev/vdb"),
        (14, "/mnt/ovl", "overlay", False, "overlay"),
    ], swaps=["/data/inner/swapfile", "/mnt/loop/swap2"],
        loops={"/dev/loop0": "/data/loop.img"})


def test_every_kind_of_mount_ends_read_only_or_released():
    k = full_stack()
    left = agent.Teardown(k).run()
    assert left == []
    assert k.swaps() == [] and k.loops() == {}
    assert all(m[3] for m in k.mounts() if m[2] == "ext4"), k.mounts()
    assert [m[1] for m in k.mounts()] == ["/", "/proc", "/dev", "/data", "/data/inner",
                                          "/mnt/bind"]          # loop fs and overlay unmounted
    # the pass order that makes it possible
    calls = k.calls
    assert calls.index(("swapoff", "/mnt/loop/swap2")) < calls.index(("unmount", "/mnt/loop"))
    assert calls.index(("unmount", "/mnt/loop")) < calls.index(("clear", "/dev/loop0"))
    last_data = max(i for i, c in enumerate(calls) if c == ("remount", "/data"))
    assert calls.index(("clear", "/dev/loop0")) < last_data
    assert calls.index(("unmount", "/mnt/ovl")) < calls.index(("remount", "/mnt/bind"))


def test_children_are_remounted_before_their_parents():
    k = FakeKernel(BASE + [(10, "/data", "ext4", False, "/dev/vda"),
                           (11, "/data/inner", "ext4", False, "/dev/vdb")])
    agent.Teardown(k).run()
    remounts = [c[1] for c in k.calls if c[0] == "remount"]
    assert remounts == ["/data/inner", "/data"]


def test_the_last_pass_is_always_followed_by_sync_even_when_something_stays_writable():
    k = FakeKernel(BASE + [(10, "/data", "ext4", False, "/dev/vda")],
                   holders={"/data": ["pid 7 (writer)"]})
    left = agent.Teardown(k).run()
    assert left == [("/data", "ext4", "Device or resource busy: pid 7 (writer) has a file "
                                      "open on it")]
    assert k.calls[-1] == ("sync",)
    assert k.calls.count(("sync",)) == 2                  # before the passes and after
    assert ("syncfs", "/data") not in k.calls             # every disk answers: sync() will do


def test_a_pass_that_changes_nothing_ends_the_passes():
    """Each kind says what it changed (as systemd-shutdown's detach loop): a pass whose
    remount failed and that turned off, unmounted and detached nothing is the last."""
    k = FakeKernel(BASE + [(10, "/data", "ext4", False, "/dev/vda")],
                   holders={"/data": ["pid 7 (writer)"]})
    t = agent.Teardown(k)
    t.run()
    assert t.passes_run == 1
    assert k.calls.count(("remount", "/data")) == 1


def test_a_pass_that_changed_something_is_followed_by_another():
    """A loop device cleared in pass 1 lets its backing filesystem go read-only in pass 2."""
    k = FakeKernel(BASE + [(10, "/data", "ext4", False, "/dev/vda")],
                   loops={"/dev/loop3": "/data/img"})
    t = agent.Teardown(k)
    assert t.run() == [] and t.passes_run == 2
    assert k.calls.count(("remount", "/data")) == 2 and ("clear", "/dev/loop3") in k.calls


def test_a_loop_device_that_never_lets_go_is_named_and_bounded():
    k = FakeKernel(BASE + [(10, "/data", "ext4", False, "/dev/vda")],
                   loops={"/dev/loop3": "/data/img"}, stuck_loops={"/dev/loop3"})
    t = agent.Teardown(k)
    left = t.run()
    assert left == [("/data", "ext4",
                     "Device or resource busy: /dev/loop3 still holds /data/img")]
    assert t.passes_run == 1          # the clear failed: nothing changed, no second pass
    assert k.calls[-1] == ("sync",)


def test_a_swap_area_that_cannot_go_is_named():
    k = FakeKernel(BASE + [(10, "/data", "ext4", False, "/dev/vda")],
                   swaps=["/data/swap"], stuck_swaps={"/data/swap"})
    left = agent.Teardown(k).run()
    assert left == [("/data", "ext4",
                     "Device or resource busy: swap area /data/swap is still on")]


class Changing(FakeKernel):
    """A kernel on which every pass changes something (a new swap area appears each time)
    and a remount never succeeds: only the bounds end the passes."""

    def __init__(self, clock=None):
        FakeKernel.__init__(self, BASE + [(10, "/data", "ext4", False, "/dev/vda")],
                            holders={"/data": ["pid 9 (x)"]})
        self.n = 0

    def swaps(self):
        self.n += 1
        return ["/dev/zram%d" % self.n]

    def swapoff(self, path):
        self.calls.append(("swapoff", path))
        return 0


def test_the_passes_are_bounded_in_number():
    t = agent.Teardown(Changing(), clock=lambda: 0.0)
    t.run()
    assert t.passes_run == agent.TEARDOWN_PASSES


def test_the_passes_are_bounded_in_time():
    now = [0.0]

    def clock():
        now[0] += 0.25
        return now[0]

    t = agent.Teardown(Changing(), time_limit=1.0, clock=clock)
    t.run()
    assert 1 <= t.passes_run < 4


def test_a_frozen_filesystem_is_thawed_before_the_first_sync():
    k = FakeKernel(BASE + [(10, "/data", "ext4", False, "/dev/vda"),
                           (11, "/net", "nfs4", False, "server:/export")], frozen={"/data"})
    agent.Teardown(k).run()
    assert k.calls.index(("thaw", "/data")) < k.calls.index(("sync",))
    assert ("thaw", "/net") not in k.calls       # not a block device: never opened


def test_contained_the_hosts_mounts_swaps_and_loops_are_never_touched():
    host = BASE + [(4, "/srv", "ext4", False, "/dev/sda2")]
    k = FakeKernel(host + [(20, "/tmp/t/mnt", "ext4", False, "/dev/loop5"),
                           (21, "/tmp/t/mnt/inner", "tmpfs", False, "scratch")],
                   swaps=["/dev/sda3", "/srv/swapfile", "/tmp/t/mnt/swap"],
                   loops={"/dev/loop0": "/srv/host.img", "/dev/loop5": "/srv/t/disk.img"})
    left = agent.Teardown(k, agent.GuestMounts(m[0] for m in host)).run()
    assert left == []
    touched = {c[1] for c in k.calls if len(c) > 1}
    assert touched == {"/tmp/t/mnt", "/tmp/t/mnt/inner", "/tmp/t/mnt/swap", "/dev/loop5"}
    assert k.swaps() == ["/dev/sda3", "/srv/swapfile"]
    assert k.loops() == {"/dev/loop0": "/srv/host.img"}


def test_a_read_only_bind_of_a_writable_disk_counts_as_writable():
    text = ("36 25 8:1 / /data rw,relatime shared:1 - ext4 /dev/vda rw\n"
            "37 25 8:1 / /view ro,relatime shared:1 - ext4 /dev/vda rw\n"
            "38 25 8:2 / /old ro,relatime - ext4 /dev/vdb ro\n"
            "39 25 0:5 / /my\\040disk rw - ext4 /dev/my\\040dev rw\n"
            "garbage line\n")
    assert agent.parse_mountinfo(text) == [
        (36, "/data", "ext4", False, "/dev/vda"), (37, "/view", "ext4", False, "/dev/vda"),
        (38, "/old", "ext4", True, "/dev/vdb"), (39, "/my disk", "ext4", False, "/dev/my dev")]


def test_proc_swaps_is_parsed_with_its_escapes():
    text = ("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
            "/data/inner/swapfile                    file\t\t8188\t\t0\t\t-2\n"
            "/dev/vdc                                partition\t8188\t\t0\t\t-3\n"
            "/my\\040swap                             file\t\t1020\t\t0\t\t-4\n")
    assert agent.parse_swaps(text) == ["/data/inner/swapfile", "/dev/vdc", "/my swap"]
    assert agent.parse_swaps("Filename Type Size Used Priority\n") == []


@pytest.mark.parametrize("path,expected", [("/data/x", "/data"), ("/data", "/data"),
                                           ("/datax/y", "/"), ("/data/inner/z", "/data/inner")])
def test_the_filesystem_holding_a_path_is_its_deepest_mount(path, expected):
    mounts = [(1, "/", "ext4", False, "/dev/vda"), (2, "/data", "ext4", False, "/dev/vdb"),
              (3, "/data/inner", "ext4", False, "/dev/vdc")]
    assert agent.owning_mount(path, mounts)[1] == expected


class DeadDisk(FakeKernel):
    """/dead is on a disk whose I/O never completes: every call that touches it waits for good
    (here: until the test ends), sync() too, since it waits on every disk."""

    def __init__(self, frozen_dead=False):
        import threading
        FakeKernel.__init__(self, BASE + [(10, "/data", "ext4", False, "/dev/vda"),
                                          (11, "/dead", "ext4", False, "/dev/mapper/dead"),
                                          (12, "/data/inner", "ext4", False, "/dev/vdb")],
                            frozen={"/dead"} if frozen_dead else (),
                            holders={"/dead": ["pid 40 (dd) in D at folio_wait_bit"]})
        self.never = threading.Event()

    def _wait_if_dead(self, target):
        if target == "/dead" or target is None:
            self.never.wait(30)

    def thaw(self, target):
        self._wait_if_dead(target if target in self.frozen else "")
        return FakeKernel.thaw(self, target)

    def syncfs(self, target):
        self.calls.append(("syncfs", target))
        self._wait_if_dead(target)
        return 0

    def remount_read_only(self, target):
        self._wait_if_dead(target)
        return FakeKernel.remount_read_only(self, target)

    def sync(self):
        self.calls.append(("sync",))
        self._wait_if_dead(None)


@pytest.mark.parametrize("frozen_dead", [False, True], ids=["nolockfs", "lockfs"])
def test_a_dead_disk_does_not_stop_the_others_going_read_only_in_bounded_time(
        frozen_dead, logged):
    import time
    k = DeadDisk(frozen_dead)
    t = agent.Teardown(k, time_limit=1.0)
    began = time.monotonic()
    left = t.run()
    took = time.monotonic() - began
    k.never.set()
    mounts = {m[1]: m for m in k.mounts()}
    assert mounts["/data"][3] and mounts["/data/inner"][3]      # the healthy ones: read-only
    assert ("syncfs", "/data") in k.calls and ("syncfs", "/data/inner") in k.calls
    assert [target for target, _, _ in left] == ["/dead"]
    assert "the disk does not answer" in left[0][2]
    assert ("remount", "/dead") not in k.calls                  # left alone once it hung
    # each step its bound (the thaws, sync(), the syncfs each, the final sync()): nothing
    # waits for good
    assert took < 2 * agent.TEARDOWN_FLUSH_SHARE + 2 * agent.TEARDOWN_OP_SHARE + 0.5
    err = "\n".join(logged)
    assert "on /dead did not finish within" in err
    assert "stuck on it: pid 40 (dd) in D at folio_wait_bit" in err
