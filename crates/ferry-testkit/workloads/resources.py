"""resources DIR PORT: holds a read-only file at a known offset, a child connected by two
pipes, and a listening TCP socket on 127.0.0.1:PORT.

Each connection gets "hello from <hostpid>\n" and is closed. On SIGUSR1, writes
DIR/report.<hostpid> (JSON) with what it finds: the file offset, a round trip through the
pipes to the child, whether the child is alive, and the port it listens on.
Writes DIR/ready.<hostpid> once all is set up.
"""
import json
import os
import select
import signal
import socket
import sys

from _kit import host_pid, write_atomic

DATA_SIZE = 64 * 1024
OFFSET = 12345

directory, port = sys.argv[1], int(sys.argv[2])
content = bytes(i % 251 for i in range(DATA_SIZE))
data_path = "%s/data.%d" % (directory, host_pid())
with open(data_path, "wb") as f:
    f.write(content)
data_fd = os.open(data_path, os.O_RDONLY)
os.lseek(data_fd, OFFSET, os.SEEK_SET)

to_child_r, to_child_w = os.pipe()
from_child_r, from_child_w = os.pipe()
child = os.fork()
if child == 0:
    # Child: answers each "ping N" line with "pong N <its host pid>".
    os.close(to_child_w)
    os.close(from_child_r)
    os.close(data_fd)
    pending = b""
    while True:
        chunk = os.read(to_child_r, 4096)
        if not chunk:
            os._exit(0)
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            reply = b"%s %d\n" % (line.replace(b"ping", b"pong", 1), host_pid())
            os.write(from_child_w, reply)
os.close(to_child_r)
os.close(from_child_w)

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(16)

requested = False
pings = 0
served = 0


def on_usr1(_signum, _frame):
    global requested
    requested = True


def round_trip():
    """Sends one ping through the pipes; returns the child's answer, or None after 10 s."""
    global pings
    pings += 1
    os.write(to_child_w, b"ping %d\n" % pings)
    answer = b""
    while not answer.endswith(b"\n"):
        readable, _, _ = select.select([from_child_r], [], [], 10)
        if not readable:
            return None
        chunk = os.read(from_child_r, 4096)
        if not chunk:
            return None
        answer += chunk
    return answer.decode().strip()


def child_alive():
    try:
        pid, _ = os.waitpid(child, os.WNOHANG)
    except ChildProcessError:
        return False
    return pid == 0


def report():
    answer = round_trip()
    parts = answer.split() if answer else []
    state = {
        "pid": host_pid(),
        "offset": os.lseek(data_fd, 0, os.SEEK_CUR),
        "expected_offset": OFFSET,
        # pread leaves the offset alone; it proves the fd still names the same content.
        "content_ok": os.pread(data_fd, 64, OFFSET) == content[OFFSET:OFFSET + 64],
        "echo": answer,
        "echo_ok": len(parts) == 3 and parts[:2] == ["pong", str(pings)],
        "child_host_pid": int(parts[2]) if len(parts) == 3 else None,
        "child_alive": child_alive(),
        "port": listener.getsockname()[1],
        "served": served,
    }
    write_atomic("%s/report.%d" % (directory, host_pid()), json.dumps(state))


signal.signal(signal.SIGUSR1, on_usr1)
write_atomic("%s/ready.%d" % (directory, host_pid()), "")
while True:
    readable, _, _ = select.select([listener], [], [], 0.05)
    if readable:
        conn, _ = listener.accept()
        try:
            conn.sendall(b"hello from %d\n" % host_pid())
        except OSError:
            pass
        conn.close()
        served += 1
    if requested:
        requested = False
        report()
