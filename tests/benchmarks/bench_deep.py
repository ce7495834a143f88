"""Benchmark of the deep models' training and evaluation cost as data grows (a script that prints figures).

    nice -n 19 python tests/benchmarks/bench_deep.py [--sizes 1000000 10000000] [--models two_tower sasrec]
                                                     [--work /tmp/bench-deep]

For each size in ratings (users = ratings / 100, ml-25m's 62,423 movies, as the other scale benchmarks):

1. the synthetic source writes the ratings in blocks (`write_synthetic`); the split stage (DuckDB, the default
   profile's `split` config) writes train/val/test as the pipeline does;
2. for each model, in a fresh process, one process at a time: the model with the `scale` profile's params (the
   tuned configs with the larger batches that profile sets for ml-25m's size) is fitted on train for one whole
   epoch on CPU (trainer.limit_train_batches 1.0: every batch, where the profile trains on a quarter), with the
   1,000 val users that per-epoch early stopping ranks under `eval.max_users: 1000`; a Lightning callback times
   the training steps and the validation pass apart. Then 1,000 test users (the `eval.max_users` sample) are
   ranked over the whole catalog as the evaluate stage does. Each process reports its peak resident memory
   (VmHWM), the memory after loading the split (before the model exists) and the training set's size.

The machine is shared: the 1-minute load average before and after each process is written beside its figures.
Figures are printed and written to reports/benchmarks/deep.json (after each size), with each model's growth from
one size to the next (the issue's goal: at most 12 times the seconds per epoch for 10 times the data).
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from bento_server import STATUS_MB, write_figures

MOVIES = 62_423
RATINGS_PER_USER = 100
EVALUATED_USERS = 1_000

# Runs in a fresh interpreter from the project root (compose_config reads conf/ there); prints one JSON line.
CHILD = """
import json, sys, time
from pathlib import Path
from lightning.pytorch.callbacks import Callback
from reelrank.core import compose_config
from reelrank.metrics import users_to_evaluate
from reelrank.models.base import FitContext, build_model
from reelrank.split import SplitData, split_stage
from reelrank.train import score_task

""" + STATUS_MB + """
mode, work = sys.argv[1], Path(sys.argv[2])
figures, started = {}, time.perf_counter()
if mode == "generate":
    from reelrank.synthetic import write_synthetic
    ratings = int(sys.argv[3])
    cfg = compose_config(["data=synthetic", f"data.users={ratings // 100}", f"data.items={62_423}",
                          f"data.interactions={ratings}"])["data"]
    figures["ratings"] = write_synthetic(cfg, work / "interim")["interactions"]
    figures["split_rows"] = split_stage(compose_config()["split"], work / "interim", work / "processed")
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))
    sys.exit(0)

class EpochTimer(Callback):
    "Seconds of the training steps and of the validation pass of each epoch, apart."
    def __init__(self):
        self.train, self.validation = [], []
    def on_train_epoch_start(self, trainer, module):
        self.started = time.perf_counter()
    def on_validation_epoch_start(self, trainer, module):
        self.train.append(time.perf_counter() - self.started)
        self.val_started = time.perf_counter()
    def on_validation_epoch_end(self, trainer, module):
        self.validation.append(time.perf_counter() - self.val_started)

config = compose_config(["profile=scale"])
model_cfg, eval_cfg = config["models"][mode], {**config["eval"], "max_users": int(sys.argv[3])}
split = SplitData.load(work / "processed")
train, valid, test = split.fitting(["train"]), split.holdout("val"), split.holdout("test")
epoch_valid = valid.subset(users_to_evaluate(valid, eval_cfg["max_users"], eval_cfg["sample_seed"])[0])
figures |= {"users": len(train), "items": split.catalog.n_items, "train_ratings": int(sum(map(len, train.histories))),
            "load_seconds": round(time.perf_counter() - started, 1), "rss_after_load_mb": status_mb("VmRSS")}
