#!/bin/sh
# Every kind of mount a real guest makes (tools/storagecheck.py builds the disks and checks
# them afterwards; tests/vm/test_nothing_lost.py and bench/run.py run it):
#   /data            disk vda                     /data/inner   disk vdb, nested
#   /mnt/loop        /data/loop.img, mount -o loop (busybox picks the device)
#   /mnt/loop2       /data/inner/loop2.img on a loop device set up by hand (losetup)
#   swap files       /data/inner/swapfile, and /mnt/loop/swap2 (swap on a loop filesystem)
#   /mnt/bind        bind of /data/inner/shared   /mnt/ovl      overlay, upper on vdb
# Then it writes a file on each without sync, leaves a process that ignores SIGTERM (and the
# SIGHUP of its session's end) appending numbered lines to /mnt/loop/appender, freezes
# /data/inner with a writer waiting on it, and says MOUNTS-READY-42 (computed, so the echoed
# command line cannot match) and touches /tmp/mounts-ready. Words in $@: "poweroff" runs
# busybox poweroff at the end; "nofreeze" leaves the freeze out (busybox init's own
# poweroff syncs first, which would wait for a frozen disk forever).
set -e
mkdir -p /data /mnt/loop /mnt/loop2 /mnt/bind /mnt/ovl
mount -t ext4 /dev/vda /data
mount -t ext4 /dev/vdb /data/inner
mount -o loop /data/loop.img /mnt/loop
dev=$(losetup -f)
losetup "$dev" /data/inner/loop2.img
mount -t ext4 "$dev" /mnt/loop2
dd if=/dev/zero of=/data/inner/swapfile bs=1M count=8 2>/dev/null
chmod 600 /data/inner/swapfile && mkswap /data/inner/swapfile >/dev/null
swapon /data/inner/swapfile
dd if=/dev/zero of=/mnt/loop/swap2 bs=1M count=4 2>/dev/null
chmod 600 /mnt/loop/swap2 && mkswap /mnt/loop/swap2 >/dev/null
swapon /mnt/loop/swap2
mount --bind /data/inner/shared /mnt/bind
mount -t overlay overlay -o lowerdir=/data/lower,upperdir=/data/inner/upper,workdir=/data/inner/work /mnt/ovl
yes disk-a | head -c 1000000 > /data/a
yes disk-b | head -c 1000000 > /data/inner/b
yes loop-c | head -c 1000000 > /mnt/loop/c
yes loop2-d | head -c 1000000 > /mnt/loop2/d
yes bind-e | head -c 1000000 > /mnt/bind/e
yes overlay-f | head -c 1000000 > /mnt/ovl/f
(trap '' TERM HUP; i=0; while :; do i=$((i+1)); echo $i >> /mnt/loop/appender; done) &
while [ ! -s /mnt/loop/appender ]; do sleep 0.05; done
# A backup agent froze the nested disk and went away; a writer now waits on it (in the
# kernel: not even SIGKILL ends it), and so does loop2's I/O to its backing file.
case " $* " in *" nofreeze "*) ;; *)
    fsfreeze --freeze /data/inner
    (trap '' TERM HUP; echo written-while-frozen > /data/inner/g; exec sleep 1000) &
esac
cat /proc/swaps
echo MOUNTS-READY-$((40+2))
touch /tmp/mounts-ready
# busybox poweroff calls sync() before it signals init, and that sync() would wait for the
# frozen disk forever: -n leaves the syncing to init (the agent thaws first).
case " $* " in *" poweroff "*) sleep 0.5; exec poweroff -n; esac
exec sleep 1000
