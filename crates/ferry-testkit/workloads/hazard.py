"""hazard DIR KIND: holds one thing `ferry check` judges, then counts like counter.py.

KIND: none, io_uring, perf_event, unix_external, deleted_cwd, deleted_small, deleted_large,
flock, tcp_self, sysv_shm, traced. Writes DIR/ready.<hostpid> once the hazard is in place,
or DIR/unsupported.<hostpid> (with the reason) and exits when this kernel refuses it.
"""
import ctypes
import fcntl
import os
import socket
import sys
import time

from _kit import append_line, host_pid, write_atomic

directory, kind = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
# Kept referenced for the process's life: their descriptors are the hazard.
held = []

# x86-64 system call numbers (the kit's tests run there).
SYS_PERF_EVENT_OPEN = 298
SYS_IO_URING_SETUP = 425


def unsupported(why):
    write_atomic("%s/unsupported.%d" % (directory, host_pid()), why)
    sys.exit(0)


def file_of(name, size):
    # Random bytes: the file takes its size on disk (CRIU's ghost limit counts blocks).
    path = "%s/%s" % (directory, name)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


if kind == "io_uring":
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(SYS_IO_URING_SETUP, 4, params)
    if fd < 0:
        unsupported("io_uring_setup: errno %d" % ctypes.get_errno())
    held.append(fd)
elif kind == "perf_event":
    attr = ctypes.create_string_buffer(128)
    # type PERF_TYPE_SOFTWARE (1), size 128, config PERF_COUNT_SW_TASK_CLOCK (1).
    ctypes.memmove(attr, (1).to_bytes(4, "little") + (128).to_bytes(4, "little") + (1).to_bytes(8, "little"), 16)
    fd = libc.syscall(SYS_PERF_EVENT_OPEN, attr, 0, -1, -1, 0)
    if fd < 0:
        unsupported("perf_event_open: errno %d" % ctypes.get_errno())
    held.append(fd)
elif kind == "unix_external":
    mine, theirs = socket.socketpair()
    if os.fork() == 0:
        # The grandchild, reparented out of the tree, holds the other end until ours closes.
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        mine.close()
        theirs.recv(1)
        os._exit(0)
    os.wait()
    theirs.close()
    held.append(mine)
elif kind == "deleted_cwd":
    gone = "%s/cwd" % directory
    os.mkdir(gone)
    os.chdir(gone)
    os.rmdir(gone)
elif kind in ("deleted_small", "deleted_large"):
    path = file_of(kind, 4096 if kind == "deleted_small" else 4 << 20)
    held.append(open(path, "rb"))
    os.unlink(path)
elif kind == "flock":
    f = open(file_of("locked", 16), "rb")
    fcntl.flock(f, fcntl.LOCK_EX)
    held.append(f)
elif kind == "tcp_self":
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    held.extend([listener, client, server])
elif kind == "sysv_shm":
    libc.shmat.restype = ctypes.c_void_p
    shmid = libc.shmget(0, 4096, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    if shmid < 0:
        unsupported("shmget: errno %d" % ctypes.get_errno())
    if libc.shmat(shmid, None, 0) in (None, ctypes.c_void_p(-1).value):
        unsupported("shmat: errno %d" % ctypes.get_errno())
    # Removed once detached: nothing outlives the test.
    libc.shmctl(shmid, 0, None)  # IPC_RMID
elif kind == "traced":
    child = os.fork()
    if child == 0:
        libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME: the parent, in the tree, traces us
        while True:
            time.sleep(1)
    held.append(child)
elif kind != "none":
    unsupported("unknown hazard %s" % kind)

count = 0
ready = False
while True:
    count += 1
    pid = host_pid()
    append_line("%s/counter.%d" % (directory, pid), str(count))
    if not ready:
        write_atomic("%s/ready.%d" % (directory, pid), "")
        ready = True
    time.sleep(0.05)
