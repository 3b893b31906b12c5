"""`vit-search train --resume` under train values that shape the optimizer other than the checkpoint's run:
refused in one line before anything is written or the MLflow run touched; the same values resume."""

from __future__ import annotations

import os
import signal
import sys

import mlflow
import pytest
import torch
import yaml
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
    for recorded in ("train_settings", "spec", "tracking_store"):  # as written before they recorded their values
        del old[recorded]
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


# -- the whole spec recorded: what may change, what may not -------------------------------------------------------
@pytest.fixture(scope="module")
def finished_two_epochs(tmp_path_factory, sqlite_uri):
    """A two-epoch run trained once for the module, its MLflow run FINISHED in the session's store: (spec, checkpoint,
    run id). Tests that only refuse share it; each checks that it is left as it was."""
    from vit_search.train import train

    folder = tmp_path_factory.mktemp("finished")
    raw = {**TINY, "tracking": {"experiment": "resume-refusals"}, "train": {**TINY["train"], "epochs": 2}}
    spec_path = write_yaml(folder / "spec.yaml", raw)
    here, saved = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(folder)  # its default checkpoint folder, runs/tiny, in the fixture's folder
    os.environ["MLFLOW_TRACKING_URI"] = sqlite_uri
    try:
        from vit_search.spec import load_spec

        run_id = train(load_spec(spec_path), progress=False).run_id
    finally:
        os.chdir(here)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        mlflow.set_tracking_uri(None)
    return spec_path, folder / "runs" / "tiny" / "checkpoint.pt", run_id


def _unchanged(run_id: str, uri: str) -> tuple:
    """What a refusal must leave as it was of run ``run_id`` (in the store ``uri``)."""
    run = MlflowClient(uri).get_run(run_id)
    return (run.info.status, run.info.end_time, run.info.lifecycle_stage, run.data.params, run.data.metrics,
            run.data.tags)


@pytest.mark.parametrize("override, said", [
    # Another split: images it trained on would be validated and tested on (val 0.99 where 0.95 was usual)
    ("seed=1", "--resume: seed 1 differs from the checkpoint's run in runs/tiny/checkpoint.pt (3); resume with the "
               "run's values, or start afresh without --resume"),
    ("data.val_fraction=0.3", "--resume: data.val_fraction 0.3 differs from the checkpoint's run"),
    ("data.augment.hflip=true", "--resume: data.augment.hflip True differs from the checkpoint's run"),
    # The same weight shapes: once resumed as another model, its params and spec.yaml still saying 2 heads
    ("model.attention.heads=4", "--resume: model.attention.heads 4 differs from the checkpoint's run"),
    ("model.layers.0.attention.heads=4", "--resume: model.layers.0.attention.heads 4 differs from the checkpoint's run in "
                                   "runs/tiny/checkpoint.pt (unset)"),
    ("train.batch_size=16", "--resume: train.batch_size 16 differs from the checkpoint's run"),
    ("train.label_smoothing=0.1", "--resume: train.label_smoothing 0.1 differs from the checkpoint's run"),
], ids=["seed", "val_fraction", "hflip", "heads", "layer-override", "batch_size", "label_smoothing"])
def test_resume_under_another_seed_split_model_or_training_value_is_refused_in_one_line_and_nothing_changes(
        finished_two_epochs, sqlite_uri, cli_here, override, said):
    spec_path, checkpoint, run_id = finished_two_epochs
    folder = spec_path.parent
    before, saved, files = _unchanged(run_id, sqlite_uri), checkpoint.read_bytes(), sorted(folder.rglob("*"))
    result = cli_here("train", spec_path, "--resume", f"--set={override}", "--set=train.epochs=3",
                      cwd=spec_path.parent, env={"MLFLOW_TRACKING_URI": sqlite_uri})
    _refused_in_one_line(result, said)
    assert _unchanged(run_id, sqlite_uri) == before
    assert checkpoint.read_bytes() == saved and sorted(folder.rglob("*")) == files


def test_resume_with_fewer_epochs_than_trained_is_refused_in_one_line(finished_two_epochs, sqlite_uri, cli_here):
    # It once ended the run FINISHED without a word, its test metrics at step 0 and its curves at step 1.
    spec_path, checkpoint, run_id = finished_two_epochs
    before = _unchanged(run_id, sqlite_uri)
    result = cli_here("train", spec_path, "--resume", "--set=train.epochs=1", cwd=spec_path.parent,
                      env={"MLFLOW_TRACKING_URI": sqlite_uri})
    _refused_in_one_line(result, "--resume: train.epochs 1 is fewer than the 2 epochs the checkpoint's run in "
                                 "runs/tiny/checkpoint.pt has trained; resume with train.epochs 2 or more (its own: 2), "
                                 "or start afresh without --resume")
    assert _unchanged(run_id, sqlite_uri) == before


