"""The `scale` profile end to end: `make run PROFILE=scale` timed, and its results (a script that prints figures).

    python tests/benchmarks/bench_scale.py [--work /tmp/bench-scale]
    python tests/benchmarks/bench_scale.py --run DIR --time-log LOG   # summarise a run made by hand

Without --run: clones this repository's HEAD into --work and runs `/usr/bin/time -v make run PROFILE=scale` there
(set-up included unless the clone's .venv is already installed), the whole pipeline from ingest to package, report
and monitor on synthetic ratings of ml-25m's size (conf/profile/scale.yaml). With --run: reads a run made the same
way, and the output of `/usr/bin/time -v` it was run under.

Printed and written to reports/benchmarks/scale.json: the wall time and the peak resident memory of the largest
process (GNU time's "Maximum resident set size": the largest of make and its descendants), the 1-minute load average
before and after, and per model the val and test NDCG@10 over the sampled users with the test interval, fit and
refit seconds, and the family of the model the select stage serves.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from bento_server import write_figures

MODELS = ("popularity", "ease", "ials", "two_tower", "sasrec", "blend")


def run_scale_profile(work: Path) -> tuple[Path, str, dict]:
    "Clone HEAD into `work` and run `make run PROFILE=scale` there under GNU time; the clone, time's output, loads."
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(work)], check=True)
    before = round(os.getloadavg()[0], 2)
    done = subprocess.run(["/usr/bin/time", "-v", "make", "run", "PROFILE=scale"], cwd=work, capture_output=True,
                          text=True, check=False)
    (work / "scale-run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"make run PROFILE=scale failed in {work}:\n{done.stderr[-3000:]}")
    return work, done.stderr, {"load_before": before, "load_after": round(os.getloadavg()[0], 2)}


def gnu_time(text: str) -> dict:
    "Wall seconds, peak RSS and exit status from `/usr/bin/time -v` output."
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = sum(float(part) * 60 ** power for power, part in enumerate(reversed(wall.split(":"))))
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    status = int(re.search(r"Exit status: (\d+)", text).group(1))
    return {"wall_seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024), "exit_status": status}


def model_results(run: Path) -> dict:
    "Per model: val and test NDCG@10 on the sampled users, the test interval, fit seconds, users scored."
    out = {}
    for name in MODELS:
        metrics = json.loads((run / "reports" / "metrics" / f"{name}.json").read_text())
        out[name] = {"val_ndcg@10": round(metrics["val"]["ndcg@10"], 4),
                     "test_ndcg@10": round(metrics["test"]["ndcg@10"], 4),
                     "test_ndcg@10_interval": [round(x, 4) for x in metrics["interval"]["test"]["ndcg@10"]],
                     "test_hit_rate@10": round(metrics["test"]["hit_rate@10"], 4),
                     "fit_seconds": round(metrics["fit_seconds"], 1),
                     "refit_seconds": round(metrics["refit_seconds"], 1), "users": metrics["users"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--run", type=Path, help="a finished run's folder (with --time-log) instead of a new run")
    parser.add_argument("--time-log", type=Path, help="the output of `/usr/bin/time -v make run PROFILE=scale`")
    parser.add_argument("--loads", type=float, nargs="*", default=[],
                        help="with --run: 1-minute load averages sampled during that run")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "scale.json")
    args = parser.parse_args()
    if args.run is not None:
        run, timing, loads = args.run, args.time_log.read_text(), {"load_samples": args.loads}
    else:
        run, timing, loads = run_scale_profile(args.work)
    figures = {"cpus": os.cpu_count(), **gnu_time(timing), **loads, "models": model_results(run)}
    figures["selected"] = json.loads((run / "models" / "selected" / "model.json").read_text())["family"]
    params = yaml.safe_load((run / "params.yaml").read_text())
    figures["params"] = {key: params[key] for key in ("data", "eval", "trainer", "select")}
    write_figures(args.out, figures)
    print(f"make run PROFILE=scale: {figures['wall_seconds'] / 60:.1f} min wall, peak RSS {figures['peak_rss_mb']:,} MB, "
          f"exit {figures['exit_status']}; serves {figures['selected']}")
    for name, result in figures["models"].items():
        low, high = result["test_ndcg@10_interval"]
        print(f"{name:>10}: val NDCG@10 {result['val_ndcg@10']:.4f}, test {result['test_ndcg@10']:.4f} "
              f"[{low:.4f}, {high:.4f}] over {result['users']['test']['evaluated']:,} of "
              f"{result['users']['test']['of']:,} users; fit {result['fit_seconds']} s, refit {result['refit_seconds']} s")


if __name__ == "__main__":
    main()
