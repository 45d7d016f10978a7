"""A fake PID 1 for delegate mode: starts the agent (command line in $AGENT), writes every
signal it receives to SIGNAL_LOG, reaps, and never acts on them (a broken init, so the
delegate agent has to force the power-off itself).

usage: fake_init.py SIGNAL_LOG
"""

import os
import signal
import sys
import time

log_path = sys.argv[1]


def record(signum, frame):
    with open(log_path, "a") as f:
        f.write("%d\n" % signum)


for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGPWR):
    signal.signal(sig, record)
agent = os.spawnv(os.P_NOWAIT, "/bin/sh", ["sh", "-c", "exec " + os.environ["AGENT"]])
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.1)
    except InterruptedError:
        pass
