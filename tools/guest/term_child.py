"""A guest process that takes DELAY seconds to handle SIGTERM. It writes READY_FILE once its
handler is installed, and on SIGTERM writes "RECEIVED EXITED" to STAMP_FILE: the boot-clock
times (the clock the agent's log uses) at which it got the signal and at which it exits, so
that a test or a benchmark can tell the child's own time from the init's.

usage: term_child.py READY_FILE STAMP_FILE DELAY
"""

import os
import signal
import sys
import time

ready, stamp, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])


def on_term(signum, frame):
    received = time.clock_gettime(time.CLOCK_BOOTTIME)
    if delay:
        time.sleep(delay)
    with open(stamp, "w") as f:
        f.write("%.6f %.6f" % (received, time.clock_gettime(time.CLOCK_BOOTTIME)))
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)
open(ready, "w").close()
while True:
    time.sleep(1)
