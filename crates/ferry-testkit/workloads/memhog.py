"""memhog DIR N_MIB [THREADS]: holds N MiB of random bytes in a page-aligned private anonymous mapping.

On SIGUSR1 writes their sha256 to DIR/hash.<hostpid> (computed by a child it forks for it when
DIR/fork.<hostpid> exists: the child's memory is the parent's, copied at fork). On SIGUSR2 reads a percentage P from
DIR/rewrite.<hostpid>, overwrites P% of the buffer's pages (distinct pages picked at random) with
new random bytes and writes how many pages it rewrote to DIR/rewritten.<hostpid>.
THREADS more threads (default none) wake every 10 ms on their own stacks, so a restore that
got a thread's stack wrong kills the process. Writes DIR/ready.<hostpid> once the memory is
filled and the threads run."""
import hashlib
import mmap
import os
import random
import signal
import sys
import threading
import time

from _kit import host_pid, read_small, write_atomic

PAGE = mmap.PAGESIZE
STEP = 1 << 20

directory, mib = sys.argv[1], int(sys.argv[2])
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 0
size = mib << 20
# Page aligned, unlike a bytes object: rewriting one page of the buffer dirties one page of memory.
data = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
for offset in range(0, size, STEP):
    data[offset:offset + min(STEP, size - offset)] = os.urandom(min(STEP, size - offset))
hash_requested = False
rewrite_requested = False


def on_usr1(_signum, _frame):
    global hash_requested
    hash_requested = True


def on_usr2(_signum, _frame):
    global rewrite_requested
    rewrite_requested = True


def rewrite():
    path = "%s/rewrite.%d" % (directory, host_pid())
    percent = float((read_small(path) or "0").strip() or "0")
    os.remove(path)
    pages = size // PAGE
    chosen = random.sample(range(pages), int(pages * percent / 100))
    for page in chosen:
        data[page * PAGE:(page + 1) * PAGE] = os.urandom(PAGE)
    write_atomic("%s/rewritten.%d" % (directory, host_pid()), str(len(chosen)))


def tick():
    while True:
        time.sleep(0.01)


for _ in range(threads):
    threading.Thread(target=tick, daemon=True).start()

# The handlers must be in place before "ready": the signals' default action would kill us.
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGUSR2, on_usr2)
write_atomic("%s/ready.%d" % (directory, host_pid()), "")
while True:
    if rewrite_requested:
        rewrite_requested = False
        rewrite()
    if hash_requested:
        hash_requested = False
        me = host_pid()
        hash_path = "%s/hash.%d" % (directory, me)
        if os.path.exists("%s/fork.%d" % (directory, me)):
            child = os.fork()
            if child == 0:
                try:
                    write_atomic(hash_path, hashlib.sha256(data).hexdigest())
                finally:
                    os._exit(0)
            os.waitpid(child, 0)
        else:
            write_atomic(hash_path, hashlib.sha256(data).hexdigest())
    time.sleep(0.05)
