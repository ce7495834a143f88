"""Benchmark of EASE^R's item cap (a script that prints figures, not a test).

    python tests/benchmarks/bench_ease_cap.py [--caps 5000 10000 20000] [--ratings 2000000]

Synthetic ratings of ml-25m's catalog (62,423 movies, 100 ratings a user) are written once; each user's last
rating is held out. For each cap (`models.ease.params.max_items`), in a fresh process, one process at a time:
EASE^R is fitted on the remaining ratings (seconds, and the process's resident memory before the fit and its peak
during the fit, VmHWM reset before it), then 1,000 sampled users are ranked over the whole catalog as the evaluate stage does with
`eval.max_users: 1000` (seconds, NDCG@10). The memory the fit added is set beside the model's own estimate
(`DENSE_MATRICES` dense cap x cap float32 matrices), which is what the refusal without a cap relies on; the
smallest cap is the reference of the time and memory ratios. A last process fits without a cap: on a machine
whose available memory is below that estimate for the whole catalog, it must be refused before any matrix is
built (seconds to the refusal, its peak memory and the message).

The 1-minute load average before and after each process is written beside its figures: the machine is shared.
Figures are printed and written to reports/benchmarks/ease_cap.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from bento_server import STATUS_MB, write_figures

MOVIES = 62_423
RATINGS_PER_USER = 100
EVALUATED_USERS = 1_000

# Runs in a fresh interpreter; argv: data directory, cap ("none" for no cap). Prints one JSON line.
CHILD = """
import json, sys, time
import numpy as np, pandas as pd, torch
from reelrank.core import ConfigError
from reelrank.metrics import evaluate_ranking
from reelrank.models.ease import DENSE_MATRICES, EASE
from reelrank.split import Catalog, HoldOut, Interactions

""" + STATUS_MB + """
data, cap = sys.argv[1], sys.argv[2]
catalog = Catalog.from_frame(pd.read_parquet(f"{data}/items.parquet"))
everyone = Interactions.from_frame(pd.read_parquet(f"{data}/interactions.parquet"), catalog)
fitting = Interactions(everyone.user_ids, [h[:-1] for h in everyone.histories])
task = HoldOut(fitting, [h[-1:] for h in everyone.histories])
max_items = None if cap == "none" else int(cap)
figures = {"torch_threads": torch.get_num_threads(), "rss_before_fit_mb": status_mb("VmRSS")}
# the fit's own peak: writing 5 to clear_refs resets the peak resident memory (VmHWM) that loading the data set
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")
started = time.perf_counter()
try:
    model = EASE(catalog, {"l2": 500.0, "max_items": max_items}).fit(fitting)
except ConfigError as refused:
    figures |= {"refused_after_seconds": round(time.perf_counter() - started, 2), "message": str(refused),
                "peak_rss_mb": status_mb("VmHWM")}
    print(json.dumps(figures))
    sys.exit(0)
figures["fit_seconds"] = round(time.perf_counter() - started, 2)
figures["peak_rss_mb"] = status_mb("VmHWM")
figures["modelled_items"] = model.describe()["modelled_items"]
figures["estimate_mb"] = round(DENSE_MATRICES * 4 * figures["modelled_items"] ** 2 / 2**20, 1)
started = time.perf_counter()
result = evaluate_ranking(model.score, task, catalog.n_items, fitting.item_counts(catalog.n_items), cutoffs=(10,),
                          k_save=10, batch_size=512, max_users=int(sys.argv[3]), sample_seed=0)
figures["evaluate_seconds"] = round(time.perf_counter() - started, 2)
figures["evaluated_users"] = result.users
figures["ndcg@10"] = round(result.metrics["ndcg@10"], 4)
print(json.dumps(figures))
"""


def mem_available_mb() -> float:
    "MemAvailable of /proc/meminfo, in MB."
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no MemAvailable in /proc/meminfo")


def measure(data: Path, cap: str) -> dict:
    "Run one child process and return its figures with the 1-minute load average before and after it."
    load_before = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-c", CHILD, str(data), cap, str(EVALUATED_USERS)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"cap {cap}: failed\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if "fit_seconds" in figures:
        figures["fit_added_mb"] = round(figures["peak_rss_mb"] - figures["rss_before_fit_mb"], 1)
        print(f"cap {cap:>6}: fit {figures['fit_seconds']:7.1f} s, peak RSS {figures['peak_rss_mb']:7.0f} MB "
              f"(+{figures['fit_added_mb']:.0f} MB by the fit; estimate {figures['estimate_mb']:.0f} MB), "
              f"{EVALUATED_USERS:,} users ranked over {MOVIES:,} items in {figures['evaluate_seconds']:.1f} s, "
              f"ndcg@10 {figures['ndcg@10']:.4f} (load {figures['load_1min'][0]:.1f} -> {figures['load_1min'][1]:.1f})")
    else:
        print(f"no cap: refused after {figures['refused_after_seconds']:.1f} s of the fit, peak RSS "
              f"{figures['peak_rss_mb']:.0f} MB: {figures['message']}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", type=int, nargs="+", default=[5_000, 10_000, 20_000])
    parser.add_argument("--ratings", type=int, default=2_000_000)
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "ease_cap.json"))
    args = parser.parse_args()
    from reelrank.core import compose_config
    from reelrank.models.ease import DENSE_MATRICES
    from reelrank.synthetic import write_synthetic

    users = args.ratings // RATINGS_PER_USER
    result = {"movies": MOVIES, "ratings": args.ratings, "users": users, "held_out": "each user's last rating",
              "cpus": os.cpu_count(), "mem_available_mb": round(mem_available_mb()),
              "machine": "2 cores shared with other work: see load_1min beside each figure", "caps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["data=synthetic", f"data.users={users}", f"data.items={MOVIES}",
                              f"data.interactions={args.ratings}"])["data"]
        write_synthetic(cfg, Path(tmp) / "raw")
        for cap in args.caps:
            result["caps"][str(cap)] = measure(Path(tmp) / "raw", str(cap))
        reference = result["caps"][str(args.caps[0])]
        for cap in args.caps:
            figures = result["caps"][str(cap)]
            figures["vs_smallest"] = {"items": round(cap / args.caps[0], 2),
                                      "fit_seconds": round(figures["fit_seconds"] / reference["fit_seconds"], 2),
                                      "fit_added_mb": round(figures["fit_added_mb"] / reference["fit_added_mb"], 2)}
            print(f"cap {cap:>6}: {figures['vs_smallest']['items']}x the items, "
                  f"{figures['vs_smallest']['fit_seconds']}x the fit time, "
                  f"{figures['vs_smallest']['fit_added_mb']}x the memory the fit added")
        whole_catalog_mb = DENSE_MATRICES * 4 * MOVIES**2 / 2**20
        if result["mem_available_mb"] < whole_catalog_mb:
            result["no_cap"] = measure(Path(tmp) / "raw", "none")
        else:
            result["no_cap"] = {"skipped": f"{result['mem_available_mb']} MB available would fit the whole catalog"}
    write_figures(args.out, result)


if __name__ == "__main__":
    main()
