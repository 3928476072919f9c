#!/usr/bin/python3
"""memload: a migration workload: M MiB of random memory, a line request/reply TCP port, and
optionally P % of its memory dirtied per second.

    memload.py --mib 1024 [--port 7000] [--bind 0.0.0.0] [--dirty 10]

Memory: one private anonymous mapping of M MiB, filled with random bytes (numpy's generator).
It listens only once the memory is filled, so a connection that is answered means "ready".

Protocol (one line per request, as the testkit's tcp_echo): for each line L received on a
connection it answers "<n> L", n counting the lines of that connection from 1, so a lost or
duplicated reply shows as a gap or a repeat. Two lines are commands; their answer is
"<n> L <json>":
  !sum    checks the memory: {"computed": C, "expected": E, "ok": C == E, "rewrites": R,
          "dirty_pages_per_s": achieved rate, "mib": M, "pid": pid as seen inside}.
          C is a position-weighted sum of the memory's 64-bit words (sum of w[i] * (2i+1) mod
          2**64), computed over all of it now; E is the same sum as the workload keeps it up to
          date while it dirties pages (each rewrite adjusts it). A memory that came back wrong
          after a migration (a page lost, stale, moved) gives C != E; for an idle workload C also
          stays equal to the value before the migration.
  !stats  the same without the full pass (cheap).
Dirtying: --dirty P rewrites P % of the pages per second, spread over 10 ms ticks, pages picked
at random (numpy, one batch per tick); a rewrite stores a new random 64-bit word at a random place
in the page (the page is dirty as a whole for the kernel, CRIU and ferry) and adjusts E. It runs
in the same single thread as the server, between select() calls, so requests are answered within
a tick. dirty_pages_per_s in the answers is the rate reached while running (stops not counted).

Needs /usr/bin/python3 with numpy (python3-numpy, pulled in by python3-matplotlib).
"""
import argparse
import json
import mmap
import os
import select
import socket
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS threads: one thread for CRIU to dump
import numpy as np  # noqa: E402

PAGE = mmap.PAGESIZE
MASK = (1 << 64) - 1
CHUNK_WORDS = 1 << 22  # 32 MiB per pass of the checksum


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--port", type=int, default=7000)
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--dirty", type=float, default=0.0, help="percent of the memory rewritten per second")
    args = ap.parse_args()

    size = args.mib << 20
    pages = size // PAGE
    data = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    rng = np.random.default_rng()
    step = 64 << 20
    for off in range(0, size, step):
        n = min(step, size - off)
        data[off:off + n] = rng.bytes(n)
    expected = weighted_sum(data)
    rewrites = 0

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(128)
    conns = {}  # socket -> [unfinished input, lines answered]
    rate = pages * args.dirty / 100.0  # pages per second
    tick = 0.01
    started = time.monotonic()
    last = started
    owed = 0.0
    words = np.frombuffer(data, dtype="<u8")  # a writable view of the mapping
    active = 0.0  # seconds the dirtier ran (a stop, a checkpoint, does not count)
    last_active = started

    def stats(full):
        out = {
            "expected": expected,
            "rewrites": rewrites,
            "dirty_pages_per_s": round(rewrites / active, 1) if active else 0.0,
            "dirty_pages_per_s_wanted": round(rate, 1),
            "mib": args.mib,
            "pid": os.getpid(),
        }
        if full:
            t0 = time.monotonic()
            computed = weighted_sum(data)
            out.update(computed=computed, ok=computed == expected, sum_s=round(time.monotonic() - t0, 3))
        return out

    def serve(conn):
        state = conns[conn]
        try:
            chunk = conn.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            del conns[conn]
            conn.close()
            return
        state[0] += chunk
        out = []
        while b"\n" in state[0]:
            line, state[0] = state[0].split(b"\n", 1)
            state[1] += 1
            if line in (b"!sum", b"!stats"):
                extra = json.dumps(stats(line == b"!sum")).encode()
                out.append(b"%d %s %s\n" % (state[1], line, extra))
            else:
                out.append(b"%d %s\n" % (state[1], line))
        try:
            conn.sendall(b"".join(out))
        except OSError:
            del conns[conn]
            conn.close()

    while True:
        timeout = tick if rate > 0 else 1.0
        readable, _, _ = select.select([listener] + list(conns), [], [], timeout)
        for sock in readable:
            if sock is listener:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[conn] = [b"", 0]
            else:
                serve(sock)
        if rate > 0:
            now = time.monotonic()
            # After a long stop (a checkpoint) do not catch up: the rate is per second of running.
            owed += rate * min(now - last, 0.1)
            last = now
            active += min(now - last_active, 0.1)
            last_active = now
            n = int(owed)
            owed -= n
            if n:
                # Distinct pages (a word written twice in one batch would be counted twice).
                chosen = np.unique(rng.integers(0, pages, n, dtype=np.int64))
                idx = (chosen * (PAGE // 8) + rng.integers(0, PAGE // 8, len(chosen))).astype(np.uint64)
                new = rng.integers(0, 1 << 64, len(chosen), dtype=np.uint64, endpoint=False)
                with np.errstate(over="ignore"):
                    old = words[idx]
                    words[idx] = new
                    delta = (new - old) * (idx * np.uint64(2) + np.uint64(1))
                    expected = (expected + int(delta.sum(dtype=np.uint64))) & MASK
                rewrites += len(chosen)


if __name__ == "__main__":
    main()
