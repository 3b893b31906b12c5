"""A supernet study killed (SIGKILL) and resumed by re-running the same ``vit-search run`` command:
phase 1 continues from its last epoch checkpoint, phase 2 retries the killed worker's subnet; real
subprocesses, sqlite and MLflow."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import torch
import yaml
from mlflow.tracking import MlflowClient
from conftest import trials_watch
from optuna.trial import TrialState

from vit_search.search.study import PARENT_RUN, RETRIED
from vit_search.search.supernet import LOGGED, OWNER, TRAINED

SPEC = {
    "seed": 0,
    "data": {"dataset": "digits", "image_size": 8},
    "model": {"dim": 16, "depth": 2, "patch_embed": {"type": "conv", "patch_size": 2},
              "attention": {"type": "sdpa", "heads": 2}, "ffn": {"type": "mlp", "ratio": 2}},
    "train": {"epochs": 1, "batch_size": 64, "lr": 3.0e-3, "warmup_epochs": 0.5},
    "search": {"strategy": "supernet", "sampler": "random", "pruner": "none",
               "supernet": {"n_subnets": 6, "finalists": 1, "random_subnets": 1, "top_runs": 1},
               "space": {"model.depth": {"int": [1, 2]}, "model.dim": {"choice": [8, 16]},
                         "model.layers.0.ffn.ratio": {"choice": [1, 2]},
                         "model.layers.1.ffn.ratio": {"choice": [1, 2]},
                         "model.layers.0.attention.heads": {"choice": [1, 2]},
                         "model.layers.1.attention.heads": {"choice": [1, 2]}}},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def write(workdir: Path, name: str, **supernet) -> tuple[Path, str]:
    """The spec file of study ``name`` and its storage URL."""
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    raw = {**SPEC, "name": name, "tracking": {"experiment": name, "plots": False},
           "search": {**SPEC["search"], "storage": storage, "supernet": {**SPEC["search"]["supernet"], **supernet}}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, storage


def start(spec_path: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec_path)], cwd=cwd, env=os.environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=500)
    assert proc.returncode == 0, err[-3000:]


def stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP delivered): its state can no longer change under the test."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "T"


def holds(ready) -> bool:
    """``ready()``, False while the database is locked (a worker frozen inside a commit)."""
    try:
        return ready()
    except sqlalchemy.exc.OperationalError:
        return False


def freeze_when(proc: subprocess.Popen, ready, deadline_s: float = 300) -> None:
    """Poll until ``ready()``, then SIGSTOP the worker and check ``ready()`` again on the frozen state
    (it may have moved on between the two); go on polling until it holds while frozen."""
    deadline = time.monotonic() + deadline_s
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the state to kill in never came"
        if holds(ready):
            proc.send_signal(signal.SIGSTOP)
            while not stopped(proc.pid):
                time.sleep(0.01)
            if holds(ready):
                return
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.1)


def study_attrs(url: str, name: str) -> dict:
    """The study's system attributes ({} before it exists)."""
    storage = optuna.storages.RDBStorage(url)
    try:
        return storage.get_study_system_attrs(storage.get_study_id_from_name(name))
    except KeyError:
        return {}
    finally:
        storage.remove_session()


