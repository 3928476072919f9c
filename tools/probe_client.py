#!/usr/bin/python3
"""probe_client: what a client sees of a migration: the longest wait for a reply, and errors.

    probe_client.py echo  HOST PORT [--conns 50] [--duration D] [--stop-file F] [--interval S]
    probe_client.py redis HOST PORT [--duration D] [--stop-file F] [--keyspace N] [--prefix key:]
    probe_client.py redis-fill   HOST PORT --keys 100000 [--prefix data:] [--value-size 64]
    probe_client.py redis-digest HOST PORT [--match 'data:*']
    probe_client.py ask HOST PORT LINE          # one request to a line server (memload's !sum)

echo: against a line server that answers each line L with "<n> L", n counting the lines of the
connection from 1 (tools/memload.py, tools/echo_server.py, the testkit's tcp_echo). Each of the
N connections sends its next numbered request as soon as (or --interval after) the reply to the
previous one came, and checks the reply: the echoed number must be the one sent (else "wrong";
an older one is "dup"), and n must go up by one (a jump is "lost": the server counted lines
whose replies never came; a repeat is "dup"). A reset, EOF, or no reply within --timeout is an
error too: the connection is closed and reopened (n starts again from 1), and the time until
its next reply counts in its gap.

redis: one connection, RESP spoken by hand: SET key:K value, then GET key:K, and the GET must
return that value (else "wrong"); K = i mod --keyspace, value "<i>-<run token>". At the end
(after the stop) it reads every key it wrote back (MGET) and counts those that do not hold the
last value written as "lost".

Both run for --duration seconds (default: until stopped), or until SIGTERM/SIGINT, or until
--stop-file exists, then print one JSON line:
  {"mode", "requests", "errors", "max_gap_s", "gap_start", "gap_end", "lost", "dup", "wrong",
   "timeouts", "resets", "reconnects", "stalled", "conns", "per_conn_max_gap_s", "duration_s", "error_log"}
max_gap_s is the client-observed downtime: the longest time between two consecutive good
replies on one connection (the last reply before the pause to the first after it); gap_start
and gap_end are their unix times. "gaps" lists every gap above 0.1 s (up to 100). A connection
still waiting for a reply at the stop has a gap that never ended: it counts up to the stop, and
if its request has waited longer than --stall (1 s) it is an error ("stalled"). (redis mode
blocks in its socket calls: a hung connection delays the stop by up to --timeout.)
Until the first reply of a connection nothing is counted
(start-up, --connect-wait), so the probe may start before the server listens.
Exit status 0, or 2 for bad arguments or no first reply within --connect-wait.
"""
import argparse
import hashlib
import json
import os
import secrets
import selectors
import signal
import socket
import sys
import time

STOP = False
GAP_REPORT = 0.1  # gaps longer than this are listed in the summary ("gaps")


def on_signal(_signum, _frame):
    global STOP
    STOP = True


def now():
    return time.monotonic()


class Clock:
    """Unix time of a monotonic instant (taken once, so gaps are not hit by clock steps)."""

    def __init__(self):
        self.mono0 = time.monotonic()
        self.unix0 = time.time()

    def unix(self, mono):
        return round(self.unix0 + (mono - self.mono0), 6)


