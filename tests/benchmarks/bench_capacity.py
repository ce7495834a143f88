"""Capacity of POST /recommend at a latency objective (a script that prints figures, not a test).

    python tests/benchmarks/bench_capacity.py [--model models/selected] [--objective-ms 50] [--seconds 8]
        [--requests 4000] [--profile]

Concurrency 1 first: one client sends --requests POST /recommend calls one after another on a keep-alive
connection (a blocking socket, the cheapest client there is; a new connection when the service closes one, every
serve.keepalive_requests calls); their p50 and p99 stand beside the same requests ranked
in this process one at a time through the service's own path (`rank_requests` and the answer model, with the served
torch threads): the model's own time. The difference is what HTTP, BentoML and the service add to one request. The
worker's CPU milliseconds per call are reported too (less sensitive than latency to other work on the machine).
The in-process rate of that run (requests a second, one at a time) is the reference of the capacity ratio. Also in
process: the seconds to write the JSON answer of a full /recommend_batch (1000 requests of a full history, k at its
limit) through BentoML's answer path and through the service's own, which replaces it.

Then open loop: requests leave on a fixed schedule (at rate r, one every 1/r s) whatever the answers, and each latency
is measured from its scheduled time, so a server that falls behind is charged for the wait (no coordinated
omission). The load generator is an asyncio HTTP/1.1 client in this process: keep-alive connections from a pool that
opens another one when all are busy (at most 512); its CPU seconds are reported beside each level, since it shares
the two cores with the server. Rates double from --start-rate until p99 passes the objective (or a request fails),
then three bisection steps between the last rate that met it and the first that did not.

Each level records every API worker's CPU seconds and the connections each holds halfway through, so the balance
of the load across workers is measured where the capacity is.

--profile: py-spy (pip install py-spy) samples one API worker for --seconds at 80% of the capacity found; the CPU
samples are grouped by where they fall (the model, the service's code, BentoML, Starlette and uvicorn, pydantic,
OpenTelemetry, Prometheus, asyncio, other; time spent waiting, which py-spy samples here, apart) and the top
functions by own time are listed.

The model is packaged with conf/serve/default.yaml into a temporary BENTOML_HOME and served with `bentoml serve` on a
free loopback port (authentication explicitly off, no request log). JSON to reports/benchmarks/capacity.json, with
the machine's load average. Loopback only; bounded in count and time; the server is stopped by its process group.
"""
import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from bench_overload import worker_cpu_seconds
from bento_server import BIN, read_response, serving_for_load, write_figures

MAX_CONNECTIONS = 512
RECOMMEND = b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def one_client(port: int, bodies: list[bytes]) -> list[float]:
    "Concurrency 1: POST /recommend each body in turn on a keep-alive connection; each call's seconds."
    latencies, remaining = [], list(reversed(bodies))
    while remaining:  # a connection lasts until the service answers `Connection: close` (serve.keepalive_requests)
        with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rb") as answers:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            close = False
            while remaining and not close:
                body = remaining.pop()
                started = time.perf_counter()
                sock.sendall(RECOMMEND % len(body) + body)
                status, length = answers.readline(), 0
                while (line := answers.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    close |= name.lower() == b"connection" and value.strip().lower() == b"close"
                answers.read(length)
                latencies.append(time.perf_counter() - started)
                if status.split()[1] != b"200":
                    raise RuntimeError(f"/recommend answered {status.decode().strip()} at concurrency 1")
    return latencies


def concurrency_one(port: int, server_pid: int, bodies: list[bytes]) -> dict:
    "One client's calls back to back: latency percentiles and the API workers' CPU milliseconds per call."
    one_client(port, bodies[:200])  # warm-up: the connection, the worker's first calls
    cpu_before = worker_cpu_seconds(server_pid)
    latencies = one_client(port, bodies)
    cpu_after = worker_cpu_seconds(server_pid)
    cpu_s = sum(cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after)
    return {"requests": len(bodies), **percentiles(latencies), "server_cpu_ms_per_request": cpu_s / len(bodies) * 1000,
            "load": os.getloadavg()[0]}


def connections_per_worker(server_pid: int, port: int) -> dict[int, int]:
    "Established connections to `port` that each API worker holds."
    return {pid: sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
            for pid in worker_cpu_seconds(server_pid)}


async def open_loop(port: int, bodies: list[bytes], rate: float, seconds: float) -> dict:
    "POST /recommend at `rate` a second for `seconds` on a fixed schedule; latency from each scheduled time."
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue = asyncio.Queue()
    opened, latencies, failures = 0, [], Counter()

    async def connection():
        nonlocal opened
        if idle.empty() and opened < MAX_CONNECTIONS:
            opened += 1
            return await asyncio.open_connection("127.0.0.1", port)
        return await idle.get()

    async def one(scheduled: float, body: bytes) -> None:
        reader, writer = await connection()
        try:
            writer.write(RECOMMEND % len(body) + body)
            await writer.drain()
            status, close = await read_response(reader)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as error:
            failures[type(error).__name__] += 1
            close = True
        else:
            latencies.append(loop.time() - scheduled)
            if status != 200:
                failures[status] += 1
        if close:  # a 503 closes its connection: the next request opens another one
            writer.close()
            idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
        else:
            idle.put_nowait((reader, writer))

    n = int(rate * seconds)
    cpu_started, start = time.process_time(), loop.time() + 0.05
    tasks = []
    for i in range(n):
        scheduled = start + i / rate
        if (delay := scheduled - loop.time()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled, random.choice(bodies))))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    while not idle.empty():
        idle.get_nowait()[1].close()
    ms = np.asarray(latencies) * 1000
    return {"rate": rate, "sent": n, "answered_per_s": len(latencies) / elapsed, "failures": dict(failures),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "connections": opened,
            "client_cpu_s": time.process_time() - cpu_started, "elapsed_s": elapsed}


