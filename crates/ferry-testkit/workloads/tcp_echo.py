"""tcp_echo DIR PORT: TCP echo server on 127.0.0.1:PORT that keeps its connections open.

For each line L received on a connection it answers "<n> L\n", n counting the lines of that
connection from 1, so a lost or duplicated reply shows as a gap or repeat. On SIGUSR1 writes
DIR/report.<hostpid> (JSON: pid, open connections). Writes DIR/ready.<hostpid> once listening.
"""
import json
import select
import signal
import socket
import sys

from _kit import host_pid, write_atomic

directory, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(16)
# connection -> [unfinished input, lines answered]
connections = {}
requested = False


def on_usr1(_signum, _frame):
    global requested
    requested = True


def serve(conn):
    state = connections[conn]
    try:
        chunk = conn.recv(4096)
    except OSError:
        chunk = b""
    if not chunk:
        del connections[conn]
        conn.close()
        return
    state[0] += chunk
    while b"\n" in state[0]:
        line, state[0] = state[0].split(b"\n", 1)
        state[1] += 1
        conn.sendall(b"%d %s\n" % (state[1], line))


signal.signal(signal.SIGUSR1, on_usr1)
write_atomic("%s/ready.%d" % (directory, host_pid()), "")
while True:
    readable, _, _ = select.select([listener] + list(connections), [], [], 0.05)
    for sock in readable:
        if sock is listener:
            conn, _ = listener.accept()
            connections[conn] = [b"", 0]
        else:
            serve(sock)
    if requested:
        requested = False
        state = {"pid": host_pid(), "connections": len(connections)}
        write_atomic("%s/report.%d" % (directory, host_pid()), json.dumps(state))
