"""`vit-search train`: one spec trained through Accelerate and logged to MLflow."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from vit_search.checkpoints import CheckpointWriter
from vit_search.registry import register
from vit_search.spec import load_spec
from vit_search.tracking import load_model
from vit_search.train import TrainingDiverged, train

from conftest import launched_pid, stopped_at_first_checkpoint, two_process_launch

TINY = {
    "name": "tiny",
    "seed": 3,
    "data": {"dataset": "digits", "image_size": 8},
    "model": {"dim": 32, "depth": 2, "patch_embed": {"type": "conv", "patch_size": 2},
              "attention": {"type": "sdpa", "heads": 2}, "ffn": {"type": "mlp", "ratio": 2}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 3.0e-3, "warmup_epochs": 0.5},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    """A fresh working directory with MLflow pointed at the session's sqlite store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def tiny_spec(experiment: str, **train):
    raw = {**TINY, "tracking": {"experiment": experiment}, "train": {**TINY["train"], **train}}
    return load_spec(raw)


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_training_on_cpu_learns_and_logs_everything_to_mlflow(workdir):
    result = train(tiny_spec("logs-everything"))
    assert result.metrics["val_accuracy"] > 0.4 and result.metrics["test_accuracy"] > 0.4  # chance: 0.1
    assert len(result.history) == 3

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.attention.type"] == "sdpa" and run.data.params["train.epochs"] == "3"
    assert run.data.params["data.dataset"] == "digits" and run.data.params["model.num_classes"] == "10"
    for name in ("train_loss", "val_loss", "val_accuracy", "lr", "images_per_second"):
        steps = [m.step for m in client.get_metric_history(result.run_id, name)]
        assert steps == [0, 1, 2], name
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    assert run.data.metrics["parameters"] == result.parameters and run.data.metrics["flops"] > 0
    assert {"vit_search.version", "torch.version", "device"} <= set(run.data.tags)
    if run.data.tags["device"].startswith("cpu"):  # docs/spec.md: CPUs have no known peak, so no MFU
        assert "mfu" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
        a.path for a in client.list_artifacts(result.run_id, "model")}
    assert {"spec.yaml", "model/state_dict.pt", "model/spec.yaml"} <= artifacts


def test_a_run_says_where_its_time_went_phase_by_phase_and_logs_it(workdir):
    result = train(tiny_spec("phases"))
    seconds = result.seconds
    assert seconds.epochs == pytest.approx(sum(m["epoch_seconds"] for m in result.history))
    assert min(seconds.setup, seconds.epochs, seconds.evaluation, seconds.bookkeeping) > 0
    # Phases timed apart: none counted twice, so together they are never more than the whole run.
    assert seconds.setup + seconds.capture + seconds.epochs + seconds.evaluation < seconds.total
    assert result.metrics.keys().isdisjoint({"setup_seconds", "capture_seconds", "eval_seconds"})  # not the trial's
    run = MlflowClient().get_run(result.run_id)
    assert run.data.metrics["setup_seconds"] == pytest.approx(seconds.setup)
    assert run.data.metrics["eval_seconds"] == pytest.approx(seconds.evaluation)
    assert run.data.metrics["capture_seconds"] == pytest.approx(seconds.capture)
    assert seconds.summary().endswith(f"{seconds.bookkeeping:.1f} s bookkeeping")


def test_a_run_stopped_by_its_epoch_callback_still_says_where_its_time_went(workdir):
    from vit_search.performance import RunSeconds

    class Pruned(Exception):
        pass

    def prune(epoch, metrics):
        raise Pruned(f"after epoch {epoch + 1}")

    seconds = RunSeconds()
    with pytest.raises(Pruned, match="after epoch 1"):
        train(tiny_spec("phases-pruned"), on_epoch=prune, seconds=seconds)
    assert min(seconds.setup, seconds.epochs, seconds.evaluation) > 0
    assert seconds.setup + seconds.capture + seconds.epochs + seconds.evaluation < seconds.total


def test_logged_model_loads_back_with_one_call(workdir):
    import torch

    from vit_search.data import load_data

    spec = tiny_spec("loads-back", epochs=2)
    result = train(spec)
    model = load_model(result.run_id)
    assert not any(module.training for module in model.modules())  # in eval mode, as the docs say
    data = load_data(spec.data, spec.seed)
    images, labels = data.test[list(range(len(data.test)))]
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)
    # A run that holds no model says why, in one line: a study's parent run, a run that logged none, no run.
    from mlflow.tracking import MlflowClient

    from vit_search.tracking import TrackingError

    client = MlflowClient()
    experiment = client.get_run(result.run_id).info.experiment_id
    parent = client.create_run(experiment, tags={"optuna.study_name": "a-study", "best_run_id": result.run_id})
    with pytest.raises(TrackingError, match=f"^MLflow run {parent.info.run_id} is study 'a-study''s parent run, which "
                                            f"holds no model; load one of its trials' runs, such as the best, "
                                            f"{result.run_id}$"):
        load_model(parent.info.run_id)
    bare = client.create_run(experiment)
    with pytest.raises(TrackingError, match=f"^MLflow run {bare.info.run_id} logged no model"):
        load_model(bare.info.run_id)
    with pytest.raises(TrackingError, match="^MLflow run 0123456789abcdef cannot be read from the store"):
        load_model("0123456789abcdef")