@pytest.mark.slow
def test_a_supernet_killed_in_phase_1_resumes_from_its_last_epoch_checkpoint(workdir, cli_here):
    # Enough epochs that the kill lands between the first checkpoint and the end of training.
    path, storage = write(workdir, "killed1", epochs=6)
    checkpoint = workdir / "runs" / "killed1" / "supernet" / "checkpoint.pt"
    proc = start(path, workdir)

    def one_epoch_saved() -> bool:
        return (checkpoint.exists() and TRAINED not in study_attrs(storage, "killed1")
                and torch.load(checkpoint, weights_only=False)["epoch"] < 5)

    freeze_when(proc, one_epoch_saved)
    saved = torch.load(checkpoint, weights_only=False)["epoch"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # Another spec cannot go on with this supernet: the way out is said for `run`, which has no --resume.
    space = "search.space={model.depth: {int: [1, 2]}, model.dim: {choice: [8, 24]}}"
    for override, says in [("train.lr=0.002", "train.lr 0.002 differs from the checkpoint's run"),
                           (space, "its weights do not fit this spec's model (blocks.0.")]:
        result = cli_here("run", path, "--set", override)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: the study's supernet, stopped in phase 1, cannot go on under this spec: ")
        assert says in result.stderr and "--resume" not in result.stderr
        assert "give the study a new search.study_name (or delete " in result.stderr
    finish(start(path, workdir))  # the same command resumes the study
    attrs = study_attrs(storage, "killed1")
    assert attrs[TRAINED] == str(checkpoint.resolve())
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 5
    client = MlflowClient()
    parent = client.get_run(attrs[PARENT_RUN])
    assert parent.info.status == "FINISHED"
    # The parent run's curves continue: one value per epoch, none logged twice (a restart would
    # log epochs 0..saved again).
    steps = [m.step for m in client.get_metric_history(parent.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(6)), (saved, steps)
    scored = optuna.load_study(study_name="killed1:subnets", storage=storage).get_trials()
    assert sum(t.state != TrialState.FAIL for t in scored) == 6


@pytest.mark.slow
def test_a_worker_killed_in_phase_2_has_its_subnet_retried_and_nothing_lost_or_scored_twice(workdir):
    path, storage = write(workdir, "killed2", n_subnets=40)
    subnets = "killed2:subnets"
    proc = start(path, workdir)
    watched = trials_watch(subnets, storage)

    def scoring() -> bool:
        trials = watched()
        return (any(t.state == TrialState.COMPLETE for t in trials)
                and any(t.state == TrialState.RUNNING for t in trials) and len(trials) < 35)

    freeze_when(proc, scoring)
    (killed,) = [t for t in optuna.load_study(study_name=subnets, storage=storage).get_trials()
                 if t.state == TrialState.RUNNING]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    finish(start(path, workdir))
    trials = optuna.load_study(study_name=subnets, storage=storage).get_trials()
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL and dead.system_attrs[RETRIED]
    assert dead.user_attrs["error"].startswith("worker died")
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    # The worker may have been frozen mid-draw: the retry keeps every value the dead trial had drawn.
    assert retry.state == TrialState.COMPLETE and dead.params.items() <= retry.params.items()
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed.number]
    assert len(trials) == 41 and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]

    # MLflow agrees with Optuna: the table holds each scored subnet once, the killed one's retry included.
    client = MlflowClient()
    parent_id = study_attrs(storage, "killed2")[PARENT_RUN]
    table = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(parent_id, "subnets.csv")).read_text())))
    complete = sorted(t.number for t in trials if t.state == TrialState.COMPLETE)
    assert study_attrs(storage, subnets)[LOGGED] == len(complete)  # the scores it logged: all of them
    assert sorted(int(row["trial"]) for row in table) == complete and killed.number not in complete
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["subnets_scored"] == len(complete)
    runs = client.search_runs([parent.info.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_two_workers_on_one_supernet_study_train_it_once_and_share_the_scores_and_finalists(workdir):
    path, storage = write(workdir, "shared", epochs=2, n_subnets=24, finalists=2)
    proc = subprocess.run([sys.executable, "-m", "vit_search", "run", str(path), "--jobs", "2", "--quiet"], cwd=workdir,
                          env=os.environ, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What phase 2 found, said once by the command (its workers leave it to it), --quiet or not
    assert proc.stdout.count("subnets: 24 scored in study 'shared:subnets', best inherited val_accuracy") == 1, proc.stdout
    attrs = study_attrs(storage, "shared")
    assert attrs[TRAINED] == str((workdir / "runs" / "shared" / "supernet" / "checkpoint.pt").resolve())
    assert attrs[OWNER]  # one worker owned phase 1; the other waited for it
    client = MlflowClient()
    parent = client.get_run(attrs[PARENT_RUN])
    assert parent.info.status == "FINISHED"
    # Trained once: one value per epoch in the parent run's curve (a second training would log each again).
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "train_loss")) == [0, 1]

    scored = optuna.load_study(study_name="shared:subnets", storage=storage).get_trials()
    assert len(scored) == 24 and all(t.state == TrialState.COMPLETE for t in scored), \
        [(t.number, t.state, t.user_attrs.get("error")) for t in scored]
    points = [tuple(sorted(t.params.items())) for t in scored]
    assert len(set(points)) == len(points)  # the two workers drew no subnet twice
    finalists = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert [t.state for t in finalists] == [TrialState.COMPLETE] * 2
    table = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(parent.info.run_id, "subnets.csv"))
                                            .read_text())))
    assert sorted(int(row["trial"]) for row in table) == list(range(24))
    runs = client.search_runs([parent.info.experiment_id])
    assert not [r for r in runs if r.info.status != "FINISHED"]


def test_a_supernet_study_under_jobs_with_packed_trials_is_refused_once_before_the_stores_are_made(workdir):
    path, storage = write(workdir, "packed")
    proc = subprocess.run([sys.executable, "-m", "vit_search", "run", str(path), "--jobs", "2", "--trials-per-gpu", "2"],
                          cwd=workdir, env=os.environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --trials-per-gpu: a supernet study trains one model at a time in each "
                                        "worker; drop it"]
    assert not (workdir / "optuna.db").exists()


@pytest.mark.parametrize("signum, code, how, then", [
    (signal.SIGINT, 130, "Ctrl-C", "(Ctrl-C again to stop at once)"),
    (signal.SIGTERM, 143, "SIGTERM", "(SIGKILL to stop at once)")], ids=["ctrl-c", "sigterm"])
def test_a_stop_in_phase_1_says_what_stops_and_how_to_go_on(workdir, signum, code, how, then):
    path, storage = write(workdir, "stopped1", epochs=500)
    checkpoint = workdir / "runs" / "stopped1" / "supernet" / "checkpoint.pt"
    proc = start(path, workdir)
    deadline = time.monotonic() + 300
    while not checkpoint.exists():  # phase 1 trains, epoch after epoch
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-2:] == [
        f"stopping ({how}): the supernet, a subnet being scored or a finalist in training ends after its current step "
        f"{then}",
        "interrupted; run the same command to go on" if signum == signal.SIGINT else
        "terminated (SIGTERM); run the same command to go on"], err[-3000:]