class Stats:
    def __init__(self, mode, conns):
        self.mode = mode
        self.requests = 0
        self.errors = 0
        self.lost = 0
        self.dup = 0
        self.wrong = 0
        self.timeouts = 0
        self.resets = 0
        self.reconnects = 0
        self.stalled = 0
        self.max_gap = 0.0
        self.gap = (None, None)
        self.per_conn = [0.0] * conns
        self.error_log = []
        self.gaps = []  # every gap longer than GAP_REPORT: (conn, start, end)
        self.started = now()

    def error(self, kind, conn, detail):
        self.errors += 1
        if len(self.error_log) < 20:
            self.error_log.append({"t": round(time.time(), 3), "conn": conn, "kind": kind, "detail": detail[:200]})

    def reply(self, conn, last, t):
        """A good reply at t on conn whose previous good reply was at last (or None)."""
        self.requests += 1
        if last is not None:
            gap = t - last
            if gap > GAP_REPORT and len(self.gaps) < 100:
                self.gaps.append((conn, last, t))
            if gap > self.per_conn[conn]:
                self.per_conn[conn] = gap
            if gap > self.max_gap:
                self.max_gap = gap
                self.gap = (last, t)

    def open_gap(self, conn, last, t):
        """A gap still open at the stop: counted as if a reply had come at t (not a request)."""
        self.requests -= 1
        self.reply(conn, last, t)

    def summary(self, clock, extra=None):
        out = {
            "mode": self.mode,
            "requests": self.requests,
            "errors": self.errors,
            "max_gap_s": round(self.max_gap, 6),
            "gap_start": clock.unix(self.gap[0]) if self.gap[0] is not None else None,
            "gap_end": clock.unix(self.gap[1]) if self.gap[1] is not None else None,
            "lost": self.lost,
            "dup": self.dup,
            "wrong": self.wrong,
            "timeouts": self.timeouts,
            "resets": self.resets,
            "reconnects": self.reconnects,
            "stalled": self.stalled,
            "conns": len(self.per_conn),
            "per_conn_max_gap_s": [round(g, 6) for g in self.per_conn],
            "duration_s": round(now() - self.started, 3),
        }
        if extra:
            out.update(extra)
        out["gaps"] = [{"conn": c, "start": clock.unix(a), "end": clock.unix(b), "s": round(b - a, 6)}
                       for c, a, b in self.gaps]
        out["error_log"] = self.error_log
        return out


def should_stop(args, t_end):
    if STOP:
        return True
    if t_end is not None and now() >= t_end:
        return True
    if args.stop_file and os.path.exists(args.stop_file):
        return True
    return False


# ------------------------------------------------------------------------------------------
# echo


class Conn:
    def __init__(self, idx):
        self.idx = idx
        self.sock = None
        self.buf = b""
        self.seq = 0  # requests sent on this connection (= n expected in the reply)
        self.sent_at = None  # when the outstanding request was sent, None if none is
        self.next_send = 0.0
        self.last_reply = None  # monotonic time of the last good reply
        self.counted = 0  # replies the server has numbered (its n)
        self.connecting = False
        self.connect_started = 0.0
        self.ever_replied = False


