"""The quality profile's leaderboard: every model with three seeds, the served model against the best baseline.

    python tests/benchmarks/bench_quality.py [--keep DIR]

Clones the committed HEAD of this repository into a temporary directory, composes `profile=quality` (the default
data and models, `seeds: [42, 43, 44]`) into its params.yaml and runs the whole pipeline there with `dvc repro`, so
the figures come from exactly what is committed and nothing in this checkout is touched. Prints and writes to
reports/benchmarks/quality.json: per model the val and test NDCG@10 seed mean, each seed's value, the 95% bootstrap
interval over users (of each user's seed mean), fit seconds; the selection (rule, best on val, served, its
comparisons); every model against the best baseline on test (paired difference, interval, p-value); the served
model's test NDCG@10 as a ratio to the best baseline's; the pipeline's wall time and the load average.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from bento_server import write_figures
from conftest import project_env


def run(cmd: list[str], cwd: Path) -> None:
    "Run `cmd` in the clone `cwd`, importing reelrank from the clone's src (the venv's editable install is this checkout's)."
    env = {**project_env(), "PYTHONPATH": str(cwd / "src")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def leaderboard(project: Path, models: list[str]) -> dict:
    "Each model's seed-mean val/test NDCG@10, per-seed values, test interval and fit seconds."
    rows = {}
    for name in models:
        metrics = json.loads((project / "reports" / "metrics" / f"{name}.json").read_text())
        rows[name] = {"val": metrics["val"]["ndcg@10"], "test": metrics["test"]["ndcg@10"],
                      "test_interval": metrics["interval"]["test"]["ndcg@10"],
                      "seeds": metrics["seeds"]["seeds"],
                      "val_per_seed": metrics["seeds"]["val"]["ndcg@10"],
                      "test_per_seed": metrics["seeds"]["test"]["ndcg@10"],
                      "fit_seconds": metrics["fit_seconds"], "refit_seconds": metrics["refit_seconds"]}
    return rows


def report(project: Path, commit: str, wall: float, load_before, load_after, note: str | None = None) -> None:
    "Print the quality figures of the pipeline run in `project` and write them to reports/benchmarks/quality.json."
    card = json.loads((project / "models" / "selected" / "card.json").read_text())
    board = leaderboard(project, list(card["leaderboard"]))
    versus = card["against_best_baseline"]
    baseline, served = versus["baseline"], card["model"]
    figures = {"commit": commit, "profile": "quality", "metric": "ndcg@10", "wall_seconds": wall,
               "load_before": load_before, "load_after": load_after, "note": note, "leaderboard": board,
               "selection": card["selection"], "against_best_baseline": versus, "served": served,
               "served_over_best_baseline": board[served]["test"] / board[baseline]["test"]}
    print(f"quality profile at {commit[:10]}: pipeline {wall / 60:.1f} min (load {load_before[0]:.1f} before)")
    if note:
        print(note)
    print(f"{'model':<12}{'seeds':>6}{'val':>9}{'test':>9}  {'test 95% interval':<20}{'test seed range':<20}"
          f"{'fit s':>7}")
    for name, row in sorted(board.items(), key=lambda item: -item[1]["val"]):
        low, high = row["test_interval"]
        print(f"{name:<12}{len(row['seeds']):>6}{row['val']:>9.4f}{row['test']:>9.4f}  [{low:.4f}, {high:.4f}]"
              f"    [{min(row['test_per_seed']):.4f}, {max(row['test_per_seed']):.4f}]    {row['fit_seconds']:>6.1f}")
    print(f"best on val: {card['selection']['best_on_val']}; served: {served}; best baseline: {baseline}")
    for name, c in versus["models"].items():
        print(f"  {name} - {baseline} on test: {c['difference']:+.4f} [{c['interval'][0]:+.4f}, "
              f"{c['interval'][1]:+.4f}], p = {c['p_value']:.3f}")
    print(f"served / best baseline (test NDCG@10, seed means): {figures['served_over_best_baseline']:.3f}")
    write_figures(ROOT / "reports" / "benchmarks" / "quality.json", figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="reelrank-quality-"))
    project = work / "project"
    shutil.rmtree(project, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(project)], check=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    run([sys.executable, "-m", "reelrank.core", "profile=quality"], project)
    run(["dvc", "repro"], project)
    report(project, commit, time.perf_counter() - started, load_before, os.getloadavg())
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
