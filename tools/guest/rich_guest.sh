#!/bin/sh
# The rich guest both agents are compared in (tests/vm/test_qga_rich_guest.py): a partitioned
# disk (vda1 ext4 on /data, vda2 under device-mapper on /dm), a bind mount of /data on /bind,
# a loop device on /loop, a second route, a logged-in user (utmp), alice's and bob's keys;
# then qemu-ga 10 on the second QGA port. /etc carries os-release with quotes and escapes,
# the time zone, adjtime (the RTC in UTC), passwd/shadow/group.
set -e
export DM_DISABLE_UDEV=1           # no udev here: libdevmapper makes /dev/mapper/NAME itself
mkdir -p /data /bind /dm /loop /var/run
mount -t ext4 /dev/vda1 /data
mount --bind /data /bind
dmsetup create lv0 --table "0 $(cat /sys/block/vda/vda2/size) linear /dev/vda2 0"
mke2fs -q /dev/mapper/lv0
mount -t ext2 /dev/mapper/lv0 /dm
dd if=/dev/zero of=/data/loop.img bs=1024 count=2048 2>/dev/null
mke2fs -q -F /data/loop.img
losetup /dev/loop0 /data/loop.img
mount -t ext2 /dev/loop0 /loop
ip route add 192.168.50.0/24 via 10.0.2.2 dev eth0 metric 7
cp /test/utmp /run/utmp
cp /test/utmp /var/run/utmp
for u in alice:1000 bob:1001; do
    name=${u%%:*} id=${u##*:}
    chown -R $id:$id /home/$name
    chmod 700 /home/$name/.ssh
    chmod 600 /home/$name/.ssh/authorized_keys
done
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name)" = org.qemu.guest_agent.peer ] && dev=/dev/${p##*/}
done
export PATH=/usr/sbin:/usr/bin:/sbin:/bin   # qemu-ga finds chpasswd and hwclock there
echo RICH-GUEST-READY-$((40 + 2))
exec /usr/sbin/qemu-ga -m virtio-serial -p "$dev" -t /run