def echo(args):
    stats = Stats("echo", args.conns)
    sel = selectors.DefaultSelector()
    conns = [Conn(i) for i in range(args.conns)]
    t_first_deadline = now() + args.connect_wait
    t_end = None
    started_all = False

    def open_conn(c):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            s.connect((args.host, args.port))
        except BlockingIOError:
            pass
        except OSError as e:
            s.close()
            return e
        c.sock, c.buf, c.seq, c.counted, c.sent_at = s, b"", 0, 0, None
        c.connecting = True
        c.connect_started = now()
        sel.register(s, selectors.EVENT_WRITE, c)
        return None

    def close_conn(c):
        if c.sock is not None:
            try:
                sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
            c.sock = None

    def fail(c, kind, detail, t):
        if c.ever_replied:
            stats.error(kind, c.idx, detail)
            if kind == "timeout":
                stats.timeouts += 1
            elif kind in ("reset", "eof"):
                stats.resets += 1
            stats.reconnects += 1
        close_conn(c)
        c.next_send = t + (0.05 if c.ever_replied else 0.1)

    def send(c, t):
        c.seq += 1
        try:
            c.sock.send(b"%d\n" % c.seq)
        except OSError as e:
            fail(c, "reset", f"send: {e}", t)
            return
        c.sent_at = t

    while True:
        t = now()
        if should_stop(args, t_end):
            break
        if not started_all:
            if all(c.ever_replied for c in conns):
                started_all = True
                if args.duration:
                    t_end = t + args.duration
            elif t > t_first_deadline:
                for c in conns:
                    close_conn(c)
                print(json.dumps({"mode": "echo", "fatal": f"no reply from {args.host}:{args.port} on every "
                                  f"connection within {args.connect_wait} s"}), flush=True)
                return 2
        for c in conns:
            if c.sock is None and t >= c.next_send:
                err = open_conn(c)
                if err is not None:
                    fail(c, "connect", str(err), t)
            elif c.sock is not None and not c.connecting:
                if c.sent_at is None and t >= c.next_send:
                    send(c, t)
                elif c.sent_at is not None and t - c.sent_at > args.timeout:
                    fail(c, "timeout", f"no reply to request {c.seq} in {args.timeout} s", t)
            elif c.sock is not None and c.connecting and t - c.connect_started > args.timeout:
                fail(c, "timeout", "connect", t)
        for key, mask in sel.select(timeout=0.001):
            c = key.data
            t = now()
            if c.connecting:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(c, "connect", os.strerror(err), t)
                    continue
                c.connecting = False
                sel.modify(c.sock, selectors.EVENT_READ, c)
                send(c, t)
                continue
            try:
                chunk = c.sock.recv(65536)
            except ConnectionResetError as e:
                fail(c, "reset", str(e), t)
                continue
            except OSError as e:
                fail(c, "reset", f"recv: {e}", t)
                continue
            if not chunk:
                fail(c, "eof", "connection closed by the server", t)
                continue
            c.buf += chunk
            while b"\n" in c.buf and c.sock is not None:
                line, c.buf = c.buf.split(b"\n", 1)
                parts = line.split(b" ", 1)
                try:
                    n, echoed = int(parts[0]), int(parts[1])
                except (ValueError, IndexError):
                    stats.wrong += 1
                    fail(c, "wrong", f"unparsable reply {line[:60]!r}", t)
                    break
                if echoed < c.seq or n <= c.counted:
                    stats.dup += 1
                    stats.error("dup", c.idx, f"reply {line[:60]!r} after {c.counted} replies, request {c.seq}")
                    continue  # an old reply again: wait on for the one to the request outstanding
                if echoed != c.seq:
                    stats.wrong += 1
                    fail(c, "wrong", f"reply {line[:60]!r} to request {c.seq}", t)
                    break
                if n != c.counted + 1:
                    stats.lost += n - c.counted - 1
                    stats.error("lost", c.idx, f"server count jumped from {c.counted} to {n}")
                c.counted = n
                c.sent_at = None
                c.next_send = t + args.interval
                if c.ever_replied:
                    stats.reply(c.idx, c.last_reply, t)
                c.ever_replied = True
                c.last_reply = t
                if args.interval <= 0:
                    send(c, t)
    # A connection still waiting at the stop is a gap that has not ended: it counts (up to the
    # stop) in the gaps, and as an error ("stalled") if its request has waited longer than
    # --stall (a connection that hangs after a migration must not pass for a good one).
    t = now()
    for c in conns:
        if c.ever_replied and c.last_reply is not None:
            if c.sent_at is not None and t - c.sent_at > args.stall:
                stats.stalled += 1
                stats.error("stalled", c.idx, f"request {c.seq} unanswered for {t - c.sent_at:.3f} s at the stop")
            if t - c.last_reply > args.stall or (c.sent_at is not None and t - c.sent_at > args.stall):
                stats.open_gap(c.idx, c.last_reply, t)
        close_conn(c)
    return stats


# ------------------------------------------------------------------------------------------
# redis (RESP by hand)


class RespError(Exception):
    pass


class Resp:
    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    @staticmethod
    def encode(*args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int):
                a = b"%d" % a
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionResetError("connection closed by the server")
        self.buf += chunk

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self._fill()

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self.reply() for _ in range(n)]
        raise RespError(f"unexpected reply {line[:60]!r}")

    def call(self, *args):
        self.send(self.encode(*args))
        r = self.reply()
        if isinstance(r, RespError):
            raise r
        return r

    def pipeline(self, commands):
        self.send(b"".join(self.encode(*c) for c in commands))
        return [self.reply() for _ in commands]


