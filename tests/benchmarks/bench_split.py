"""Benchmark of the split stage: DuckDB out of core against the pandas reference (a script that prints figures).

    nice -n 19 python tests/benchmarks/bench_split.py [--sizes 1000000 10000000] [--pandas-up-to 10000000]
                                                      [--memory-limits 2GB] [--work /tmp/bench-split]

For each size in ratings (users = ratings / 100, ml-25m's 62,423 movies, as tests/benchmarks/bench_synthetic.py),
one process at a time:

1. the synthetic source writes `interactions.parquet` in blocks (`write_synthetic`, bounded memory) under --work;
   the file stands in for data/interim (it passes every validate rule by construction, see 01b_synthetic);
2. pandas (sizes up to --pandas-up-to only: it holds every rating in memory): the stage as it was before DuckDB,
   `pd.read_parquet`, the reference `temporal_split`, one Parquet file per part;
3. duckdb: `split_stage` with the `split` config of the default profile, once per --memory-limits value, with
   DuckDB's scratch folder under --work; the parent polls that folder twice a second for the size of the scratch
   database (the labelled rows) and of the spill files (what did not fit in memory_limit);
4. after each DuckDB run where pandas ran, a separate process checks that the two give the same rows, order and
   dtypes.

Each process reports its wall seconds and its peak resident memory (ru_maxrss); a process that only imports
reelrank.split gives the floor under every memory figure. The machine is shared: the 1-minute load average before
and after each process is written beside its figures. Figures are printed and written to
reports/benchmarks/split.json (after each size, so a long last size keeps the others), with the ratios that
matter: DuckDB against pandas at the same size, and each engine's growth from one size to the next.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from bento_server import write_figures

MOVIES = 62_423
RATINGS_PER_USER = 100

# Runs in a fresh interpreter from the project root (compose_config reads conf/ there); prints one JSON line.
CHILD = """
import json, resource, sys, time
from pathlib import Path
from reelrank.core import compose_config, write_parquet
from reelrank.split import PARTS, split_stage, temporal_split
mode, work, ratings, memory_limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
figures = {}
started = time.perf_counter()
if mode == "generate":
    from reelrank.synthetic import write_synthetic
    cfg = compose_config(["data=synthetic", f"data.users={ratings // 100}", f"data.items={62_423}",
                          f"data.interactions={ratings}"])["data"]
    figures["ratings"] = write_synthetic(cfg, work / "interim")["interactions"]
    figures["file_mb"] = round((work / "interim" / "interactions.parquet").stat().st_size / 2**20, 1)
elif mode == "duckdb":
    cfg = compose_config()["split"]
    cfg["engine"] = {**cfg["engine"], "memory_limit": memory_limit, "temp_directory": str(work / "spill")}
    figures["rows"] = split_stage(cfg, work / "interim", work / "duckdb")
    figures["engine"] = cfg["engine"]
elif mode == "pandas":
    import pandas as pd
    cfg = compose_config()["split"]
    parts = temporal_split(pd.read_parquet(work / "interim" / "interactions.parquet"), cfg["holdout_fraction"],
                           cfg["min_interactions"])
    (work / "pandas").mkdir(exist_ok=True)
    for part, rows in parts.items():
        write_parquet(rows, work / "pandas" / f"{part}.parquet")
    figures["rows"] = {part: len(rows) for part, rows in parts.items()}
elif mode == "compare":
    import pandas as pd
    for part in PARTS:
        pd.testing.assert_frame_equal(pd.read_parquet(work / "duckdb" / f"{part}.parquet"),
                                      pd.read_parquet(work / "pandas" / f"{part}.parquet"))
    figures["identical_rows_order_dtypes"] = True
