"""memhog DIR N_MIB: holds N MiB of random bytes; on SIGUSR1 writes their sha256 to
DIR/hash.<hostpid>. Writes DIR/ready.<hostpid> once the memory is filled."""
import hashlib
import os
import signal
import sys
import time

from _kit import host_pid, write_atomic

directory, mib = sys.argv[1], int(sys.argv[2])
data = os.urandom(mib << 20)
requested = False


def on_usr1(_signum, _frame):
    global requested
    requested = True


# The handler must be in place before "ready": SIGUSR1's default action would kill us.
signal.signal(signal.SIGUSR1, on_usr1)
write_atomic("%s/ready.%d" % (directory, host_pid()), "")
while True:
    if requested:
        requested = False
        write_atomic("%s/hash.%d" % (directory, host_pid()), hashlib.sha256(data).hexdigest())
    time.sleep(0.05)
