"""Benchmark of the recommendation service (a script that prints figures, not a test).

    python tests/benchmarks/bench_service.py [--model models/selected] [--seconds 15] [--max-requests 20000]

1. In process: `RecommendationEngine.recommend` for one request at a time and for batches of 32 (what adaptive
   batching forms under 32 concurrent clients), with the scoring process's settings (torch threads from
   conf/serve).
2. Served, once per scoring mode (`inline`: the API workers rank; `batched`: a Scorer service behind them, with
   adaptive batching): the model is packaged into a temporary BENTOML_HOME, the bento is served with `bentoml
   serve` on a free loopback port, and POST /recommend is driven by a small asyncio HTTP/1.1 keep-alive client at
   concurrency 1 and 32 (bounded by --seconds and --max-requests per level): requests/s, p50, p99 and errors, the
   ratio to the in-process figures, and the resident memory of each serving process. GET /livez at concurrency 32
   is the floor of the HTTP stack itself (no model work) on the same cores, load generator included.
3. Top-10 over 10k, 100k and 1M synthetic items (clustered 64-d vectors): exact torch matmul + topk against the
   FAISS IVF index the engine uses for large catalogs (build time, query latency, recall of the exact top-10).
Loopback only; every loop is bounded in count and time; the server is stopped by killing its process group.
"""
import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from bento_server import BIN, package, read_response, serving  # the tests' package-and-serve helpers


def summary(latencies_s: list[float], elapsed_s: float, n_requests: int) -> dict:
    ms = np.asarray(latencies_s) * 1000
    return {"requests": n_requests, "rps": n_requests / elapsed_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def in_process(model_dir: Path, users: list[int], serve: dict, seconds: float, max_requests: int) -> dict:
    from reelrank.recommend import RecommendationEngine

    torch.set_num_threads(serve["torch_threads"])
    engine = RecommendationEngine.load(model_dir, ann_min_items=serve["ann"]["min_items"])
    out = {}
    for concurrency in (1, 32):
        engine.recommend([(u, None) for u in users[:concurrency]], 10)
        latencies, served, started = [], 0, time.perf_counter()
        while time.perf_counter() - started < seconds and served < max_requests:
            batch = [(random.choice(users), None) for _ in range(concurrency)]
            t0 = time.perf_counter()
            engine.recommend(batch, 10)
            latencies += [time.perf_counter() - t0] * concurrency
            served += concurrency
        out[concurrency] = summary(latencies, time.perf_counter() - started, served)
    return out


async def drive(port: int, bodies: list[bytes] | None, concurrency: int, seconds: float, max_requests: int,
                path: str = "/recommend") -> dict:
    "POST `bodies` (or GET, when None) to `path` from `concurrency` keep-alive connections; bounded in time and count."
    latencies, errors, sent = [], [], 0

    async def request(reader, writer, body: bytes | None) -> tuple[int, bool]:
        "The answer's status, and whether the service closes the connection after it (serve.keepalive_requests)."
        if body is None:
            writer.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
        else:
            writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        await writer.drain()
        return await read_response(reader)

    async def client(reader, writer) -> None:
        nonlocal sent
        try:
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    status, close = await request(reader, writer, random.choice(bodies) if bodies else None)
                except (OSError, IndexError, ValueError, asyncio.IncompleteReadError) as exc:
                    errors.append(type(exc).__name__)
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors.append(status)
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    connections = []
    for _ in range(concurrency):
        # ramp up as real clients arrive, over time: a burst of simultaneous connects is accepted by whichever
        # worker process wakes first, which then serves them all while the other idles
        connections.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.02)
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    await asyncio.gather(*(client(*connection) for connection in connections))
    result = summary(latencies, time.perf_counter() - started, len(latencies))
    result["errors"] = len(errors)
    return result