timer = EpochTimer()
trainer = {**config["trainer"], "max_epochs": 1, "limit_train_batches": 1.0}
started = time.perf_counter()
model = build_model(model_cfg["family"], split.catalog, {**model_cfg["params"], "epochs": 1})
model.fit(train, epoch_valid, FitContext(trainer, 42, callbacks=[timer]))
figures |= {"fit_seconds": round(time.perf_counter() - started, 1), "epoch_seconds": round(timer.train[0], 1),
            "epoch_validation_seconds": round(timer.validation[0], 1), "training_set": model.summary}
fitting = split.fitting(["train", "val"])  # the test users' histories: built once, as the evaluate stage does
started = time.perf_counter()
result = score_task(model, test, fitting, eval_cfg)
figures |= {"evaluate_seconds": round(time.perf_counter() - started, 1), "evaluated_users": result.users,
            "test_ndcg@10_after_one_epoch": round(result.metrics["ndcg@10"], 4),
            "peak_rss_mb": status_mb("VmHWM")}
print(json.dumps(figures))
"""


def measure(mode: str, work: Path, argument: int) -> dict:
    "Run CHILD in a fresh interpreter; its figures with the wall seconds and the load before and after."
    before, started = round(os.getloadavg()[0], 2), time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(work), str(argument)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} at {work} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_seconds": round(time.perf_counter() - started, 1),
            "load_before": before, "load_after": round(os.getloadavg()[0], 2)}


def growth(result: dict, models: list[str]) -> list[dict]:
    "Each model's ratios from one size to the next: seconds per epoch, evaluation seconds and peak memory."
    sizes = sorted(result["sizes"], key=int)
    out = []
    for small, large in itertools.pairwise(sizes):
        for name in models:
            a, b = result["sizes"][small][name], result["sizes"][large][name]
            out.append({"model": name, "from": int(small), "to": int(large), "data": int(large) / int(small),
                        "epoch_seconds": round(b["epoch_seconds"] / a["epoch_seconds"], 2),
                        "evaluate_seconds": round(b["evaluate_seconds"] / a["evaluate_seconds"], 2),
                        "peak_rss": round(b["peak_rss_mb"] / a["peak_rss_mb"], 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--models", nargs="+", default=["two_tower", "sasrec"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-deep"))
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "deep.json")
    args = parser.parse_args()
    result = {"movies": MOVIES, "ratings_per_user": RATINGS_PER_USER, "evaluated_users": EVALUATED_USERS,
              "cpus": os.cpu_count(), "sizes": {}}
    for ratings in args.sizes:
        work = args.work / str(ratings)
        if not (work / "processed" / "test.parquet").exists():
            result.setdefault("data", {})[str(ratings)] = measure("generate", work, ratings)
        figures = result["sizes"][str(ratings)] = {}
        for name in args.models:
            figures[name] = measure(name, work, EVALUATED_USERS)
            run = figures[name]
            print(f"{ratings:>11,} ratings {name:>9}: epoch {run['epoch_seconds']:7.1f} s "
                  f"(+ validation of {EVALUATED_USERS:,} users {run['epoch_validation_seconds']:.1f} s), "
                  f"evaluate {EVALUATED_USERS:,} users {run['evaluate_seconds']:.1f} s, "
                  f"peak RSS {run['peak_rss_mb']:,.0f} MB (after loading the split {run['rss_after_load_mb']:,.0f} MB), "
                  f"load {run['load_before']}-{run['load_after']}", flush=True)
        result["growth"] = growth(result, args.models)
        write_figures(args.out, result)
    for row in result["growth"]:
        print(f"{row['model']}: {row['data']:.0f}x the data -> {row['epoch_seconds']}x seconds per epoch, "
              f"{row['evaluate_seconds']}x evaluation seconds, {row['peak_rss']}x peak RSS")


if __name__ == "__main__":
    main()
