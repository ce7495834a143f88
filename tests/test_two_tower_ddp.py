"""A two-tower fit with Lightning's `ddp` strategy: two CPU processes (gloo) on tiny synthetic data.

The `ddp` strategy re-runs the launching command once per extra process, so the fits run in processes of their own
rather than inside pytest: a script (written to tmp_path) where each rank leaves a marker file so the test can tell
both took part, and the pipeline's own fit stage, whose outputs only rank 0 writes. Lightning's rank-zero INFO lines
are off (see notebook 04e), so a process taking part shows in its own "Initializing distributed" line."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import torch
import yaml
from conftest import project_env, write_toy_split

from reelrank.models.base import load_model

TRAINER = {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "strategy": "ddp", "precision": "32-true",
           "max_epochs": 1, "patience": 3, "deterministic": False}
SCRIPT = f"TRAINER = {TRAINER!r}\n" + textwrap.dedent('''
    import json
    import sys
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from reelrank.models.base import FitContext, save_model
    from reelrank.models.two_tower import TwoTower
    from reelrank.split import Catalog, HoldOut, Interactions

    out = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    catalog = Catalog.from_frame(pd.DataFrame({
        "item_id": np.arange(n_items) + 1, "title": "movie", "genres": ["Comedy", "Drama", "Comedy|Drama"] * 10,
        "year": rng.integers(1950, 2020, n_items)}))
    liked = [rng.permutation(n_items)[:10] for _ in range(n_users)]
    users = np.arange(n_users)
    train = Interactions(users, [items[:8] for items in liked])
    valid = HoldOut(train, [items[8:] for items in liked])
    trainer = TRAINER
    model = TwoTower(catalog, {"dim": 8, "hidden": 16, "batch_size": 8, "passes_per_epoch": 1}).fit(
        train, valid, FitContext(trainer=trainer, seed=0, checkpoint_dir=out / "checkpoints"))
    rank = 0 if model.is_global_zero else 1
    (out / f"rank{rank}.json").write_text(json.dumps(model.describe(), default=str))
    if model.is_global_zero:
        save_model(model, out / "model")
''')


def test_two_tower_ddp_fit_saves_on_rank_zero_only(tmp_path):
    script = tmp_path / "fit_ddp.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], check=False, cwd=tmp_path, env=project_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    # run() returns once every holder of the output pipes closed them: rank 1, which inherits them, is done too
    summaries = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("rank0", "rank1")}
    assert summaries["rank0"]["epochs_trained"] == summaries["rank1"]["epochs_trained"] == 1
    assert summaries["rank0"]["best_val_ndcg@10"] == summaries["rank1"]["best_val_ndcg@10"]
    assert not list((tmp_path / "checkpoints").rglob("*.ckpt"))   # a finished fit deletes its checkpoint
    assert not (tmp_path / "lightning_logs").exists()

    model = load_model(tmp_path / "model")
    scores = model.score([np.array([0, 3, 5]), np.array([], dtype=np.int64)])
    assert scores.shape == (2, 30) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_ddp_fit_stage_writes_its_outputs_once(tmp_path):
    "`python -m reelrank.train fit two_tower` under the ddp trainer: both ranks train, rank 0 alone writes."
    write_toy_split(tmp_path / "data" / "processed", n_users=40, n_items=30, per_user=12)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "seeds": [0], "trainer": TRAINER, "eval": {"cutoffs": [10], "save_k": 20, "batch_size": 16},
        "models": {"two_tower": {"family": "two_tower", "grid": {},
                                 "params": {"dim": 8, "hidden": 16, "batch_size": 8, "passes_per_epoch": 1}}}}))
    proc = subprocess.run([sys.executable, "-m", "reelrank.train", "fit", "two_tower"], check=False, cwd=tmp_path,
                          env=project_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert output.count("two_tower: wrote models/two_tower and reports/training/two_tower") == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["two_tower"]
    assert sorted(p.name for p in (tmp_path / "reports" / "training").iterdir()) == ["two_tower"]
    report = json.loads((tmp_path / "reports" / "training" / "two_tower" / "fit.json").read_text())
    assert report["family"] == "two_tower" and len(report["per_seed"][0]["candidates"]) == 1
    scores = load_model(tmp_path / "models" / "two_tower").score([np.array([0, 3, 5])])
    assert scores.shape == (1, 30) and torch.isfinite(scores).all()
