"""Benchmark of the data stages out of core: ingest, validate and split of synthetic ratings at growing sizes.

python tests/benchmarks/bench_data_stages.py [--sizes 1000000 10000000 100000000] [--work /tmp/bench-data-stages]

For each size (100 ratings a user, ml-25m's 62,423 movies: 10k, 100k and 1M users at 1M, 10M and 100M ratings), a
project folder under --work gets a params.yaml composed from conf/ with `data=synthetic` at that size (everything
else the default profile, so `validate.engine` and `split.engine` are the committed settings), and the three DVC
stage commands run there one after the other, each in a fresh process, as `dvc repro` runs them:

1. `python -m reelrank.data ingest`: the synthetic source written in blocks into data/raw;
2. `python -m reelrank.data validate`: DuckDB checks every rule and writes data/interim (with data/accepted absent);
3. `python -m reelrank.split`: DuckDB splits into data/processed.

Each stage's wall seconds and peak resident memory (ru_maxrss of the child, from wait4) are recorded, with the
1-minute load average before and after it (the machine is shared), and for the DuckDB stages the peak size of their
scratch folder (its database and its spill files, polled twice a second). A process that only imports the stages'
modules gives the floor under every memory figure. Up to --compare-up-to ratings, a further process checks that the
validate stage wrote exactly the pandas reference's rows, order, dtypes and report (`validate_tables`).

Figures are printed and written to reports/benchmarks/data_stages.json after each size, with each stage's growth
from one size to the next and the issue's goals: at most 12 times the seconds per 10 times the data, and a peak RSS
of at most 8 GB at 100M ratings.
"""
import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
from bento_server import write_figures

from reelrank.core import compose_config

MOVIES = 62_423
RATINGS_PER_USER = 100
STAGES = {"ingest": ["-m", "reelrank.data", "ingest"], "validate": ["-m", "reelrank.data", "validate"],
          "split": ["-m", "reelrank.split"]}
IMPORT_ONLY = ["-c", "import reelrank.data, reelrank.split, reelrank.synthetic"]
COMPARE = ["-c", """
import pandas as pd, yaml
from reelrank.core import read_json
from reelrank.data import read_tables, validate_tables
expected, expected_items, report = validate_tables(yaml.safe_load(open("params.yaml"))["validate"], "data/raw",
                                                   "data/accepted")
written, written_items = read_tables("data/interim")
pd.testing.assert_frame_equal(written, expected)
pd.testing.assert_frame_equal(written_items, expected_items)
assert read_json("reports/validation.json") == report
"""]
TIME_GROWTH_GOAL = 12      # at most this many times the seconds for 10 times the data
PEAK_RSS_GOAL_MB = 8_000   # at most this peak RSS at 100M ratings


def scratch_bytes(data: Path) -> tuple[int, int]:
    "Bytes in the DuckDB scratch folders under `data` now: (their databases, their spill files); vanished files count 0."
    database = spilled = 0
    for path in itertools.chain(*(folder.rglob("*") for folder in data.glob(".*-spill-*"))):
        try:
            size = path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            continue
        if path.name.endswith((".duckdb", ".duckdb.wal")):
            database += size
        else:
            spilled += size
    return database, spilled


