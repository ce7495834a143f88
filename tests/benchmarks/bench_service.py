"""Benchmark of the recommendation service (a script that prints figures, not a test).

    python tests/benchmarks/bench_service.py [--model models/selected] [--seconds 15] [--max-requests 20000]

1. In process: `RecommendationEngine.recommend` for one request at a time and for batches of 32 (what adaptive
   batching forms under 32 concurrent clients), with the scoring process's settings (torch threads from
   conf/serve).
2. Served: the model is packaged into a temporary BENTOML_HOME, the bento is served with `bentoml serve` on a free
   loopback port, and POST /recommend is driven by a small asyncio HTTP/1.1 keep-alive client at concurrency 1 and
   32 (bounded by --seconds and --max-requests per level): requests/s, p50, p99 and errors, the ratio to the
   in-process figures, and the resident memory of each serving process.
3. Top-10 over 10k, 100k and 1M synthetic items (clustered 64-d vectors): exact torch matmul + topk against the
   FAISS IVF index the engine uses for large catalogs (build time, query latency, recall of the exact top-10).
Loopback only; every loop is bounded in count and time; the server is stopped by killing its process group.
"""
import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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


async def drive(port: int, bodies: list[bytes], concurrency: int, seconds: float, max_requests: int) -> dict:
    "POST /recommend from `concurrency` keep-alive connections; bounded by `seconds` and `max_requests`."
    latencies, errors, sent = [], [], 0
    deadline = time.perf_counter() + seconds

    async def request(reader, writer, body: bytes) -> int:
        writer.write(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        return status

    async def client() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    status = await request(reader, writer, random.choice(bodies))
                except (OSError, IndexError, ValueError, asyncio.IncompleteReadError) as exc:
                    errors.append(type(exc).__name__)
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors.append(status)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
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
    with tempfile.TemporaryDirectory(prefix="reelrank-bench-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for name in (serve["auth_token_env"], serve["request_log_env"]):
            env.pop(name, None)
        (tmp / "params.yaml").write_text(yaml.safe_dump({"serve": serve}))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "reelrank.package", "--params", str(tmp / "params.yaml"), "--model",
                        str(model_dir), "--out", str(tmp / "bento")], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=900)
        package_s = time.perf_counter() - started
        bento = json.loads((tmp / "bento" / "bento.json").read_text())["bento"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with open(tmp / "serve.log", "w") as log:
            proc = subprocess.Popen([str(BIN / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port",
                                     str(port)], cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            started = time.perf_counter()
            while True:
                if proc.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError(f"server did not start:\n{(tmp / 'serve.log').read_text()[-3000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            ready_s = time.perf_counter() - started
            bodies = [json.dumps({"user_id": u, "k": 10}).encode() for u in users]
            asyncio.run(drive(port, bodies, 32, min(seconds, 5), 2000))  # warm-up, and trains the batcher
            levels = {c: asyncio.run(drive(port, bodies, c, seconds, max_requests)) for c in (1, 32)}
            memory = process_tree_rss(proc.pid)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"package_s": package_s, "ready_s": ready_s, "levels": levels, "memory": memory}


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
    remote = served(model_dir, users, serve, args.seconds, args.max_requests)
    print(f"model: {model_dir} ({len(users)} users); package {remote['package_s']:.1f} s, "
          f"ready in {remote['ready_s']:.1f} s after start")
    print(f"{'':28}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for c in (1, 32):
        lo, hi = local[c], remote["levels"][c]
        print(f"in-process, concurrency {c:<3} {lo['rps']:9.1f}{lo['p50_ms']:9.2f}{lo['p99_ms']:9.2f}{'':>8}")
        print(f"served,     concurrency {c:<3} {hi['rps']:9.1f}{hi['p50_ms']:9.2f}{hi['p99_ms']:9.2f}{hi['errors']:8d}"
              f"   served/in-process throughput {hi['rps'] / lo['rps']:.2f}")
    print("resident memory of the serving processes (MiB):")
    for rss, command in remote["memory"]:
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
