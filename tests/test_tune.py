"""`reelrank tune` on a throwaway project (this repo's conf/ and a synthetic split of 60 users): a sweep writes the
tuned config and summaries; a sweep interrupted by Ctrl-C and then killed mid-trial resumes to exactly n_trials;
two workers share one study on a real PostgreSQL server; bad input is one `error:` line and exit status 1.

Toy models make the behaviour under test certain: `slow` (popularity whose fit sleeps, so a signal lands inside a
trial and both workers get trials) and `curve` (a Lightning fit whose val NDCG@10 curve is set by its parameter, so
the pruner has something to prune). They live in a module written into the project and are registered in
MODEL_REGISTRY by the test or by the worker's launcher."""
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import ROOT, project_env, write_toy_split

from reelrank.cli import main
from reelrank.core import compose_config
from reelrank.models.base import MODEL_REGISTRY
from reelrank.tune import open_storage

TOY_MODELS = '''
import time
from pathlib import Path

import lightning as L
import torch

from reelrank.models.popularity import Popularity


class Slow(Popularity):
    "Popularity whose fit marks its start in FIT_STARTED and sleeps `seconds`: signals land inside a trial's fit."
    family = "slow"

    def fit(self, data, valid=None, context=None):
        Path("FIT_STARTED").touch()
        time.sleep(self.params["seconds"])
        return super().fit(data, valid, context)


class Curve(Popularity):
    "Popularity behind a 4-epoch Lightning fit that logs val/ndcg@10 = level * (epoch + 1) through the context's callbacks."
    family = "curve"

    def fit(self, data, valid=None, context=None):
        level = self.params["level"]

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def training_step(self, batch, index):
                return (self.w * batch[0]).sum()

            def validation_step(self, batch, index):
                pass

            def on_validation_epoch_end(self):
                self.log("val/ndcg@10", level * (self.current_epoch + 1))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=4)
        L.Trainer(max_epochs=4, callbacks=context.callbacks, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(
            Module(), loader, loader)
        return super().fit(data, valid, context)
'''
SLOW = ["model=slow", "+model@models.slow=slow"]
SETUP_HINT = "run `make system-deps` (installs Debian's postgresql package)"


@pytest.fixture
def project(tmp_path) -> Path:
    "conf/ of this repo plus the `slow` model and its sweep, dvc.yaml, and a synthetic split in data/processed."
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "toy_models.py").write_text(TOY_MODELS)
    (tmp_path / "conf" / "model" / "slow.yaml").write_text("family: slow\nparams: {seconds: 1.5, x: 0.5}\ngrid: {}\n")
    (tmp_path / "conf" / "sweep" / "slow.yaml").write_text(
        "defaults: [_common, _self_]\nstudy_name: slow\nparams:\n  x: {type: float, low: 0.0, high: 1.0}\n")
    (tmp_path / "conf" / "model" / "curve.yaml").write_text("family: curve\nparams: {level: 0.5}\ngrid: {}\n")
    (tmp_path / "conf" / "sweep" / "curve.yaml").write_text(
        "defaults: [_common, _self_]\nstudy_name: curve\npruner: {n_startup_trials: 1, n_warmup_steps: 0}\n"
        "params:\n  level: {type: float, low: 0.0, high: 0.2}\n")
    write_toy_split(tmp_path / "data" / "processed", n_users=60, n_items=80, per_user=20)
    return tmp_path


def reelrank(project: Path, *args: str) -> subprocess.Popen:
    "Start `reelrank ARGS` in `project` with the slow model registered."
    env = {**project_env(), "PYTHONPATH": str(project)}
    # a shell's background job starts with SIGINT ignored and Python keeps it ignored: restore Ctrl-C's handler
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from reelrank.models.base import MODEL_REGISTRY; MODEL_REGISTRY['slow'] = 'toy_models:Slow'; "
            "import reelrank.cli; reelrank.cli.main()")
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, expect: int = 0, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{out[-3000:]}\n{err[-3000:]}"
    return out + err


