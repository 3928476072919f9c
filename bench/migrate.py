"""The migrate suite: client-observed downtime of a live migration between two lab nodes, ferry's
strategies against CRIU's own stop-and-copy through its page server, in the same run.

    bench/run migrate                          # 256 MiB, 1 GiB, 4 GiB; idle and dirtying 10 %/s
    bench/run migrate --quick                  # 256 MiB and 1 GiB, one repetition
    bench/run migrate --sizes 256,1024 --reps 3
    bench/run migrate --tools criu             # the baseline alone (no ferry build, no migrate)
    bench/run migrate --strategies stop-copy --modes idle --conns 50

Every run gets a fresh lab (`ferry lab up --nodes 2`, a named lab, `bm` by default, so that it never
meets the default lab others may be using), and takes it down after (`ferry lab down`). The
workload is tools/memload.py (M MiB of random memory, a line request/reply port, optionally P % of
its pages dirtied per second), started with `ferry lab exec node1 -- ...`; tools/probe_client.py
(echo mode) talks to it from this machine across the lab's bridge for the whole migration and
reports the longest gap between two replies: the downtime a client sees.

Variants:
  baseline   CRIU's stop-and-copy: `criu page-server` in node2's network namespace,
             `criu dump --page-server --address NODE2 --port P --tcp-established` of the workload
             (run in the workload's network namespace), the small non-memory images copied to
             node2's image directory, `criu restore -d --tcp-established` from there, run again in
             the workload's network namespace: the address does not move (the lab's workload
             namespace stays where it is; see bench/README.md).
  stop-copy, pre-copy, post-copy
             `ferry --node node1 migrate pid:PID --to node2 --strategy S --report-json F`. Absent
             or failing, the error is recorded in the results and the suite goes on.

Writes bench/results/<out>.json and <out>.png (out: migrate, or migrate-quick with --quick).
Leaves nothing behind: probes, page servers, labs, the private tmpfs; Ctrl-C included.
"""

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
TOOLS = os.path.join(REPO, "tools")
MEMLOAD = os.path.join(TOOLS, "memload.py")
PROBE = os.path.join(TOOLS, "probe_client.py")
PYTHON = "/usr/bin/python3"  # the system's: numpy for memload, and CRIU restores it by path

DEFAULT_SIZES = [256, 1024, 4096]
STRATEGIES = ["stop-copy", "pre-copy", "post-copy"]
MODES = ["idle", "dirty"]
PORT = 7000  # the workload's
PAGE_SERVER_PORT = 27000  # in node2's namespace
TMPFS_SOURCE = "ferry-bench-migrate"


class BenchError(Exception):
    pass


