"""marker DIR: holds a unique marker (64 random hex digits) in memory many times over, and a
blob of random bytes that no compressor can shrink.

Writes the marker to DIR/marker.<hostpid> and the blob to DIR/blob.<hostpid>, then
DIR/ready.<hostpid>. On SIGUSR1 writes DIR/report.<hostpid> (JSON): the marker as its memory
holds it, and whether every copy of it and the blob are intact. Tests look for the marker and
pieces of the blob in files that must never hold plaintext memory: the blob catches plaintext
that was compressed (which could hide a repeated marker) but not encrypted.
"""
import hashlib
import json
import os
import signal
import sys
import time

from _kit import host_pid, write_atomic

COPIES = 4096
BLOB = 256 * 1024

directory = sys.argv[1]
marker = os.urandom(32).hex()
# 256 KiB of marker copies: every page of it holds the whole marker several times.
held = bytearray((marker * COPIES).encode())
blob = os.urandom(BLOB)
blob_sha = hashlib.sha256(blob).hexdigest()
requested = False


def on_usr1(_signum, _frame):
    global requested
    requested = True


signal.signal(signal.SIGUSR1, on_usr1)
with open("%s/blob.%d" % (directory, host_pid()), "wb") as f:
    f.write(blob)
write_atomic("%s/marker.%d" % (directory, host_pid()), marker)
write_atomic("%s/ready.%d" % (directory, host_pid()), "")
while True:
    if requested:
        requested = False
        first = bytes(held[:64]).decode()
        state = {
            "pid": host_pid(),
            "marker": first,
            "intact": first == marker
            and held == bytearray((marker * COPIES).encode())
            and hashlib.sha256(blob).hexdigest() == blob_sha,
        }
        write_atomic("%s/report.%d" % (directory, host_pid()), json.dumps(state))
    time.sleep(0.05)
