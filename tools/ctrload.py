#!/usr/bin/python3
"""ctrload: the container workload of ferry's tests and demo (standard library only, so that it
runs from the lab's image): M MiB of random memory, a tick counter, and a line request/reply
TCP port.

    ctrload.py --mib 64 [--port 7000] [--tick 0.1]

Memory: one private anonymous mapping of M MiB filled from os.urandom; its SHA-256 is taken
once filled. It listens only once the memory is filled, so an answer means "ready".
The counter goes up by one every --tick seconds (in the server's loop), and is also written to
/tmp/ticks, so that a restored copy shows it went on from where it was.

Protocol (as tools/memload.py and the testkit's tcp_echo): for each line L received on a
connection it answers "<n> L", n counting the lines of that connection from 1, so a lost or
duplicated reply shows as a gap or a repeat. Commands answer "<n> L <json>":
  !sum    hashes the memory again: {"sha256": now, "expected": at fill, "ok": equal, "ticks": T,
          "mib": M, "pid": pid as seen inside}
  !stats  {"ticks": T, "mib": M, "pid": pid}
"""
import argparse
import hashlib
import json
import mmap
import os
import select
import socket
import time


def digest(buf):
    h = hashlib.sha256()
    view = memoryview(buf)
    for off in range(0, len(buf), 16 << 20):
        h.update(view[off:off + (16 << 20)])
    view.release()
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--port", type=int, default=7000)
    ap.add_argument("--tick", type=float, default=0.1)
    args = ap.parse_args()

    size = args.mib << 20
    data = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, size, 8 << 20):
        n = min(8 << 20, size - off)
        data[off:off + n] = os.urandom(n)
    expected = digest(data)
    ticks = 0
    next_tick = time.monotonic() + args.tick

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    srv.listen(256)
    conns = {}  # socket -> [buffer, lines answered]

    def answer(line):
        if line == b"!sum":
            now = digest(data)
            extra = {"sha256": now, "expected": expected, "ok": now == expected}
        elif line == b"!stats":
            extra = {}
        else:
            return None
        extra.update({"ticks": ticks, "mib": args.mib, "pid": os.getpid()})
        return json.dumps(extra).encode()

    while True:
        timeout = max(0.0, next_tick - time.monotonic())
        readable, _, _ = select.select([srv] + list(conns), [], [], timeout)
        if time.monotonic() >= next_tick:
            ticks += 1
            next_tick += args.tick
            with open("/tmp/ticks", "w") as f:
                f.write(f"{ticks}\n")
        for s in readable:
            if s is srv:
                c, _ = srv.accept()
                conns[c] = [b"", 0]
                continue
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                conns.pop(s, None)
                s.close()
                continue
            state = conns[s]
            state[0] += chunk
            out = []
            while b"\n" in state[0]:
                line, state[0] = state[0].split(b"\n", 1)
                state[1] += 1
                extra = answer(line)
                reply = b"%d %s" % (state[1], line)
                if extra is not None:
                    reply += b" " + extra
                out.append(reply + b"\n")
            if out:
                try:
                    s.sendall(b"".join(out))
                except OSError:
                    conns.pop(s, None)
                    s.close()


if __name__ == "__main__":
    main()
