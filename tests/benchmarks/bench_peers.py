"""This project's models beside a peer library's implementations of the same families, on this project's protocol
(a script that prints figures, not a test).

    make bench-peers            # creates .venv-peers (RecTools, see below) and runs this script
    python tests/benchmarks/bench_peers.py [--families ease,ials,sasrec] [--trials sasrec=4] [--threads 1]

The peer is RecTools (EASEModel; ImplicitALSWrapperModel over `implicit`'s ALS; SASRecModel). RecTools pins numpy<2,
pandas<3, attrs<24 and pytorch-lightning<=2.5.2 on Python 3.11, which conflict with requirements.lock, so it lives
in its own virtual environment (`.venv-peers`, the `peers` group of pyproject.toml). This script runs in the
project's environment and starts one worker process in `.venv-peers` (this file with --worker): the worker fits
RecTools models and answers with ranked lists (top `eval.save_k` unseen items per user, raw ids); everything else
happens here, with the locked libraries: the split, the Optuna search, every metric, the intervals and the tests.

Both sides, per family, in one run on data/processed (`make run` or `dvc repro split` writes it):
- ours: the model config the pipeline uses (conf/model/<family>_tuned.yaml, found by the sweep whose trial count is
  printed), fitted by `reelrank.train.fit_model` exactly as the fit stage does (on train, early stopping on val for
  SASRec; then the refit on train + val), and scored on test by `score_task`;
- the peer: tuned on val with this project's search space (conf/sweep/<family>.yaml, names mapped to the peer's,
  keys it has no counterpart for dropped) and the same Optuna sampler and pruner as our sweeps, for the trial
  budget printed beside it, the first trial being our tuned configuration; our fixed params where the peer has them,
  its own defaults everywhere else. A SASRec trial trains --max-epochs epochs with val NDCG@10 checked every
  --check-every epochs (no patience: RecTools' SASRec sits at popularity level for its first 15-20 epochs here);
  the best trial is refit on train + val with the epochs of its best check, and its test lists are scored by this
  project's evaluator (full catalog, seen items excluded, the same cutoffs) through `ranked_list_scores`;
- the same seed (params `seed`), torch threads and machine; the fit seconds carry the 1-minute load average.

Printed and written to reports/benchmarks/peers.json: test NDCG@10 of both with 95% bootstrap intervals over users,
the paired difference ours - peer over the same users (its interval and permutation p-value, reelrank.stats), val
NDCG@10 of both, fit and refit seconds, and the tuning budget of both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
HEADLINE = "ndcg@10"


def ranked_list_scores(ranked: pd.DataFrame, task, catalog) -> torch.Tensor:
    """Scores under which this project's evaluator ranks exactly the lists in `ranked` (user_id, item_id, rank; raw
    ids), one row per user of `task`: -rank for a listed item, -inf for every other item, so the evaluator's top k
    is the list's first k items and a user without a list gets nothing. A listed item the user has already seen
    means the lists were not made on this protocol (seen items excluded), so it is an error, as are unknown users or
    items and an item listed twice for a user."""
    from reelrank.split import histories_matrix

    rows = pd.Index(task.histories.user_ids).get_indexer(ranked.user_id.to_numpy())
    cols = catalog.index_of(ranked.item_id.to_numpy())
    if (rows < 0).any():
        raise ValueError(f"{int((rows < 0).sum())} listed rows name users who are not in this task")
    if (cols < 0).any():
        raise ValueError(f"{int((cols < 0).sum())} listed items are not in the catalog")
    if pd.DataFrame({"row": rows, "col": cols}).duplicated().any():
        raise ValueError("an item is listed twice for the same user")
    seen = np.asarray(histories_matrix(task.histories.histories, catalog.n_items)[rows, cols]).ravel() > 0
    if seen.any():
        raise ValueError(f"{int(seen.sum())} listed items were already seen by their user: the lists must exclude "
                         "each user's fitting history, as this project's evaluation does")
    scores = torch.full((len(task.histories), catalog.n_items), -torch.inf)
    scores[torch.as_tensor(rows), torch.as_tensor(cols)] = -torch.as_tensor(ranked["rank"].to_numpy(np.float32))
    return scores


def evaluate_ranked_lists(ranked: pd.DataFrame, task, catalog, fitting, eval_cfg: dict):
    "This project's ranking evaluation (`RankingResult`) of ranked lists made outside it, as `score_task` scores ours."
    from reelrank.metrics import evaluate_ranking

    scores = ranked_list_scores(ranked, task, catalog)
    # one batch holding every user: the score function hands back the whole matrix
    return evaluate_ranking(lambda histories: scores, task, catalog.n_items, fitting.item_counts(catalog.n_items),
                            cutoffs=eval_cfg["cutoffs"], k_save=eval_cfg["save_k"],
                            batch_size=max(len(task.histories), 1))


# ---- the peer side: runs in .venv-peers (`--worker`), never imported by the project's environment ---------------

class PeerFits:
    "RecTools models of one family at a time, fitted on parts of the split and ranking the next part's users."
    def __init__(self, split_dir: str):
        from reelrank.split import SplitData

        self.split = SplitData.load(split_dir)

    def versions(self) -> dict:
        from importlib.metadata import version

        return {name: version(name) for name in ("rectools", "torch", "pytorch-lightning", "pm-implicit", "numpy",
                                                 "pandas")}

    def _dataset(self, parts: list[str]):
        from rectools import Columns
        from rectools.dataset import Dataset

        frame = self.split.fitting_frame(parts).sort_values(["user_id", "timestamp", "item_id"], kind="stable")
        # RecTools orders a user's items by datetime; one distinct instant per row in this project's order (timestamp,
        # then item id) gives the sequence models exactly the histories ours read
        return Dataset.construct(pd.DataFrame({
            Columns.User: frame.user_id.to_numpy(), Columns.Item: frame.item_id.to_numpy(), Columns.Weight: 1.0,
            Columns.Datetime: pd.to_datetime(np.arange(len(frame)), unit="s")}))

    def _model(self, family: str, params: dict, seed: int):
        if family == "ease":
            from rectools.models import EASEModel

            return EASEModel(**params)
        if family == "ials":
            from implicit.cpu.als import AlternatingLeastSquares
            from rectools.models import ImplicitALSWrapperModel

            return ImplicitALSWrapperModel(AlternatingLeastSquares(**params, random_state=seed))
        from rectools.models import SASRecModel
        from rectools.models.nn.item_net import IdEmbeddingsItemNet

        # item ids only, like ours (RecTools' default would add item-feature embeddings when the dataset has some)
        return SASRecModel(**params, item_net_block_types=(IdEmbeddingsItemNet,), deterministic=True)

    def fit(self, family: str, params: dict, parts: list[str], seed: int, epochs: int | None = None) -> dict:
        "Fit a new model on `parts`; a sequence model trains `epochs` epochs and can train on with `train`."
        import pytorch_lightning

        from reelrank.split import PARTS

        self.dataset, self.target = self._dataset(parts), PARTS[len(parts)]
        pytorch_lightning.seed_everything(seed, workers=True, verbose=False)
        self.model = self._model(family, params, seed)
        started = time.perf_counter()
        if epochs is None:
            self.model.fit(self.dataset)
        else:
            self.model.fit_partial(self.dataset, min_epochs=epochs, max_epochs=epochs)
        return {"seconds": time.perf_counter() - started}

    def train(self, epochs: int) -> dict:
        "Train the current sequence model `epochs` more epochs."
        started = time.perf_counter()
        self.model.fit_partial(self.dataset, min_epochs=epochs, max_epochs=epochs)
        return {"seconds": time.perf_counter() - started}

    def rank(self, k: int) -> dict:
        "Top-`k` unseen items of every user of the part after the fitting parts, as RecTools recommends them."
        users = np.unique(self.split.frames[self.target].user_id.to_numpy())
        started = time.perf_counter()
        lists = self.model.recommend(users, self.dataset, k=k, filter_viewed=True)
        return {"seconds": time.perf_counter() - started, "user_id": lists.user_id.tolist(),
                "item_id": lists.item_id.tolist(), "rank": lists["rank"].tolist()}


def limit_threads(threads: int) -> None:
    "Use `threads` CPU threads in torch and in the BLAS and OpenMP pools (`implicit`'s own ALS pool is left as is)."
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def serve_peer_requests(split_dir: str, threads: int) -> None:
    "The worker loop: one JSON request per stdin line (`op` names a PeerFits method), one JSON reply per line."
    import warnings

    warnings.filterwarnings("ignore")
    limit_threads(threads)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    # Lightning and RecTools print to stdout: that goes to stderr, so the pipe carries replies only
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    fits = PeerFits(split_dir)
    for line in sys.stdin:
        request = json.loads(line)
        reply = getattr(fits, request.pop("op"))(**request)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# ---- the project side --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    "A peer implementation of one of our families: its name, our param names renamed to its own, its trial budget."
    implementation: str
    names: dict[str, str]
    trials: int
    sequential: bool = False

    def params(self, ours: dict) -> dict:
        return {self.names[key]: value for key, value in ours.items() if key in self.names}


# Trial budgets: see docs/peers.md. Our SASRec's weight_decay has no RecTools counterpart (its Lightning module builds
# a plain Adam), so that key is left out of the peer's search; its loss stays RecTools' default (full softmax), as ours
# (a shared sampled softmax with logQ correction) has no counterpart either.
PEERS = {
    "ease": Peer("rectools.models.EASEModel", {"l2": "regularization"}, trials=6),
    "ials": Peer("rectools.models.ImplicitALSWrapperModel(implicit.cpu.als.AlternatingLeastSquares)",
                 {key: key for key in ("factors", "regularization", "alpha", "iterations")}, trials=12),
    "sasrec": Peer("rectools.models.SASRecModel",
                   {"hidden": "n_factors", "blocks": "n_blocks", "heads": "n_heads", "dropout": "dropout_rate",
                    "lr": "lr", "max_len": "session_max_len", "batch_size": "batch_size"}, trials=1, sequential=True),
}


class PeerWorker:
    "The worker process in the peer environment, called one request at a time."
    def __init__(self, python: Path, split_dir: Path, threads: int):
        if not python.exists():
            raise SystemExit(f"{python} not found: create the peer environment with `make bench-peers`")
        self.process = subprocess.Popen([str(python), __file__, "--worker", "--split-dir", str(split_dir),
                                         "--threads", str(threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, op: str, **request) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer worker exited with status {self.process.wait()} during {op!r} "
                               "(its traceback is above)")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass
class Side:
    "One side of a family's comparison: what was fitted, how it scored, what it cost."
    name: str
    params: dict
    val: float
    fit_seconds: float
    refit_seconds: float
    load: list[float]
    budget: str
    result: object = field(repr=False)
    trials: list[dict] = field(default_factory=list)


def fit_ours(family: str, cfg: dict, split, tuned_by: str) -> Side:
    "Our model as the pipeline fits it (fit stage), scored on test as the evaluate stage does."
    from reelrank.train import fit_model, score_task

    load = [load1()]
    model, report = fit_model(family, cfg["models"][family], cfg["trainer"], cfg["eval"], cfg["seed"], split)
    load.append(load1())
    result = score_task(model, split.holdout("test"), split.fitting(["train", "val"]), cfg["eval"])
    return Side(f"reelrank {family}", report["params"], report["val"][HEADLINE], report["fit_seconds"],
                report["refit_seconds"], load, tuned_by, result)


def peer_trial(worker: PeerWorker, peer: Peer, params: dict, cfg: dict, split, report=None) -> dict:
    """Fit the peer on train and score its val lists; a sequential model trains --max-epochs epochs, its val NDCG@10
    checked every --check-every epochs and reported to `report(value, epochs)` (which may stop the trial), and the
    best check's epoch count is what the refit trains. Returns the best val NDCG@10, the params to refit with and the
    fit seconds as ours counts them (a sequential fit's includes its val checks, like our early stopping's)."""
    valid, train = split.holdout("val"), split.fitting(["train"])

    def val_ndcg() -> float:
        lists = pd.DataFrame(worker("rank", k=cfg["eval"]["save_k"])).drop(columns="seconds")
        return evaluate_ranked_lists(lists, valid, split.catalog, train, cfg["eval"]).metrics[HEADLINE]

    if not peer.sequential:
        fitted = worker("fit", family=cfg["family"], params=params, parts=["train"], seed=cfg["seed"])
        return {"val": val_ndcg(), "refit_params": params, "fit_seconds": fitted["seconds"]}
    started, step = time.perf_counter(), cfg["check_every"]
    worker("fit", family=cfg["family"], params=params, parts=["train"], seed=cfg["seed"], epochs=step)
    epochs, checks = step, {}
    while True:
        checks[epochs] = val_ndcg()
        print(f"    {epochs} epochs: val {HEADLINE} {checks[epochs]:.4f} (load {load1()})", flush=True)
        if report:
            report(checks[epochs], epochs)
        if epochs >= cfg["max_epochs"]:
            best_epochs = max(checks, key=checks.get)
            return {"val": checks[best_epochs], "refit_params": {**params, "epochs": best_epochs},
                    "fit_seconds": time.perf_counter() - started, "val_by_epochs": checks}
        worker("train", epochs=step)
        epochs += step


def tune_peer(worker: PeerWorker, family: str, cfg: dict, split) -> Side:
    "The peer tuned like our sweeps (search space, TPE sampler per trial, median pruner), refit, scored on test."
    import optuna

    from reelrank.tune import make_pruner, make_sampler, search_space, suggest

    peer, sweep = PEERS[family], cfg["sweep"]
    space = {key: dist for key, dist in search_space(sweep["params"], family, cfg["models"][family]["params"]).items()
             if key in peer.names}
    trials, run = [], {**cfg, "family": family}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(sweep["pruner"]))
    # the first trial is our tuned configuration, so the peer's search starts where ours ended
    ours = cfg["models"][family]["params"]
    study.enqueue_trial({key: ours[key] for key in space})
    load = [load1()]
    started = time.perf_counter()

    def objective(trial: optuna.Trial) -> float:
        trial.study.sampler = make_sampler(sweep["sampler"], trial.number)
        # our params outside the search space (SASRec's batch size and heads) hold in the peer's trials too
        params = peer.params({**ours, **{key: suggest(trial, key, dist) for key, dist in space.items()}})
        begun = time.perf_counter()

        def report(value: float, epochs: int) -> None:
            trial.report(value, epochs)
            if trial.should_prune():
                trials.append({"params": params, "val": value, "epochs_trained": epochs, "state": "pruned",
                               "seconds": round(time.perf_counter() - begun, 2)})
                raise optuna.TrialPruned()

        outcome = peer_trial(worker, peer, params, run, split, report)
        trial.set_user_attr("outcome", outcome)
        trials.append({**outcome, "params": params, "state": "complete",
                       "seconds": round(time.perf_counter() - begun, 2)})
        print(f"  {family} peer trial {trial.number}: {outcome['refit_params']} val {HEADLINE} {outcome['val']:.4f} "
              f"({trials[-1]['seconds']:.0f} s, load {load1()})", flush=True)
        return outcome["val"]

    study.optimize(objective, n_trials=cfg["trials"][family])
    tuning_seconds = time.perf_counter() - started
    best = study.best_trial.user_attrs["outcome"]
    params = {k: v for k, v in best["refit_params"].items() if k != "epochs"}
    fitted = worker("fit", family=family, params=params, parts=["train", "val"], seed=cfg["seed"],
                    epochs=best["refit_params"].get("epochs"))
    load.append(load1())
    lists = pd.DataFrame(worker("rank", k=cfg["eval"]["save_k"])).drop(columns="seconds")
    result = evaluate_ranked_lists(lists, split.holdout("test"), split.catalog, split.fitting(["train", "val"]),
                                   cfg["eval"])
    budget = f"{len(trials)} Optuna trials ({sum(t['state'] == 'pruned' for t in trials)} pruned) in " \
             f"{tuning_seconds:.0f} s"
    return Side(peer.implementation, best["refit_params"], best["val"], best["fit_seconds"], fitted["seconds"], load,
                budget, result, trials)


def our_budget(family: str) -> str:
    "How the tuned config we fit was found: the committed sweep's trial count."
    summary = ROOT / "reports" / "tuning" / family / "summary.json"
    if not summary.exists():
        return "conf/model default"
    counts = json.loads(summary.read_text())["n_trials"]
    return f"{counts['complete'] + counts['pruned']} Optuna trials ({counts['pruned']} pruned; reports/tuning)"


def compare(family: str, ours: Side, peer: Side, split) -> dict:
    "Intervals of both sides' test metrics over users and the paired test ours - peer on NDCG@10."
    from reelrank.stats import CONFIDENCE, confidence_intervals, paired_comparison
    from reelrank.train import per_user_frame

    task = split.holdout("test")
    frames = {side.name: per_user_frame(side.result, task).set_index("user_id") for side in (ours, peer)}
    paired = paired_comparison(frames[ours.name][HEADLINE], frames[peer.name][HEADLINE], HEADLINE)

    def summary(side: Side) -> dict:
        return {"implementation": side.name, "params": side.params, "val_" + HEADLINE: side.val,
                "test": {k: v for k, v in side.result.metrics.items()},
                "test_interval": confidence_intervals(frames[side.name]),
                "fit_seconds": round(side.fit_seconds, 2), "refit_seconds": round(side.refit_seconds, 2),
                "load_1min": side.load, "tuning": side.budget, **({"trials": side.trials} if side.trials else {})}

    return {"family": family, "level": CONFIDENCE, "ours": summary(ours), "peer": summary(peer),
            "ours_minus_peer": paired.as_dict()}


def table(rows: list[dict]) -> str:
    def cell(side: dict) -> str:
        low, high = side["test_interval"][HEADLINE]
        return f"{side['test'][HEADLINE]:.4f} [{low:.4f}, {high:.4f}]"

    lines = [(f"{'family':<8} {'side':<6} {'implementation':<28} {'test ' + HEADLINE + ' [95% CI]':<26} "
              f"{'val':>7} {'fit s':>7} {'refit s':>7} {'load':>11}  tuning budget")]
    for row in rows:
        for side in ("ours", "peer"):
            s = row[side]
            name = s["implementation"] if len(s["implementation"]) <= 28 else s["implementation"][:25] + "..."
            lines.append(f"{row['family']:<8} {side:<6} {name:<28} {cell(s):<26} {s['val_' + HEADLINE]:>7.4f} "
                         f"{s['fit_seconds']:>7.1f} {s['refit_seconds']:>7.1f} "
                         f"{'-'.join(f'{x:.1f}' for x in s['load_1min']):>11}  {s['tuning']}")
        d = row["ours_minus_peer"]
        lines.append(f"{'':<8} ours - peer: {d['difference']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]"
                     f", p = {d['p_value']:.3f} over {d['n_users']} users")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(PEERS), help=f"comma-separated subset of {list(PEERS)}")
    parser.add_argument("--trials", nargs="*", default=[], metavar="FAMILY=N", help="peer trial budget overrides")
    parser.add_argument("--check-every", type=int, default=5, help="epochs between a sequential peer's val checks")
    parser.add_argument("--max-epochs", type=int, default=40,
                        help="a sequential peer's epochs per fit (40 x 21 batches of 32: the ~880 steps of our fit)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of torch and BLAS on both sides (1: what a shared machine can give)")
    parser.add_argument("--split-dir", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "peers.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return serve_peer_requests(str(args.split_dir), args.threads)

    sys.path.insert(0, str(ROOT / "tests"))
    from bento_server import write_figures

    from reelrank.core import compose_config
    from reelrank.split import SplitData

    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(PEERS))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {list(PEERS)}")
    trials = {family: peer.trials for family, peer in PEERS.items()}
    trials.update({k: int(v) for k, v in (item.split("=") for item in args.trials)})
    limit_threads(args.threads)
    split = SplitData.load(args.split_dir)
    worker = PeerWorker(args.peer_python, args.split_dir, args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    rows = []
    try:
        versions = worker("versions")
        for family in families:
            cfg = {**compose_config([f"+sweep={family}"], ROOT / "conf"), "trials": trials,
                   "check_every": args.check_every, "max_epochs": args.max_epochs}
            print(f"{family}: ours (tuned config, fit + refit), then the peer ({trials[family]} trials)", flush=True)
            ours = fit_ours(family, cfg, split, our_budget(family))
            peer = tune_peer(worker, family, cfg, split)
            rows.append(compare(family, ours, peer, split))
            print(table(rows[-1:]), flush=True)
    finally:
        worker.close()
    figures = {"protocol": "reelrank split (data/processed), full-catalog ranking with seen items excluded, "
                           f"test of the refit on train + val; intervals: bootstrap over users; seed {cfg['seed']}",
               "peer_versions": versions, "ours_versions": {"torch": torch.__version__, "numpy": np.__version__,
                                                           "pandas": pd.__version__},
               "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "load_average_start": [round(x, 2) for x in load_start],
               "load_average_end": [round(x, 2) for x in os.getloadavg()],
               "total_seconds": round(time.perf_counter() - started, 1),
               "sequential_peer_epochs": {"check_every": args.check_every, "max": args.max_epochs},
               "families": rows}
    print(f"\nRecTools {versions['rectools']} (torch {versions['torch']}) vs reelrank (torch {torch.__version__}), "
          f"{torch.get_num_threads()} torch threads, load {figures['load_average_start'][0]} at start, "
          f"{figures['load_average_end'][0]} at end, {figures['total_seconds']:.0f} s")
    print(table(rows))
    write_figures(args.out, figures)


if __name__ == "__main__":
    main()
