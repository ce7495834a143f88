"""Serving a million known users: each API worker's memory and startup, and /recommend latency (a script that prints
figures, not a test).

    nice -n 19 python tests/benchmarks/bench_serve_users.py [--users 1000000] [--interactions 20000000]
        [--requests 2000] [--reference-commit f96e15a] [--work /tmp/bench-serve-users]

1. Data: `write_synthetic` with data.users=--users, ml-25m's 62,423 movies and --interactions ratings (min_per_user
   5, so that 1M users fit in 20M ratings), written in blocks under --work (kept for the next run of the same sizes).
2. Model: iALS from `implicit` (64 factors, 3 iterations, alpha 10, regularization 0.05), fit on all ratings and
   saved with the layout of models/selected (model, interactions.parquet, card.json), also kept under --work.
3. In fresh processes: the users' histories as the engine held them before (a dict of a million numpy arrays
   built from interactions.parquet) against `UserHistories.open` of the packaged arrays: bytes, seconds, RSS.
4. Served, for each variant: the model is packaged with conf/serve/default.yaml (2 API workers, serve.ann.min_items
   lowered to 50,000 so that the 62k-item catalog ranks through FAISS) into its own BENTOML_HOME and served with
   `bentoml serve` on a free loopback port, authentication explicitly off, no request log. Startup: seconds from
   the process start to /readyz answering 200, and until every worker logged "Service reelrank initialized".
   Latency of POST /recommend {"user_id": u, "k": 10} for known users drawn at random (seed 0): --requests calls
   one after another on a keep-alive connection (concurrency 1), then 2 x --requests calls from 32 connections
   that each send their next call when the last is answered (concurrency 32). Each API worker's RSS and PSS (with
   their anonymous and file-backed parts) from /proc/PID/smaps_rollup after startup and after the calls: PSS
   divides a page shared by n processes by n, so it is what a worker costs the machine.
   Also the files of the stored model each worker has memory-mapped (/proc/PID/maps).
   Variants: `arrays`, this checkout (the histories and the FAISS index memory-mapped from the packaged model's
   histories/*.npy and ann.faiss); and `dict`, the code of --reference-commit (taken with `git archive`), whose
   workers each built the dict of histories from interactions.parquet, trained their own FAISS index and folded in
   every request with a fresh catalog-wide YᵀY; its latency runs are --reference-requests calls, and 50 users'
   answers are compared with the arrays variant's.

The machine is shared: the 1-minute load average is recorded beside each figure. Figures are printed and written to
reports/benchmarks/serve_users.json. Loopback only; each server is stopped by its process group.
"""
import argparse
import asyncio
import gc
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from bench_capacity import RECOMMEND, one_client, percentiles
from bench_overload import worker_cpu_seconds
from bento_server import BIN, STATUS_MB, free_port, package, read_response, wait_until_ready, write_figures

MOVIES = 62_423
IALS_PARAMS = {"factors": 64, "iterations": 3, "alpha": 10.0, "regularization": 0.05}
SMAPS_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File")


