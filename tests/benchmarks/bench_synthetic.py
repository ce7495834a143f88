"""Benchmark of the synthetic source (a script that prints figures, not a test).

    python tests/benchmarks/bench_synthetic.py [--sizes 1000000 10000000]

For each size in ratings (users = ratings / 100, the issue's 100M ratings by 1M users; ml-25m's 62,423 movies),
each in a fresh process, one process at a time:

1. chunked: `write_synthetic` into a temporary directory, a block of users at a time appended as a Parquet row
   group, as the benchmarks and a bounded-memory ingest use it;
2. in memory, the reference: `load_synthetic`, every rating in one DataFrame, as the `ingest` stage holds them today.

A process that only imports reelrank.synthetic gives the floor under every memory figure. Each process reports its
wall seconds and its peak resident memory (ru_maxrss); the figures are seconds, ratings per second, peak RSS, the
file size, and the ratios that matter: time and peak RSS from the smallest to the largest size, and chunked
against in-memory peak RSS at each size. The 1-minute load average before and after each process is written
beside its figures: the machine is shared. Figures are printed and written to reports/benchmarks/synthetic.json.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from bento_server import write_figures

MOVIES = 62_423
RATINGS_PER_USER = 100

# Runs in a fresh interpreter from the project root (compose_config reads conf/ there); prints one JSON line.
CHILD = """
import json, resource, sys, tempfile, time
from pathlib import Path
from reelrank.core import compose_config
from reelrank.synthetic import load_synthetic, write_synthetic
mode, ratings, users, movies = sys.argv[1], *map(int, sys.argv[2:])
cfg = compose_config(["data=synthetic", f"data.users={users}", f"data.items={movies}",
                      f"data.interactions={ratings}"])["data"]
figures = {}
started = time.perf_counter()
if mode == "chunked":
    with tempfile.TemporaryDirectory() as tmp:
        written = write_synthetic(cfg, Path(tmp) / "raw")
        figures["ratings"] = written["interactions"]
        figures["file_mb"] = round((Path(tmp) / "raw" / "interactions.parquet").stat().st_size / 2**20, 1)
elif mode == "in_memory":
    interactions, _ = load_synthetic(cfg)
    figures["ratings"] = len(interactions)
    figures["frame_mb"] = round(interactions.memory_usage(deep=True).sum() / 2**20, 1)
figures["seconds"] = round(time.perf_counter() - started, 2)
figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(figures))
"""


def measure(mode: str, ratings: int = 0) -> dict:
    "Run one child process and return its figures with the 1-minute load average before and after it."
    load_before = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(ratings), str(ratings // RATINGS_PER_USER),
                           str(MOVIES)], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} {ratings:,}: failed\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if ratings:
        figures["ratings_per_second"] = round(figures["ratings"] / figures["seconds"])
    print(f"{mode:>9} {ratings:>12,} ratings: {figures['seconds']:8.1f} s, peak RSS {figures['peak_rss_mb']:7.0f} MB "
          f"(load {figures['load_1min'][0]:.1f} -> {figures['load_1min'][1]:.1f})")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "synthetic.json"))
    args = parser.parse_args()
    result = {"movies": MOVIES, "ratings_per_user": RATINGS_PER_USER, "cpus": os.cpu_count(),
              "import_only": measure("import"), "sizes": {}}
    for ratings in args.sizes:
        chunked, in_memory = measure("chunked", ratings), measure("in_memory", ratings)
        result["sizes"][str(ratings)] = {
            "chunked": chunked, "in_memory": in_memory,
            "chunked_over_in_memory_rss": round(chunked["peak_rss_mb"] / in_memory["peak_rss_mb"], 3)}
    smallest, largest = (result["sizes"][str(size)] for size in (min(args.sizes), max(args.sizes)))
    result["growth"] = {
        "size": max(args.sizes) / min(args.sizes),
        "chunked_seconds": round(largest["chunked"]["seconds"] / smallest["chunked"]["seconds"], 2),
        "chunked_peak_rss": round(largest["chunked"]["peak_rss_mb"] / smallest["chunked"]["peak_rss_mb"], 2),
        "in_memory_peak_rss": round(largest["in_memory"]["peak_rss_mb"] / smallest["in_memory"]["peak_rss_mb"], 2)}
    print(f"import only: peak RSS {result['import_only']['peak_rss_mb']:.0f} MB")
    for ratings, entry in result["sizes"].items():
        print(f"{int(ratings):>12,} ratings: chunked peak RSS is {entry['chunked_over_in_memory_rss']:.2f}x in-memory")
    print(f"{result['growth']['size']:.0f}x the ratings: chunked {result['growth']['chunked_seconds']:.2f}x the "
          f"seconds, {result['growth']['chunked_peak_rss']:.2f}x the peak RSS (in memory "
          f"{result['growth']['in_memory_peak_rss']:.2f}x)")
    write_figures(args.out, result)


if __name__ == "__main__":
    main()
