"""Helpers shared by the sample workloads of ferry-testkit.

Every file a workload writes is named with its host pid, read anew at each write: restored
copies of one checkpoint get new host pids, so each copy reports into its own files.
"""
import os


def host_pid():
    # /proc is the host's even inside a new pid namespace, so /proc/self names the host pid.
    return int(os.readlink("/proc/self"))


def write_atomic(path, text):
    # Write then rename, so that a reader polling for the file never sees half of it.
    tmp = "%s.tmp" % path
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def append_line(path, line):
    # Open, append, close: CRIU refuses to restore a regular file that a process holds open
    # if its size changed since the dump, so no growing file may stay open.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_small(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