def generate(work: Path, users: int, interactions: int) -> Path:
    "The synthetic ratings under work/data-<users>-<interactions> (generated when missing)."
    from reelrank.core import compose_config
    from reelrank.synthetic import write_synthetic

    out = work / f"data-{users}-{interactions}"
    if not (out / "interactions.parquet").exists():
        cfg = compose_config(["data=synthetic", f"data.users={users}", f"data.items={MOVIES}",
                              f"data.interactions={interactions}", "data.min_per_user=5"])["data"]
        started = time.perf_counter()
        write_synthetic(cfg, out)
        print(f"generated {interactions:,} ratings of {users:,} users in {time.perf_counter() - started:.1f} s "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    return out


def fit_model(data_dir: Path, model_dir: Path) -> dict:
    "iALS (`implicit`) on every rating, saved like models/selected (model, interactions, card)."
    import scipy.sparse as sp
    import torch
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from reelrank.core import atomic_output, write_json, write_parquet
    from reelrank.models.base import save_model
    from reelrank.models.ials import IALS
    from reelrank.split import Catalog

    frame = pd.read_parquet(data_dir / "interactions.parquet", columns=["user_id", "item_id", "timestamp"])
    catalog = Catalog.from_frame(pd.read_parquet(data_dir / "items.parquet"))
    users, rows = np.unique(frame.user_id.to_numpy(), return_inverse=True)
    matrix = sp.csr_matrix((np.ones(len(frame), np.float32), (rows, catalog.index_of(frame.item_id.to_numpy()))),
                           shape=(len(users), catalog.n_items))
    started = time.perf_counter()
    with threadpool_limits(1, "blas"):  # implicit's own threads do the work; BLAS threads beside them slow it down
        als = AlternatingLeastSquares(random_state=0, **IALS_PARAMS)
        als.fit(matrix, show_progress=False)
    fit_seconds = time.perf_counter() - started
    model = IALS(catalog, IALS_PARAMS)
    model.item_factors = torch.from_numpy(np.ascontiguousarray(als.item_factors))
    with atomic_output(model_dir) as tmp:
        save_model(model, tmp)
        write_parquet(frame, tmp / "interactions.parquet")
        write_json(tmp / "card.json", {
            "model": "ials", "family": "ials", "params": IALS_PARAMS, "fitted_on": "synthetic", "metric": "ndcg@10",
            "data": {"interactions": len(frame), "users": len(users), "items": catalog.n_items},
            "val": {"ndcg@10": 0.0}, "test": {"ndcg@10": 0.0},
            "provenance": {"git_commit": "benchmark", "data_md5": "synthetic", "params_hash": "benchmark"}})
    figures = {"fit_seconds": fit_seconds, "users": len(users), "interactions": len(frame),
               "load": os.getloadavg()[0]}
    print(f"fit iALS {IALS_PARAMS} on {len(frame):,} ratings in {fit_seconds:.1f} s (load {figures['load']:.2f})",
          flush=True)
    return figures


# Runs in a fresh interpreter; prints one JSON line: the histories held one way, and what holding them cost.
SIZES_CHILD = """
import json, sys, time
from pathlib import Path
import pandas as pd
mode, model_dir = sys.argv[1], Path(sys.argv[2])
""" + STATUS_MB + """from reelrank.recommend import UserHistories
from reelrank.split import Catalog, Interactions
before, started = status_mb("VmRSS"), time.perf_counter()
if mode == "dict":  # what RecommendationEngine held before UserHistories
    fitted = Interactions.from_frame(pd.read_parquet(model_dir / "interactions.parquet"),
                                     Catalog.from_frame(pd.read_parquet(model_dir / "items.parquet")))
    histories = dict(zip(fitted.user_ids.tolist(), fitted.histories))
    del fitted
    # each history is a view into one array of every user's items: its header, plus its share of that array
    held = (sys.getsizeof(histories) + sum(sys.getsizeof(user) + sys.getsizeof(items) + items.nbytes
                                           for user, items in histories.items()))
    users = len(histories)
else:
    histories = UserHistories.open(model_dir)
    histories.item_counts(int(histories.items.max()) + 1)  # as the engine does at load: every page read once
    held = sum(getattr(histories, name).nbytes for name in ("user_ids", "indptr", "items"))
    users = len(histories)
seconds = time.perf_counter() - started
print(json.dumps({"users": users, "held_mb": held / 2**20, "seconds": seconds, "rss_before_mb": before,
                  "rss_after_mb": status_mb("VmRSS"), "peak_rss_mb": status_mb("VmHWM")}))
"""


def held_sizes(mode: str, model_dir: Path, env: dict) -> dict:
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", SIZES_CHILD, mode, str(model_dir)], env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load, "load_after": os.getloadavg()[0]}


def smaps(pid: int) -> dict:
    "A process's RSS and PSS (and PSS's anonymous and file-backed parts) in MB, from /proc/PID/smaps_rollup."
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return {f"{name.lower()}_mb": int(re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024
            for name in SMAPS_FIELDS}


def mapped_model_files(pid: int, model_dir: Path) -> list[str]:
    "The files of the stored model that process `pid` has memory-mapped."
    paths = {line.split(maxsplit=5)[-1].strip() for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
             if str(model_dir) in line}
    return sorted(str(Path(path).relative_to(model_dir)) for path in paths)


def worker_memory(server_pid: int, model_dir: Path) -> dict:
    workers = sorted(worker_cpu_seconds(server_pid))
    return {"workers": [{**smaps(pid), "mapped": mapped_model_files(pid, model_dir)} for pid in workers],
            "load": os.getloadavg()[0]}


async def closed_loop(port: int, bodies: list[bytes], concurrency: int) -> tuple[list[float], float]:
    "`concurrency` connections each send their next body when the last call is answered; latencies and seconds."
    queue = list(reversed(bodies))
    latencies: list[float] = []

    async def connection_loop() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            body = queue.pop()
            started = time.perf_counter()
            writer.write(RECOMMEND % len(body) + body)
            await writer.drain()
            status, close = await read_response(reader)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"/recommend answered {status} at concurrency {concurrency}")
            if close:  # serve.keepalive_requests: the service asked the client to reconnect
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection_loop() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def answers(port: int, users: list[int]) -> list[list[int]]:
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        return [[item["movie_id"] for item in client.post("/recommend", json={"user_id": u, "k": 10}).json()["items"]]
                for u in users]


def serve_variant(name: str, root: Path, model_dir: Path, serve: dict, work: Path, users: list[int],
                  requests: int) -> dict:
    "Package and serve `model_dir` with the code of `root`; startup, memory and latency figures (see the docstring)."
    shutil.rmtree(work, ignore_errors=True)  # a fresh BentoML home: the last run's bento and model are not kept
    work.mkdir(parents=True)
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "PYTHONPATH": str(root / "src"), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           serve["auth_switch_env"]: "off"}
    for variable in (serve["auth_token_env"], serve["request_log_env"]):
        env.pop(variable, None)
    started = time.perf_counter()
    summary = package(model_dir, serve, work, env, root)
    bento, (model_name, model_version) = summary["bento"], summary["model"].split(":")
    stored = work / "bentoml" / "models" / model_name / model_version
    figures = {"variant": name, "package_seconds": time.perf_counter() - started, "load_package": os.getloadavg()[0],
               "stored_model": str(stored), "stored_files_mb": {
                   str(path.relative_to(stored)): path.stat().st_size / 2**20 for path in sorted(stored.rglob("*"))
                   if path.is_file()}}
    print(f"[{name}] packaged in {figures['package_seconds']:.1f} s (load {figures['load_package']:.2f})", flush=True)
    port, log_path = free_port(), work / "serve.log"
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, lambda: proc.poll() is None, lambda: log_path.read_text()[-4000:], 1800, poll=0.1)
        readyz_s = time.perf_counter() - started
        while log_path.read_text().count("Service reelrank initialized") < serve["workers"]:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            time.sleep(0.1)
        figures["startup"] = {"readyz_s": readyz_s, "all_workers_s": time.perf_counter() - started,
                              "load_before": load_before, "load_after": os.getloadavg()[0]}
        figures["memory_after_startup"] = worker_memory(proc.pid, stored)
        print(f"[{name}] /readyz after {readyz_s:.1f} s, every worker initialised after "
              f"{figures['startup']['all_workers_s']:.1f} s (load {load_before:.2f} -> "
              f"{figures['startup']['load_after']:.2f})", flush=True)
        sequence = random.Random(0).choices(users, k=3 * requests + 200)
        bodies = [json.dumps({"user_id": user, "k": 10}).encode() for user in sequence]
        one_client(port, bodies[:200])  # warm-up: the connection, the workers' first calls
        load = os.getloadavg()[0]
        one = one_client(port, bodies[200:200 + requests])
        figures["concurrency_1"] = {"requests": requests, **percentiles(one), "load_before": load,
                                    "load_after": os.getloadavg()[0]}
        load = os.getloadavg()[0]
        many, seconds = asyncio.run(closed_loop(port, bodies[200 + requests:], 32))
        figures["concurrency_32"] = {"requests": len(many), **percentiles(many), "per_s": len(many) / seconds,
                                     "load_before": load, "load_after": os.getloadavg()[0]}
        figures["memory_after_calls"] = worker_memory(proc.pid, stored)
        figures["answers"] = answers(port, users[:50])
        for level in ("concurrency_1", "concurrency_32"):
            row = figures[level]
            rate = f", {row['per_s']:.0f} calls/s" if "per_s" in row else ""
            print(f"[{name}] {level}: {row['requests']} calls, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms"
                  f"{rate} (load {row['load_before']:.2f} -> {row['load_after']:.2f})", flush=True)
        print(f"[{name}] files of the stored model each worker maps: "
              f"{[w['mapped'] for w in figures['memory_after_calls']['workers']]}", flush=True)
        for when in ("memory_after_startup", "memory_after_calls"):
            print(f"[{name}] {when}: " + "; ".join(
                f"worker RSS {w['rss_mb']:.0f} MB, PSS {w['pss_mb']:.0f} MB (anon {w['pss_anon_mb']:.0f}, "
                f"file {w['pss_file_mb']:.0f})" for w in figures[when]["workers"]), flush=True)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    return figures


