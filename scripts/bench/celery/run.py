"""Celery baseline: N no-op tasks through Celery 5 + Redis, `--concurrency C` workers.

Run with the venv that setup.sh makes:

    scripts/bench/celery/setup.sh
    target/bench/celery-venv/bin/python scripts/bench/celery/run.py --n 10000 --concurrency 2

Starts its own redis-server (on --port, data in a temporary directory, no persistence) and one
`celery worker --concurrency C` (prefork pool, the default), waits until the worker answers a
ping, then times what a user's client does: `noop.delay()` for every task, then `.get()` on
every result. Prints one JSON line: {"n", "concurrency", "seconds", "per_s"}. Stops both
processes at the end (also on error).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--port", type=int, default=6390)
    args = ap.parse_args()

    here = os.path.dirname(os.path.abspath(__file__))
    url = f"redis://127.0.0.1:{args.port}/0"
    env = dict(os.environ, CELERY_BENCH_REDIS=url, PYTHONPATH=here)
    tmp = tempfile.mkdtemp(prefix="celery-bench-")
    procs = []
    try:
        redis = subprocess.Popen(
            ["redis-server", "--port", str(args.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis)
        os.environ["CELERY_BENCH_REDIS"] = url
        sys.path.insert(0, here)
        from noop_tasks import app, noop  # noqa: E402  (needs the URL first)

        celery = os.path.join(os.path.dirname(sys.executable), "celery")
        worker = subprocess.Popen(
            [celery, "-A", "noop_tasks", "worker", "--concurrency", str(args.concurrency),
             "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        procs.append(worker)
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("celery worker did not come up")
        # One task end to end first, so that both sides are warm.
        noop.delay().get(timeout=30)

        t0 = time.perf_counter()
        results = [noop.delay() for _ in range(args.n)]
        for r in results:
            r.get(timeout=300)
        seconds = time.perf_counter() - t0
        print(json.dumps({"n": args.n, "concurrency": args.concurrency,
                          "seconds": round(seconds, 3), "per_s": round(args.n / seconds, 1)}))
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM) if p is not procs[0] else p.terminate()
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