def balance(cpu_before: dict[int, float], cpu_after: dict[int, float], connections: dict[int, int]) -> dict:
    "Each API worker's CPU seconds, share of the workers' CPU and connections held, busiest first."
    used = {pid: cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after}
    total = sum(used.values()) or 1.0
    return {"worker_cpu_s": sorted(used.values(), reverse=True),
            "worker_cpu_share": sorted((seconds / total for seconds in used.values()), reverse=True),
            "worker_connections": [connections.get(pid, 0) for pid in sorted(used, key=used.get, reverse=True)]}


def capacity(port: int, server_pid: int, bodies: list[bytes], objective_ms: float, start_rate: float,
             seconds: float) -> dict:
    "The highest rate whose p99 meets the objective with no failure: doubling, then three bisection steps."
    levels = []

    def meets(rate: float) -> bool:
        connections: dict[int, int] = {}
        halfway = threading.Timer(seconds / 2, lambda: connections.update(connections_per_worker(server_pid, port)))
        cpu_before = worker_cpu_seconds(server_pid)
        halfway.start()
        level = asyncio.run(open_loop(port, bodies, rate, seconds))
        halfway.join()
        level.update(balance(cpu_before, worker_cpu_seconds(server_pid), connections), load=os.getloadavg()[0])
        levels.append(level)
        ok = level["p99_ms"] <= objective_ms and not level["failures"]
        shares = "/".join(f"{share:.0%}" for share in level["worker_cpu_share"])
        print(f"  {rate:7.1f}/s: p50 {level['p50_ms']:6.1f} ms, p99 {level['p99_ms']:7.1f} ms, failures "
              f"{level['failures']}, {level['connections']} connections (held {level['worker_connections']}), "
              f"worker CPU shares {shares}, client CPU {level['client_cpu_s']:.1f} s, load {level['load']:.2f} "
              f"-> {'meets' if ok else 'misses'}", flush=True)
        return ok

    good, bad = 0.0, start_rate
    while meets(bad):
        good, bad = bad, bad * 2
    for _ in range(3):
        middle = (good + bad) / 2
        good, bad = (middle, bad) if meets(middle) else (good, middle)
    return {"capacity_per_s": good, "levels": levels}


def in_process(model_dir: Path, users: list[int], serve: dict) -> dict:
    "`users`' requests one at a time through the service's ranking and answer code, in this process."
    import torch
    from bentoml._internal.utils.args import set_arguments

    set_arguments(serve)
    from reelrank.recommend import RecommendationEngine
    from reelrank.service import Deadline, ModelInfo, RecommendRequest, _answer, rank_requests

    torch.set_num_threads(serve["torch_threads"])
    engine = RecommendationEngine.load(model_dir, ann_min_items=serve["ann"]["min_items"])
    info = ModelInfo(name="bench", version="0")
    requests = [RecommendRequest(user_id=user, k=10) for user in users]
    latencies, started = [], time.perf_counter()
    for request in requests:
        t0 = time.perf_counter()
        _answer(rank_requests(engine, [request], serve["batching"]["max_batch_size"], Deadline(60))[0], info)
        latencies.append(time.perf_counter() - t0)
    return {"requests": len(requests), "per_s": len(requests) / (time.perf_counter() - started),
            **percentiles(latencies), "load": os.getloadavg()[0], "full_batch_json": batch_json(engine, serve)}


