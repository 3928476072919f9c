"""The containers suite: ferry's checkpoint/restore and live migration of containers against the
runtimes' own flows, and against ferry's own migration of a plain process, in the same run.

    bench/run containers                        # both parts: checkpoint at 1 GiB, migrate 256 MiB, 1 GiB, 4 GiB
    bench/run containers --quick                # 256 MiB and 1 GiB, one repetition, podman only
    bench/run containers --part migrate --sizes 1024 --reps 3 --runtimes podman

The workload is tools/ctrload.py (M MiB of random memory with its SHA-256, a line request/reply
port): in a container it runs from the lab's image (scripts/mkrootfs puts it at
/opt/ferry/ctrload.py), as a process from tools/. Every run gets a fresh lab (`ferry lab up
--nodes 2`, a named lab, `bc` by default), each node with its own instance of the runtime, and
takes it down after.

Part "checkpoint" (--checkpoint-mib, default 1024), for each runtime R of --runtimes:
  ferry      `ferry checkpoint R:web` then `ferry restore CK` on node1 (its store, its runtime)
  native     R's own flow: podman `checkpoint?export=true` (the archive to a file) then
             `restore?import=true` (the file as the body); docker `POST /containers/web/checkpoints`
             then `start?checkpoint=`. Both through the runtime's API, as `podman container
             checkpoint --export` / `restore --import` and `docker checkpoint create` / `docker start
             --checkpoint` do.
  Times: checkpoint, restore, total; the restored copy's memory must hash the same.
Part "migrate" (--sizes), with tools/probe_client.py (echo, --conns connections) talking to the
workload across the lab's bridge during the whole move; its longest gap between two replies is
the downtime a client sees:
  process    ctrload as a plain process tree, `ferry migrate pid:PID --strategy post-copy`
  R-S        a container of R, `ferry migrate R:web --strategy S` for S in --strategies
  podman-flow  Podman's export, copy, import: `checkpoint?export=true&tcpEstablished=true` on node1's
             Podman, the archive copied to node2's directory, `restore?import=true&tcpEstablished=true`
             on node2's Podman. Podman cannot give the restored container another network namespace,
             so it keeps the source's (on one machine it is still there): its address does not move.
Ratios: best container strategy / podman-flow and / process at each size; ferry's container
checkpoint+restore / the native flow's. Writes bench/results/containers[-quick].json and .png.
Leaves nothing behind: probes, labs (with their runtimes), temp dirs; Ctrl-C included.
"""

import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import migrate as mig

BENCH_DIR = mig.BENCH_DIR
REPO = mig.REPO
RESULTS_DIR = mig.RESULTS_DIR
CTRLOAD = os.path.join(REPO, "tools", "ctrload.py")
CTRLOAD_IN_IMAGE = "/opt/ferry/ctrload.py"
PROBE = mig.PROBE
PYTHON = mig.PYTHON
PORT = 7000
STRATEGIES = ["stop-copy", "pre-copy", "post-copy"]
TARGETS = {"vs_podman_flow": 1 / 20, "vs_process": 1.2, "checkpoint_vs_native": 1.0}

BenchError = mig.BenchError
log = mig.log
tail_text = mig.tail_text
file_text = mig.file_text