def test_a_run_that_cannot_be_read_from_a_store_with_a_password_is_said_without_it(monkeypatch):
    from conftest import free_port
    from vit_search.tracking import TrackingError, load_model

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a closed port: no retries to wait out
    with pytest.raises(TrackingError) as refused:
        load_model("0123456789abcdef", f"http://user:pw12345@127.0.0.1:{free_port()}")
    assert "pw12345" not in str(refused.value) and "user:***@127.0.0.1" in str(refused.value)


def test_seeded_cpu_runs_are_reproducible(workdir):
    first = train(tiny_spec("reproducible", epochs=2))
    second = train(tiny_spec("reproducible", epochs=2))
    assert first.metrics == second.metrics


def test_runs_reach_a_real_mlflow_server(workdir, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    result = train(tiny_spec("server", epochs=1))
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics
    assert "model/state_dict.pt" in {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert load_model(result.run_id, tracking_uri=mlflow_server).num_classes == 10


@register("head", "test_nan_head")
class NanHead:
    """A head whose logits turn NaN: drives the divergence check."""

    def __new__(cls, dim: int, num_classes: int):
        import torch

        class Head(torch.nn.Linear):
            def forward(self, x):
                return super().forward(x) * float("nan")

        return Head(dim, num_classes)


def test_nan_loss_stops_the_run_with_a_clear_error_and_a_failed_mlflow_run(workdir, capsys, monkeypatch):
    from vit_search.cli import main

    raw = {**TINY, "tracking": {"experiment": "nan"}, "model": {**TINY["model"], "head": {"type": "test_nan_head"}}}
    with pytest.raises(TrainingDiverged, match="loss became nan in epoch 1"):
        train(load_spec(raw))
    # The command: one line with what to try, exit 1 (in this process, where the test's head is registered).
    assert main(["train", str(write_yaml(workdir / "nan.yaml", raw)), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "error: loss became nan in epoch 1; lower train.lr, set train.grad_clip, or use mixed_precision: bf16 "
        "instead of fp16")
    (run, _) = mlflow.search_runs(experiment_names=["nan"], output_format="list")
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("TrainingDiverged: loss became nan")
    # Under a launch every process finds the divergence together: the others say nothing (each said it).
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["train", str(workdir / "nan.yaml"), "--quiet"]) == 1
    assert capsys.readouterr().err == ""


@register("head", "test_counted_nan_head")
class CountedNanHead:
    """A NaN head that counts its training forwards on a real device (not the FLOP count's meta one)."""

    steps: list[int] = []

    def __new__(cls, dim: int, num_classes: int):
        import torch

        class Head(torch.nn.Linear):
            def forward(self, x):
                if self.training and x.device.type != "meta":
                    CountedNanHead.steps.append(1)
                return super().forward(x) * float("nan")

        return Head(dim, num_classes)


def test_a_nan_loss_ends_its_epoch_after_25_steps_not_at_the_epochs_end(workdir):
    CountedNanHead.steps.clear()
    raw = {**TINY, "tracking": {"enabled": False}, "model": {**TINY["model"], "head": {"type": "test_counted_nan_head"}},
           # About 140 steps an epoch, eager: a captured step (on a GPU) runs the head's Python only to capture.
           "train": {**TINY["train"], "batch_size": 8, "cuda_graph": False}}
    with pytest.raises(TrainingDiverged, match="loss became nan in epoch 1"):
        train(load_spec(raw))
    assert len(CountedNanHead.steps) == 25


def test_after_the_stores_check_neither_a_trials_tracker_nor_mlflow_changes_the_environment(workdir, monkeypatch):
    # A change to os.environ while another thread copies it (every Accelerator does) raises there:
    # offline, MLflow's telemetry thread removed its session id about a second after the first MLflow
    # call, and a packed trial's Accelerator got a KeyError. The process's check of the store, made
    # before its trials run in threads, makes every change there is to make.
    from mlflow.environment_variables import _MLFLOW_TELEMETRY_SESSION_ID
    from mlflow.telemetry.client import _set_telemetry_client, get_telemetry_client

    from vit_search.tracking import HTTP_RETRY_DEFAULTS, check_store, use_store

    for key in HTTP_RETRY_DEFAULTS:  # unset, as in a fresh process; restored after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv(_MLFLOW_TELEMETRY_SESSION_ID.name, "a-session")  # as `import mlflow` sets it
    monkeypatch.setattr("mlflow.telemetry.client._MLFLOW_TELEMETRY_CLIENT", get_telemetry_client())  # restored after
    spec = load_spec({**TINY, "tracking": {"experiment": "environment"}})
    check_store(spec)
    before = dict(os.environ)
    use_store(spec)  # what each trial's tracker does, in its thread
    _set_telemetry_client(None)  # what MLflow's thread calls when its config fetch fails
    assert dict(os.environ) == before


def test_tracking_uri_names_the_store_unless_mlflow_tracking_uri_is_set(workdir, monkeypatch, sqlite_uri):
    from mlflow.exceptions import MlflowException

    store = f"sqlite:///{workdir / 'spec-store.db'}"
    raw = {**TINY, "tracking": {"experiment": "where-logged", "uri": store}, "train": {**TINY["train"], "epochs": 1}}
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    in_spec_store = train(load_spec(raw)).run_id
    assert MlflowClient(store).get_run(in_spec_store).info.status == "FINISHED"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)  # the environment wins
    in_env_store = train(load_spec(raw)).run_id
    assert MlflowClient(sqlite_uri).get_run(in_env_store).info.status == "FINISHED"
    with pytest.raises(MlflowException):
        MlflowClient(store).get_run(in_env_store)


def test_a_run_is_tagged_with_the_commit_of_its_specs_git_work_tree(workdir):
    spec_path = write_yaml(workdir / "tagged.yaml", {**TINY, "tracking": {"experiment": "git-tag"},
                                                     "train": {**TINY["train"], "epochs": 1}})
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.run([*git, "init", "-q"], cwd=workdir, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "spec"], cwd=workdir, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workdir, capture_output=True, text=True).stdout.strip()
    run = MlflowClient().get_run(train(load_spec(spec_path)).run_id)
    assert run.data.tags["git.commit"] == head