def batch_json(engine, serve: dict) -> dict:
    "Seconds to write the JSON answer of a full /recommend_batch: BentoML's answer path against the service's own."
    from _bentoml_impl.serde import JSONSerde

    from reelrank.service import _BATCH_ANSWER, ModelInfo, Recommender, RecommendRequest, _answer, rank_requests

    items = engine.catalog.item_ids
    rng = random.Random(0)
    requests = [RecommendRequest(history=rng.sample(items.tolist(), serve["max_history"]), k=serve["max_k"])
                for _ in range(serve["max_batch"])]
    info = ModelInfo(name="bench", version="0")
    answers = [_answer(r, info) for r in rank_requests(engine, requests, serve["batching"]["max_batch_size"])]
    started = time.perf_counter()
    response = asyncio.run(Recommender.apis["recommend_batch"].output_spec.to_http_response(answers, JSONSerde()))
    bentoml_bytes = len(b"".join(response.body_iterator))
    bentoml_s = time.perf_counter() - started
    started = time.perf_counter()
    service_bytes = len(_BATCH_ANSWER.dump_json(answers))
    return {"bentoml_s": bentoml_s, "service_s": time.perf_counter() - started, "bentoml_bytes": bentoml_bytes,
            "service_bytes": service_bytes, "load": os.getloadavg()[0]}


GROUPS = [  # (group, substrings of a frame), first match wins
    ("waiting (epoll, an idle thread)", ("EpollSelector.select", "_worker (concurrent/futures/thread.py:81)")),
    ("model (torch, numpy, the engine)", ("torch/", "numpy/", "reelrank/recommend.py", "reelrank/models/",
                                          "reelrank/metrics.py", "reelrank/split.py", "pandas/")),
    ("service code (reelrank/service.py)", ("reelrank/service.py",)),
    ("pydantic (validation, serialisation)", ("pydantic",)),
    ("OpenTelemetry", ("opentelemetry",)),
    ("Prometheus metrics", ("prometheus_client", "instruments.py")),
    ("access log, logging", ("logging/", "access.py")),
    ("BentoML", ("bentoml", "_bentoml_impl", "_bentoml_sdk", "simple_di")),
    ("Starlette, uvicorn, h11", ("starlette", "uvicorn", "h11", "anyio")),
    ("asyncio, threads", ("asyncio/", "concurrent/", "threading.py", "selectors.py")),
]