class Terminated(BaseException):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cmd_output(cmd, timeout=30):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def meminfo(key):
    for line in (read("/proc/meminfo") or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def tail_text(text, n=12):
    lines = [l for l in (text or "").splitlines() if l.strip()]
    return "\n".join(lines[-n:])


def file_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def reap_all():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def cpu_ticks():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                rest = stat[stat.rindex(")") + 2:].split()
                out[int(name)] = int(rest[11]) + int(rest[12])
            except (OSError, ValueError, IndexError):
                pass
    return out


def others_cpu(interval=1.0):
    """CPUs used on average by processes that are not ours over `interval` seconds."""
    me = os.getpid()
    a = cpu_ticks()
    time.sleep(interval)
    b = cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    used = sum(t - a[p] for p, t in b.items() if p in a and p != me)
    return used / hz / interval


# --------------------------------------------------------------------------------------------


class Lab:
    """`ferry lab` through the CLI, for one named lab."""

    def __init__(self, ferry, name):
        self.ferry = ferry
        self.env = dict(os.environ)
        self.env.pop("FERRY_LAB", None)
        if name:
            self.env["FERRY_LAB"] = name
        self.name = name or "(default)"

    def run(self, args, timeout=120, cwd=None):
        r = subprocess.run([self.ferry] + args, capture_output=True, text=True, timeout=timeout,
                           env=self.env, cwd=cwd, stdin=subprocess.DEVNULL)
        return r

    def up(self):
        r = self.run(["lab", "up", "--nodes", "2"])
        if r.returncode != 0:
            raise BenchError(f"ferry lab up failed: {tail_text(r.stderr + r.stdout)}")

    def down(self):
        r = self.run(["lab", "down"])
        if r.returncode != 0:
            raise BenchError(f"ferry lab down failed: {tail_text(r.stderr + r.stdout)}")
        return r.stdout.strip()

    def status(self):
        r = self.run(["lab", "status", "--json"])
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def exec(self, node, argv, cwd):
        r = self.run(["lab", "exec", node, "--"] + argv, cwd=cwd)
        if r.returncode != 0:
            raise BenchError(f"ferry lab exec failed: {tail_text(r.stderr + r.stdout)}")
        lines = [l for l in r.stdout.splitlines() if l.strip()]
        m = re.match(r"^(pid:(\d+))\s+(\d+\.\d+\.\d+\.\d+)\s*$", lines[-1] if lines else "")
        if not m:
            raise BenchError(f"ferry lab exec printed no `pid:N IP` line: {r.stdout!r}")
        return m.group(1), int(m.group(2)), m.group(3)


def node_of(status, name):
    for n in status.get("nodes", []):
        if n["name"] == name:
            return n
    raise BenchError(f"lab status lists no {name}")


def workload_of(status, wid):
    for w in status.get("workloads", []):
        if w.get("id") == wid:
            return w
    return None


def ask_sum(host, timeout=300):
    """memload's `!sum` through the probe client: the JSON part of its answer."""
    r = subprocess.run([PYTHON, PROBE, "ask", host, str(PORT), "!sum", "--connect-wait", str(timeout),
                        "--timeout", str(timeout)], capture_output=True, text=True, timeout=2 * timeout + 30)
    text = r.stdout.strip()
    m = re.match(r"^\d+ !sum (\{.*\})$", text)
    if r.returncode != 0 or not m:
        raise BenchError(f"!sum to {host}:{PORT} failed: {tail_text(r.stderr) or text!r}")
    return json.loads(m.group(1))


def stats_from_criu(text):
    """CRIU's --display-stats lines: {"frozen_s": .., "memory_dump_s": .., "memory_write_s": ..,
    "pages_written": ..}."""
    out = {}
    for key, name, scale in [("Frozen time", "frozen_s", 1e-6), ("Freezing time", "freezing_s", 1e-6),
                             ("Memory dump time", "memory_dump_s", 1e-6),
                             ("Memory write time", "memory_write_s", 1e-6),
                             ("Memory pages written", "pages_written", 1)]:
        m = re.search(re.escape(key) + r":\s*(\d+)", text)
        if m:
            v = int(m.group(1)) * scale
            out[name] = round(v, 6) if scale != 1 else int(v)
    return out


class Suite:
    def __init__(self, args, criu, ferry, lab_ferry, migrate_problem, notes):
        self.args = args
        self.criu = criu
        self.ferry = ferry
        self.lab = Lab(lab_ferry, args.lab)
        self.migrate_problem = migrate_problem
        self.notes = notes
        self.runs = []
        self.procs = []  # Popen objects to kill on the way out
        self.work = None
        self.mounted = False

    # ---- set up / tear down

    def mount(self, max_mib):
        self.work = tempfile.mkdtemp(prefix="ferry-bench-migrate.")
        size_mib = int(max_mib * 2.2) + 1024
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", TMPFS_SOURCE, self.work],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"mount tmpfs on {self.work}: {r.stderr.strip()}")
        self.mounted = True

    def private_binaries(self):
        """Copies of ferry and of the ferryd beside it (the lab starts the agents from there), so
        that a build elsewhere cannot swap them in the middle of the run."""
        bindir = os.path.join(self.work, "bin")
        os.makedirs(bindir)
        copies = {}
        for path in {self.ferry, self.lab.ferry}:
            if not path:
                continue
            sub = os.path.join(bindir, str(len(copies)))
            os.makedirs(sub)
            shutil.copy2(path, os.path.join(sub, "ferry"))
            agent = os.path.join(os.path.dirname(path), "ferryd")
            if os.access(agent, os.X_OK):
                shutil.copy2(agent, os.path.join(sub, "ferryd"))
            copies[path] = os.path.join(sub, "ferry")
        self.ferry = copies.get(self.ferry, self.ferry)
        self.lab.ferry = copies.get(self.lab.ferry, self.lab.ferry)

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self.procs = []
        if self.lab.status() is not None or os.path.exists(self.lab_state_dir()):
            try:
                self.lab.down()
            except (BenchError, subprocess.TimeoutExpired) as e:
                log(f"bench: warning: {e}")
        reap_all()
        if self.mounted:
            subprocess.run(["umount", self.work])
            self.mounted = False
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None

    def lab_state_dir(self):
        return "/run/ferry-lab" + (f"-{self.args.lab}" if self.args.lab else "")

    def popen(self, cmd, out, err=None, **kw):
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(out, "wb"),
                             stderr=open(err or out + ".err", "wb"), **kw)
        self.procs.append(p)
        return p

    # ---- one run

    def quiet(self):
        """Waits up to --quiet-wait s for other processes to use less than --max-others-cpu."""
        deadline = time.monotonic() + self.args.quiet_wait
        while True:
            used = others_cpu(1.0)
            if used <= self.args.max_others_cpu or time.monotonic() >= deadline:
                return used

    def run_one(self, size, mode, variant, rep):
        args = self.args
        rundir = os.path.join(self.work, f"{variant}-{mode}-{size}-{rep}")
        os.makedirs(rundir)
        run = {"size_mib": size, "mode": mode, "variant": variant, "rep": rep,
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        probe = None
        try:
            run["others_cpu_before"] = round(self.quiet(), 3)
            self.lab.up()
            status = self.lab.status() or {}
            node2 = node_of(status, "node2")
            argv = [PYTHON, MEMLOAD, "--mib", str(size), "--port", str(PORT)]
            if mode == "dirty":
                argv += ["--dirty", str(args.dirty_rate)]
            wid, pid, ip = self.lab.exec("node1", argv, cwd=rundir)
            run.update(workload=wid, ip=ip)
            w = workload_of(self.lab.status() or {}, wid)
            if not w:
                raise BenchError(f"lab status does not list {wid}")
            wns = "/run/netns/" + w["netns"]
            t0 = time.monotonic()
            before = ask_sum(ip)
            run["ready_s"] = round(time.monotonic() - t0, 2)
            run["sum_before"] = before
            stop = os.path.join(rundir, "probe.stop")
            probe_out = os.path.join(rundir, "probe.json")
            probe = self.popen([PYTHON, PROBE, "echo", ip, str(PORT), "--conns", str(args.conns),
                                "--interval", str(args.interval), "--stop-file", stop, "--out", probe_out,
                                "--timeout", "60"], os.path.join(rundir, "probe.out"))
            time.sleep(args.warmup)
            if probe.poll() is not None:
                raise BenchError(f"the probe client ended early: {file_text(os.path.join(rundir, 'probe.out'))}")
            run["migrate_start_unix"] = round(time.time(), 6)
            if variant == "baseline":
                self.baseline(run, rundir, pid, wns, node2)
            else:
                self.ferry_migrate(run, rundir, wid, variant, size)
            run["migrate_end_unix"] = round(time.time(), 6)
            time.sleep(args.after)
            open(stop, "w").close()
            try:
                probe.wait(timeout=120)
            except subprocess.TimeoutExpired:
                probe.kill()
                raise BenchError("the probe client did not stop")
            run["probe"] = json.loads(file_text(probe_out) or "null")
            if not run["probe"]:
                raise BenchError(f"the probe client wrote nothing: {file_text(os.path.join(rundir, 'probe.out'))}")
            run["downtime_s"] = run["probe"]["max_gap_s"]
            if run["probe"].get("gap_end"):
                # How long after the command returned the client still waited: TCP retransmission
                # backoff, ARP or bridge learning after an address move, lazy pages, ...
                run["gap_after_command_s"] = round(run["probe"]["gap_end"] - run["migrate_end_unix"], 4)
                run["gap_before_command_s"] = round(run["migrate_start_unix"] - run["probe"]["gap_start"], 4)
            if run.get("migrate_error"):
                return run
            after = ask_sum(ip)
            run["sum_after"] = after
            problems = []
            if not after.get("ok"):
                problems.append("memory checksum after the migration does not match its bookkeeping")
            if mode == "idle" and after.get("computed") != before.get("computed"):
                problems.append("memory checksum changed across the migration of an idle workload")
            p = run["probe"]
            if p["errors"] or p["lost"] or p["dup"] or p["wrong"]:
                problems.append(f"probe saw errors={p['errors']} lost={p['lost']} dup={p['dup']} wrong={p['wrong']}")
            st = self.lab.status() or {}
            run["lab_after"] = [{k: x.get(k) for k in ("id", "node", "netns", "running", "ip")}
                                for x in st.get("workloads", [])]
            run["problems"] = problems
            run["ok"] = not problems
        except BenchError as e:
            run["error"] = str(e)
            run["ok"] = False
            log(f"bench: {variant} {mode} {size} MiB rep {rep}: {e}")
        finally:
            if probe is not None and probe.poll() is None:
                probe.kill()
                probe.wait()
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self.procs = []
            try:
                self.lab.down()
            except (BenchError, subprocess.TimeoutExpired) as e:
                run.setdefault("cleanup_error", str(e))
                log(f"bench: warning: {e}")
            reap_all()
            shutil.rmtree(rundir, ignore_errors=True)
        return run

    def timed(self, cmd, logbase, timeout):
        t0 = time.perf_counter()
        with open(logbase + ".out", "wb") as out, open(logbase + ".err", "wb") as err:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise BenchError(f"timed out after {timeout} s: {' '.join(cmd)}")
        elapsed = time.perf_counter() - t0
        text = file_text(logbase + ".out") + file_text(logbase + ".err")
        if rc != 0:
            raise BenchError(f"exit status {rc}: {' '.join(cmd)}\n{tail_text(text)}")
        return elapsed, text

    def baseline(self, run, rundir, pid, wns, node2):
        size = run["size_mib"]
        timeout = 120 + size // 10
        src = os.path.join(rundir, "src")  # node1's image directory
        dst = os.path.join(rundir, "dst")  # node2's
        os.makedirs(src)
        os.makedirs(dst)
        n2ns = "/run/netns/" + node2["netns"]
        ps = self.popen(["nsenter", f"--net={n2ns}", "--", self.criu, "page-server", "-D", dst,
                         "--address", node2["ip"], "--port", str(PAGE_SERVER_PORT)],
                        os.path.join(rundir, "page-server.out"))
        deadline = time.monotonic() + 10
        while True:
            listening = cmd_output(["nsenter", f"--net={n2ns}", "--", "ss", "-Hltn", f"sport = :{PAGE_SERVER_PORT}"])
            if listening:
                break
            if ps.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"criu page-server did not listen: {file_text(os.path.join(rundir, 'page-server.out.err'))}")
            time.sleep(0.02)
        t_start = time.perf_counter()
        dump_s, dump_text = self.timed(
            ["nsenter", f"--net={wns}", "--", self.criu, "dump", "-t", str(pid), "-D", src, "--page-server",
             "--address", node2["ip"], "--port", str(PAGE_SERVER_PORT), "--tcp-established", "--display-stats",
             "-o", "dump.log"], os.path.join(rundir, "dump"), timeout)
        try:
            ps.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise BenchError("criu page-server did not end after the dump")
        if ps.returncode != 0:
            raise BenchError(f"criu page-server: exit status {ps.returncode}")
        t = time.perf_counter()
        for name in os.listdir(src):
            if name.endswith(".img"):
                shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
        copy_s = time.perf_counter() - t
        pidfile = os.path.join(rundir, "restored.pid")
        restore_s, _ = self.timed(
            ["nsenter", f"--net={wns}", "--", self.criu, "restore", "-D", dst, "-d", "--tcp-established",
             "--pidfile", pidfile, "-o", "restore.log"], os.path.join(rundir, "restore"), timeout)
        total_s = time.perf_counter() - t_start
        run.update(dump_s=round(dump_s, 4), copy_s=round(copy_s, 4), restore_s=round(restore_s, 4),
                   total_s=round(total_s, 4), criu_stats=stats_from_criu(dump_text),
                   bytes_sent=sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst)
                                  if f.startswith("pages-")))
        run["restored_pid"] = int(file_text(pidfile).strip() or 0)

    def ferry_migrate(self, run, rundir, wid, strategy, size):
        if self.migrate_problem:
            run["migrate_error"] = self.migrate_problem
            return
        report = os.path.join(rundir, "report.json")
        cmd = [self.ferry, "--node", "node1", "migrate", wid, "--to", "node2", "--strategy", strategy,
               "--report-json", report]
        timeout = 180 + size // 5
        t0 = time.perf_counter()
        with open(os.path.join(rundir, "migrate.out"), "wb") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=self.lab.env)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                rc = "timeout"
        run["total_s"] = round(time.perf_counter() - t0, 4)
        run["migrate_cmd"] = " ".join(cmd)
        text = file_text(os.path.join(rundir, "migrate.out"))
        try:
            run["report"] = json.loads(file_text(report)) if os.path.exists(report) else None
        except ValueError:
            run["report"] = None
            run["report_raw"] = file_text(report)[:2000]
        if rc != 0:
            run["migrate_error"] = f"exit status {rc}: {tail_text(text)}"
        elif not run["report"]:
            run["migrate_error"] = f"no report in {report}: {tail_text(text)}"
        else:
            run["ferry_downtime_s"] = run["report"].get("downtime_s")
            run["bytes_sent"] = run["report"].get("bytes_sent")