class UnixHTTP(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket (the runtimes' APIs)."""

    def __init__(self, path, timeout=600):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def api(sock, method, path, body=None, out=None, headers=None, timeout=600):
    """One API call; the answer's body is written to `out` (a path) or returned."""
    c = UnixHTTP(sock, timeout)
    try:
        h = dict(headers or {})
        if isinstance(body, str) and os.path.isfile(body):
            h.setdefault("Content-Type", "application/x-tar")
            h["Content-Length"] = str(os.path.getsize(body))
            with open(body, "rb") as f:
                c.request(method, path, body=f, headers=h)
                r = c.getresponse()
        else:
            data = json.dumps(body).encode() if body is not None else None
            if data is not None:
                h.setdefault("Content-Type", "application/json")
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
        if out is not None and r.status < 300:
            with open(out, "wb") as f:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
            return r.status, b""
        data = r.read()
        if r.status >= 300:
            raise BenchError(f"{method} {path}: HTTP {r.status}: {data[:400]!r}")
        return r.status, data
    finally:
        c.close()


class Suite:
    def __init__(self, args, ferry):
        self.args = args
        self.ferry = ferry
        self.lab = mig.Lab(ferry, args.lab)
        self.work = None
        self.procs = []
        self.runs = []

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs = []
        if self.lab.status() is not None or os.path.exists(self.lab_state_dir()):
            try:
                self.lab.down()
            except (BenchError, subprocess.TimeoutExpired) as e:
                log(f"bench: warning: {e}")
        mig.reap_all()
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None

    def lab_state_dir(self):
        return "/run/ferry-lab" + (f"-{self.args.lab}" if self.args.lab else "")

    def ferry_cmd(self, args, timeout, rundir, name):
        t0 = time.perf_counter()
        r = self.lab.run(args, timeout=timeout)
        elapsed = time.perf_counter() - t0
        with open(os.path.join(rundir, name + ".out"), "w") as f:
            f.write(r.stdout + r.stderr)
        if r.returncode != 0:
            raise BenchError(f"ferry {' '.join(args[:6])}... exit {r.returncode}: {tail_text(r.stderr + r.stdout)}")
        return elapsed, r.stdout

    def start(self, runtime, size, rundir):
        """The workload on node1: a container of `runtime`, or a process (runtime "process")."""
        if runtime == "process":
            return self.lab.exec("node1", [PYTHON, CTRLOAD, "--mib", str(size), "--port", str(PORT)], cwd=rundir)
        image = subprocess.run(["bash", os.path.join(REPO, "scripts", "mkrootfs")], capture_output=True,
                               text=True, check=True).stdout.strip().splitlines()[-1]
        r = self.lab.run(["lab", "exec", "node1", "--runtime", runtime, "--id", "web", "--image", image, "--",
                          PYTHON, CTRLOAD_IN_IMAGE, "--mib", str(size), "--port", str(PORT)], timeout=300)
        if r.returncode != 0:
            raise BenchError(f"ferry lab exec --runtime {runtime} failed: {tail_text(r.stderr + r.stdout)}")
        lines = [l for l in r.stdout.splitlines() if l.strip()]
        m = re.match(r"^(\S+)\s+(\d+\.\d+\.\d+\.\d+)\s*$", lines[-1] if lines else "")
        if not m:
            raise BenchError(f"ferry lab exec printed no `ID IP` line: {r.stdout!r}")
        st = self.lab.status() or {}
        w = mig.workload_of(st, m.group(1)) or {}
        return m.group(1), w.get("pid", 0), m.group(2)

    def node(self, name):
        return mig.node_of(self.lab.status() or {}, name)

    def ask(self, ip):
        r = subprocess.run([PYTHON, PROBE, "ask", ip, str(PORT), "!sum", "--connect-wait", "300", "--timeout", "300"],
                           capture_output=True, text=True, timeout=700)
        m = re.match(r"^\d+ !sum (\{.*\})$", r.stdout.strip())
        if r.returncode != 0 or not m:
            raise BenchError(f"!sum to {ip} failed: {tail_text(r.stderr) or r.stdout!r}")
        return json.loads(m.group(1))

    # ---- part checkpoint

    def checkpoint_run(self, runtime, variant, size, rep):
        rundir = tempfile.mkdtemp(prefix=f"{runtime}-{variant}-", dir=self.work)
        run = {"part": "checkpoint", "runtime": runtime, "variant": variant, "size_mib": size, "rep": rep,
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        try:
            run["others_cpu_before"] = round(mig.others_cpu(1.0), 3)
            self.lab.up()
            wid, _, ip = self.start(runtime, size, rundir)
            before = self.ask(ip)
            n1 = self.node("node1")
            sock = n1["runtimes"][runtime]
            if variant == "ferry":
                base = ["--store", n1["store"], "--runtime-endpoint", f"{runtime}={sock}"]
                run["checkpoint_s"], _ = self.ferry_cmd(base + ["checkpoint", wid, "--name", "bench-ck"],
                                                        600, rundir, "checkpoint")
                run["restore_s"], _ = self.ferry_cmd(base + ["restore", "bench-ck"], 600, rundir, "restore")
            elif runtime == "podman":
                archive = os.path.join(rundir, "web.tar")
                t0 = time.perf_counter()
                api(sock, "POST", "/v4.0.0/libpod/containers/web/checkpoint?export=true", out=archive)
                run["checkpoint_s"] = time.perf_counter() - t0
                api(sock, "DELETE", "/v4.0.0/libpod/containers/web?force=true")
                t0 = time.perf_counter()
                api(sock, "POST", "/v4.0.0/libpod/containers/web/restore?import=true", body=archive)
                run["restore_s"] = time.perf_counter() - t0
                run["archive_bytes"] = os.path.getsize(archive)
            elif runtime == "docker":
                t0 = time.perf_counter()
                api(sock, "POST", "/v1.41/containers/web/checkpoints", body={"CheckpointID": "ck", "Exit": True})
                run["checkpoint_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                api(sock, "POST", "/v1.41/containers/web/start?checkpoint=ck")
                run["restore_s"] = time.perf_counter() - t0
            else:
                raise BenchError(f"no native flow for {runtime}")
            run["total_s"] = run["checkpoint_s"] + run["restore_s"]
            after = self.ask(ip)
            run["ok"] = after.get("sha256") == before.get("sha256") and after.get("ok")
            if not run["ok"]:
                run["problems"] = [f"memory differs after the restore: {before} -> {after}"]
        except (BenchError, subprocess.SubprocessError, OSError, KeyError) as e:
            run["error"] = str(e)
            run["ok"] = False
            log(f"bench: checkpoint {runtime} {variant} rep {rep}: {e}")
        finally:
            self.teardown(rundir, run)
        return run

    # ---- part migrate

    def migrate_run(self, runtime, variant, size, rep):
        rundir = tempfile.mkdtemp(prefix=f"{runtime}-{variant}-", dir=self.work)
        run = {"part": "migrate", "runtime": runtime, "variant": variant, "size_mib": size, "rep": rep,
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        probe = None
        try:
            run["others_cpu_before"] = round(mig.others_cpu(1.0), 3)
            self.lab.up()
            wid, pid, ip = self.start(runtime, size, rundir)
            run.update(workload=wid, ip=ip)
            before = self.ask(ip)
            stop = os.path.join(rundir, "probe.stop")
            probe_out = os.path.join(rundir, "probe.json")
            probe = subprocess.Popen([PYTHON, PROBE, "echo", ip, str(PORT), "--conns", str(self.args.conns),
                                      "--stop-file", stop, "--out", probe_out, "--timeout", "120"],
                                     stdin=subprocess.DEVNULL, stdout=open(os.path.join(rundir, "probe.out"), "wb"),
                                     stderr=subprocess.STDOUT)
            self.procs.append(probe)
            time.sleep(self.args.warmup)
            if probe.poll() is not None:
                raise BenchError(f"the probe ended early: {file_text(os.path.join(rundir, 'probe.out'))}")
            run["migrate_start_unix"] = round(time.time(), 6)
            if variant == "podman-flow":
                self.podman_flow(run, rundir)
            else:
                report = os.path.join(rundir, "report.json")
                strategy = variant.split("-", 1)[1] if variant != "process" else "post-copy"
                t0 = time.perf_counter()
                self.ferry_cmd(["--node", "node1", "migrate", wid, "--to", "node2", "--strategy", strategy,
                                "--report-json", report], 300 + size // 5, rundir, "migrate")
                run["total_s"] = round(time.perf_counter() - t0, 4)
                run["report"] = json.loads(file_text(report) or "null")
                if run["report"]:
                    run["ferry_downtime_s"] = run["report"].get("downtime_s")
                    run["phases"] = {p["name"]: p["seconds"] for p in run["report"].get("phases", [])}
            run["migrate_end_unix"] = round(time.time(), 6)
            time.sleep(self.args.after)
            open(stop, "w").close()
            probe.wait(timeout=180)
            run["probe"] = json.loads(file_text(probe_out) or "null")
            if not run["probe"]:
                raise BenchError(f"the probe wrote nothing: {file_text(os.path.join(rundir, 'probe.out'))}")
            run["downtime_s"] = run["probe"]["max_gap_s"]
            after = self.ask(ip)
            p = run["probe"]
            problems = []
            if after.get("sha256") != before.get("sha256") or not after.get("ok"):
                problems.append("the memory differs after the move")
            if p["errors"] or p["lost"] or p["dup"] or p["wrong"]:
                problems.append(f"probe saw errors={p['errors']} lost={p['lost']} dup={p['dup']} wrong={p['wrong']}")
            run["problems"] = problems
            run["ok"] = not problems
        except (BenchError, subprocess.SubprocessError, OSError, KeyError, ValueError) as e:
            run["error"] = str(e)
            run["ok"] = False
            log(f"bench: migrate {runtime} {variant} {size} MiB rep {rep}: {e}")
        finally:
            if probe is not None and probe.poll() is None:
                probe.kill()
                probe.wait()
            self.teardown(rundir, run)
        return run

    def podman_flow(self, run, rundir):
        n1, n2 = self.node("node1"), self.node("node2")
        archive = os.path.join(rundir, "web.tar")
        copy = os.path.join(rundir, "node2-web.tar")
        t0 = time.perf_counter()
        api(n1["runtimes"]["podman"], "POST",
            "/v4.0.0/libpod/containers/web/checkpoint?export=true&tcpEstablished=true", out=archive)
        t1 = time.perf_counter()
        shutil.copyfile(archive, copy)
        t2 = time.perf_counter()
        api(n2["runtimes"]["podman"], "POST", "/v4.0.0/libpod/containers/web/restore?import=true&tcpEstablished=true",
            body=copy)
        t3 = time.perf_counter()
        run.update(checkpoint_s=round(t1 - t0, 4), copy_s=round(t2 - t1, 4), restore_s=round(t3 - t2, 4),
                   total_s=round(t3 - t0, 4), archive_bytes=os.path.getsize(archive))

    def teardown(self, rundir, run):
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
        mig.reap_all()
        shutil.rmtree(rundir, ignore_errors=True)


def aggregate(runs):
    groups = {}
    for r in runs:
        if not r.get("ok"):
            continue
        key = (r["part"], r["runtime"], r["variant"], r["size_mib"])
        groups.setdefault(key, []).append(r)
    out = []
    for (part, runtime, variant, size), rs in sorted(groups.items()):
        row = {"part": part, "runtime": runtime, "variant": variant, "size_mib": size, "runs": len(rs)}
        for field in ["downtime_s", "ferry_downtime_s", "checkpoint_s", "restore_s", "total_s"]:
            vals = [r[field] for r in rs if isinstance(r.get(field), (int, float))]
            if vals:
                row[field] = mig.summarize(vals)
        out.append(row)
    return out


def median_of(rows, part, runtime, variant, size, field):
    for r in rows:
        if (r["part"], r["runtime"], r["variant"], r["size_mib"]) == (part, runtime, variant, size) and field in r:
            return r[field]["median"]
    return None


def ratios(rows, args):
    out = []
    for runtime in args.runtimes:
        for size in sorted({r["size_mib"] for r in rows if r["part"] == "migrate"}):
            best = None
            for s in args.strategies:
                v = median_of(rows, "migrate", runtime, f"{runtime}-{s}", size, "downtime_s")
                if v is not None and (best is None or v < best[1]):
                    best = (s, v)
            if best is None:
                continue
            flow = median_of(rows, "migrate", "podman", "podman-flow", size, "downtime_s")
            proc = median_of(rows, "migrate", "process", "process", size, "downtime_s")
            row = {"runtime": runtime, "size_mib": size, "best_strategy": best[0], "downtime_s": best[1]}
            if flow:
                row["vs_podman_flow"] = round(best[1] / flow, 4)
            if proc:
                row["vs_process"] = round(best[1] / proc, 4)
            out.append(row)
        ferry_total = median_of(rows, "checkpoint", runtime, "ferry", args.checkpoint_mib, "total_s")
        native_total = median_of(rows, "checkpoint", runtime, "native", args.checkpoint_mib, "total_s")
        if ferry_total and native_total:
            out.append({"runtime": runtime, "size_mib": args.checkpoint_mib,
                        "checkpoint_vs_native": round(ferry_total / native_total, 4),
                        "ferry_total_s": ferry_total, "native_total_s": native_total})
    return out


def print_table(rows, rat):
    print(f"{'part':<11}{'runtime':<9}{'variant':<20}{'MiB':>6}{'runs':>5}  {'client downtime':>16}{'ferry downtime':>16}"
          f"{'checkpoint':>12}{'restore':>10}{'total':>9}")
    for r in rows:
        def m(f):
            return f"{r[f]['median']:.3f}" if f in r else "-"
        print(f"{r['part']:<11}{r['runtime']:<9}{r['variant']:<20}{r['size_mib']:>6}{r['runs']:>5}  "
              f"{m('downtime_s'):>16}{m('ferry_downtime_s'):>16}{m('checkpoint_s'):>12}{m('restore_s'):>10}"
              f"{m('total_s'):>9}")
    print()
    for r in rat:
        parts = [f"{k}={v}" for k, v in r.items()]
        verdicts = []
        for k, target in TARGETS.items():
            if k in r:
                verdicts.append(f"{k} {'met' if r[k] <= target else 'MISSED'} (target <= {target:.3f})")
        print("  ".join(parts + verdicts))


def plot(doc, path):
    plt = mig.pyplot()
    if plt is None:
        return
    rows = [r for r in doc["results"] if r["part"] == "migrate" and "downtime_s" in r]
    cks = [r for r in doc["results"] if r["part"] == "checkpoint" and "total_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for variant in sorted({r["variant"] for r in rows}):
        pts = sorted((r["size_mib"], r["downtime_s"]["median"]) for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("memory (MiB)")
    ax.set_ylabel("client-observed downtime (s), median")
    ax.set_title("live migration between lab nodes")
    ax.legend(fontsize=8)
    ax = axes[1]
    labels = [f"{r['runtime']} {r['variant']}" for r in cks]
    ck = [r["checkpoint_s"]["median"] if "checkpoint_s" in r else 0 for r in cks]
    rs = [r["restore_s"]["median"] if "restore_s" in r else 0 for r in cks]
    ax.bar(labels, ck, label="checkpoint")
    ax.bar(labels, rs, bottom=ck, label="restore")
    ax.set_ylabel("seconds, median")
    ax.set_title(f"container checkpoint + restore, {doc['plan']['checkpoint_mib']} MiB")
    ax.legend()
    fig.suptitle(f"ferry containers, {doc['started'][:10]} ({doc['machine'].get('cpus')} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/run containers", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB and 1 GiB, one repetition, podman only")
    ap.add_argument("--part", choices=["all", "checkpoint", "migrate"], default="all")
    ap.add_argument("--sizes", help="MiB, comma-separated (default 256,1024,4096)")
    ap.add_argument("--checkpoint-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--runtimes", default="podman,docker")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--no-baselines", action="store_true", help="ferry alone")
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--after", type=float, default=3.0)
    ap.add_argument("--lab", default="bc")
    ap.add_argument("--ferry", help="the ferry binary (default: target/release/ferry)")
    ap.add_argument("--out", help="results name (default containers, or containers-quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or "256,1024"
        args.reps = args.reps or 1
        if args.runtimes == "podman,docker":
            args.runtimes = "podman"
    args.sizes = [int(s) for s in (args.sizes or "256,1024,4096").split(",")]
    args.reps = args.reps or 3
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.out = args.out or ("containers-quick" if args.quick else "containers")
    return args


def main(argv):
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (CRIU, the lab and the runtimes need it)", file=sys.stderr)
        return 2
    ferry = os.path.abspath(args.ferry or os.path.join(REPO, "target", "release", "ferry"))
    if not os.access(ferry, os.X_OK):
        print(f"bench: no ferry at {ferry} (make build)", file=sys.stderr)
        return 2
    suite = Suite(args, ferry)
    suite.work = tempfile.mkdtemp(prefix="ferry-bench-containers.")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    plan = []
    if args.part in ("all", "checkpoint"):
        for rt in args.runtimes:
            for variant in ["ferry"] + ([] if args.no_baselines else ["native"]):
                plan += [("checkpoint", rt, variant, args.checkpoint_mib)] * args.reps
    if args.part in ("all", "migrate"):
        for size in args.sizes:
            variants = [("process", "process")]
            variants += [(rt, f"{rt}-{s}") for rt in args.runtimes for s in args.strategies]
            if not args.no_baselines and "podman" in args.runtimes:
                variants.append(("podman", "podman-flow"))
            plan += [("migrate", rt, v, size) for rt, v in variants] * args.reps
    try:
        for i, (part, rt, variant, size) in enumerate(plan):
            log(f"bench: [{i + 1}/{len(plan)}] {part} {rt} {variant} {size} MiB")
            run = (suite.checkpoint_run if part == "checkpoint" else suite.migrate_run)(rt, variant, size, i)
            suite.runs.append(run)
    except KeyboardInterrupt:
        log("bench: interrupted")
    finally:
        suite.cleanup()
    rows = aggregate(suite.runs)
    rat = ratios(rows, args)
    doc = {"suite": "containers", "started": started,
           "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "plan": {"sizes_mib": args.sizes, "checkpoint_mib": args.checkpoint_mib, "reps": args.reps,
                    "runtimes": args.runtimes, "strategies": args.strategies, "conns": args.conns},
           "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                       "ferry": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip()},
           "targets": TARGETS, "results": rows, "ratios": rat, "runs": suite.runs}
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, args.out + ".json"), "w") as f:
        json.dump(doc, f, indent=1)
    plot(doc, os.path.join(RESULTS_DIR, args.out + ".png"))
    print_table(rows, rat)
    failed = [r for r in suite.runs if not r.get("ok")]
    if failed:
        log(f"bench: {len(failed)} of {len(suite.runs)} runs failed (errors in the JSON)")
    return 1 if failed else 0


def entry(argv):
    return main(argv)
