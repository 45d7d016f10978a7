"""A process that takes DELAY seconds to handle SIGTERM, then writes the boot-clock time it
exits at to STAMP_FILE (the clock the agent's log uses) and exits.

usage: slow_term_child.py READY_FILE STAMP_FILE DELAY
"""

import os
import signal
import sys
import time

ready, stamp, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])


def on_term(signum, frame):
    time.sleep(delay)
    with open(stamp, "w") as f:
        f.write("%.6f" % time.clock_gettime(time.CLOCK_BOOTTIME))
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)
open(ready, "w").close()
while True:
    time.sleep(1)
