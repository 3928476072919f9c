#!/usr/bin/python3
"""counterd: a threaded counter server holding M MiB of random memory, for migration tests.

    counterd.py --mib 256 [--port 7000] [--bind 0.0.0.0]

One thread per connection (a threaded server, as a database is). Each connection sends lines:
  inc     the counter goes up by one; the answer is its new value: once a client has read it,
          that value is acknowledged, and the counter must never again be below it. Each inc
          also rewrites one 64-bit word at a random place of the memory (so that the server
          touches its whole memory, and a post-copy migration's faults are real).
  get     the counter's value.
  !sum    checks the memory: {"computed": C, "expected": E, "ok": C == E, "counter": N}. E is
          kept up to date by each rewrite; C is computed over all of the memory now.
It listens only once the memory is filled, so a connection that is answered means "ready".
Needs /usr/bin/python3 with numpy.
"""
import argparse
import json
import mmap
import os
import socket
import threading

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

MASK = (1 << 64) - 1
CHUNK_WORDS = 1 << 22


def weighted_sum(buf):
    """sum(w[i] * (2i + 1)) mod 2**64 over the buffer's 64-bit little-endian words."""
    words = np.frombuffer(buf, dtype="<u8")
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for start in range(0, len(words), CHUNK_WORDS):
            w = words[start:start + CHUNK_WORDS]
            weights = np.arange(start, start + len(w), dtype=np.uint64)
            weights *= np.uint64(2)
            weights += np.uint64(1)
            weights *= w
            total += weights.sum(dtype=np.uint64)
    del words
    return int(total)


class State:
    def __init__(self, mib):
        size = mib << 20
        self.data = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        rng = np.random.default_rng()
        step = 64 << 20
        for off in range(0, size, step):
            n = min(step, size - off)
            self.data[off:off + n] = rng.bytes(n)
        self.words = np.frombuffer(self.data, dtype="<u8")
        self.expected = weighted_sum(self.data)
        self.counter = 0
        self.lock = threading.Lock()
        self.rand = np.random.default_rng()

    def inc(self):
        with self.lock:
            i = int(self.rand.integers(0, len(self.words)))
            new = int(self.rand.integers(0, 1 << 63))
            old = int(self.words[i])
            self.words[i] = new
            self.expected = (self.expected + (new - old) * (2 * i + 1)) & MASK
            self.counter += 1
            return self.counter

    def check(self):
        with self.lock:
            computed = weighted_sum(self.data)
            return {"computed": computed, "expected": self.expected, "ok": computed == self.expected,
                    "counter": self.counter}


def serve(state, conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = conn.makefile("rwb", buffering=0)
    try:
        for line in f:
            line = line.strip()
            if line == b"inc":
                out = b"%d\n" % state.inc()
            elif line == b"get":
                out = b"%d\n" % state.counter
            elif line == b"!sum":
                out = json.dumps(state.check()).encode() + b"\n"
            else:
                out = b"? " + line + b"\n"
            conn.sendall(out)
    except OSError:
        pass
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--port", type=int, default=7000)
    ap.add_argument("--bind", default="0.0.0.0")
    args = ap.parse_args()
    state = State(args.mib)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(128)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(state, conn), daemon=True).start()


if __name__ == "__main__":
    main()