def measure(name: str, args: list[str], project: Path) -> dict:
    """Run `python <args>` in `project`; return its wall seconds, its peak RSS (the child's own ru_maxrss, from wait4),
    the peak size of its DuckDB scratch folder and the 1-minute load average before and after it."""
    load_before = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BENTOML_DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "true"}
    log = project / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as stderr:
        child = subprocess.Popen([sys.executable, *args], cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    peak_database = peak_spill = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        database, spilled = scratch_bytes(project / "data")
        peak_database, peak_spill = max(peak_database, database), max(peak_spill, spilled)
        time.sleep(0.5)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen, so that it does not wait again
    if child.returncode != 0:
        raise SystemExit(f"{name} failed ({child.returncode}):\n{log.read_text()[-3000:]}")
    figures = {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
               "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if name in ("validate", "split"):
        figures["peak_scratch_database_mb"] = round(peak_database / 2**20, 1)
        figures["peak_spill_mb"] = round(peak_spill / 2**20, 1)
    scratch = (f", scratch {figures['peak_scratch_database_mb']:.0f} MB database + {figures['peak_spill_mb']:.0f} MB "
               "spilled" if "peak_spill_mb" in figures else "")
    print(f"{name:>9}: {figures['seconds']:8.1f} s, peak RSS {figures['peak_rss_mb']:7.0f} MB{scratch} (load "
          f"{figures['load_1min'][0]:.1f} -> {figures['load_1min'][1]:.1f})", flush=True)
    return figures


def project_for(work: Path, ratings: int) -> Path:
    "A fresh project folder whose params.yaml is the default profile with the synthetic source of `ratings`."
    project = work / str(ratings)
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    params = compose_config(["data=synthetic", f"data.users={ratings // RATINGS_PER_USER}", f"data.items={MOVIES}",
                             f"data.interactions={ratings}"])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def growth(result: dict) -> list[dict]:
    "Each stage's (and the three's) seconds and peak RSS from one measured size to the next."
    steps = []
    for earlier, later in itertools.pairwise(sorted(map(int, result["sizes"]))):
        before, after = result["sizes"][str(earlier)], result["sizes"][str(later)]
        step = {"from": earlier, "to": later}
        for stage in [*STAGES, "total"]:
            step[stage] = {"seconds": round(after[stage]["seconds"] / before[stage]["seconds"], 2),
                           "peak_rss": round(after[stage]["peak_rss_mb"] / before[stage]["peak_rss_mb"], 2)}
        steps.append(step)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--compare-up-to", type=int, default=1_000_000,
                        help="largest size at which the validate stage is checked against the pandas reference")
    parser.add_argument("--work", default="/tmp/bench-data-stages", help="scratch folder for the project folders")
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "data_stages.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"shared, {os.cpu_count()} CPUs, run under nice -n 19: each timing has the 1-minute load "
                         "average before and after it beside it",
              "movies": MOVIES, "ratings_per_user": RATINGS_PER_USER,
              "engine": {stage: compose_config()[stage]["engine"] for stage in ("validate", "split")},
              "import_only": measure("import", IMPORT_ONLY, work), "sizes": {}}
    for ratings in args.sizes:
        print(f"{ratings:,} ratings ({ratings // RATINGS_PER_USER:,} users):", flush=True)
        project = project_for(work, ratings)
        entry = {stage: measure(stage, command, project) for stage, command in STAGES.items()}
        entry["total"] = {"seconds": round(sum(entry[stage]["seconds"] for stage in STAGES), 2),
                          "peak_rss_mb": max(entry[stage]["peak_rss_mb"] for stage in STAGES)}
        entry["validation"] = json.loads((project / "reports" / "validation.json").read_text())
        entry["file_mb"] = {folder: round(sum(path.stat().st_size for path in (project / "data" / folder).glob("*"))
                                          / 2**20, 1) for folder in ("raw", "interim", "processed")}
        if ratings <= args.compare_up_to:
            measure("compare", COMPARE, project)
            entry["validate_equals_pandas_reference"] = True
        result["sizes"][str(ratings)] = entry
        shutil.rmtree(project)
        result["growth"] = growth(result)
        at_most = result["sizes"].get(str(100_000_000), {}).get("total", {}).get("peak_rss_mb")
        result["goals"] = {
            "seconds_growth_per_10x_at_most": TIME_GROWTH_GOAL,
            "seconds_growth_met": {f"{step['from']}->{step['to']}": step["total"]["seconds"]
                                   <= TIME_GROWTH_GOAL * step["to"] / step["from"] / 10 for step in result["growth"]},
            "peak_rss_mb_at_100m_at_most": PEAK_RSS_GOAL_MB,
            "peak_rss_met": None if at_most is None else at_most <= PEAK_RSS_GOAL_MB}
        write_figures(args.out, result)  # after every size: the largest takes long
    print(f"import only: peak RSS {result['import_only']['peak_rss_mb']:.0f} MB")
    for step in result["growth"]:
        print(f"{step['from']:,} -> {step['to']:,} ratings ({step['to'] / step['from']:.0f}x): " + "; ".join(
            f"{stage} {step[stage]['seconds']:.2f}x the seconds, {step[stage]['peak_rss']:.2f}x the peak RSS"
            for stage in [*STAGES, "total"]))
    print(f"goals: {json.dumps(result['goals'])}")


if __name__ == "__main__":
    main()
