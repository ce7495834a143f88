"""Training throughput of SASRec: the Lightning loop vs a plain PyTorch loop over the same model and batches.

Not a test (timings on shared machines are noise for a pass/fail); it prints figures. Run from the project root:

    python tests/benchmarks/bench_sasrec_throughput.py [--epochs 2] [--threads 2] [--params '{"loss": "full"}']

Both loops train a freshly initialised copy of the same network with the same optimiser on the same batches
(the same data loader, reseeded), on MovieLens small from data/processed when it is there, else on synthetic
histories of the same shape. After an untimed warm-up round, the rounds alternate plain / Lightning so drifting
machine load hits both alike; samples/s counts next-item positions (the unit the loss is computed over) and whole
epochs are timed. Use --threads 1 on a machine shared with other jobs.
The goal from the issue: Lightning >= 0.9x plain.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from reelrank.models.base import FitContext
from reelrank.models.sasrec import (
    DEFAULT_PARAMS,
    PAD,
    SASRec,
    SASRecNet,
    WindowBatches,
    full_softmax_loss,
    sampled_softmax_loss,
    training_windows,
)
from reelrank.models.training import FitModule, WeightAverage, lightning_trainer
from reelrank.split import Catalog, Interactions, SplitData

ROOT = Path(__file__).resolve().parents[2]


def histories_and_items(split_dir: Path, seed: int) -> tuple[list[np.ndarray], int, str]:
    "Train histories of the pipeline's split, or synthetic ones shaped like MovieLens small."
    if (split_dir / "train.parquet").exists():
        split = SplitData.load(split_dir)
        return split.fitting(["train"]).histories, split.catalog.n_items, f"MovieLens train split ({split_dir})"
    rng = np.random.default_rng(seed)
    n_items = 9066
    lengths = np.clip(rng.lognormal(4.0, 1.0, 671).astype(int), 16, 1900)
    popularity = rng.zipf(1.3, n_items).astype(float)
    probs = popularity / popularity.sum()
    histories = [rng.choice(n_items, size=min(n, n_items), replace=False, p=probs) for n in lengths]
    return histories, n_items, "synthetic histories (671 users, 9066 items)"


def clocks() -> tuple[float, float]:
    "Wall time and this process's CPU time (the latter barely moves when other jobs load the machine)."
    return time.perf_counter(), time.process_time()


class EpochTimer(Callback):
    "(wall, CPU) seconds of each training epoch, excluding Trainer setup and teardown."
    def __init__(self):
        self.seconds: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, module):
        self._start = clocks()

    def on_train_epoch_end(self, trainer, module):
        self.seconds.append(tuple(end - start for start, end in zip(self._start, clocks())))


def plain_epochs(net: SASRecNet, params: dict, sampling_probs: torch.Tensor, loader,
                 epochs: int) -> list[tuple[float, float]]:
    "SASRec's training step (loss, AdamW, weight average) as a bare PyTorch loop; (wall, CPU) s/epoch."
    optimiser = torch.optim.AdamW(net.parameters(), lr=params["lr"], weight_decay=params["weight_decay"],
                                  betas=(0.9, 0.98))
    average = [p.detach().clone() for p in net.parameters()] if params["ema_decay"] else None
    net.train()
    seconds, step = [], 0
    for _ in range(epochs):
        start = clocks()
        for inputs, targets in loader:
            real = targets != PAD
            states = net(inputs)[real]
            if params["loss"] == "full":
                loss = full_softmax_loss(net, states, targets[real])
            else:
                loss = sampled_softmax_loss(net, states, targets[real], sampling_probs, params["n_negatives"])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            if average is not None:
                decay = min(params["ema_decay"], (1.0 + step) / (10.0 + step))
                with torch.no_grad():
                    for kept, param in zip(average, net.parameters()):
                        kept.lerp_(param, 1.0 - decay)
        seconds.append(tuple(end - begin for begin, end in zip(start, clocks())))
    return seconds


def lightning_epochs(net: SASRecNet, params: dict, sampling_probs: torch.Tensor, loader, epochs: int,
                     trainer_cfg: dict) -> list[tuple[float, float]]:
    "SASRec's FitModule under the Reelrank Trainer (no val set, no logger, no checkpoints); (wall, CPU) s per epoch."
    timer = EpochTimer()
    n_items = net.item_embedding.num_embeddings - 1
    model = SASRec(Catalog.from_frame(pd.DataFrame({"item_id": np.arange(n_items), "title": "", "genres": "",
                                                    "year": 2000})), params)
    model.net = net
    averaging = [WeightAverage(params["ema_decay"])] if params["ema_decay"] else []
    trainer = lightning_trainer({**trainer_cfg, "deterministic": False}, FitContext(callbacks=[timer]), epochs,
                                early_stopping=False, checkpoint_dir=None, root_dir=Path(torch.__file__).parent,
                                callbacks=averaging)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(validation_step|many workers).*")
        trainer.fit(FitModule(model, {"sampling_probs": sampling_probs}, None), loader)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "conf/model/sasrec.yaml"),
                        help="a model config YAML (its `params`) or a JSON object of params")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each plain then Lightning")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--split-dir", default=str(ROOT / "data/processed"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    given = (yaml.safe_load(Path(args.params).read_text())["params"] if Path(args.params).exists()
             else json.loads(args.params))
    params = {**DEFAULT_PARAMS, **given}
    trainer_cfg = yaml.safe_load((ROOT / "conf/trainer/cpu.yaml").read_text())
    histories, n_items, source = histories_and_items(Path(args.split_dir), seed=0)
    inputs, targets = training_windows(histories, params["max_len"])
    positions = int((targets != PAD).sum())
    item_counts = torch.as_tensor(Interactions(np.arange(len(histories)), histories).item_counts(n_items),
                                  dtype=torch.float32)
    sampling_probs = (item_counts + 1.0) / (item_counts + 1.0).sum()
    torch.manual_seed(0)
    initial = SASRecNet(n_items, **{k: params[k] for k in ("max_len", "hidden", "blocks", "heads", "dropout")})

    print(f"data: {source}; {len(inputs)} windows, {positions} next-item positions per epoch")
    print(f"params: {json.dumps(params, sort_keys=True)}; torch threads: {args.threads}")
    rates: dict[tuple[str, str], list[float]] = {}
    # round 0 is an untimed warm-up of both loops (allocator, thread pools, first-call kernel selection)
    for round_number in range(args.rounds + 1):
        for name in ("plain", "lightning"):
            torch.manual_seed(round_number)      # same shuffling for both loops within a round
            loader = DataLoader(range(len(inputs)), batch_size=params["batch_size"], shuffle=True,
                                collate_fn=WindowBatches(inputs, targets))
            net = copy.deepcopy(initial)
            epochs = 1 if round_number == 0 else args.epochs
            seconds = (plain_epochs(net, params, sampling_probs, loader, epochs) if name == "plain"
                       else lightning_epochs(net, params, sampling_probs, loader, epochs, trainer_cfg))
            if round_number == 0:
                continue
            for clock, per_epoch in zip(("wall", "CPU"), zip(*seconds)):
                rates.setdefault((name, clock), []).extend(positions / s for s in per_epoch)
            print(f"round {round_number} {name:9s}: samples per wall second "
                  + ", ".join(f"{positions / wall:,.0f}" for wall, _ in seconds)
                  + "; per CPU second " + ", ".join(f"{positions / cpu:,.0f}" for _, cpu in seconds))
    # wall time is what a user waits for; CPU time is the fairer comparison when other jobs share the machine
    for clock in ("wall", "CPU"):
        plain, lightning = (statistics.median(rates[name, clock]) for name in ("plain", "lightning"))
        print(f"median samples per {clock} second: plain {plain:,.0f}, lightning {lightning:,.0f}; "
              f"lightning / plain = {lightning / plain:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
