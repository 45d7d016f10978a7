#!/bin/sh
# chpasswd for the rich test guest (Debian's busybox-static has none; shadow's needs PAM):
# "user:password" lines on stdin, as chpasswd(8) reads them; -e: already crypted, else
# SHA-512 by busybox's mkpasswd. Both agents run this same program.
crypted=0
[ "$1" = "-e" ] && crypted=1
while IFS= read -r line; do
    user=${line%%:*} pass=${line#*:}
    grep -q "^$user:" /etc/shadow || { echo "chpasswd: user '$user' does not exist" >&2; exit 1; }
    if [ $crypted = 1 ]; then hash=$pass; else hash=$(mkpasswd -m sha512 "$pass"); fi
    awk -F: -v OFS=: -v u="$user" -v h="$hash" '$1 == u { $2 = h } 1' /etc/shadow \
        > /etc/shadow.new && mv /etc/shadow.new /etc/shadow
done
