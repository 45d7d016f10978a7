"""A process with a SIGTERM handler that exits 0: stopped with SIGSTOP, it can only run the
handler if somebody sends SIGCONT. Writes READY_FILE once the handler is installed."""

import signal
import sys
import time

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open(sys.argv[1], "w").close()
while True:
    time.sleep(1)
