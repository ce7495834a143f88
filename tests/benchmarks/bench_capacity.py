"""Capacity of POST /recommend at a latency objective (a script that prints figures, not a test).

    python tests/benchmarks/bench_capacity.py [--model models/selected] [--objective-ms 50] [--seconds 8] [--profile]

Open loop: requests leave on a fixed schedule (at rate r, one every 1/r s) whatever the answers, and each latency
is measured from its scheduled time, so a server that falls behind is charged for the wait (no coordinated
omission). The load generator is an asyncio HTTP/1.1 client in this process: keep-alive connections from a pool that
opens another one when all are busy (at most 512); its CPU seconds are reported beside each level, since it shares
the two cores with the server. Rates double from --start-rate until p99 passes the objective (or a request fails),
then three bisection steps between the last rate that met it and the first that did not.

Beside it, in the same run: the in-process rate of the same model answering one request at a time through the
service's own path (`rank_requests` and the answer model, with the served torch threads), which is what one core
does without HTTP.

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
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from bench_overload import worker_cpu_seconds
from bento_server import BIN, serving_for_load, write_figures

MAX_CONNECTIONS = 512


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
            writer.write(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                close |= name.lower() == "connection" and value.strip().lower() == "close"
            await reader.readexactly(length)
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


def capacity(port: int, bodies: list[bytes], objective_ms: float, start_rate: float, seconds: float) -> dict:
    "The highest rate whose p99 meets the objective with no failure: doubling, then three bisection steps."
    levels = []

    def meets(rate: float) -> bool:
        level = asyncio.run(open_loop(port, bodies, rate, seconds))
        level["load"] = os.getloadavg()[0]
        levels.append(level)
        ok = level["p99_ms"] <= objective_ms and not level["failures"]
        print(f"  {rate:7.1f}/s: p50 {level['p50_ms']:6.1f} ms, p99 {level['p99_ms']:7.1f} ms, failures "
              f"{level['failures']}, {level['connections']} connections, client CPU {level['client_cpu_s']:.1f} s, "
              f"load {level['load']:.2f} -> {'meets' if ok else 'misses'}", flush=True)
        return ok

    good, bad = 0.0, start_rate
    while meets(bad):
        good, bad = bad, bad * 2
    for _ in range(3):
        middle = (good + bad) / 2
        good, bad = (middle, bad) if meets(middle) else (good, middle)
    return {"capacity_per_s": good, "levels": levels}


def in_process(model_dir: Path, users: list[int], serve: dict, seconds: float) -> dict:
    "One request at a time through the service's ranking and answer code, in this process."
    import torch
    from bentoml._internal.utils.args import set_arguments

    set_arguments(serve)
    from reelrank.recommend import RecommendationEngine
    from reelrank.service import Deadline, ModelInfo, RecommendRequest, _answer, rank_requests

    torch.set_num_threads(serve["torch_threads"])
    engine = RecommendationEngine.load(model_dir, ann_min_items=serve["ann"]["min_items"])
    info = ModelInfo(name="bench", version="0")
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        request = RecommendRequest(user_id=random.choice(users), k=10)
        t0 = time.perf_counter()
        _answer(rank_requests(engine, [request], serve["batching"]["max_batch_size"], Deadline(60))[0], info)
        latencies.append(time.perf_counter() - t0)
    ms = np.asarray(latencies) * 1000
    return {"per_s": len(latencies) / (time.perf_counter() - started), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


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
    parser.add_argument("--profile", action="store_true", help="py-spy one worker at 80%% of the capacity")
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "capacity.json"))
    args = parser.parse_args()
    model_dir = Path(args.model).resolve()
    serve = yaml.safe_load((ROOT / "conf" / "serve" / "default.yaml").read_text())
    users = sorted(pd.read_parquet(model_dir / "interactions.parquet").user_id.unique().tolist())
    bodies = [json.dumps({"user_id": user, "k": 10}).encode() for user in users]
    result = {"load_before": os.getloadavg(), "objective_ms": args.objective_ms, "workers": serve["workers"]}
    result["in_process"] = in_process(model_dir, users, serve, seconds=args.seconds)
    print(f"in process, one at a time: {result['in_process']['per_s']:.0f}/s "
          f"(p50 {result['in_process']['p50_ms']:.2f} ms, p99 {result['in_process']['p99_ms']:.2f} ms)", flush=True)
    with tempfile.TemporaryDirectory(prefix="reelrank-capacity-") as tmp:
        work = Path(tmp)
        with serving_for_load(model_dir, serve, work) as (url, proc):
            port = int(url.rsplit(":", 1)[1])
            asyncio.run(open_loop(port, bodies, args.start_rate, 3))  # warm-up
            print(f"served, {serve['workers']} workers, open loop, objective p99 <= {args.objective_ms:.0f} ms:")
            result["served"] = capacity(port, bodies, args.objective_ms, args.start_rate, args.seconds)
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
    print(f"capacity at p99 <= {args.objective_ms:.0f} ms: {served:.0f} requests/s served "
          f"({serve['workers']} workers) against {result['in_process']['per_s']:.0f}/s in process one at a time; "
          f"load average {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after")
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