def process_tree_rss(root: int) -> list[tuple[int, str]]:
    "(RSS MiB, command) of `root` and all its descendants (BentoML's workers run in sessions of their own)."
    status = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue
            status[int(proc.name)] = (int(fields["PPid"]), int(fields.get("VmRSS", "0 kB").split()[0]), command)
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, (ppid, _, _) in status.items() if ppid in tree} - tree
        tree, grew = tree | children, bool(children)
    return sorted(((status[pid][1] // 1024, status[pid][2][:150]) for pid in tree if pid in status), reverse=True)


def served(model_dir: Path, users: list[int], serve: dict, seconds: float, max_requests: int) -> dict:
    "Package and serve the model with `serve`; load levels, the /livez floor and process memory."
    with tempfile.TemporaryDirectory(prefix="reelrank-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for name in (serve["auth_token_env"], serve["request_log_env"]):
            env.pop(name, None)
        env[serve["auth_switch_env"]] = "off"  # the figures are the service's own cost, without a token check
        started = time.perf_counter()
        bento = package(model_dir, serve, work, env)["bento"]
        package_s, started = time.perf_counter() - started, time.perf_counter()
        with serving(bento, work, env, timeout=300) as (url, proc):
            ready_s = time.perf_counter() - started
            port = int(url.rsplit(":", 1)[1])
            bodies = [json.dumps({"user_id": u, "k": 10}).encode() for u in users]
            asyncio.run(drive(port, bodies, 32, min(seconds, 5), 2000))  # warm-up, and trains the batcher
            levels = {c: asyncio.run(drive(port, bodies, c, seconds, max_requests)) for c in (1, 32)}
            floor = asyncio.run(drive(port, None, 32, seconds, max_requests, path="/livez"))
            memory = process_tree_rss(proc.pid)
    return {"package_s": package_s, "ready_s": ready_s, "levels": levels, "livez_32": floor, "memory": memory}


def ann_vs_exact(sizes=(10_000, 100_000, 1_000_000), dim: int = 64, queries: int = 50) -> list[dict]:
    from reelrank.metrics import topk_unseen
    from reelrank.recommend import FaissTopK

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        centres = rng.standard_normal((256, dim)).astype(np.float32)
        vectors = torch.from_numpy(centres[rng.integers(0, 256, n)]
                                   + 0.5 * rng.standard_normal((n, dim)).astype(np.float32))
        probes = vectors[rng.integers(0, n, queries)] + 0.1 * torch.randn(queries, dim)
        started = time.perf_counter()
        index = FaissTopK(vectors, nprobe=32)
        build_s = time.perf_counter() - started
        exact_ms, ann_ms, recall = [], [], []
        for q in probes:
            t0 = time.perf_counter()
            _, exact = topk_unseen(q[None] @ vectors.T, None, 10)
            t1 = time.perf_counter()
            _, approx = index.search(q[None], 10, None)
            t2 = time.perf_counter()
            exact_ms.append((t1 - t0) * 1000)
            ann_ms.append((t2 - t1) * 1000)
            recall.append(len(set(exact[0].tolist()) & set(approx[0].tolist())) / 10)
        rows.append({"items": n, "exact_p50_ms": float(np.median(exact_ms)), "faiss_p50_ms": float(np.median(ann_ms)),
                     "faiss_build_s": build_s, "recall@10": float(np.mean(recall))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "selected"))
    parser.add_argument("--seconds", type=float, default=15.0, help="time limit per load level")
    parser.add_argument("--max-requests", type=int, default=20000, help="request limit per load level")
    parser.add_argument("--skip-ann", action="store_true", help="skip the exact-vs-FAISS catalog sizes")
    args = parser.parse_args()
    model_dir = Path(args.model).resolve()
    serve = yaml.safe_load((ROOT / "conf" / "serve" / "default.yaml").read_text())
    import pandas as pd
    users = sorted(pd.read_parquet(model_dir / "interactions.parquet").user_id.unique().tolist())

    local = in_process(model_dir, users, serve, args.seconds, args.max_requests)
    remote = {mode: served(model_dir, users, {**serve, "scoring": mode}, args.seconds, args.max_requests)
              for mode in ("inline", "batched")}
    print(f"model: {model_dir} ({len(users)} users); serve workers: {serve['workers']}")
    print(f"{'':36}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    row = "{:36}{:9.1f}{:9.2f}{:9.2f}{:>8}"
    for c in (1, 32):
        print(row.format(f"in-process, concurrency {c}", local[c]["rps"], local[c]["p50_ms"], local[c]["p99_ms"], ""))
        for mode, figures in remote.items():
            hi = figures["levels"][c]
            print(row.format(f"served {mode}, concurrency {c}", hi["rps"], hi["p50_ms"], hi["p99_ms"], hi["errors"])
                  + f"   served/in-process throughput {hi['rps'] / local[c]['rps']:.2f}")
    for mode, figures in remote.items():
        floor = figures["livez_32"]
        print(row.format(f"served {mode}, GET /livez, c 32", floor["rps"], floor["p50_ms"], floor["p99_ms"],
                         floor["errors"]))
    for mode, figures in remote.items():
        print(f"{mode}: package {figures['package_s']:.1f} s, ready {figures['ready_s']:.1f} s after start; "
              "resident memory of the serving processes (MiB):")
        for rss, command in figures["memory"]:
            print(f"  {rss:6d}  {command}")
    result = {"in_process": local, "served": remote}
    if not args.skip_ann:
        result["ann"] = ann_vs_exact()
        print(f"{'items':>9}{'exact p50 ms':>14}{'faiss p50 ms':>14}{'faiss build s':>15}{'recall@10':>11}")
        for row in result["ann"]:
            print(f"{row['items']:9d}{row['exact_p50_ms']:14.2f}{row['faiss_p50_ms']:14.2f}"
                  f"{row['faiss_build_s']:15.1f}{row['recall@10']:11.3f}")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
