"""Overload benchmark of the served recommender (a script that prints figures, not a test).

    python tests/benchmarks/bench_overload.py [--model models/selected] [--clients 48] [--seconds 20] [--settle 60]

The model is packaged with conf/serve/default.yaml into a temporary BENTOML_HOME and served with `bentoml serve` on
a free loopback port (authentication explicitly off, no request log). Then:

1. made-up paths: 2,000 requests (GET and POST) to paths the service does not serve; /metrics size and scrape time
   before and after.
2. a flood: `--clients` clients each send full /recommend_batch calls (1000 requests of a 500-movie history, k=100,
   3.2 MB a body) over keep-alive connections for `--seconds`, waiting Retry-After after a 503 as a well-behaved
   client does. Every status is counted (200, 503, 504, other, connection errors), with latencies; the CPU seconds
   of each worker process during the flood show how connections spread across workers.
3. memory: resident memory of the serving processes when idle (after a warm-up), at the flood's peak, and
   `--settle` seconds after it.

Figures are printed and written to reports/benchmarks/overload.json, with the machine's load average beside them.
Loopback only; every loop is bounded in count and time; the server is stopped by killing its process group.
"""
import argparse
import asyncio
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from bench_service import process_tree_rss
from bento_server import serving_for_load, write_figures


def worker_cpu_seconds(root: int) -> dict[int, float]:
    "CPU seconds (user + system) of each BentoML worker process under `root`."
    ticks = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        parents[int(proc.name)] = int(fields[1])
        if b"_bentoml_impl.worker.service" in command:
            cpu[int(proc.name)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree, grew = tree | children, bool(children)
    return {pid: seconds for pid, seconds in cpu.items() if pid in tree}


def made_up_paths(url: str, n: int = 1000) -> dict:
    "/metrics size and scrape time before and after 2n requests to made-up paths."
    def scrape() -> tuple[int, float]:
        timings, size = [], 0
        with httpx.Client(base_url=url, timeout=30) as prometheus:
            for _ in range(5):
                started = time.perf_counter()
                size = len(prometheus.get("/metrics").content)
                timings.append(time.perf_counter() - started)
        return size, sorted(timings)[2]

    before = scrape()
    statuses = Counter()
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(n):
            path = f"/{uuid.uuid4().hex}"
            statuses[http.get(path).status_code] += 1
            statuses[http.post(path, json={}).status_code] += 1
    after = scrape()
    return {"requests": 2 * n, "statuses": dict(statuses), "metrics_bytes_before": before[0],
            "metrics_bytes_after": after[0], "metrics_ms_before": before[1] * 1000, "metrics_ms_after": after[1] * 1000}


async def flood(port: int, body: bytes, clients: int, seconds: float) -> list[tuple[int | str, float]]:
    "`clients` keep-alive clients POSTing `body` to /recommend_batch for `seconds`; (status or error, seconds) each."
    answers: list[tuple[int | str, float]] = []
    deadline = time.monotonic() + seconds
    head = (b"POST /recommend_batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))

    async def one_client() -> None:
        reader = writer = None
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head + body)
                await writer.drain()
                status = int((await reader.readline()).split()[1])
                length, retry_after, close = 0, 0.0, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "retry-after":
                        retry_after = float(value)
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                await reader.readexactly(length)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as error:
                answers.append((type(error).__name__, time.perf_counter() - started))
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.5)
                continue
            answers.append((status, time.perf_counter() - started))
            if close:
                writer.close()
                reader = writer = None
            if retry_after:
                await asyncio.sleep(min(retry_after, max(0.0, deadline - time.monotonic())))
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return answers


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "selected"))
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the flood")
    parser.add_argument("--settle", type=float, default=60.0, help="wait after the flood before measuring memory")
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "overload.json"))
    args = parser.parse_args()
    model_dir = Path(args.model).resolve()
    serve = yaml.safe_load((ROOT / "conf" / "serve" / "default.yaml").read_text())
    items = pd.read_parquet(model_dir / "items.parquet").item_id.tolist()
    rng = random.Random(0)
    body = json.dumps({"requests": [{"history": rng.sample(items, serve["max_history"]), "k": serve["max_k"]}
                                    for _ in range(serve["max_batch"])]}).encode()
    result = {"load_before": os.getloadavg(), "clients": args.clients, "seconds": args.seconds,
              "body_bytes": len(body), "serve": serve}
    with tempfile.TemporaryDirectory(prefix="reelrank-overload-") as tmp:
        work = Path(tmp)
        with serving_for_load(model_dir, serve, work) as (url, proc):
            port = int(url.rsplit(":", 1)[1])
            # warm-up: a few clients for a few seconds, so that every worker has answered full batches (a worker's
            # first ones allocate what it keeps for reuse)
            warm_up = Counter(status for status, _ in asyncio.run(flood(port, body, 2 * serve["workers"], 8)))
            time.sleep(5)
            result["warm_up"] = dict(warm_up)
            idle = process_tree_rss(proc.pid)
            idle_mib = sum(rss for rss, _ in idle)
            result["made_up_paths"] = made_up_paths(url)

            peak = [idle_mib]
            stop = threading.Event()

            def sample_memory() -> None:
                while not stop.wait(0.5):
                    peak.append(sum(rss for rss, _ in process_tree_rss(proc.pid)))

            sampler = threading.Thread(target=sample_memory)
            cpu_before, client_cpu_before = worker_cpu_seconds(proc.pid), resource.getrusage(resource.RUSAGE_SELF)
            sampler.start()
            started = time.perf_counter()
            answers = asyncio.run(flood(port, body, args.clients, args.seconds))
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
            cpu_after, client_cpu_after = worker_cpu_seconds(proc.pid), resource.getrusage(resource.RUSAGE_SELF)
            result["load_after_flood"] = os.getloadavg()
            time.sleep(args.settle)
            settled = process_tree_rss(proc.pid)
            settled_mib = sum(rss for rss, _ in settled)
            after_settle = httpx.post(f"{url}/recommend", json={"user_id": 1}, timeout=30).status_code
    statuses = Counter(status for status, _ in answers)
    result["flood"] = {
        "elapsed_s": elapsed, "statuses": {str(status): count for status, count in statuses.items()},
        "answered_per_s": statuses[200] / elapsed,
        "latency_200": percentiles([s for status, s in answers if status == 200]),
        "latency_503": percentiles([s for status, s in answers if status == 503]),
        "worker_cpu_s": {str(pid): cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after},
        "client_cpu_s": (client_cpu_after.ru_utime + client_cpu_after.ru_stime
                         - client_cpu_before.ru_utime - client_cpu_before.ru_stime)}
    result["memory_mib"] = {"idle": idle_mib, "peak": max(peak), "settled": settled_mib,
                            "settled_vs_idle": settled_mib / idle_mib - 1, "settle_s": args.settle,
                            "idle_processes": idle, "settled_processes": settled}
    result["recommend_after_settle"] = after_settle

    paths, flood_figures, memory = result["made_up_paths"], result["flood"], result["memory_mib"]
    print(f"load average before: {result['load_before'][0]:.2f}; after the flood: {result['load_after_flood'][0]:.2f}")
    print(f"made-up paths: {paths['requests']} requests {paths['statuses']}; /metrics {paths['metrics_bytes_before']} "
          f"-> {paths['metrics_bytes_after']} bytes, {paths['metrics_ms_before']:.1f} -> {paths['metrics_ms_after']:.1f} ms")
    print(f"flood: {args.clients} clients x full batches ({len(body) / 1e6:.1f} MB) for {elapsed:.1f} s: "
          f"{flood_figures['statuses']}; answered {flood_figures['answered_per_s']:.2f}/s")
    print(f"  200 latency {flood_figures['latency_200']}")
    print(f"  503 latency {flood_figures['latency_503']}")
    print(f"  worker CPU s {flood_figures['worker_cpu_s']}; load generator CPU {flood_figures['client_cpu_s']:.1f} s")
    print(f"memory MiB: idle {memory['idle']}, peak {memory['peak']}, {args.settle:.0f} s after "
          f"{memory['settled']} ({memory['settled_vs_idle']:+.1%}); /recommend afterwards {after_settle}")
    write_figures(args.out, result)


if __name__ == "__main__":
    main()
