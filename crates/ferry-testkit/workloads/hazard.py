"""hazard DIR KIND: holds one thing `ferry check` judges, then counts like counter.py.

KIND: none, aio (an io_setup ring, mapped as `/[aio] (deleted)`), io_uring, perf_event, bpf_map,
fanotify, device, tun, unix_external, pipe_external, ctty_external, deleted_cwd, deleted_small,
deleted_large, deleted_linked, flock, tcp_self, tcp_half_closed, tcp_closed, tcp_queued,
sysv_shm, traced, netns_shared, memfd_exe (runs on from a copy of the interpreter in a memfd, as
runc's cloned binary does), child (a child in our session that counts too), vfork (reports
ready, then waits for ever in vfork: it never counts). Writes DIR/ready.<hostpid> once the
hazard is in place, or DIR/unsupported.<hostpid> (with the reason) and exits when this kernel
refuses it.
"""
import ctypes
import fcntl
import os
import socket
import sys
import time

from _kit import append_line, host_pid, write_atomic

directory, kind = sys.argv[1], sys.argv[2]
# Descriptors the test harness leaks to its children (cargo's jobserver pipe) are hazards of
# their own (a pipe read outside the tree): only the one asked for may be held.
os.closerange(3, 65536)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
# Kept referenced for the process's life: their descriptors are the hazard.
held = []

# x86-64 system call numbers (the kit's tests run there).
SYS_IO_SETUP = 206
SYS_VFORK = 58
SYS_PERF_EVENT_OPEN = 298
SYS_FANOTIFY_INIT = 300
SYS_BPF = 321
SYS_IO_URING_SETUP = 425
CLONE_NEWNET = 0x40000000


def unsupported(why):
    write_atomic("%s/unsupported.%d" % (directory, host_pid()), why)
    sys.exit(0)


def outside_holder(keep, close):
    """Forks a grandchild, reparented out of the tree, that holds `keep` until its peer closes
    (reading it returns nothing or fails); `close` are the descriptors it must not hold."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        for fd in close:
            os.close(fd)
        try:
            while os.read(keep, 1):
                pass
        except OSError:
            pass
        os._exit(0)
    os.wait()


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
elif kind == "aio":
    ctx = ctypes.c_ulong(0)
    if libc.syscall(SYS_IO_SETUP, 16, ctypes.byref(ctx)) != 0:
        unsupported("io_setup: errno %d" % ctypes.get_errno())
    held.append(ctx)
elif kind == "perf_event":
    attr = ctypes.create_string_buffer(128)
    # type PERF_TYPE_SOFTWARE (1), size 128, config PERF_COUNT_SW_TASK_CLOCK (1).
    ctypes.memmove(attr, (1).to_bytes(4, "little") + (128).to_bytes(4, "little") + (1).to_bytes(8, "little"), 16)
    fd = libc.syscall(SYS_PERF_EVENT_OPEN, attr, 0, -1, -1, 0)
    if fd < 0:
        unsupported("perf_event_open: errno %d" % ctypes.get_errno())
    held.append(fd)
elif kind == "bpf_map":
    # BPF_MAP_CREATE of an array map: map_type 2, key_size 4, value_size 4, max_entries 1.
    attr = ctypes.create_string_buffer(b"".join(v.to_bytes(4, "little") for v in (2, 4, 4, 1)), 128)
    fd = libc.syscall(SYS_BPF, 0, attr, 128)
    if fd < 0:
        unsupported("bpf(BPF_MAP_CREATE): errno %d" % ctypes.get_errno())
    held.append(fd)
elif kind == "fanotify":
    fd = libc.syscall(SYS_FANOTIFY_INIT, 0, os.O_RDONLY)  # FAN_CLASS_NOTIF, no marks
    if fd < 0:
        unsupported("fanotify_init: errno %d" % ctypes.get_errno())
    held.append(fd)
elif kind == "device":
    for dev in ("/dev/kvm", "/dev/fuse"):
        try:
            held.append(os.open(dev, os.O_RDWR))
            break
        except OSError:
            pass
    else:
        unsupported("neither /dev/kvm nor /dev/fuse opens")
elif kind == "tun":
    # Opened only (no interface attached): nothing appears in the host's network.
    held.append(os.open("/dev/net/tun", os.O_RDWR))
elif kind == "unix_external":
    mine, theirs = socket.socketpair()
    outside_holder(theirs.fileno(), [mine.fileno()])
    theirs.close()
    held.append(mine)
elif kind == "pipe_external":
    # We hold only the write end of a pipe whose reader lives outside the tree.
    r, w = os.pipe()
    outside_holder(r, [w])
    os.close(r)
    held.append(w)
elif kind == "ctty_external":
    # A terminal whose master only a process outside the tree holds becomes our controlling
    # terminal (we lead our session and have none: opening it without O_NOCTTY takes it).
    # Taken before the holder starts reading: with no slave open its read fails and it leaves.
    master, slave = os.openpty()
    tty = os.open(os.ttyname(slave), os.O_RDWR)
    outside_holder(master, [slave, tty])
    os.close(master)
    os.close(slave)
    held.append(tty)
elif kind == "netns_shared":
    # A network namespace of our own, which a process outside the tree shares.
    if libc.unshare(CLONE_NEWNET) != 0:
        unsupported("unshare(CLONE_NEWNET): errno %d" % ctypes.get_errno())
    r, w = os.pipe()
    outside_holder(r, [w])
    os.close(r)
    held.append(w)
elif kind == "deleted_cwd":
    gone = "%s/cwd" % directory
    os.mkdir(gone)
    os.chdir(gone)
    os.rmdir(gone)
elif kind in ("deleted_small", "deleted_large"):
    path = file_of(kind, 4096 if kind == "deleted_small" else 4 << 20)
    held.append(open(path, "rb"))
    os.unlink(path)
elif kind == "deleted_linked":
    # Open, linked under a second name, the first removed (zdtm's unlink_fstat03).
    path = file_of(kind, 4096)
    held.append(open(path, "rb"))
    os.link(path, path + ".link")
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
elif kind == "tcp_half_closed":
    # The client shuts its sending side: it waits in FIN_WAIT2, the server in CLOSE_WAIT.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    client.shutdown(socket.SHUT_WR)
    held.extend([listener, client, server])
elif kind == "tcp_closed":
    # Both ends shut their sending side (zdtm's socket-tcp-close2): the FINs cross and both
    # sockets end closed, held open, in no TCP table, still naming their peer.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    client.shutdown(socket.SHUT_WR)
    server.shutdown(socket.SHUT_WR)
    held.extend([client, server])
elif kind == "tcp_queued":
    # A connection the kernel accepted into the listener's queue, which we never accept.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    client = socket.create_connection(listener.getsockname())
    held.extend([listener, client])
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
elif kind == "memfd_exe":
    # The interpreter (several MiB) copied into a memfd runs this script again, holding nothing.
    fd = os.memfd_create("python", 0)
    os.write(fd, open(os.path.realpath(sys.executable), "rb").read())
    env = dict(os.environ, PYTHONHOME=sys.prefix)
    os.execve("/proc/self/fd/%d" % fd, [sys.executable, "-B", sys.argv[0], directory, "none"], env)
elif kind == "child":
    # Parent and child both go on to count, each into its own file.
    os.fork()
elif kind == "vfork":
    write_atomic("%s/ready.%d" % (directory, host_pid()), "")
    # The child shares our memory and never execs: it only waits, and we stay in vfork.
    if libc.syscall(SYS_VFORK) == 0:
        libc.pause()
        os._exit(0)
    os._exit(1)
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