@pytest.mark.parametrize("key, value, said", [
    ("model", [1], "its 'model' is a list, not a state dict of tensors"),
    ("optimizer", "x", "its 'optimizer' is a str, not an optimizer's state"),
    ("epoch", "x", "its 'epoch' is 'x', not an epoch number (0 or more)"),
    ("epoch", -1, "its 'epoch' is -1, not an epoch number"),
    ("history", None, "its 'history' is None, not a list of each epoch's metrics"),
    ("scheduler", {}, "its 'scheduler' is an empty dict, not a scheduler's state"),
    ("rng", {}, "its 'rng' is an empty dict, not the random states"),
    ("run_id", 7, "its 'run_id' is an int, not an MLflow run id"),
    ("spec", "x", "its 'spec' is a str, not a spec's values"),
], ids=["model", "optimizer", "epoch-str", "epoch-negative", "history", "scheduler", "rng", "run_id", "spec"])
def test_a_checkpoint_with_damaged_contents_is_one_line_naming_it_and_its_run_is_not_reopened(
        finished_two_epochs, tmp_path, sqlite_uri, cli_here, key, value, said):
    # Each once reopened the run and ended it FAILED, exit 1, with an internal error that did not name the file.
    spec_path, checkpoint, run_id = finished_two_epochs
    before = _unchanged(run_id, sqlite_uri)
    damaged = tmp_path / "damaged" / "checkpoint.pt"
    damaged.parent.mkdir()
    torch.save({**torch.load(checkpoint, weights_only=True), key: value}, damaged)
    result = cli_here("train", spec_path, "--resume", "--set=train.epochs=3", "--checkpoint-dir", damaged.parent,
                      cwd=spec_path.parent, env={"MLFLOW_TRACKING_URI": sqlite_uri})
    _refused_in_one_line(result, f"{damaged}: not a usable checkpoint ({said}")
    assert "delete it, or run without --resume to start afresh" in result.stderr
    assert _unchanged(run_id, sqlite_uri) == before


def test_resuming_a_run_deleted_in_mlflow_is_one_line_saying_how_to_restore_it(finished_two_epochs, sqlite_uri,
                                                                                 cli_here):
    spec_path, checkpoint, run_id = finished_two_epochs
    client = MlflowClient(sqlite_uri)
    client.delete_run(run_id)
    try:
        before = _unchanged(run_id, sqlite_uri)
        result = cli_here("train", spec_path, "--resume", "--set=train.epochs=3", cwd=spec_path.parent,
                          env={"MLFLOW_TRACKING_URI": sqlite_uri})
        _refused_in_one_line(result, f"MLflow run {run_id}, the one to continue, was deleted in the store ")
        assert f"restore it (mlflow runs restore --run-id {run_id}) and run the same command again, or start afresh " \
               f"(without --resume)" in result.stderr
        assert _unchanged(run_id, sqlite_uri) == before
    finally:
        client.restore_run(run_id)


