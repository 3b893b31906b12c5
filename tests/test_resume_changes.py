"""`vit-search train --resume` under train values that shape the optimizer other than the checkpoint's run:
refused in one line before anything is written or the MLflow run touched; the same values resume."""

from __future__ import annotations

import os
import signal
import sys

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import stopped_at_first_checkpoint
from test_train import TINY, write_yaml

# Layer decay and a frozen block: the optimizer has a pair of groups per layer, less the frozen block's.
SHAPED = {**TINY["train"], "layer_decay": 0.6, "freeze": ["blocks.0.*"]}


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    """A fresh working directory with MLflow pointed at the session's sqlite store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def _run_state(experiment: str) -> tuple:
    """What a refusal must leave as it was: the experiment's one run, its status, end, params and metrics."""
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return run.info.run_id, run.info.status, run.info.end_time, run.data.params, run.data.metrics


def _refused_in_one_line(result, said: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout.strip() == ""


def test_resume_with_other_freeze_layer_decay_lr_weight_decay_or_betas_is_refused_and_the_killed_run_stays_killed(
        workdir, sqlite_uri, cli_here):
    experiment = "resume-changes-killed"
    spec_path = write_yaml(workdir / "shaped.yaml", {**TINY, "tracking": {"experiment": experiment},
                                                     "train": {**SHAPED, "epochs": 200}})
    checkpoint = workdir / "runs" / "tiny" / "checkpoint.pt"
    # As a scheduler stops a job: the run ends KILLED
    stopped = stopped_at_first_checkpoint([sys.executable, "-m", "vit_search", "train", str(spec_path)], checkpoint,
                                          signal.SIGTERM, workdir, {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    before = _run_state(experiment)
    assert before[1] == "KILLED"
    saved = checkpoint.read_bytes()
    files = sorted(workdir.rglob("*"))

    env = {"MLFLOW_TRACKING_URI": sqlite_uri}
    cases = [
        # (a) the group count differs (blocks.0's pair comes back): once said as weights that do not fit, run FAILED
        ("train.freeze=[]", "--resume: train.freeze [] differs from the checkpoint's run in "
                            f"{checkpoint.relative_to(workdir)} (['blocks.0.*']); resume with the run's values, "
                            "or start afresh without --resume"),
        # (b) the same count: once loaded blocks.0's moments onto blocks.1 without a word
        ("train.freeze=[blocks.1.*]", "train.freeze ['blocks.1.*'] differs from the checkpoint's run"),
        # (c) the same groups at other rates: once kept the checkpoint's rates without a word
        ("train.layer_decay=0.5", "train.layer_decay 0.5 differs from the checkpoint's run"),
        ("train.layer_decay=null", "train.layer_decay None differs from the checkpoint's run"),
        # Each saved group carries these, and loading it would put the checkpoint's back over the spec's.
        ("train.lr=0.001", "train.lr 0.001 differs from the checkpoint's run"),
        ("train.weight_decay=0.1", "train.weight_decay 0.1 differs from the checkpoint's run"),
        ("train.betas=[0.8, 0.99]", "train.betas [0.8, 0.99] differs from the checkpoint's run"),
    ]
    for override, said in cases:
        result = cli_here("train", spec_path, "--resume", f"--set={override}", cwd=workdir, env=env)
        _refused_in_one_line(result, said)
        assert _run_state(experiment) == before, override  # still KILLED, nothing logged
        assert checkpoint.read_bytes() == saved and sorted(workdir.rglob("*")) == files, override

    # The run's own values resume it, extended by --set train.epochs as ever, in the same MLflow run.
    last = torch.load(checkpoint, weights_only=True)["epoch"]
    resumed = cli_here("train", spec_path, "--resume", f"--set=train.epochs={last + 2}", cwd=workdir, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run_id, status, *_ = _run_state(experiment)
    assert run_id == before[0] and status == "FINISHED"
    steps = sorted({m.step for m in MlflowClient().get_metric_history(run_id, "val_accuracy")})
    assert steps == list(range(last + 2))


def test_resume_with_another_freeze_is_refused_and_a_finished_run_stays_finished(workdir, sqlite_uri, cli_here):
    experiment = "resume-changes-finished"
    spec_path = write_yaml(workdir / "shaped.yaml", {**TINY, "tracking": {"experiment": experiment},
                                                     "train": {**SHAPED, "epochs": 1}})
    env = {"MLFLOW_TRACKING_URI": sqlite_uri}
    assert cli_here("train", spec_path, cwd=workdir, env=env).returncode == 0
    before = _run_state(experiment)
    assert before[1] == "FINISHED"
    checkpoint = workdir / "runs" / "tiny" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["train_settings"] == {
        "freeze": ["blocks.0.*"], "layer_decay": 0.6, "lr": 3.0e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]}
    result = cli_here("train", spec_path, "--resume", "--set=train.freeze=[blocks.1.*]", "--set=train.epochs=2",
                      cwd=workdir, env=env)
    _refused_in_one_line(result, "train.freeze ['blocks.1.*'] differs from the checkpoint's run")
    assert _run_state(experiment) == before
    # Trained on two processes (accelerate launch): resumed on one, its schedule's saved step would fall elsewhere.
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["num_processes"] == 1
    torch.save({**saved, "num_processes": 2}, checkpoint)
    result = cli_here("train", spec_path, "--resume", "--set=train.epochs=2", cwd=workdir, env=env)
    _refused_in_one_line(result, "--resume: 1 process now, but 2 trained the checkpoint's run in ")
    assert "accelerate launch --num_processes 2" in result.stderr
    torch.save(saved, checkpoint)
    assert _run_state(experiment) == before
    # Another model: refused as well, before the run is reopened (it was ended FAILED, with an error tag that stayed)
    result = cli_here("train", spec_path, "--resume", "--set=model.dim=48", "--set=train.epochs=2", cwd=workdir, env=env)
    _refused_in_one_line(result, "checkpoint.pt: its weights do not fit this spec's model (")
    assert _run_state(experiment) == before
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert "error" not in run.data.tags
    # The same spec again: the run is done, so its result is read back and nothing is evaluated or logged twice.
    models = MlflowClient().list_artifacts(run.info.run_id, "model")
    result = cli_here("train", spec_path, "--resume", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "had finished (1 of 1 epochs, tested); nothing was trained or logged" in result.stderr
    assert f"test_accuracy {run.data.metrics['test_accuracy']:.4f}" in result.stdout
    assert _run_state(experiment) == before
    assert len(MlflowClient().get_metric_history(run.info.run_id, "test_accuracy")) == 1
    assert MlflowClient().list_artifacts(run.info.run_id, "model") == models


def test_a_checkpoint_from_before_the_record_still_resumes_and_an_optimizer_that_does_not_load_is_said_as_such(
        workdir, sqlite_uri, cli_here):
    experiment = "resume-changes-old-checkpoint"
    spec_path = write_yaml(workdir / "shaped.yaml", {**TINY, "tracking": {"experiment": experiment},
                                                     "train": {**SHAPED, "epochs": 1}})
    env = {"MLFLOW_TRACKING_URI": sqlite_uri}
    assert cli_here("train", spec_path, cwd=workdir, env=env).returncode == 0
    checkpoint = workdir / "runs" / "tiny" / "checkpoint.pt"
    old = torch.load(checkpoint, weights_only=True)
    del old["train_settings"]  # as checkpoints were written before they recorded their train values
    torch.save(old, checkpoint)

    # Nothing recorded to compare: the optimizer's own load finds the other groups, and says it of the optimizer.
    result = cli_here("train", spec_path, "--resume", "--set=train.freeze=[]", "--set=train.epochs=2",
                      cwd=workdir, env=env)
    _refused_in_one_line(result, f"{checkpoint.relative_to(workdir)}: its optimizer state does not fit this spec's "
                                 "training (loaded state dict has a different number of parameter groups)")
    assert "weights do not fit" not in result.stderr

    # The same values resume it, and extend it.
    resumed = cli_here("train", spec_path, "--resume", "--set=train.epochs=2", cwd=workdir, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert run.info.status == "FINISHED"
    assert sorted({m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")}) == [0, 1]


def test_resume_without_a_checkpoint_says_it_starts_afresh(workdir, sqlite_uri, cli_here):
    # Stopped before its first epoch ended (or a mistyped --checkpoint-dir): it began a new run without a word.
    spec_path = write_yaml(workdir / "fresh.yaml", {**TINY, "tracking": {"experiment": "resume-nothing"},
                                                    "train": {**TINY["train"], "epochs": 1}})
    result = cli_here("train", spec_path, "--resume", "--checkpoint-dir", workdir / "typo", cwd=workdir,
                      env={"MLFLOW_TRACKING_URI": sqlite_uri})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"vit-search: --resume: no checkpoint at {workdir / 'typo' / 'checkpoint.pt'}; training from the first "
            f"epoch, as a new MLflow run") in result.stderr