def reference_checkout(commit: str, out: Path) -> Path:
    "src/, conf/ and bentofile.yaml of `commit`, extracted under `out`."
    if not (out / "bentofile.yaml").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = out / "checkout.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), commit, "src", "conf", "bentofile.yaml"],
                       check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(out, filter="data")
        archive.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--interactions", type=int, default=20_000_000)
    parser.add_argument("--requests", type=int, default=2000, help="calls at concurrency 1 (twice as many at 32)")
    parser.add_argument("--reference-commit", default="f96e15a",
                        help="the code whose workers held a dict of histories (empty: no reference)")
    parser.add_argument("--reference-requests", type=int, default=300)
    parser.add_argument("--work", default="/tmp/bench-serve-users")
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "serve_users.json"))
    args = parser.parse_args()
    work = Path(args.work)
    result = {"load_before": os.getloadavg(), "sizes": {"users": args.users, "interactions": args.interactions,
                                                        "items": MOVIES}, "model": {"ials": IALS_PARAMS}}
    data_dir = generate(work, args.users, args.interactions)
    model_dir, fit_figures = (work / f"model-{args.users}-{args.interactions}",
                              work / f"model-{args.users}-{args.interactions}.fit.json")
    if not fit_figures.exists():  # written after the model: a model without it is refit
        fit_figures.write_text(json.dumps(fit_model(data_dir, model_dir)))
        gc.collect()
    result["model"]["fit"] = json.loads(fit_figures.read_text())
    serve = {**yaml.safe_load((ROOT / "conf" / "serve" / "default.yaml").read_text()), "workers": 2}
    serve["ann"] = {**serve["ann"], "min_items": 50_000}
    result["serve"] = {"workers": serve["workers"], "ann": serve["ann"], "torch_threads": serve["torch_threads"]}
    users = sorted(pd.read_parquet(model_dir / "interactions.parquet", columns=["user_id"]).user_id.unique().tolist())
    random.Random(1).shuffle(users)
    result["served"] = {"arrays": serve_variant("arrays", ROOT, model_dir, serve, work / "arrays", users,
                                                args.requests)}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    stored = Path(result["served"]["arrays"]["stored_model"])
    result["held_in_process"] = {"dict": held_sizes("dict", model_dir, env), "arrays": held_sizes("arrays", stored, env)}
    for mode, row in result["held_in_process"].items():
        print(f"histories held as {mode}: {row['held_mb']:.0f} MB of objects, RSS {row['rss_before_mb']:.0f} -> "
              f"{row['rss_after_mb']:.0f} MB (peak {row['peak_rss_mb']:.0f} MB) in {row['seconds']:.2f} s "
              f"(load {row['load_before']:.2f})", flush=True)
    if args.reference_commit:
        reference = reference_checkout(args.reference_commit, work / f"reference-{args.reference_commit}")
        result["served"]["dict"] = serve_variant("dict", reference, model_dir, serve, work / "dict", users,
                                                 args.reference_requests)
        result["served"]["dict"]["reference_commit"] = args.reference_commit
        same = [a == b for a, b in zip(result["served"]["arrays"]["answers"], result["served"]["dict"].pop("answers"))]
        result["served"]["dict"]["answers_equal_to_arrays"] = f"{sum(same)}/{len(same)}"
        print(f"the two variants' top-10 for 50 users: {sum(same)}/{len(same)} equal", flush=True)
    result["served"]["arrays"].pop("answers")  # compared above; only how many were equal is kept
    result["load_after"] = os.getloadavg()
    write_figures(args.out, result)


if __name__ == "__main__":
    main()