def connect_wait(args):
    deadline = now() + args.connect_wait
    while True:
        try:
            r = Resp(args.host, args.port, args.timeout)
            if r.call("PING") == "PONG":
                return r
            r.close()
        except (OSError, RespError):
            pass
        if now() > deadline:
            return None
        time.sleep(0.05)


def redis(args):
    stats = Stats("redis", 1)
    token = secrets.token_hex(4)
    r = connect_wait(args)
    if r is None:
        print(json.dumps({"mode": "redis", "fatal": f"no PONG from {args.host}:{args.port} within {args.connect_wait} s"}),
              flush=True)
        return 2
    t_end = now() + args.duration if args.duration else None
    last = None
    written = {}  # key -> last value we SET and saw acknowledged
    pending = {}  # key -> value of a SET whose answer never came (it may or may not have landed)
    i = 0
    while not should_stop(args, t_end):
        if r is None:
            try:
                r = Resp(args.host, args.port, args.timeout)
            except OSError as e:
                stats.error("connect", 0, str(e))
                time.sleep(0.05)
                continue
        key = f"{args.prefix}{i % args.keyspace}"
        value = f"{i}-{token}"
        try:
            pending[key] = value
            if args.pipeline:
                set_r, get_r = r.pipeline([("SET", key, value), ("GET", key)])
            else:
                set_r = r.call("SET", key, value)
                get_r = r.call("GET", key)
        except socket.timeout:
            stats.timeouts += 1
            stats.error("timeout", 0, f"no answer for {key} within {args.timeout} s")
            r.close()
            r = None
            stats.reconnects += 1
            continue
        except (OSError, RespError) as e:
            stats.resets += 1
            stats.error("reset", 0, f"{type(e).__name__}: {e}")
            if r is not None:
                r.close()
            r = None
            stats.reconnects += 1
            continue
        t = now()
        pending.pop(key, None)
        i += 1
        if set_r != "OK" or get_r != value.encode():
            stats.wrong += 1
            stats.error("wrong", 0, f"SET {key} -> {set_r!r}, GET -> {get_r!r}, want {value!r}")
            continue
        written[key] = value
        stats.reply(0, last, t)
        last = t
        if args.interval > 0:
            time.sleep(args.interval)
    t = now()
    if last is not None and t - last > args.stall:
        stats.stalled += 1
        stats.error("stalled", 0, f"no answer for {t - last:.3f} s at the stop")
        stats.open_gap(0, last, t)
    # Read back every key written: each must hold the last value acknowledged (or a pending one).
    extra = {"keys_written": len(written), "sets": i}
    try:
        if r is None:
            r = Resp(args.host, args.port, args.timeout)
        keys = sorted(written)
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            values = r.call("MGET", *batch)
            for k, v in zip(batch, values):
                want = written[k].encode()
                if v != want and not (k in pending and v == pending[k].encode()):
                    stats.lost += 1
                    stats.error("lost", 0, f"{k} holds {v!r}, last written {want!r}")
        r.close()
    except (OSError, RespError) as e:
        stats.error("verify", 0, f"final read-back failed: {e}")
        extra["verify_failed"] = True
    return stats, extra


def resp_once(args):
    r = connect_wait(args)
    if r is None:
        raise SystemExit(f"probe_client: no PONG from {args.host}:{args.port}")
    return r


def redis_fill(args):
    r = resp_once(args)
    t0 = now()
    pad = "x" * max(0, args.value_size - 12)
    batch = []
    for k in range(args.keys):
        batch.append(("SET", f"{args.prefix}{k}", f"{k:010d}{pad}"))
        if len(batch) == 1000 or k == args.keys - 1:
            for res in r.pipeline(batch):
                if res != "OK":
                    raise SystemExit(f"probe_client: SET failed: {res!r}")
            batch = []
    out = {"keys": args.keys, "seconds": round(now() - t0, 3), "dbsize": r.call("DBSIZE")}
    r.close()
    print(json.dumps(out), flush=True)
    return 0