figures["seconds"] = round(time.perf_counter() - started, 2)
figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(figures))
"""


def scratch_bytes(folder: Path) -> tuple[int, int]:
    "Bytes under DuckDB's scratch `folder` now: (its database file, its spill files); vanished files count 0."
    database = spilled = 0
    for path in folder.rglob("*"):
        try:
            size = path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            continue
        if path.name.startswith("split.duckdb"):
            database += size
        else:
            spilled += size
    return database, spilled


def measure(mode: str, work: Path, ratings: int = 0, memory_limit: str = "") -> dict:
    """Run one child process and return its figures with the 1-minute load average before and after it. A DuckDB run
    that fails (a memory limit too small for its size is a finding) is recorded with its error; any other stops."""
    load_before = os.getloadavg()[0]
    spill, peak_database, peak_spill = work / "spill", 0, 0
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(work), str(ratings), memory_limit], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while child.poll() is None:
        if spill.exists():
            database, spilled = scratch_bytes(spill)
            peak_database, peak_spill = max(peak_database, database), max(peak_spill, spilled)
        time.sleep(0.5)
    stdout, stderr = child.communicate()
    if child.returncode != 0 and mode == "duckdb":
        lines = stderr.strip().splitlines()
        error = next((line for line in lines if "Error:" in line and not line.startswith(" ")), lines[-1])
        print(f"{mode + ' ' + memory_limit:>14} {ratings:>12,} ratings: failed: {error}")
        return {"failed": error, "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if child.returncode != 0:
        raise SystemExit(f"{mode} {ratings:,}: failed\n{stderr[-3000:]}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if mode == "duckdb":
        figures["peak_spill_mb"] = round(peak_spill / 2**20, 1)
        figures["peak_scratch_database_mb"] = round(peak_database / 2**20, 1)
    spilled = (f", spilled {figures['peak_spill_mb']:.0f} MB beside a {figures['peak_scratch_database_mb']:.0f} MB "
               "scratch database" if mode == "duckdb" else "")
    print(f"{mode + ' ' + memory_limit:>14} {ratings:>12,} ratings: {figures['seconds']:8.1f} s, peak RSS "
          f"{figures['peak_rss_mb']:7.0f} MB{spilled} (load {figures['load_1min'][0]:.1f} -> "
          f"{figures['load_1min'][1]:.1f})")
    return figures


def ratios(run: dict, reference: dict) -> dict:
    "Seconds and peak RSS of `run` over those of `reference`."
    return {"seconds": round(run["seconds"] / reference["seconds"], 2),
            "peak_rss": round(run["peak_rss_mb"] / reference["peak_rss_mb"], 2)}


def growth(result: dict, limits: list[str]) -> list[dict]:
    "Each engine's seconds and peak RSS from one measured size to the next (failed runs left out)."
    sizes, steps = sorted(map(int, result["sizes"])), []
    for earlier, later in itertools.pairwise(sizes):
        before, after = result["sizes"][str(earlier)], result["sizes"][str(later)]
        step = {"from": earlier, "to": later, "duckdb": {
            limit: ratios(after["duckdb"][limit], before["duckdb"][limit]) for limit in limits
            if "failed" not in after["duckdb"][limit] and "failed" not in before["duckdb"][limit]}}
        if "pandas" in before and "pandas" in after:
            step["pandas"] = ratios(after["pandas"], before["pandas"])
        steps.append(step)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--pandas-up-to", type=int, default=10_000_000, help="largest size the pandas reference runs at")
    parser.add_argument("--memory-limits", nargs="+", default=["2GB"], help="DuckDB memory_limit values to run")
    parser.add_argument("--work", default="/tmp/bench-split", help="scratch folder for the data and the outputs")
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "split.json"))
    args = parser.parse_args()
    result = {"machine": f"shared, {os.cpu_count()} CPUs, run under nice -n 19: each timing has the 1-minute load "
                         "average before and after it beside it",
              "movies": MOVIES, "ratings_per_user": RATINGS_PER_USER,
              "import_only": measure("import", Path(args.work)), "sizes": {}}
    for ratings in args.sizes:
        work = Path(args.work) / str(ratings)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        entry = {"generate": measure("generate", work, ratings), "duckdb": {}}
        if ratings <= args.pandas_up_to:
            entry["pandas"], entry["compare"] = measure("pandas", work, ratings), {}
        for limit in args.memory_limits:
            entry["duckdb"][limit] = measure("duckdb", work, ratings, limit)
            shutil.rmtree(work / "spill", ignore_errors=True)
            if "pandas" in entry and "failed" not in entry["duckdb"][limit]:
                entry["compare"][limit] = measure("compare", work, ratings)
        if "pandas" in entry:
            entry["duckdb_over_pandas"] = {limit: ratios(run, entry["pandas"])
                                           for limit, run in entry["duckdb"].items() if "failed" not in run}
        result["sizes"][str(ratings)] = entry
        shutil.rmtree(work)
        result["growth"] = growth(result, args.memory_limits)
        write_figures(args.out, result)  # after every size: the largest may take long, or fail
    print(f"import only: peak RSS {result['import_only']['peak_rss_mb']:.0f} MB")
    for ratings, entry in result["sizes"].items():
        for limit, ratio in entry.get("duckdb_over_pandas", {}).items():
            print(f"{int(ratings):>12,} ratings, DuckDB at {limit}: {ratio['seconds']:.2f}x the pandas seconds, "
                  f"{ratio['peak_rss']:.2f}x its peak RSS; same rows, order and dtypes: "
                  f"{entry['compare'][limit]['identical_rows_order_dtypes']}")
    for step in result["growth"]:
        print(f"{step['from']:,} -> {step['to']:,} ratings ({step['to'] / step['from']:.0f}x): " + "; ".join(
            f"{engine}{' ' + limit if limit else ''}: {ratio['seconds']:.2f}x the seconds, {ratio['peak_rss']:.2f}x "
            "the peak RSS"
            for engine, limit, ratio in [*(("duckdb", limit, ratio) for limit, ratio in step["duckdb"].items()),
                                         *([("pandas", "", step["pandas"])] if "pandas" in step else [])]))


if __name__ == "__main__":
    main()
