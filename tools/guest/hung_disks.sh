#!/bin/sh
# Disks that never answer, beside a healthy one (tests/vm/test_never_wedged.py). vda is the
# healthy disk (/data); vdb and vdc are used through device-mapper (dm-linear), then
# suspended the two ways a disk stops answering: vdb as LVM and `dmsetup suspend` do it
# (lockfs: the filesystem is frozen, then I/O queued), vdc as a dead SAN does (--nolockfs:
# I/O simply never completes). A writer is stuck on each. The 21 files written to the healthy
# disk, never synced, must all be there after the stop.
set -e
export DM_DISABLE_UDEV=1           # no udev here: libdevmapper makes /dev/mapper/NAME itself
mkdir -p /data /locked /dead
mount -t ext4 /dev/vda /data
for pair in locked:vdb dead:vdc; do
    name=${pair%%:*} disk=${pair##*:}
    dmsetup create "$name" --table "0 $(cat /sys/block/$disk/size) linear /dev/$disk 0"
    mount -t ext4 "/dev/mapper/$name" "/$name"
done
i=1
while [ $i -le 21 ]; do
    yes "healthy file $i" | head -c 65536 > /data/f$i
    i=$((i + 1))
done
for d in locked dead; do
    (while :; do dd if=/dev/zero of=/$d/w bs=64k count=8 conv=fsync 2>/dev/null; done) &
done
sleep 0.5
dmsetup suspend locked
dmsetup suspend --nolockfs dead
echo HUNG-DISKS-READY-$((40 + 2))
exec sleep 100000
