"""Train/serve parity: the served ranking is the offline evaluation's ranking. The model the `evaluate` stage scored
(models/<name>, fit on train + val) is packaged with train + val as its known histories and served over real
HTTP; every test user's top-100 from the service must equal reports/recommendations/<name>.parquet, the lists the
published test metrics were computed from."""
import json
import shutil

import httpx
import numpy as np
import pandas as pd
import yaml
from bento_server import package, serving
from conftest import ROOT, project_env

from reelrank.core import write_parquet
from reelrank.split import SplitData


def evaluated_model_as_served(project, name, work):
    "models/<name> with the files a packaged model needs: the histories evaluate ranked with, and the run's card."
    model_dir = work / "model"
    shutil.copytree(project / "models" / name, model_dir)
    fitting = SplitData.load(project / "data" / "processed").fitting_frame(["train", "val"])
    write_parquet(fitting[["user_id", "item_id", "timestamp"]], model_dir / "interactions.parquet")
    card = json.loads((project / "models" / "selected" / "card.json").read_text())
    family = json.loads((model_dir / "model.json").read_text())["family"]
    (model_dir / "card.json").write_text(json.dumps({**card, "model": name, "family": family}))
    return model_dir


def test_served_top_k_equals_the_evaluated_top_k(smoke_project, tmp_path):
    selected = json.loads((smoke_project / "models" / "selected" / "card.json").read_text())["model"]
    # the selected model, and SASRec: the sequence model, whose answer depends on the order of a history
    for name in sorted({selected, "sasrec"}):
        work = tmp_path / name
        # served open (the explicit switch): this test checks rankings, tests/test_service.py checks authentication
        env = {**project_env(), "BENTOML_HOME": str(work / "bentoml"), "REELRANK_AUTH": "off"}
        env.pop("REELRANK_API_TOKEN", None)
        serve = {**yaml.safe_load((ROOT / "conf" / "serve" / "default.yaml").read_text()), "workers": 1}
        summary = package(evaluated_model_as_served(smoke_project, name, work), serve, work, env)
        offline = pd.read_parquet(smoke_project / "reports" / "recommendations" / f"{name}.parquet")
        users = sorted(offline.user_id.unique().tolist())
        requests = [{"user_id": user, "k": int(offline["rank"].max())} for user in users]
        with serving(summary["bento"], work, env) as (url, _):
            answers = httpx.post(f"{url}/recommend_batch", json={"requests": requests}, timeout=120).json()
        assert len(answers) == len(users) > 0
        for user, answer in zip(users, answers):
            expected = offline[offline.user_id == user].sort_values("rank")
            assert answer["fallback"] is None
            assert [item["movie_id"] for item in answer["items"]] == expected.item_id.tolist(), f"{name} user {user}"
            np.testing.assert_allclose([item["score"] for item in answer["items"]], expected.score,
                                       rtol=1e-5, atol=1e-6)