def test_without_resume_a_run_starts_afresh_in_a_new_mlflow_run_and_overwrites_the_checkpoint(workdir):
    spec = tiny_spec("afresh", epochs=1)
    first = train(spec, checkpoint_dir=workdir / "ck")
    second = train(spec, checkpoint_dir=workdir / "ck")
    assert second.run_id != first.run_id and len(second.history) == 1  # not continued from the first
    checkpoint = torch.load(workdir / "ck" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["run_id"] == second.run_id and checkpoint["epoch"] == 0


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_and_matches_an_unbroken_run(workdir, sqlite_uri, cli_here):
    raw = {**TINY, "tracking": {"experiment": "resume"}, "train": {**TINY["train"], "epochs": 8}}
    spec_path = write_yaml(workdir / "resume.yaml", raw)
    unbroken = train(load_spec(raw), checkpoint_dir=workdir / "unbroken")

    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri}
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "train", str(spec_path)], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = workdir / "runs" / "tiny" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # Resumed in this process (no start-up to pay): all it carries over is in the checkpoint.
    result = cli_here("train", str(spec_path), "--resume", cwd=workdir, env={"MLFLOW_TRACKING_URI": sqlite_uri})
    assert result.returncode == 0, result.stderr
    resumed = [line for line in result.stdout.splitlines() if line.startswith("tiny:")][0]
    assert f"test_accuracy {unbroken.metrics['test_accuracy']:.4f}" in resumed
    assert f"val_loss {unbroken.metrics['val_loss']:.4f}" in resumed

    runs = mlflow.search_runs(experiment_names=["resume"], output_format="list")
    killed = [r for r in runs if r.info.run_id != unbroken.run_id]
    assert len(killed) == 1 and killed[0].info.status == "FINISHED"  # the same run, continued
    steps = sorted({m.step for m in MlflowClient().get_metric_history(killed[0].info.run_id, "val_accuracy")})
    assert steps == list(range(8))


def test_a_run_killed_outright_is_ended_killed_by_the_next_train_in_its_folder(workdir, sqlite_uri, cli_here):
    # SIGKILL (the OOM killer, a scheduler's hard limit) leaves no chance to end the run: MLflow showed it
    # RUNNING for ever, though nothing would ever continue it (killed before its first checkpoint, or run again
    # without --resume).
    raw = {**TINY, "tracking": {"experiment": "killed-outright"}, "train": {**TINY["train"], "epochs": 50}}
    spec_path = write_yaml(workdir / "killed.yaml", raw)
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri}
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "train", str(spec_path)], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mark, deadline = workdir / "runs" / "tiny" / "run.json", time.monotonic() + 120
    while not mark.exists():  # written once its MLflow run has started
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (abandoned,) = mlflow.search_runs(experiment_names=["killed-outright"], output_format="list")
    assert abandoned.info.status == "RUNNING"

    result = cli_here("train", str(spec_path), "--set", "train.epochs=1", cwd=workdir,
                      env={"MLFLOW_TRACKING_URI": sqlite_uri})
    assert result.returncode == 0, result.stderr
    said = f"MLflow run {abandoned.info.run_id}, left RUNNING in runs/tiny by a process that ended without ending it"
    assert said in result.stderr
    runs = {r.info.run_id: r for r in mlflow.search_runs(experiment_names=["killed-outright"], output_format="list")}
    assert runs.pop(abandoned.info.run_id).info.status == "KILLED"
    assert [r.info.status for r in runs.values()] == ["FINISHED"]
    assert MlflowClient().get_run(abandoned.info.run_id).data.tags["error"] == (
        f"its process ({proc.pid}) ended without ending the run (killed, or its tracking server went away)")
    # A RUNNING run whose process still lives (another train in the same folder, here this one) is not touched.
    client = MlflowClient()
    live = client.create_run(client.get_experiment_by_name("killed-outright").experiment_id).info.run_id
    mark.write_text(json.dumps({"run_id": live, "host": socket.gethostname(), "pid": os.getpid()}))
    train(load_spec(raw, ["train.epochs=1"]), checkpoint_dir=workdir / "runs" / "tiny")
    assert client.get_run(live).info.status == "RUNNING"


