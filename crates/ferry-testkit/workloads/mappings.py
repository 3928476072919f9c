"""mappings DIR: memory of every kind a dump treats differently, side by side.

- a 1 MiB file (DIR/mapped.<hostpid>) mapped privately, every fourth page rewritten (those
  pages are the process's own, copied on write; the others are still the file's);
- 1 MiB of shared anonymous memory (shmem) filled with random bytes;
- sixteen 64 KiB private anonymous mappings of random bytes, each followed by a 4 KiB private
  mapping of the same file: small mappings of both kinds interleaved, as CRIU's pagemap cache
  reads several small mappings in one window.
On SIGUSR1 writes the sha256 of all of it, in that order, to DIR/hash.<hostpid>.
Writes DIR/ready.<hostpid> once everything is in place."""
import hashlib
import mmap
import os
import signal
import sys
import time

from _kit import host_pid, write_atomic

PAGE = mmap.PAGESIZE
MIB = 1 << 20

directory = sys.argv[1]
path = "%s/mapped.%d" % (directory, host_pid())
with open(path, "wb") as f:
    f.write(os.urandom(MIB))
fd = os.open(path, os.O_RDONLY)
private_file = mmap.mmap(fd, MIB, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
for page in range(0, MIB // PAGE, 4):
    private_file[page * PAGE:(page + 1) * PAGE] = os.urandom(PAGE)
shared = mmap.mmap(-1, MIB, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
shared[:] = os.urandom(MIB)
small = []
for _ in range(16):
    anon = mmap.mmap(-1, 64 << 10, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anon[:] = os.urandom(64 << 10)
    small.append(anon)
    small.append(mmap.mmap(fd, PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ))
os.close(fd)

hash_requested = False


def on_usr1(_signum, _frame):
    global hash_requested
    hash_requested = True


signal.signal(signal.SIGUSR1, on_usr1)
write_atomic("%s/ready.%d" % (directory, host_pid()), "")
while True:
    if hash_requested:
        hash_requested = False
        h = hashlib.sha256()
        for region in [private_file, shared] + small:
            h.update(region[:])
        write_atomic("%s/hash.%d" % (directory, host_pid()), h.hexdigest())
    time.sleep(0.05)
