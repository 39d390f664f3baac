#!/usr/bin/env python3
"""The user-path bench: what a user runs, side by side with the baselines, in one run.

Run with: scripts/bench/user-path.sh   (builds the release binaries, installs what is missing,
then runs this; see the flags below and BENCHMARKS.md)

Measurements (each round runs every column once, in the order shown):

local  `orchestrator run` of N_LOCAL tasks `{argv: ["true"]}` on the default config: the `local`
       distributor and SQLite, state under ./.distributor/ of a directory on the ordinary disk
       (--dir). Every round gets a fresh working directory ("fresh"); the "after rm -rf" column
       runs again in a directory whose previous .distributor/ was just deleted, as a user who
       cleans up between runs does (ext4 is slowest right after mass deletions). Baselines:
       `xargs -P2 -n1 true` and GNU `parallel -j2 true` over the same N.
pool   `orchestrator run` of N_POOL no-op tasks (`jobs`, task type `echo`) with 2 `jobs-worker`
       processes of capacity 1, started as soon as the Jobs API listens; and `orchestrator
       serve` with the same workers, the tasks submitted over HTTP by a keep-alive client (one
       POST per task), timed from the first submit until the last task is terminal. Baseline: Celery 5 + Redis, `--concurrency
       2`, the same N (scripts/bench/celery/run.py).

Prints every figure and the ratios (lower is better for orchestrator ÷ baseline).
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env():
    # cargo's LD_LIBRARY_PATH (when run under cargo) makes every exec search it for libc.
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    env["RUST_LOG"] = env.get("BENCH_RUST_LOG", "warn")
    return env


def timed(cmd, cwd=None, stdin=None, env=None):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, input=stdin, env=env or clean_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return dt


def task_file(path, n, payload, distributor="local"):
    with open(path, "w") as f:
        for i in range(n):
            f.write(f'[[task]]\nname = "t{i}"\ndistributor = "{distributor}"\n'
                    f"payload = {payload}\n")


def wait_port(port, proc, deadline_s=30):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited ({proc.returncode}) before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.002)
    raise SystemExit(f"nothing listens on {port}")


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------------------------
# local


def bench_local(args, bins, rnd, out):
    n = args.n_local
    work = os.path.join(args.dir, f"local-{rnd}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    task_file(os.path.join(work, "tasks.toml"), n, '{ argv = ["true"] }')
    orch = os.path.join(bins, "orchestrator")
    fresh = timed([orch, "run", "tasks.toml", "--progress", "quiet"], cwd=work)
    out["local fresh"].append(fresh)
    print(f"  round {rnd}: orchestrator run (fresh ./.distributor)  {fresh:7.2f} s", flush=True)
    seq = "".join(f"{i}\n" for i in range(n)).encode()
    x = timed(["xargs", "-P2", "-n1", "true"], stdin=seq)
    out["xargs -P2"].append(x)
    print(f"  round {rnd}: xargs -P2                               {x:7.2f} s", flush=True)
    par = timed(["parallel", "-j2", "true"], stdin=seq)
    out["parallel -j2"].append(par)
    print(f"  round {rnd}: GNU parallel -j2                        {par:7.2f} s", flush=True)
    if not args.no_rerun:
        shutil.rmtree(os.path.join(work, ".distributor"))
        again = timed([orch, "run", "tasks.toml", "--progress", "quiet"], cwd=work)
        out["local after rm -rf"].append(again)
        print(f"  round {rnd}: orchestrator run (after rm -rf)         {again:7.2f} s", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# pool


def pool_config(work, port, workers):
    lines = ["[distributors.pool]", 'kind = "jobs"', f'listen = "127.0.0.1:{port}"',
             'database = ".distributor/jobs.db"', "long_poll_ms = 30000", "workers = ["]
    lines += [f'  {{ name = "w{i}", token = "bench-token-{i}" }},' for i in range(workers)]
    lines += ["]", ""]
    path = os.path.join(work, "orchestrator.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def start_workers(bins, port, workers):
    procs = []
    for i in range(workers):
        procs.append(subprocess.Popen(
            [os.path.join(bins, "jobs-worker"), "--server", f"http://127.0.0.1:{port}/",
             "--token", f"bench-token-{i}", "--task-types", "echo", "--capacity", "1"],
            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def bench_pool_run(args, bins, rnd, out):
    work = os.path.join(args.dir, f"pool-run-{rnd}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    port = free_port()
    config = pool_config(work, port, args.workers)
    task_file(os.path.join(work, "tasks.toml"), args.n_pool,
              '{ task_type = "echo", input = {} }', "pool")
    t0 = time.perf_counter()
    orch = subprocess.Popen([os.path.join(bins, "orchestrator"), "--config", config, "run",
                             "tasks.toml", "--progress", "quiet"], cwd=work, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(port, orch)
    workers = start_workers(bins, port, args.workers)
    try:
        _, err = orch.communicate(timeout=1800)
        dt = time.perf_counter() - t0
    finally:
        stop(workers)
    if orch.returncode != 0:
        raise SystemExit(f"orchestrator run (jobs) failed: {err.decode()[-2000:]}")
    out["pool run"].append(dt)
    print(f"  round {rnd}: orchestrator run, jobs, {args.workers} workers   {dt:7.2f} s", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


class Api:
    """A keep-alive HTTP client of `orchestrator serve`."""

    def __init__(self, port, token):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers=self.headers)
        r = self.conn.getresponse()
        payload = r.read()
        return r.status, payload


def bench_pool_serve(args, bins, rnd, out):
    work = os.path.join(args.dir, f"pool-serve-{rnd}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    port, api_port = free_port(), free_port()
    config = pool_config(work, port, args.workers)
    server = subprocess.Popen([os.path.join(bins, "orchestrator"), "--config", config, "serve",
                               "--listen", f"127.0.0.1:{api_port}"], cwd=work, env=clean_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs = [server]
    try:
        wait_port(api_port, server)
        wait_port(port, server)
        procs += start_workers(bins, port, args.workers)
        token_file = os.path.join(work, ".distributor", "api-token")
        token = open(token_file).read().strip() if os.path.exists(token_file) else None
        api = Api(api_port, token)
        task = {"distributor": "pool", "payload": {"task_type": "echo", "input": {}}}
        t0 = time.perf_counter()
        for _ in range(args.n_pool):
            status, body = api.call("POST", "/v1/executions", task)
            if status != 201:
                raise SystemExit(f"submit: {status} {body[:500]!r}")
        live = "/v1/executions?state=queued,dispatching,pending,running,cancelling&limit=1"
        while True:
            status, body = api.call("GET", live)
            if status != 200:
                raise SystemExit(f"list: {status} {body[:500]!r}")
            listed = json.loads(body)
            if isinstance(listed, dict):
                listed = listed.get("executions", [])
            if not listed:
                break
            time.sleep(0.01)
        dt = time.perf_counter() - t0
    finally:
        stop(procs)
    out["pool serve"].append(dt)
    print(f"  round {rnd}: serve + HTTP submits, {args.workers} workers        {dt:7.2f} s", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def bench_celery(args, rnd, out):
    py = os.path.join(args.celery_venv, "bin", "python")
    p = subprocess.run([py, os.path.join(ROOT, "scripts", "bench", "celery", "run.py"),
                        "--n", str(args.n_pool), "--concurrency", str(args.workers),
                        "--port", str(free_port())], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"celery baseline failed: {p.stderr[-2000:]}")
    dt = json.loads(p.stdout.strip().splitlines()[-1])["seconds"]
    out["celery"].append(dt)
    print(f"  round {rnd}: Celery 5 + Redis, --concurrency {args.workers}      {dt:7.2f} s", flush=True)


# ---------------------------------------------------------------------------------------------


def span(xs):
    return f"{min(xs):.2f} – {max(xs):.2f} s" if len(xs) > 1 else f"{xs[0]:.2f} s"


def ratio(a, b):
    r = [x / y for x, y in zip(a, b)]
    return f"{min(r):.2f} – {max(r):.2f}×" if len(r) > 1 else f"{r[0]:.2f}×"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bins", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "bench", "user-path"),
                    help="working directories (on the ordinary disk)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-local", type=int, default=2000)
    ap.add_argument("--n-pool", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=["local", "pool"], help="one half only")
    ap.add_argument("--no-rerun", action="store_true", help="skip the after-rm -rf column")
    ap.add_argument("--keep", action="store_true", help="keep the working directories")
    ap.add_argument("--celery-venv",
                    default=os.path.join(ROOT, "target", "bench", "celery-venv"))
    args = ap.parse_args()
    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    out = {k: [] for k in ["local fresh", "local after rm -rf", "xargs -P2", "parallel -j2",
                           "pool run", "pool serve", "celery"]}
    print(f"user-path bench: {args.rounds} rounds, local N={args.n_local}, pool N={args.n_pool}, "
          f"{args.workers} workers; load {os.getloadavg()[0]:.2f}; dir {args.dir}", flush=True)
    for rnd in range(1, args.rounds + 1):
        if args.only in (None, "local"):
            bench_local(args, args.bins, rnd, out)
        if args.only in (None, "pool"):
            bench_pool_run(args, args.bins, rnd, out)
            bench_pool_serve(args, args.bins, rnd, out)
            bench_celery(args, rnd, out)
    print(f"\nresults (load now {os.getloadavg()[0]:.2f}):")
    for k, v in out.items():
        if v:
            print(f"  {k:22} {span(v)}   (median {statistics.median(v):.2f} s)")
    print("ratios, per round (as labelled):")
    if out["local fresh"]:
        print(f"  local fresh ÷ xargs -P2          {ratio(out['local fresh'], out['xargs -P2'])}"
              "   (goal ≤ 1.3×)")
        print(f"  parallel -j2 ÷ local fresh       {ratio(out['parallel -j2'], out['local fresh'])}"
              "   (goal ≥ 4×)")
        if out["local after rm -rf"]:
            print(f"  local after rm -rf ÷ xargs -P2   "
                  f"{ratio(out['local after rm -rf'], out['xargs -P2'])}")
    if out["pool run"]:
        print(f"  Celery ÷ pool run                {ratio(out['celery'], out['pool run'])}"
              "   (goal ≥ 5×: how many times faster than Celery)")
        print(f"  Celery ÷ pool serve              {ratio(out['celery'], out['pool serve'])}")


if __name__ == "__main__":
    sys.exit(main())