# --------------------------------------------------------------------------------------------


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "all": [round(v, 4) for v in values]}


def aggregate(runs, plan_sizes, modes, variants, dirty_rate):
    results = {}
    for mode in modes:
        for size in plan_sizes:
            for v in variants:
                rs = [r for r in runs if r["mode"] == mode and r["size_mib"] == size and r["variant"] == v]
                if not rs:
                    continue
                good = [r for r in rs if r.get("ok")]
                entry = {
                    "runs": len(rs),
                    "ok_runs": len(good),
                    "downtime_s": summarize([r.get("downtime_s") for r in good]),
                    "total_s": summarize([r.get("total_s") for r in good]),
                    "gap_after_command_s": summarize([r.get("gap_after_command_s") for r in good]),
                }
                if v == "baseline":
                    for k in ("dump_s", "copy_s", "restore_s"):
                        entry[k] = summarize([r.get(k) for r in good])
                    entry["frozen_s"] = summarize([r.get("criu_stats", {}).get("frozen_s") for r in good])
                else:
                    entry["ferry_downtime_s"] = summarize([r.get("ferry_downtime_s") for r in good])
                if mode == "dirty":
                    entry["dirty_pages_per_s"] = summarize(
                        [(r.get("sum_after") or {}).get("dirty_pages_per_s") for r in good])
                    entry["dirty_pages_per_s_wanted"] = round(size * 256 * dirty_rate / 100, 1)
                errors = sorted({(r.get("error") or r.get("migrate_error") or "; ".join(r.get("problems") or []))
                                 for r in rs if not r.get("ok")})
                if errors:
                    entry["errors"] = [e[:600] for e in errors]
                results.setdefault(mode, {}).setdefault(str(size), {})[v] = entry
    return results