def test_a_run_missing_from_its_own_store_is_said_removed_and_another_store_is_named_and_not_made(
        finished_two_epochs, tmp_path, sqlite_uri, cli_here):
    spec_path, checkpoint, run_id = finished_two_epochs
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["tracking_store"] == sqlite_uri  # absolute already
    gone = tmp_path / "gone" / "checkpoint.pt"
    gone.parent.mkdir()
    env = {"MLFLOW_TRACKING_URI": sqlite_uri}

    def resume(folder, **env_now):
        return cli_here("train", spec_path, "--resume", "--checkpoint-dir", folder, cwd=spec_path.parent,
                        env={**env, **env_now})

    # As after `mlflow gc`: the store it was logged to no longer has it. It once said to look for another store.
    torch.save({**saved, "run_id": "f" * 32}, gone)
    result = resume(gone.parent)
    _refused_in_one_line(result, f"MLflow run {'f' * 32}, the one to continue, is not in the store {sqlite_uri}, the one "
                                 f"it was logged to (MLFLOW_TRACKING_URI or tracking.uri names it still): it was removed "
                                 f"from it (deleted, then `mlflow gc`); start afresh (without --resume)")
    # A checkpoint from before the record: either cause is named.
    torch.save({key: item for key, item in {**saved, "run_id": "f" * 32}.items() if key != "tracking_store"}, gone)
    _refused_in_one_line(resume(gone.parent), "it was logged to another store, or removed from this one (deleted, then "
                                              "`mlflow gc`); point MLFLOW_TRACKING_URI")
    # Another store: named as the run's, and nothing is made there (it once made a new database, 1 MB of tables).
    before = _unchanged(run_id, sqlite_uri)
    for other in (f"sqlite:///{tmp_path / 'other.db'}", str(tmp_path / "other-folder")):
        result = resume(checkpoint.parent, MLFLOW_TRACKING_URI=other)
        _refused_in_one_line(result, f"MLflow run {run_id}, the one to continue, is not in the store ")
        assert f"it was logged to {sqlite_uri}: point MLFLOW_TRACKING_URI (or tracking.uri) at that store" in result.stderr
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "other-folder").exists()
    assert _unchanged(run_id, sqlite_uri) == before


def test_resume_with_values_that_may_change_tags_the_run_and_logs_its_spec_again(workdir, sqlite_uri, cli_here):
    experiment = "resume-allowed-changes"
    spec_path = write_yaml(workdir / "spec.yaml", {**TINY, "tracking": {"experiment": experiment},
                                                   "train": {**TINY["train"], "epochs": 1}})
    env = {"MLFLOW_TRACKING_URI": sqlite_uri}
    assert cli_here("train", spec_path, cwd=workdir, env=env).returncode == 0
    result = cli_here("train", spec_path, "--resume", "--set=train.epochs=2", "--set=data.num_workers=0",
                      "--set=train.eval_batch_size=64", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    changed = "data.num_workers: 2 -> 0; train.epochs: 1 -> 2; train.eval_batch_size: None -> 64"
    assert run.info.status == "FINISHED" and run.data.tags["resumed_with"] == changed
    assert f"vit-search: --resume: MLflow run {run.info.run_id} goes on with {changed}; its params keep" in result.stderr
    assert run.data.params["train.epochs"] == "1"  # MLflow keeps a param's first value
    logged = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/spec.yaml"))
    assert logged["train"]["epochs"] == 2 and logged["data"]["num_workers"] == 0
    assert sorted({m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")}) == [0, 1]


def test_a_checkpoint_that_names_no_mlflow_run_resumes_into_a_new_run_logged_as_any_new_run(workdir, sqlite_uri,
                                                                                             cli_here):
    # Trained with tracking off, then resumed with it on: its new run once had no params, tags or spec.yaml.
    experiment = "resume-untracked"
    spec_path = write_yaml(workdir / "spec.yaml", {**TINY, "tracking": {"experiment": experiment},
                                                   "train": {**TINY["train"], "epochs": 1}})
    env = {"MLFLOW_TRACKING_URI": sqlite_uri}
    assert cli_here("train", spec_path, "--set=tracking.enabled=false", cwd=workdir, env=env).returncode == 0
    assert torch.load(workdir / "runs" / "tiny" / "checkpoint.pt", weights_only=True)["run_id"] is None
    result = cli_here("train", spec_path, "--resume", "--set=train.epochs=2", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("vit-search: --resume: the checkpoint runs/tiny/checkpoint.pt names no MLflow run (trained with tracking "
            "off); training from epoch 2, as a new MLflow run, its first epochs logged from the checkpoint") in result.stderr
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    assert {"vit_search.version", "device", "num_processes"} <= set(run.data.tags)
    assert run.data.metrics["parameters"] > 0
    assert "spec.yaml" in [a.path for a in MlflowClient().list_artifacts(run.info.run_id)]
    assert sorted({m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")}) == [0, 1]


def test_resume_into_a_checkpoint_folder_that_is_a_file_is_refused_without_promising_training(workdir, cli_here):
    spec_path = write_yaml(workdir / "spec.yaml", {**TINY, "tracking": {"enabled": False}})
    (workdir / "afile").write_text("")
    result = cli_here("train", spec_path, "--resume", "--checkpoint-dir", workdir / "afile", cwd=workdir)
    _refused_in_one_line(result, f"cannot write checkpoints in {workdir / 'afile'}: ")  # once after the note
    assert "training from the first epoch" not in result.stderr