@pytest.mark.parametrize("signum, code, line, tag", [
    (signal.SIGINT, 130, "interrupted; run the same command with --resume to go on", "interrupted (Ctrl-C)"),
    # The run's tag says it as a study's trial does (it said `interrupted` for both)
    (signal.SIGTERM, 143, "terminated (SIGTERM); run the same command with --resume to go on", "interrupted (SIGTERM)")],
    ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_mid_training_ends_the_run_killed_in_one_line_and_resume_finishes_it(
        workdir, sqlite_uri, cli_here, signum, code, line, tag):
    experiment = f"stopped-{signum.name.lower()}"
    raw = {**TINY, "tracking": {"experiment": experiment}, "train": {**TINY["train"], "epochs": 200}}
    spec_path = write_yaml(workdir / "stopped.yaml", raw)
    checkpoint = workdir / "runs" / "tiny" / "checkpoint.pt"
    # As Ctrl-C sends it (SIGINT), or a scheduler and `timeout` (SIGTERM)
    stopped = stopped_at_first_checkpoint([sys.executable, "-m", "vit_search", "train", str(spec_path)], checkpoint,
                                          signum, workdir, {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri})
    err = stopped.stderr
    assert stopped.returncode == code and err.strip().splitlines()[-1] == line, err[-2000:]
    assert "Traceback" not in err
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert run.info.status == "KILLED" and run.data.tags["error"] == tag
    # --resume continues it, in the same MLflow run (two epochs past its checkpoint, to keep the test short).
    last = torch.load(checkpoint, weights_only=True)["epoch"]
    resumed = cli_here("train", spec_path, "--resume", f"--set=train.epochs={last + 3}", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert run.info.status == "FINISHED" and "error" not in run.data.tags  # why it stopped no longer holds
    steps = sorted({m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")})
    assert steps == list(range(last + 3))


@pytest.mark.slow
def test_two_process_accelerate_launch_trains_data_parallel_logs_once_and_resumes_after_sigterm(workdir, sqlite_uri):
    raw = {**TINY, "tracking": {"experiment": "ddp"}, "train": {**TINY["train"], "epochs": 200, "peak_tflops": 1.0}}
    spec_path = write_yaml(workdir / "ddp.yaml", raw)
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri, "OMP_NUM_THREADS": "1"}
    # Stopped as a scheduler stops a job: SIGTERM to the launcher, which passes it on to both processes.
    checkpoint = workdir / "runs" / "tiny" / "checkpoint.pt"
    stopped = stopped_at_first_checkpoint(two_process_launch("-m", "vit_search", "train", str(spec_path)), checkpoint,
                                          signal.SIGTERM, workdir, env, wait_seconds=300)
    err = stopped.stderr
    assert stopped.returncode != 0
    assert err.count("terminated (SIGTERM)") == 1, err[-3000:]  # said by the main process alone
    (run,) = mlflow.search_runs(experiment_names=["ddp"], output_format="list")
    assert run.info.status == "KILLED"

    last = torch.load(checkpoint, weights_only=True)["epoch"]
    result = subprocess.run(
        two_process_launch("-m", "vit_search", "train", str(spec_path), "--resume", f"--set=train.epochs={last + 3}"),
        cwd=workdir, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("mlflow run ") == 1 and result.stdout.count("tiny: ") == 1
    (run,) = mlflow.search_runs(experiment_names=["ddp"], output_format="list")  # the same run, continued
    assert run.data.tags["num_processes"] == "2" and run.info.status == "FINISHED"
    steps = sorted({m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")})
    assert steps == list(range(last + 3))
    assert run.data.metrics["val_accuracy"] > 0.2  # chance: 0.1
    # MFU is per device: the images of both processes over two devices' peak.
    metrics = run.data.metrics
    expected = 3 * metrics["flops"] * metrics["images_per_second"] / 2 / 1e12
    assert metrics["mfu"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_a_launch_whose_other_process_is_killed_ends_in_one_line_and_leaves_no_run_running(workdir, sqlite_uri):
    raw = {**TINY, "tracking": {"experiment": "peer"}, "train": {**TINY["train"], "epochs": 500}}
    spec_path = write_yaml(workdir / "peer.yaml", raw)
    mark = f"VIT_SEARCH_TEST_LAUNCH={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri, "OMP_NUM_THREADS": "1", mark.split("=")[0]: mark.split("=")[1]}
    checkpoint = workdir / "runs" / "tiny" / "checkpoint.pt"
    proc = subprocess.Popen(two_process_launch("-m", "vit_search", "train", str(spec_path)), cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() or launched_pid(mark, "1") is None:  # training on both
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    os.kill(launched_pid(mark, "1"), signal.SIGKILL)  # the OOM killer's way
    err = proc.communicate(timeout=300)[1]
    (run,) = mlflow.search_runs(experiment_names=["peer"], output_format="list")
    # It was left RUNNING, tagged with gloo's text (a source path, a port, "GLHF!"), and the line said SIGTERM: the
    # launcher's, sent to the main process as it ended the run.
    assert run.info.status in ("FAILED", "KILLED") and "gloo" not in run.data.tags["error"], run.data.tags
    said = [line for line in err.splitlines() if line.startswith(("error:", "terminated", "interrupted"))]
    # Which comes first, the broken collective or the launcher's SIGTERM, is the scheduler's call: either is one line.
    assert said in (["error: another process of the launch stopped (its connection to this one was lost); run the same "
                     "command with --resume to go on"],
                    ["terminated (SIGTERM); run the same command with --resume to go on"]), err[-3000:]
    if said[0].startswith("error:"):
        assert run.info.status == "FAILED" and run.data.tags["error"].startswith("LaunchBroken: another process")


def test_a_run_a_stop_left_active_at_exit_ends_killed_not_finished(workdir, sqlite_uri):
    # MLflow's own exit hook ends an active run FINISHED: a launcher's SIGTERM that cut the recording of a run's
    # error short left a run of 3 epochs out of 500 FINISHED.
    # A run started as Tracker.run starts one (which registers the hook), never ended: as after such a cut.
    code = ("import mlflow; from vit_search.tracking import _left_runs_killed_at_exit; "
            "mlflow.set_experiment('left-active'); _left_runs_killed_at_exit(); mlflow.start_run()")
    subprocess.run([sys.executable, "-c", code], cwd=workdir, check=True, timeout=120,
                   env={**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri})
    (run,) = mlflow.search_runs(experiment_names=["left-active"], output_format="list")
    assert run.info.status == "KILLED"


def test_bad_input_under_accelerate_launch_is_said_once_before_anything_starts(workdir, sqlite_uri):
    write_yaml(workdir / "bad.yaml", {**TINY, "model": {**TINY["model"], "dim": 31}})
    result = subprocess.run(two_process_launch("-m", "vit_search", "train", "bad.yaml"), cwd=workdir,
                            env={**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("dim 31 is not divisible by heads 2") == 1, result.stderr[-3000:]


@pytest.mark.parametrize("command, said", [
    (("run", "study.yaml", "--jobs", "2"), "--jobs 2 starts worker processes of its own; under accelerate launch"),
    (("run", "supernet.yaml"), "search.strategy supernet trains in one process; run it without accelerate launch"),
], ids=["jobs", "supernet"])
def test_what_a_launch_cannot_run_is_refused_by_its_main_process_alone(workdir, cli_here, command, said):
    # Each launched process sees the environment the launcher sets (test_bad_input_under_accelerate_launch_...
    # launches for real): the main process says it, the other says nothing, neither starts anything.
    write_yaml(workdir / "study.yaml", {**TINY, "search": {"n_trials": 2, "storage": f"sqlite:///{workdir / 'o.db'}",
                                                          "space": {"train.lr": {"float": [1e-3, 1e-2]}}}})
    write_yaml(workdir / "supernet.yaml", {**TINY, "search": {"strategy": "supernet", "storage": f"sqlite:///{workdir / 'o.db'}",
                                                             "space": {"model.depth": {"int": [1, 2]}}}})
    said_by = [cli_here(*command, cwd=workdir, env={"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank})
               for rank in ("0", "1")]
    assert [r.returncode for r in said_by] == [2, 2]
    assert [r.stderr.count(said) for r in said_by] == [1, 0], [r.stderr for r in said_by]
    assert not (workdir / "o.db").exists()  # --jobs would have started two workers in each launched process


def test_missing_data_files_are_one_error_line_exit_2_and_no_mlflow_run(workdir, cli_here, sqlite_uri):
    from mlflow.tracking import MlflowClient

    spec_path = write_yaml(workdir / "mnist.yaml", {
        "name": "nomnist", "data": {"dataset": "mnist", "image_size": 28, "root": str(workdir / "data")},
        "model": {"patch_embed": {"type": "conv", "patch_size": 4}}, "train": {"epochs": 1},
        "tracking": {"uri": sqlite_uri, "experiment": "train-no-mnist"}})
    result = cli_here("train", str(spec_path), cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "mnist: data files not found in" in line and "data.download: true" in line
    assert not (workdir / "runs").exists()
    assert MlflowClient(sqlite_uri).get_experiment_by_name("train-no-mnist") is None  # bad input: no FAILED run


def test_the_schedule_counts_the_step_accelerate_takes_at_an_epochs_uneven_end(workdir):
    # 40 batches of 32 with grad_accum_steps 3: 14 optimizer steps an epoch (the last one on 1 batch).
    spec = load_spec({**TINY, "train": {**TINY["train"], "epochs": 2, "warmup_epochs": 0, "grad_accum_steps": 3},
                      "tracking": {"enabled": False}})
    result = train(spec, checkpoint_dir=workdir / "ckpt")
    # Half the steps done: the cosine is half-way down.
    assert result.history[0]["lr"] == pytest.approx(0.5 * spec.train.lr, rel=1e-6)


def test_a_batch_larger_than_the_training_split_is_one_error_line_exit_2_and_no_mlflow_run(workdir, cli_here,
                                                                                           sqlite_uri):
    from mlflow.tracking import MlflowClient

    spec_path = write_yaml(workdir / "big.yaml", {**TINY, "train": {**TINY["train"], "batch_size": 4096},
                                                  "tracking": {"uri": sqlite_uri, "experiment": "train-big-batch"}})
    result = cli_here("train", str(spec_path), cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "train.batch_size 4096" in line and "1293 training images" in line and "lower train.batch_size" in line
    assert MlflowClient(sqlite_uri).get_experiment_by_name("train-big-batch") is None


def test_compiled_models_save_weights_under_the_plain_models_names():
    from accelerate import Accelerator

    from vit_search.model import build_model
    from vit_search.train import _plain

    model = build_model(load_spec(TINY))
    accelerator = Accelerator(cpu=True)
    compiled = torch.compile(accelerator.prepare(model), backend="eager")
    assert list(_plain(compiled, accelerator).state_dict()) == list(model.state_dict())


def test_attention_blocks_that_do_not_call_sdpa_are_tagged_with_no_kernel():
    from accelerate import Accelerator

    from vit_search.model import build_model
    from vit_search.train import _attention_kernel

    accelerator = Accelerator(cpu=True)
    for attention, expected in (("einsum", {"none"}), ("sdpa", {"flash", "efficient", "math"})):
        spec = load_spec({**TINY, "model": {**TINY["model"], "attention": {"type": attention, "heads": 2}}})
        assert _attention_kernel(build_model(spec), accelerator, "no") in expected


def test_the_attention_kernel_is_probed_once_per_process_and_leaves_torchs_setting_as_it_was():
    # The probe restricts SDPA's backends, a global setting: packed trials' attention in other
    # threads meets it while the probe runs, so each trial must not probe again.
    from vit_search.performance import fused_attention_kernel

    fused_attention_kernel.cache_clear()
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
              torch.backends.cuda.math_sdp_enabled())
    first = fused_attention_kernel(torch.device("cpu"), torch.float32, 16)
    assert first in ("flash", "efficient", "math")
    assert fused_attention_kernel(torch.device("cpu"), torch.float32, 16) == first
    assert fused_attention_kernel.cache_info().hits == 1 and fused_attention_kernel.cache_info().misses == 1
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled()) == before


def test_layer_decay_gives_each_layer_its_rate_and_the_schedule_keeps_the_ratios():
    from accelerate import Accelerator

    from vit_search.train import _setup

    spec = load_spec({**TINY, "train": {**TINY["train"], "layer_decay": 0.5, "warmup_epochs": 1},
                      "tracking": {"enabled": False}})
    run = _setup(spec, Accelerator(cpu=True), "no")
    group_of = {id(p): g for g in run.optimizer.param_groups for p in g["params"]}
    lr = spec.train.lr
    expected = {"patch_embed.proj.weight": lr / 8, "pos_embed.weight": lr / 8, "pool.cls_token": lr / 8,
                "blocks.0.attn.qkv.weight": lr / 4, "blocks.1.ffn.fc2.bias": lr / 2, "norm.weight": lr,
                "head.fc.weight": lr}
    named = dict(run.model.named_parameters())
    # The peak rates (the schedule's warmup has already scaled "lr" for step 0).
    assert {name: group_of[id(named[name])]["initial_lr"] for name in expected} == pytest.approx(expected)
    # Weight decay still only on matrices, in every layer.
    assert group_of[id(named["blocks.0.attn.qkv.weight"])]["weight_decay"] == spec.train.weight_decay
    assert group_of[id(named["blocks.0.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert group_of[id(named["pos_embed.weight"])]["weight_decay"] == 0.0
    for _ in range(7):  # into the warmup and past it: every group moves by the same factor
        run.optimizer.step()
        run.scheduler.step()
        head = group_of[id(named["head.fc.weight"])]["lr"]
        assert group_of[id(named["patch_embed.proj.weight"])]["lr"] == pytest.approx(head / 8)
        assert group_of[id(named["blocks.1.ffn.fc2.bias"])]["lr"] == pytest.approx(head / 2)


def test_frozen_parameters_stay_as_loaded_and_the_trainable_count_is_logged(workdir):
    from vit_search.model import build_vit

    source = build_vit(load_spec(TINY))
    torch.save(source.state_dict(), workdir / "start.pth")
    frozen = ["patch_embed.*", "pos_embed.*", "pool.*", "blocks.[0-0].*"]
    spec = load_spec({**TINY, "model": {"init": {"from": "file", "path": str(workdir / "start.pth")},
                                        "attention": {"heads": 2}},
                      "train": {**TINY["train"], "epochs": 1, "freeze": frozen}, "tracking": {"experiment": "freeze"}})
    result = train(spec)
    trained = load_model(result.run_id)
    after, before = trained.state_dict(), source.state_dict()
    kept = [name for name in before if name.startswith(("patch_embed.", "pos_embed.", "pool.", "blocks.0."))]
    assert kept and all(torch.equal(after[name], before[name]) for name in kept)
    assert not torch.equal(after["blocks.1.attn.qkv.weight"], before["blocks.1.attn.qkv.weight"])
    trainable = sum(p.numel() for name, p in source.named_parameters() if name not in kept)
    assert result.trainable_parameters == trainable
    assert MlflowClient().get_run(result.run_id).data.metrics["trainable_parameters"] == trainable


def test_freeze_patterns_are_checked_when_the_spec_loads():
    from vit_search.spec import SpecError

    with pytest.raises(SpecError, match="train.freeze.1: 'patch_embd.*' matches no parameter"):
        load_spec({**TINY, "train": {**TINY["train"], "freeze": ["blocks.*", "patch_embd.*"]}})
    with pytest.raises(SpecError, match="train.freeze: freezes every parameter"):
        load_spec({**TINY, "train": {**TINY["train"], "freeze": ["*"]}})
    with pytest.raises(SpecError, match="train.layer_decay: Input should be less than or equal to 1"):
        load_spec({**TINY, "train": {**TINY["train"], "layer_decay": 1.5}})


def test_the_logged_lr_is_the_heads_under_layer_decay(workdir):
    spec = load_spec({**TINY, "train": {**TINY["train"], "epochs": 2, "warmup_epochs": 0, "layer_decay": 0.5},
                      "tracking": {"enabled": False}})
    result = train(spec, checkpoint_dir=workdir / "ckpt")
    assert result.history[0]["lr"] == pytest.approx(0.5 * spec.train.lr, rel=1e-6)  # half-way down the cosine


def test_epochs_that_train_faster_than_they_are_stored_are_stored_together_newest_checkpoint_last(tmp_path):
    path, stored, store_free = tmp_path / "checkpoint.pt", [], threading.Event()

    def log(epochs):  # a tracking store busy with other trials' writes
        assert store_free.wait(30)
        on_disk = torch.load(path, weights_only=True)["epoch"] if path.exists() else -1
        assert on_disk < min(step for _, step, _ in epochs)  # no checkpoint ahead of its metrics
        stored.append([step for _, step, _ in epochs])

    writer = CheckpointWriter(path, log=log)
    for epoch in range(5):  # training goes on while the first epoch's metrics wait for the store
        writer.save({"epoch": epoch, "weights": torch.full((3,), float(epoch))}, {"loss": 1 / (epoch + 1)}, epoch)
    store_free.set()
    writer.wait()
    assert [step for call in stored for step in call] == [0, 1, 2, 3, 4]  # every epoch's metrics, in order
    assert len(stored) <= 2  # those that waited went in one call
    assert torch.load(path, weights_only=True)["epoch"] == 4  # the newest checkpoint is the one on disk


def test_metrics_alone_wait_out_the_log_interval_but_a_checkpoint_or_the_end_stores_them_at_once(tmp_path):
    # Epochs of milliseconds (a small trial on a GPU) would each be a write transaction on a store that
    # every packed trial shares; a checkpoint must still never be on disk before its epoch's metrics.
    path, calls = tmp_path / "checkpoint.pt", []
    writer = CheckpointWriter(path, log=lambda epochs: calls.append([step for _, step, _ in epochs]), log_interval=60)
    writer.save({"epoch": 0}, {"loss": 1.0}, 0)
    for epoch in range(1, 5):
        writer.save(None, {"loss": 1.0}, epoch)
    writer.save({"epoch": 5}, {"loss": 1.0}, 5)  # long before the interval is out
    deadline = time.monotonic() + 20
    while not (path.exists() and torch.load(path, weights_only=True)["epoch"] == 5):
        assert time.monotonic() < deadline, f"checkpoint 5 not written within 20 s; metrics stored: {calls}"
        time.sleep(0.02)
    assert [step for call in calls for step in call] == [0, 1, 2, 3, 4, 5]  # its metrics went first
    for epoch in range(6, 9):
        writer.save(None, {"loss": 1.0}, epoch)
    time.sleep(0.2)
    stored = len(calls)
    writer.wait()  # the run's end: what waits is stored now, not in a minute
    assert [step for call in calls for step in call] == list(range(9))
    assert len(calls) == stored + 1 and calls[-1] == [6, 7, 8]  # in one call
    assert len(calls) <= 4  # 9 epochs: the first at once, then in batches


def test_epochs_shorter_than_copying_their_state_skip_checkpoints_but_never_metrics_or_the_last(tmp_path):
    path, stored = tmp_path / "checkpoint.pt", []
    writer = CheckpointWriter(path, log=lambda epochs: stored.extend(step for _, step, _ in epochs), budget=0.001)

    def state(epoch):  # a copy that takes 20 ms: 0.1% of the training time needs 20 s between copies
        time.sleep(0.02)
        return {"epoch": epoch}

    for epoch in range(10):
        writer.save(functools.partial(state, epoch) if writer.due(last=epoch == 9) else None, {"loss": 1.0}, epoch)
    writer.wait()
    assert writer.snapshots == 2  # the first epoch and the last
    assert sorted(stored) == list(range(10))  # every epoch's metrics
    assert torch.load(path, weights_only=True)["epoch"] == 9


def test_epochs_longer_than_copying_their_state_each_get_a_checkpoint(tmp_path):
    writer = CheckpointWriter(tmp_path / "checkpoint.pt", budget=1.0, checkpoint_interval=0.0)
    for epoch in range(4):
        time.sleep(0.05)  # an epoch's training, far longer than copying a few numbers
        writer.save((lambda e=epoch: {"epoch": e}) if writer.due() else None, {"loss": 1.0}, epoch)
    writer.wait()
    assert writer.snapshots == 4


def test_epochs_shorter_than_the_checkpoint_interval_get_one_checkpoint_per_interval_and_every_metric(tmp_path):
    # Each checkpoint is a write of the weights and a store of the metrics before it: epochs of
    # milliseconds (small trials, several packed in one process) would make one of each per epoch.
    path, calls = tmp_path / "checkpoint.pt", []
    writer = CheckpointWriter(path, log=lambda epochs: calls.append([step for _, step, _ in epochs]), budget=1.0,
                              checkpoint_interval=0.25)
    started = time.perf_counter()
    for epoch in range(40):
        time.sleep(0.01)  # an epoch's training
        writer.save((lambda e=epoch: {"epoch": e}) if writer.due(last=epoch == 39) else None, {"loss": 1.0}, epoch)
    writer.wait()
    elapsed = time.perf_counter() - started
    assert 2 <= writer.snapshots <= 2 + elapsed / 0.25  # the first, the last, and one per interval between
    assert [step for call in calls for step in call] == list(range(40))  # every epoch's metrics, in order
    assert len(calls) <= 2 + 2 * elapsed / 0.25  # stored with the checkpoints or once a second, not per epoch
    assert torch.load(path, weights_only=True)["epoch"] == 39


def test_runs_training_at_once_in_one_process_each_checkpoint_as_often_as_their_number_says(tmp_path):
    # Trials packed into threads of one worker: K of them would otherwise store K times as often,
    # and their host work runs one thread at a time.
    first = CheckpointWriter(tmp_path / "first.pt", budget=1.0, checkpoint_interval=1.0)
    first.save({"epoch": 0}, {"loss": 1.0}, 0)
    time.sleep(1.1)
    assert first.due()  # alone: an interval has passed
    second = CheckpointWriter(tmp_path / "second.pt", budget=1.0, checkpoint_interval=1.0)
    assert not first.due()  # two runs in the process: each waits two intervals
    second.close()
    second.close()  # closing twice counts once
    assert first.due()
    first.wait()


def test_a_failed_store_is_raised_in_the_training_thread_at_its_next_save(tmp_path):
    def log(epochs):
        raise OSError("the tracking store went away")

    writer = CheckpointWriter(tmp_path / "checkpoint.pt", log=log)
    writer.save({"epoch": 0}, {"loss": 1.0}, 0)
    writer.close()
    with pytest.raises(OSError, match="went away"):
        writer.save({"epoch": 1}, {"loss": 0.5}, 1)
    assert not (tmp_path / "checkpoint.pt").exists()  # no checkpoint ahead of its metrics


def test_train_ignores_the_search_section_even_one_that_run_would_refuse(workdir, cli_here):
    spec_path = write_yaml(workdir / "searched.yaml", {
        **TINY, "train": {**TINY["train"], "epochs": 1}, "tracking": {"enabled": False},
        "search": {"space": {"model.no_such_key": {"int": [1, 2]}}}})
    assert cli_here("validate", str(spec_path), cwd=workdir).returncode == 2  # validate checks the space
    result = cli_here("train", str(spec_path), "--quiet", cwd=workdir)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("tiny: train_loss ")


@pytest.mark.parametrize("eval_batch_size, expected", [(None, 4 * 32), (50, 50)])
def test_validation_and_test_batches_are_four_training_batches_unless_set(eval_batch_size, expected):
    from accelerate import Accelerator

    from vit_search.train import _setup

    spec = load_spec({**TINY, "train": {**TINY["train"], "eval_batch_size": eval_batch_size}})
    loaders = _setup(spec, Accelerator(cpu=True), "no").loaders
    assert loaders["train"].batch_size == 32 and loaders["val"].batch_size == loaders["test"].batch_size == expected


def test_a_checkpoint_dir_under_home_is_the_homes_never_a_folder_named_tilde(workdir, monkeypatch, cli_here):
    # `train.checkpoint_dir: ~/x` once made ./~/x, which `rm -rf ~` would then "clean up".
    from vit_search.cli import build_parser

    home = workdir / "home"
    monkeypatch.setenv("HOME", str(home))
    assert load_spec({**TINY, "train": {**TINY["train"], "checkpoint_dir": "~/ck"}}).train.checkpoint_dir == \
        str(home / "ck")
    # The argument too (the shell leaves `--checkpoint-dir=~/x` as it is): `run` and `train` read it.
    for command in ("run", "train"):
        assert build_parser().parse_args([command, "s.yaml", "--checkpoint-dir=~/x"]).checkpoint_dir == str(home / "x")
    spec_path = write_yaml(workdir / "home.yaml", {**TINY, "tracking": {"enabled": False},
                                                   "train": {**TINY["train"], "epochs": 1}})
    assert cli_here("train", spec_path, "--set=train.checkpoint_dir=~/ck", cwd=workdir).returncode == 0
    assert cli_here("train", spec_path, "--checkpoint-dir=~/other", cwd=workdir).returncode == 0
    assert (home / "ck" / "checkpoint.pt").exists() and (home / "other" / "checkpoint.pt").exists()
    assert not (workdir / "~").exists()