def redis_digest(args):
    """sha256 over the sorted (key, value) pairs of every key matching --match (SCAN + MGET),
    and DBSIZE. Only string values (what redis-fill writes)."""
    r = resp_once(args)
    keys = set()
    cursor = b"0"
    while True:
        cursor, batch = r.call("SCAN", cursor, "MATCH", args.match, "COUNT", 1000)
        keys.update(batch)
        if cursor == b"0":
            break
    keys = sorted(keys)
    h = hashlib.sha256()
    for start in range(0, len(keys), 1000):
        batch = keys[start:start + 1000]
        for k, v in zip(batch, r.call("MGET", *batch)):
            if v is None:
                v = b"<gone>"
            h.update(b"%d:%s%d:%s" % (len(k), k, len(v), v))
    out = {"match": args.match, "keys": len(keys), "digest": h.hexdigest(), "dbsize": r.call("DBSIZE")}
    r.close()
    print(json.dumps(out), flush=True)
    return 0


def ask(args):
    """One line to a line server; prints its answer (memload: `!sum`)."""
    deadline = now() + args.connect_wait
    while True:
        try:
            s = socket.create_connection((args.host, args.port), timeout=args.timeout)
            break
        except OSError:
            if now() > deadline:
                raise SystemExit(f"probe_client: cannot connect to {args.host}:{args.port}")
            time.sleep(0.1)
    s.settimeout(args.timeout)
    s.sendall(args.line.encode() + b"\n")
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    print(buf.decode(errors="replace").strip(), flush=True)
    return 0 if buf else 1


def main(argv):
    ap = argparse.ArgumentParser(prog="probe_client.py", description="client-observed downtime")
    sub = ap.add_subparsers(dest="mode", required=True)

    def common(p, timeout=5.0):
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=timeout, help="seconds to wait for a reply")
        p.add_argument("--connect-wait", type=float, default=60.0,
                       help="seconds to wait for the first reply (the server starting)")

    for name in ("echo", "redis"):
        p = sub.add_parser(name)
        common(p, timeout=30.0)
        p.add_argument("--duration", type=float, default=0.0, help="seconds (default: until stopped)")
        p.add_argument("--stop-file", help="stop once this file exists")
        p.add_argument("--interval", type=float, default=0.001 if name == "echo" else 0.0,
                       help="pause after each reply before the next request")
        p.add_argument("--out", help="also write the JSON line to this file")
        p.add_argument("--stall", type=float, default=1.0,
                       help="at the stop, a request unanswered for longer than this is an error (stalled)")
    sub.choices["echo"].add_argument("--conns", type=int, default=1)
    sub.choices["redis"].add_argument("--keyspace", type=int, default=10000)
    sub.choices["redis"].add_argument("--prefix", default="key:")
    sub.choices["redis"].add_argument("--pipeline", action="store_true", help="SET and GET in one write")
    p = sub.add_parser("redis-fill")
    common(p)
    p.add_argument("--keys", type=int, default=100000)
    p.add_argument("--prefix", default="data:")
    p.add_argument("--value-size", type=int, default=64)
    p = sub.add_parser("redis-digest")
    common(p)
    p.add_argument("--match", default="data:*")
    p = sub.add_parser("ask")
    common(p, timeout=120.0)
    p.add_argument("line")
    args = ap.parse_args(argv)

    if args.mode == "redis-fill":
        return redis_fill(args)
    if args.mode == "redis-digest":
        return redis_digest(args)
    if args.mode == "ask":
        return ask(args)
    if args.mode == "echo" and args.conns < 1:
        ap.error("--conns must be >= 1")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    clock = Clock()
    if args.mode == "echo":
        res = echo(args)
        extra = None
    else:
        res = redis(args)
        if isinstance(res, tuple):
            res, extra = res
    if isinstance(res, int):
        return res
    line = json.dumps(res.summary(clock, extra))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, args.out)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