def ratios(results):
    out = {}
    for mode, by_size in results.items():
        for size, by_v in by_size.items():
            base = (by_v.get("baseline") or {}).get("downtime_s")
            for v, e in by_v.items():
                if v == "baseline":
                    continue
                d = e.get("downtime_s")
                r = round(d["median"] / base["median"], 3) if (d and base and base["median"] > 0) else None
                out.setdefault(mode, {}).setdefault(size, {})[v] = r
    return out


def print_table(results, rat):
    lines = ["", "migrate suite: client-observed downtime (probe max gap), median (min-max) s; total: the "
             "migration's commands; after: how long the client still waited once they returned"]
    lines.append(f"{'mode':6} {'size':>6} {'variant':10} {'ok':>5} {'downtime':>22} {'total':>8} "
                 f"{'after':>6} {'ferry/base':>10}  notes")
    for mode, by_size in results.items():
        for size, by_v in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            for v, e in by_v.items():
                d = e.get("downtime_s")
                dt = f"{d['median']:.3f} ({d['min']:.3f}-{d['max']:.3f})" if d else "-"
                tt = f"{e['total_s']['median']:.3f}" if e.get("total_s") else "-"
                at = f"{e['gap_after_command_s']['median']:.3f}" if e.get("gap_after_command_s") else "-"
                r = rat.get(mode, {}).get(size, {}).get(v)
                rt = f"{r:.2f}" if r is not None else ("" if v == "baseline" else "-")
                note = ""
                if v == "baseline" and e.get("dump_s"):
                    note = f"dump {e['dump_s']['median']:.3f} s, restore {e['restore_s']['median']:.3f} s"
                if v != "baseline" and e.get("ferry_downtime_s"):
                    note = f"ferry's report: downtime {e['ferry_downtime_s']['median']:.3f} s"
                if e.get("errors"):
                    note += ("; " if note else "") + "error: " + e["errors"][0].splitlines()[0][:90]
                lines.append(f"{mode:6} {size:>6} {v:10} {e['ok_runs']:>2}/{e['runs']:<2} {dt:>22} {tt:>8} {at:>6} {rt:>10}  {note}")
    print("\n".join(lines), flush=True)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (the suites then write no plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("bench: no matplotlib: no plot")
        return None
    return plt


def plot(doc, path):
    plt = pyplot()
    if plt is None:
        return False
    results = doc["results"]
    modes = [m for m in MODES if m in results]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    styles = {"baseline": ("black", "o", "CRIU page server (baseline)"), "stop-copy": ("tab:blue", "s", "ferry stop-copy"),
              "pre-copy": ("tab:green", "^", "ferry pre-copy"), "post-copy": ("tab:red", "v", "ferry post-copy")}
    for ax, mode in zip(axes[0], modes):
        missing = []
        for v, (color, marker, label) in styles.items():
            xs, ys, lo, hi = [], [], [], []
            for size, by_v in sorted(results[mode].items(), key=lambda kv: int(kv[0])):
                e = by_v.get(v)
                if e and e.get("downtime_s"):
                    d = e["downtime_s"]
                    xs.append(int(size))
                    ys.append(d["median"])
                    lo.append(d["median"] - d["min"])
                    hi.append(d["max"] - d["median"])
                elif e:
                    missing.append(v)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, capsize=3, label=label)
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
        if missing:
            ax.text(0.02, 0.97, "no data (failed): " + ", ".join(sorted(set(missing))), transform=ax.transAxes,
                    va="top", fontsize=8, color="gray")
        ax.set_xscale("log", base=2)
        sizes = sorted(int(s) for s in results[mode])
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{s} MiB" if s < 1024 else f"{s // 1024} GiB" for s in sizes])
        # Log scale: post-copy's tenths of a second and the baseline's tens of seconds both read.
        ax.set_yscale("log")
        title = "idle" if mode == "idle" else f"dirtying {doc['method']['dirty_rate_pct_per_s']:g} %/s"
        ax.set_title(f"{title}: client-observed downtime")
        ax.set_xlabel("workload memory")
        ax.set_ylabel("longest gap between replies (s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"live migration between two lab nodes ({doc['machine'].get('git', '?')}, "
                 f"{doc['finished'][:16]} UTC), median with min-max", fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------------------------


def find_criu(path):
    for cand in [path, shutil.which("criu"), "/usr/local/sbin/criu"]:
        if cand and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise BenchError("criu not found (build CRIU 4.2 with scripts/setup)")


def find_ferry(args, notes):
    """The ferry binary (built unless --no-build or --ferry); a failed build is noted, and the
    binary already there used, so that the baseline runs whatever state the tree is in."""
    if args.ferry:
        return os.path.abspath(args.ferry)
    ferry = os.path.join(REPO, "target", "release", "ferry")
    if not args.no_build:
        cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
        log("bench: cargo build --release -p ferry -p ferryd")
        r = subprocess.run([cargo, "build", "--release", "-p", "ferry", "-p", "ferryd"], cwd=REPO)
        if r.returncode != 0:
            msg = "cargo build --release -p ferry -p ferryd failed: using the binaries already there, if any"
            log(f"bench: warning: {msg}")
            notes.append(msg)
    if not os.access(ferry, os.X_OK):
        raise BenchError(f"no ferry binary at {ferry} (the lab needs it)")
    return ferry


def migrate_problem_of(ferry):
    """Why `ferry migrate` cannot be benchmarked with this binary, or None."""
    r = subprocess.run([ferry, "migrate", "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        text = r.stderr + r.stdout
        first = next((l for l in text.splitlines() if l.startswith("error")), tail_text(text, 1))
        return f"`ferry migrate` is not available in {ferry}: {first.strip()}"
    missing = [o for o in ("--to", "--strategy", "--report-json") if o not in r.stdout]
    top = subprocess.run([ferry, "--help"], capture_output=True, text=True).stdout
    if "--node" not in top:
        missing.append("--node (global)")
    if missing:
        return f"`ferry migrate` in {ferry} lacks {', '.join(missing)}"
    return None


def criu_patches():
    """ferry's CRIU patches in this tree, and whether the installed CRIU was built with exactly
    these: scripts/setup records the sha256 of their concatenation when it builds CRIU."""
    paths = sorted(glob.glob(os.path.join(REPO, "scripts", "criu-patches", "*.patch")))
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    stamp = (read("/usr/local/share/ferry/criu-patches.sha256") or "").strip()
    return {"patches": [os.path.basename(p) for p in paths],
            "installed_criu_carries_them": (stamp == digest.hexdigest()) if stamp else None}


def machine_info(criu, ferry):
    cpu = ""
    for line in (read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    criu_ver = re.search(r"Version:\s*(\S+)", cmd_output([criu, "--version"]))
    info = {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(meminfo("MemTotal") / 2**20, 1), "criu": criu_ver.group(1) if criu_ver else None,
            "criu_path": criu, "criu_patches": criu_patches(), "python": platform.python_version()}
    if ferry:
        info["ferry"] = cmd_output([ferry, "--version"]) or None
        info["ferry_path"] = ferry
        try:
            info["ferry_mtime"] = datetime.datetime.fromtimestamp(
                os.stat(ferry).st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
        except OSError:
            pass
    git = cmd_output(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    if git:
        dirty = cmd_output(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
        info["git"] = git + ("-dirty" if dirty else "")
    return info


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/run migrate",
                                 description="Client-observed downtime of live migration: ferry vs CRIU's page server.")
    ap.add_argument("--sizes", help="comma-separated MiB (default 256,1024,4096)")
    ap.add_argument("--quick", action="store_true", help="256 MiB and 1 GiB, one repetition")
    ap.add_argument("--reps", type=int, help="repetitions per case (default 2 up to 1 GiB, 1 above)")
    ap.add_argument("--modes", default="idle,dirty", help="idle and/or dirty (default both)")
    ap.add_argument("--dirty-rate", type=float, default=10.0, help="dirty mode: %% of memory rewritten per second")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="ferry strategies (default all three)")
    ap.add_argument("--tools", default="criu,ferry", help="criu (the baseline) and/or ferry")
    ap.add_argument("--conns", type=int, default=1, help="probe connections (default 1)")
    ap.add_argument("--interval", type=float, default=0.001, help="probe: pause between a reply and the next request")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of probing before the migration")
    ap.add_argument("--after", type=float, default=2.0, help="seconds of probing after it")
    ap.add_argument("--lab", default="bm", help="lab name (default bm; '' for the default lab)")
    ap.add_argument("--ferry", help="ferry binary (default: build target/release/ferry)")
    ap.add_argument("--lab-ferry", help="ferry binary for the `ferry lab` commands (default: --ferry)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--criu", help="criu binary (default: criu in PATH, else /usr/local/sbin/criu)")
    ap.add_argument("--max-others-cpu", type=float, default=0.3,
                    help="wait (up to --quiet-wait s) before each run until others use fewer CPUs than this")
    ap.add_argument("--quiet-wait", type=float, default=20.0)
    ap.add_argument("--label", help="free text stored in the JSON")
    ap.add_argument("--out", help="results basename under bench/results/ (default migrate[-quick])")
    args = ap.parse_args(argv)
    if args.sizes:
        args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    else:
        args.size_list = [256, 1024] if args.quick else DEFAULT_SIZES
    if not args.size_list or any(s < 16 for s in args.size_list):
        ap.error("--sizes takes MiB values >= 16")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or any(m not in MODES for m in args.mode_list):
        ap.error("--modes takes idle and/or dirty")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tools or any(t not in ("criu", "ferry") for t in tools):
        ap.error("--tools takes criu and/or ferry")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if any(s not in STRATEGIES for s in strategies):
        ap.error(f"--strategies takes {', '.join(STRATEGIES)}")
    args.variants = (["baseline"] if "criu" in tools else []) + (strategies if "ferry" in tools else [])
    if not args.variants:
        ap.error("nothing to run")
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be >= 1")
    args.out = args.out or ("migrate-quick" if args.quick else "migrate")
    if args.conns < 1:
        ap.error("--conns must be >= 1")
    return args


def reps_for(args, size):
    if args.reps:
        return args.reps
    if args.quick:
        return 1
    return 2 if size <= 1024 else 1


def main(argv):
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise BenchError("must run as root (CRIU and the lab need it)")
    for prog in ("nsenter", "ss", "mount", "umount"):
        if not shutil.which(prog):
            raise BenchError(f"{prog} not found")
    if cmd_output([PYTHON, "-c", "import numpy; print(1)"]) != "1":
        raise BenchError(f"{PYTHON} lacks numpy (python3-numpy, which python3-matplotlib brings)")
    max_size = max(args.size_list)
    avail = meminfo("MemAvailable") // 1024
    need = int(3.3 * max_size) + 1024  # the workload, its images in the tmpfs, the restored copy
    if avail < need:
        raise BenchError(f"{max_size} MiB needs about {need} MiB of free memory, {avail} available")
    notes = []
    criu = find_criu(args.criu)
    ferry = find_ferry(args, notes)
    lab_ferry = os.path.abspath(args.lab_ferry) if args.lab_ferry else ferry
    problem = None
    if any(v != "baseline" for v in args.variants):
        problem = migrate_problem_of(ferry)
        if problem:
            log(f"bench: {problem}; ferry's runs are recorded as failed, the baseline runs")
            notes.append(problem)

    def on_signal(signum, _frame):
        raise Terminated(f"signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    suite = Suite(args, criu, ferry, lab_ferry, problem, notes)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    try:
        if suite.lab.status() is not None:
            log(f"bench: lab {suite.lab.name} is up (left by an earlier run?): taking it down")
            notes.append(f"lab {suite.lab.name} was up at the start: taken down")
            suite.lab.down()
        suite.mount(max_size)
        suite.private_binaries()
        for size in args.size_list:
            for mode in args.mode_list:
                for rep in range(reps_for(args, size)):
                    for variant in args.variants:
                        if variant != "baseline" and problem and rep > 0:
                            continue  # one recorded failure per case is enough
                        log(f"bench: migrate {size} MiB {mode} {variant} rep {rep + 1}")
                        if variant != "baseline" and problem:
                            run = {"size_mib": size, "mode": mode, "variant": variant, "rep": rep,
                                   "ok": False, "migrate_error": problem}
                        else:
                            run = suite.run_one(size, mode, variant, rep)
                        suite.runs.append(run)
                        if run.get("ok"):
                            extra = ""
                            if variant == "baseline":
                                extra = f" (dump {run['dump_s']:.3f} s, restore {run['restore_s']:.3f} s)"
                            log(f"bench:   downtime {run['downtime_s']:.3f} s, total {run.get('total_s', 0):.3f} s{extra}")
                        else:
                            why = run.get("error") or run.get("migrate_error") or "; ".join(run.get("problems") or [])
                            log(f"bench:   failed: {why.splitlines()[0] if why else '?'}")
    finally:
        suite.cleanup()
        for s, h in old.items():
            signal.signal(s, h)
    finished = datetime.datetime.now(datetime.timezone.utc)
    results = aggregate(suite.runs, args.size_list, args.mode_list, args.variants, args.dirty_rate)
    rat = ratios(results)
    doc = {
        "suite": "migrate",
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "command": "bench/run migrate " + " ".join(argv),
        "label": args.label,
        "machine": machine_info(criu, ferry),
        "method": {
            "workload": "tools/memload.py: random memory, line request/reply port, dirty mode rewrites pages",
            "dirty_rate_pct_per_s": args.dirty_rate,
            "probe": f"tools/probe_client.py echo, {args.conns} connection(s), {args.interval} s between reply and "
                     f"next request, {args.warmup} s before and {args.after} s after the migration",
            "downtime": "longest gap between two consecutive good replies on one connection (probe max_gap_s)",
            "baseline": "criu page-server in node2's netns; criu dump --page-server --tcp-established in the "
                        "workload's netns; non-memory images copied; criu restore -d --tcp-established in the "
                        "workload's netns (the address does not move)",
            "ferry": "ferry --node node1 migrate pid:PID --to node2 --strategy S --report-json F",
            "lab": f"a fresh `ferry lab up --nodes 2` per run (lab name {args.lab or '(default)'})",
            "images": "a private tmpfs",
        },
        "results": results,
        "ratios_ferry_over_baseline_downtime": rat,
        "runs": suite.runs,
        "notes": notes,
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, args.out + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    png = os.path.join(RESULTS_DIR, args.out + ".png")
    plotted = plot(doc, png)
    print_table(results, rat)
    print(f"\nbench: wrote {os.path.relpath(path, REPO)}" + (f" and {os.path.relpath(png, REPO)}" if plotted else "")
          + f" in {doc['duration_s']:.0f} s", flush=True)
    failed_baseline = [r for r in suite.runs if r["variant"] == "baseline" and not r.get("ok")]
    return 1 if failed_baseline else 0


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
