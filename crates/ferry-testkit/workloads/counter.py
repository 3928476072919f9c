"""counter DIR: counts every ~50 ms, appending each count to DIR/counter.<hostpid>.

Writes DIR/ready.<hostpid> after the first count. Exits with code N once DIR/exit.<hostpid>
holds N, so a test can end one copy with a known exit code.
"""
import sys
import time

from _kit import append_line, host_pid, read_small, write_atomic

directory = sys.argv[1]
count = 0
ready = False
while True:
    count += 1
    pid = host_pid()
    append_line("%s/counter.%d" % (directory, pid), str(count))
    if not ready:
        write_atomic("%s/ready.%d" % (directory, pid), "")
        ready = True
    code = read_small("%s/exit.%d" % (directory, pid))
    if code is not None:
        sys.exit(int(code.strip() or "0"))
    time.sleep(0.05)
