"""Scoring a saved deep model needs no Lightning: the bento does not install it (bentofile.yaml).

A tiny two-tower and SASRec model, each fitted for one epoch on synthetic histories, is saved; a fresh Python process
loads each directory with `load_model`, scores two histories and reports which modules it imported."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import project_env

from reelrank.models.base import FitContext, build_model, save_model
from reelrank.split import Catalog, Interactions

SMALL = {"two_tower": {"dim": 8, "hidden": 16, "batch_size": 8, "passes_per_epoch": 1},
         "sasrec": {"max_len": 8, "hidden": 8, "batch_size": 8, "n_negatives": 8}}
SCORE = """
import json, sys
import numpy as np
from reelrank.models.base import load_model

scores = load_model(sys.argv[1]).score([np.array([1, 2, 3]), np.array([], dtype=np.int64)])
print(json.dumps({"shape": list(scores.shape), "lightning": sorted(m for m in sys.modules if "lightning" in m)}))
"""


@pytest.mark.parametrize("family", sorted(SMALL))
def test_a_saved_deep_model_scores_without_lightning(family, tmp_path):
    rng = np.random.default_rng(0)
    catalog = Catalog.from_frame(pd.DataFrame({"item_id": np.arange(20) + 1, "title": "movie", "genres": "Drama",
                                               "year": 2000}))
    train = Interactions(np.arange(12), [rng.permutation(20)[:6] for _ in range(12)])
    trainer = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "num_threads": 1}
    save_model(build_model(family, catalog, SMALL[family]).fit(train, None, FitContext(trainer, seed=0)), tmp_path)
    proc = subprocess.run([sys.executable, "-c", SCORE, str(tmp_path)], check=False, env=project_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"shape": [2, 20], "lightning": []}
