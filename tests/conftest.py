"""Shared fixtures: a throwaway copy of the project (its committed files) where DVC can run for real."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


BENTOML_HOME = tempfile.mkdtemp(prefix="reelrank-bentoml-")


def project_env() -> dict:
    "The environment stages run in: the project's venv first on PATH, no telemetry, a throwaway BentoML store."
    env = dict(os.environ)
    env["BENTOML_HOME"] = BENTOML_HOME
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(BENTOML_DO_NOT_TRACK="true", DVC_NO_ANALYTICS="true", MPLBACKEND="Agg", PYTHONHASHSEED="0")
    env.pop("DVC_EXP_NAME", None)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    "Run a command in `cwd`; on failure show its output."
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def copy_project(dest: Path) -> Path:
    "Copy the files git tracks (plus the working-tree versions of them) into `dest` and commit them there."
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=ci@reelrank.dev", "-c", "user.name=ci", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory) -> Path:
    "A project copy where `dvc exp run -S profile=smoke` has reproduced the whole pipeline."
    project = copy_project(tmp_path_factory.mktemp("smoke_project"))
    run(["dvc", "exp", "run", "-S", "profile=smoke"], project)
    return project


@pytest.fixture(scope="session")
def sample_project(tmp_path_factory) -> Path:
    "A folder with data/interim from the embedded sample (default profile) and its params.yaml."
    from reelrank.core import compose_config
    from reelrank.data import ingest, validate_stage

    project = tmp_path_factory.mktemp("sample_project")
    cfg = compose_config()
    ingest(cfg["data"], project / "data" / "raw")
    validate_stage(cfg["validate"], project / "data" / "raw", project / "data" / "interim",
                   project / "reports" / "validation.json")
    (project / "params.yaml").write_text(yaml.safe_dump({"split": cfg["split"]}))
    return project


# the hold-out fractions the adversarial frame is split with: 0.35 puts user 90 at a rounding edge
ADVERSARIAL_FRACTIONS = (0.1, 0.2, 0.35)


def adversarial_interactions() -> pd.DataFrame:
    """Interactions built to break a split: duplicates at the same second in shuffled file order, users below
    min_interactions (users 1-4), hold-out sizes at rounding edges."""
    users = [*range(1, 17), 90]  # 0.35 * 90 + 0.5 is just below 32 in double precision
    rows = [(user, item, 100 + item // 3, float(item % 4 + 1)) for user in users for item in range(user)]
    rows += [(user, item, 100 + item // 3, 0.5) for user in users for item in (0, user - 1)]  # same second again
    return (pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"]).astype({"rating": "float32"})
            .sample(frac=1, random_state=1, ignore_index=True))


def screenshot_pixels(png: Path) -> tuple[np.ndarray, float, int]:
    "A screenshot's RGB pixels, its share of non-white pixels and its number of distinct colours (8 levels each)."
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    not_white = (pixels < 245).any(axis=2).mean()
    colors = len(np.unique(pixels.reshape(-1, 3) // 8, axis=0))
    print(f"screenshot: {not_white:.1%} non-white pixels, {colors} distinct colours")
    return pixels, not_white, colors


def write_toy_split(processed: Path, n_users: int, n_items: int, per_user: int) -> None:
    "A split stage's output (train/val/test/items parquet) for `n_users` users with `per_user` random items each."
    from reelrank.core import write_parquet
    from reelrank.split import temporal_split

    rng = np.random.default_rng(0)
    rows = [(u, int(i), t) for u in range(n_users) for t, i in enumerate(rng.choice(n_items, per_user, replace=False))]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=np.float32(1))
    processed.mkdir(parents=True)
    for part, rows in temporal_split(frame).items():
        write_parquet(rows, processed / f"{part}.parquet")
    write_parquet(pd.DataFrame({"item_id": range(n_items), "title": "t", "genres": "Drama", "year": 2000}),
                  processed / "items.parquet")