@functools.cache
def storage(url: str) -> optuna.storages.RDBStorage:
    "The storage at `url`, opened as the workers open it."
    return open_storage(url, ROOT)[0]


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage(url))


def wait_for_running_trial(url: str, name: str, proc: subprocess.Popen, after: int = -1,
                           timeout: float = 90) -> optuna.trial.FrozenTrial:
    "The first trial numbered above `after` that a live worker is running (and has tagged with its pid)."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker exited early: {proc.communicate()}"
        try:
            running = load(url, name).get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:  # the worker has not created the study yet
            running = []
        tagged = [t for t in running if t.number > after and t.user_attrs.get("worker")]
        if tagged:
            return tagged[0]
        time.sleep(0.1)
    raise AssertionError("no trial started in time")


def wait_for_fit(project: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    "Wait until the worker's slow model is inside its fit (past composing the trial's config), then clear the mark."
    mark = project / "FIT_STARTED"
    deadline = time.monotonic() + timeout
    while not mark.exists():
        assert proc.poll() is None, f"worker exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no fit started in time"
        time.sleep(0.05)
    mark.unlink()


def states(url: str, name: str) -> dict[str, int]:
    trials = load(url, name).get_trials()
    return {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}


def test_sweep_writes_tuned_config_and_summaries(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    main(["tune", "model=ease", "sweep.n_trials=4"])
    assert "reproduce with: dvc exp run -S model@models.ease=ease_tuned" in capsys.readouterr().out
    summary = yaml.safe_load((project / "reports" / "tuning" / "ease" / "summary.json").read_text())
    assert summary["n_trials"] == {"complete": 4, "pruned": 0, "fail": 0, "running": 0}
    assert set(summary["importances"]) == {"l2"} and summary["best"]["fit_seconds"] > 0
    trials = pd.read_csv(project / "reports" / "tuning" / "ease" / "trials.csv")  # Optuna's trials_dataframe()
    assert {"number", "state", "value", "params_l2", "user_attrs_fit_seconds", "user_attrs_val_ndcg@10",
            "user_attrs_val_recall@20"} <= set(trials.columns)
    assert trials["value"].max() == summary["best"]["value"] == summary["best"]["val_ndcg@10"]
    for plot in ("history.png", "importances.png", "slice.png"):
        assert (project / "reports" / "tuning" / "ease" / plot).stat().st_size > 0
    tuned = compose_config(["model@models.ease=ease_tuned"], project / "conf")["models"]["ease"]
    assert tuned == {"family": "ease", "params": {"max_items": None, **summary["best"]["params"]}, "grid": {}}
    assert "GENERATED by `reelrank tune model=ease`" in (project / "conf" / "model" / "ease_tuned.yaml").read_text()


def test_deep_models_report_every_epoch_to_the_pruner(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.setitem(MODEL_REGISTRY, "curve", "toy_models:Curve")
    main(["tune", "model=curve", "+model@models.curve=curve", "sweep.n_trials=6"])
    trials = load(f"sqlite:///{project}/reports/tuning/optuna.db", "curve").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert len(complete) + len(pruned) == 6 and pruned, "a trial below the first one's curve should be pruned"
    for t in complete:
        level = t.params["level"]
        assert t.intermediate_values == pytest.approx({e: level * (e + 1) for e in range(4)})
    assert all(len(t.intermediate_values) < 4 for t in pruned)


def test_rerun_after_ctrl_c_and_kill_resumes_the_study(project):
    url = f"sqlite:///{project}/reports/tuning/optuna.db"
    command = ["tune", *SLOW, "sweep.n_trials=4"]
    worker = reelrank(project, *command)
    interrupted = wait_for_running_trial(url, "slow", worker)
    wait_for_fit(project, worker)
    worker.send_signal(signal.SIGINT)
    assert "rerun the same command to resume" in finish(worker, expect=130)
    assert load(url, "slow").trials[interrupted.number].state.name == "FAIL"

    worker = reelrank(project, *command)
    killed = wait_for_running_trial(url, "slow", worker, after=interrupted.number)
    wait_for_fit(project, worker)
    worker.kill()
    worker.wait()
    assert load(url, "slow").trials[killed.number].state.name == "RUNNING"  # the kill landed mid-trial

    finish(reelrank(project, *command))
    assert states(url, "slow") == {"COMPLETE": 4, "PRUNED": 0, "FAIL": 2, "RUNNING": 0}
    assert load(url, "slow").trials[killed.number].state.name == "FAIL"
    assert yaml.safe_load((project / "conf" / "model" / "slow_tuned.yaml").read_text())["params"]["seconds"] == 1.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_url():
    "A PostgreSQL server on 127.0.0.1 in a temporary directory, run as user postgres, stopped by PID afterwards."
    found = sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl under /usr/lib/postgresql/*/bin) are missing: "
                    f"{SETUP_HINT}")
    bin_dir = Path(found[-1]).parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="reelrank-pg-"))  # not under pytest's tmp_path, which postgres cannot enter
    (base / "sockets").mkdir()
    for path in (base, base / "sockets"):
        if as_postgres:
            shutil.chown(path, "postgres", "postgres")
    data, port, pid = base / "data", _free_port(), None
    try:
        for cmd in ([bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"],
                    [bin_dir / "pg_ctl", "-D", data, "-l", base / "server.log", "-w", "-t", "60", "-o",
                     f"-c listen_addresses=127.0.0.1 -p {port} -k {base / 'sockets'} -c fsync=off", "start"]):
            proc = subprocess.run([*as_postgres, *map(str, cmd)], capture_output=True, text=True, timeout=120,
                                  check=False)
            assert proc.returncode == 0, f"{cmd[0].name} failed: {proc.stdout}{proc.stderr}"
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown; it removes postmaster.pid when done
            deadline = time.monotonic() + 60
            while (data / "postmaster.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not (data / "postmaster.pid").exists(), "PostgreSQL did not stop"
        shutil.rmtree(base)


def test_workers_share_one_study_on_postgresql(project, postgres_url):
    command = ["tune", *SLOW, "sweep.n_trials=6", f"sweep.storage={postgres_url}"]
    workers = [reelrank(project, *command) for _ in range(2)]
    for worker in workers:
        finish(worker)
    counts = states(postgres_url, "slow")
    # MaxTrialsCallback counts the shared study's complete, pruned and running trials after each trial, so only two
    # workers deciding in the same instant can both start the last one
    assert counts["COMPLETE"] in (6, 7) and counts["FAIL"] == counts["RUNNING"] == 0
    finished = load(postgres_url, "slow").get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len({t.user_attrs["worker"] for t in finished}) == 2, "both workers should have run trials"


def tune_error(capsys, *args: str) -> str:
    "Run `reelrank tune ARGS` in this process: it must exit 1 with one `error: ...` line, which is returned."
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: "), err
    return err


def test_unknown_search_space_key_is_an_error(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    err = tune_error(capsys, "model=ease", "+sweep.params.lambda={type:float,low:1,high:2}")
    assert "search-space keys ['lambda']" in err and "known: ['l2', 'max_items']" in err


def test_unreachable_storage_fails_fast_naming_the_url(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    url = f"postgresql://reelrank:secret@127.0.0.1:{_free_port()}/optuna"
    started = time.monotonic()
    err = tune_error(capsys, "model=ease", f"sweep.storage={url}", "sweep.connect_timeout=3")
    assert time.monotonic() - started < 15
    assert "cannot open study storage" in err and url.replace("secret", "***") in err and "secret" not in err
    assert "Connection refused" in err


def test_study_name_clash_with_another_search_space_is_an_error(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    main(["tune", "model=ease", "sweep.n_trials=1"])
    capsys.readouterr()
    err = tune_error(capsys, "model=ease", "sweep.n_trials=2", "sweep.params.l2.high=100.0")
    assert "study 'ease'" in err and "search_space" in err and "sweep.study_name" in err