def profile(pid: int, seconds: float, out: Path) -> dict:
    "py-spy samples of `pid` (collapsed stacks): CPU samples by group (of their innermost frame) and top own-time."
    subprocess.run([str(BIN / "py-spy"), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250", "-f", "raw",
                    "-o", str(out), "--nonblocking"], check=True, capture_output=True, timeout=seconds + 60)
    groups, functions, total = Counter(), Counter(), 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frame = stack.rsplit(";", 1)[-1]
        total += int(count)
        functions[frame] += int(count)
        groups[next((name for name, needles in GROUPS if any(n in frame for n in needles)), "other")] += int(count)
    return {"samples": total, "groups": {name: count / total for name, count in groups.most_common()},
            "top_functions": [(frame, count / total) for frame, count in functions.most_common(15)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "selected"))
    parser.add_argument("--objective-ms", type=float, default=50.0, help="the p99 latency objective")
    parser.add_argument("--start-rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each rate level")
    parser.add_argument("--requests", type=int, default=4000, help="calls at concurrency 1 (and in process)")
    parser.add_argument("--profile", action="store_true", help="py-spy one worker at 80%% of the capacity")
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "capacity.json"))
    args = parser.parse_args()
    model_dir = Path(args.model).resolve()
    serve = yaml.safe_load((ROOT / "conf" / "serve" / "default.yaml").read_text())
    users = sorted(pd.read_parquet(model_dir / "interactions.parquet").user_id.unique().tolist())
    bodies = [json.dumps({"user_id": user, "k": 10}).encode() for user in users]
    sequence = random.Random(0).choices(users, k=args.requests)  # the same requests in process and served
    result = {"load_before": os.getloadavg(), "objective_ms": args.objective_ms, "workers": serve["workers"]}
    result["in_process"] = in_process(model_dir, sequence, serve)
    print(f"in process, one at a time: {result['in_process']['per_s']:.0f}/s "
          f"(p50 {result['in_process']['p50_ms']:.2f} ms, p99 {result['in_process']['p99_ms']:.2f} ms)", flush=True)
    batch = result["in_process"]["full_batch_json"]
    print(f"JSON of a full /recommend_batch answer: BentoML's answer path {batch['bentoml_s']:.2f} s, the service's "
          f"{batch['service_s']:.2f} s (load {batch['load']:.2f})", flush=True)
    with tempfile.TemporaryDirectory(prefix="reelrank-capacity-") as tmp:
        work = Path(tmp)
        with serving_for_load(model_dir, serve, work) as (url, proc):
            port = int(url.rsplit(":", 1)[1])
            one = concurrency_one(port, proc.pid, [json.dumps({"user_id": user, "k": 10}).encode()
                                                   for user in sequence])
            one["p50_over_in_process_ms"] = one["p50_ms"] - result["in_process"]["p50_ms"]
            one["p99_over_in_process_ms"] = one["p99_ms"] - result["in_process"]["p99_ms"]
            result["concurrency_1"] = one
            print(f"served at concurrency 1 ({one['requests']} calls, one at a time): p50 {one['p50_ms']:.2f} ms, "
                  f"p99 {one['p99_ms']:.2f} ms; {one['p50_over_in_process_ms']:+.2f} ms and "
                  f"{one['p99_over_in_process_ms']:+.2f} ms over in process; worker CPU "
                  f"{one['server_cpu_ms_per_request']:.2f} ms a call; load {one['load']:.2f}", flush=True)
            asyncio.run(open_loop(port, bodies, args.start_rate, 3))  # warm-up
            print(f"served, {serve['workers']} workers, open loop, objective p99 <= {args.objective_ms:.0f} ms:")
            result["served"] = capacity(port, proc.pid, bodies, args.objective_ms, args.start_rate, args.seconds)
            if args.profile:
                worker = min(worker_cpu_seconds(proc.pid))
                rate = 0.8 * result["served"]["capacity_per_s"]

                async def load_while_profiling() -> tuple[dict, dict]:
                    sampled = asyncio.create_task(asyncio.to_thread(profile, worker, args.seconds,
                                                                    work / "py-spy.txt"))
                    level = await open_loop(port, bodies, rate, args.seconds + 1)
                    return level, await sampled

                level, result["profile"] = asyncio.run(load_while_profiling())
                result["profile"]["rate"], result["profile"]["level"] = rate, level
    result["load_after"] = os.getloadavg()
    served = result["served"]["capacity_per_s"]
    result["served"]["ratio_to_in_process"] = served / result["in_process"]["per_s"]
    at_capacity = next((level for level in result["served"]["levels"] if level["rate"] == served), None)
    result["served"]["at_capacity"] = at_capacity
    print(f"capacity at p99 <= {args.objective_ms:.0f} ms: {served:.0f} requests/s served "
          f"({serve['workers']} workers) against {result['in_process']['per_s']:.0f}/s in process one at a time "
          f"({result['served']['ratio_to_in_process']:.2f}x); load average {result['load_before'][0]:.2f} before, "
          f"{result['load_after'][0]:.2f} after")
    if at_capacity is not None:
        print(f"at {served:.0f}/s the workers used {', '.join(f'{s:.1f}' for s in at_capacity['worker_cpu_s'])} CPU s "
              f"({', '.join(f'{s:.0%}' for s in at_capacity['worker_cpu_share'])}) holding "
              f"{at_capacity['worker_connections']} connections")
    if args.profile:
        figures = result["profile"]
        print(f"py-spy, one worker at {figures['rate']:.0f}/s ({figures['samples']} samples):")
        for name, share in figures["groups"].items():
            print(f"  {share:6.1%}  {name}")
        print("  top functions by own time:")
        for frame, share in figures["top_functions"]:
            print(f"  {share:6.1%}  {frame[:110]}")
    write_figures(args.out, result)


if __name__ == "__main__":
    main()
