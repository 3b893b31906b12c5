"""`vit-search run`: studies over specs, shared by workers, logged to MLflow as parent and children."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from vit_search.registry import register
from vit_search.search.run import run_search
from vit_search.search.storage import StorageError
from vit_search.search.study import PARENT_RUN, RETRIED, open_study
from vit_search.spec import load_spec

STUDY = {
    "name": "study",
    "seed": 0,
    "data": {"dataset": "digits", "image_size": 8},
    "model": {"dim": 16, "depth": 1, "patch_embed": {"type": "conv", "patch_size": 2},
              "attention": {"type": "sdpa", "heads": 2}, "ffn": {"type": "mlp", "ratio": 2}},
    "train": {"epochs": 2, "batch_size": 64, "lr": 3.0e-3, "warmup_epochs": 0.5},
    "search": {"n_trials": 4, "sampler": "random", "pruner": "none",
               "space": {"model.depth": {"int": [1, 2]}, "train.lr": {"float": [1.0e-3, 1.0e-2], "log": True},
                         "model.pooling.type": {"choice": ["cls", "mean"]}}},
}


def study_raw(name: str, plots: bool = False, **search) -> dict:
    return {**STUDY, "name": name, "tracking": {"experiment": name, "plots": plots},
            "search": {"storage": f"sqlite:///{Path.cwd() / 'optuna.db'}", **STUDY["search"], **search}}


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    """A fresh working directory (studies go to its optuna.db) and the session's MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def children_of(client: MlflowClient, parent_id: str):
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def worker(spec_path: Path, cwd: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vit_search", "run", str(spec_path), *extra], cwd=cwd,
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_study_logs_a_parent_run_with_one_child_per_trial(workdir):
    result = run_search(load_spec(study_raw("structure", plots=True)), progress=False)
    trials = result.study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)

    client = MlflowClient()
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("structure").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["sampler"] == "random"
    assert parent.data.tags["pruner"] == "none" and parent.data.tags["optuna.study_name"] == "structure"
    assert {k: parent.data.metrics[k] for k in ("trials_complete", "trials_pruned", "trials_fail")} == {
        "trials_complete": 4, "trials_pruned": 0, "trials_fail": 0}
    assert {"best_test_accuracy", "best_test_loss", "best_parameters", "best_flops"} <= set(parent.data.metrics)
    # The worker's account of its trials' time is the sum of what each trial's run logged.
    children = children_of(client, parent.info.run_id)
    assert result.seconds.setup == pytest.approx(sum(r.data.metrics["setup_seconds"] for r in children))
    assert result.seconds.evaluation == pytest.approx(sum(r.data.metrics["eval_seconds"] for r in children))
    assert result.seconds.total <= result.train_seconds
    children = children_of(client, parent.info.run_id)
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2, 3]
    for child in children:
        number = int(child.data.tags["optuna.trial_number"])
        assert child.data.tags["trial.state"] == "COMPLETE" and child.info.status == "FINISHED"
        assert child.data.tags["search.keys"] == "model.depth,train.lr,model.pooling.type"
        assert child.info.run_name.startswith(f"trial {number} · depth ") and " · val_accuracy " in child.info.run_name
        assert {"epoch_seconds", "test_accuracy", "parameters", "flops"} <= set(child.data.metrics)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"spec.yaml", "model"}
        # The searched values are params under their dotted names, as sampled.
        assert child.data.params["model.depth"] == str(trials[number].params["model.depth"])
        assert child.data.params["model.pooling.type"] == trials[number].params["model.pooling.type"]
    best = result.study.best_trial
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"best_spec.yaml", "study.yaml"} <= artifacts and "plots/optimization_history.png" in plots
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {c.info.run_id for c in children}
    # Each trial's epoch checkpoints in runs/<study>/trial-<n>/.
    assert sorted(p.relative_to(workdir).as_posix() for p in (workdir / "runs").rglob("checkpoint.pt")) == [
        f"runs/structure/trial-{n}/checkpoint.pt" for n in range(4)]


def test_a_multi_objective_study_prunes_nothing_and_logs_its_pareto_front(workdir, capsys):
    from vit_search.cli import main

    raw = study_raw("pareto", plots=True, n_trials=3, metric=["val_accuracy", "parameters"],
                    direction=["maximize", "minimize"], pruner="median")
    (workdir / "spec.yaml").write_text(yaml.safe_dump(raw))
    result = run_search(load_spec(raw), progress=False)
    study = result.study
    assert isinstance(study.pruner, optuna.pruners.NopPruner)  # Optuna prunes single-objective studies only
    assert all(t.values[1] == t.user_attrs["parameters"] for t in study.get_trials())
    front = [t.number for t in study.best_trials]
    client = MlflowClient()
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("pareto").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags.get("pareto_front", str(front[0])) == ",".join(map(str, front))  # tagged when 2 or more
    assert parent.data.tags["best_trial"] == str(front[0])
    assert "plots/pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert main(["best", "spec.yaml", "--export", "best.yaml"]) == 0  # the first trial of the front
    exported = yaml.safe_load((workdir / "best.yaml").read_text())
    params = study.trials[front[0]].params  # every searched value, not only one that trials may share
    written = {key: functools.reduce(dict.get, key.split("."), exported) for key in params}
    assert written["model.pooling.type"] == params.pop("model.pooling.type")
    assert {key: written[key] for key in params} == pytest.approx(params) and len(params) == 2
    assert "trial  value" in capsys.readouterr().out


def test_constraints_prune_trials_before_any_training(workdir):
    spec = load_spec(study_raw("constrained", n_trials=3, constraints={"max_params": 1000}))
    result = run_search(spec, progress=False)
    trials = result.study.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    assert all(t.user_attrs["pruned_reason"].startswith("params ") for t in trials)
    assert result.train_seconds == 0 and not (workdir / "runs").exists()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("constrained").experiment_id],
                              filter_string="tags.`trial.state` = 'PRUNED'")
    assert len(runs) == 3 and all("max_params" in r.data.tags["pruned_reason"] for r in runs)
    by_number = {t.number: t for t in trials}
    for run in runs:  # each untrained run still records the size that pruned it, as its trial does
        trial = by_number[int(run.data.tags["optuna.trial_number"])]
        assert run.data.metrics["parameters"] == trial.user_attrs["parameters"] > 1000
        assert run.data.metrics["flops"] == trial.user_attrs["flops"] > 0


def test_n_trials_extends_a_study_a_finished_one_adds_none_and_every_enqueued_trial_runs_once(workdir):
    # Trials pruned by a constraint: the study's bookkeeping without training.
    raw = {**study_raw("extended", n_trials=2, constraints={"max_params": 1000},
                       enqueue=[{"model.depth": 1}, {"model.depth": 2}, {"model.depth": 1, "train.lr": 5.0e-3},
                                {"model.depth": 2}]),  # given twice: two trials, each with its own drawn lr
           "tracking": {"enabled": False}}
    assert len(run_search(load_spec(raw), progress=False).study.get_trials()) == 4  # all enqueued, though n_trials is 2
    assert len(run_search(load_spec(raw), progress=False).study.get_trials()) == 4  # finished: the same command adds none
    trials = run_search(load_spec(raw, ["search.n_trials=5"]), progress=False).study.get_trials()
    assert len(trials) == 5 and {t.state for t in trials} == {TrialState.PRUNED}  # the queue was not added again
    assert [t.params["model.depth"] for t in trials[:4]] == [1, 2, 1, 2] and trials[2].params["train.lr"] == 5.0e-3
    assert trials[1].params["train.lr"] != trials[3].params["train.lr"]
    # An initialise whose worker was killed before the study recorded it done runs again: it adds none twice.
    from vit_search.search.run import TrialRunner
    from vit_search.search.study_runs import StudyRuns

    spec = load_spec(raw)
    handle = open_study(spec)
    TrialRunner(spec, handle, StudyRuns(spec, handle), 1).initialise()
    assert len(handle.study.get_trials()) == 5


def test_without_n_trials_a_worker_stops_taking_trials_at_its_timeout(workdir):
    raw = {**study_raw("timed", n_trials=None, timeout=1.0, constraints={"max_params": 1000}),
           "tracking": {"enabled": False}}
    started = time.monotonic()
    trials = run_search(load_spec(raw), progress=False).study.get_trials()
    assert time.monotonic() - started < 30 and len(trials) >= 1 and {t.state for t in trials} == {TrialState.PRUNED}
    first = trials[0].datetime_start
    assert all((t.datetime_start - first).total_seconds() <= 1.0 for t in trials)  # none started after the timeout


def test_a_study_that_reaches_its_timeout_with_trials_still_queued_ends_its_parent_run_finished(workdir, monkeypatch):
    # docs/search.md: the parent ends FINISHED once `timeout` has passed; queued trials left it RUNNING.
    import vit_search.search.run as run_module

    def train_past_the_timeout(*args, **kwargs):  # a fast machine trained all three within it
        time.sleep(0.6)
        return real_train(*args, **kwargs)

    real_train = run_module.train
    monkeypatch.setattr(run_module, "train", train_past_the_timeout)
    raw = study_raw("timed-queued", n_trials=3, timeout=0.5, enqueue=[{"model.depth": 1}] * 3)
    trials = run_search(load_spec(raw, ["train.epochs=1"]), progress=False).study.get_trials()
    assert TrialState.WAITING in {t.state for t in trials} and TrialState.COMPLETE in {t.state for t in trials}
    client = MlflowClient()
    (parent,) = client.search_runs([client.get_experiment_by_name("timed-queued").experiment_id],
                                   filter_string="tags.`mlflow.parentRunId` IS NULL")
    assert parent.info.status == "FINISHED"


def test_a_combination_that_cannot_be_built_is_pruned_with_its_reason(workdir):
    spec = load_spec(study_raw("infeasible", n_trials=1, space={"model.attention.heads": {"choice": [3, 4]}},
                               enqueue=[{"model.attention.heads": 3}]))  # dim 16 does not split into 3 heads
    (trial,) = run_search(spec, progress=False).study.get_trials()
    assert trial.state == TrialState.PRUNED and not (workdir / "runs").exists()
    assert trial.user_attrs["pruned_reason"].startswith("infeasible: ") and "heads" in trial.user_attrs["pruned_reason"]


def test_an_input_error_no_searched_value_can_cause_stops_the_worker_with_its_trial_queued_again(workdir):
    too_big = {"train.batch_size": 4096}  # more than digits' training split: not one full batch
    spec = load_spec({**study_raw("batch-fixed", n_trials=3), "tracking": {"enabled": False}},
                     [f"{k}={v}" for k, v in too_big.items()])
    result = run_search(spec, progress=False)
    assert result.stopped.exit_code == 2 and "lower train.batch_size" in str(result.stopped)
    assert [t.state for t in result.study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
    # Searched, the batch size is the trial's own: its trials fail and the study goes on.
    space = {"train.batch_size": {"choice": [4096, 8192]}}
    spec = load_spec({**study_raw("batch-searched", n_trials=2, space=space), "tracking": {"enabled": False}})
    result = run_search(spec, progress=False)
    assert result.stopped is None
    assert [t.state for t in result.study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]


@register("head", "test_exploding_head")
class ExplodingHead:
    """A head that raises in a training forward: a plugin bug inside one trial, which the spec's check
    (one image through the model in eval mode) cannot see."""

    def __new__(cls, dim: int, num_classes: int):
        import torch

        class Head(torch.nn.Linear):
            def forward(self, x):
                if self.training:
                    raise RuntimeError("plugin bug")
                return super().forward(x)

        return Head(dim, num_classes)


def test_a_failing_trial_is_recorded_and_the_study_goes_on(workdir):
    raw = study_raw("failing", n_trials=4, space={
        "model.head.type": {"choice": ["linear", "test_exploding_head"]}, "model.depth": {"int": [1, 2]}},
        enqueue=[{"model.head.type": "test_exploding_head"}, {"model.head.type": "linear"}])
    raw["tracking"] = {**raw["tracking"], "log_model": False}  # and plots off, as study_raw has them
    result = run_search(load_spec(raw), progress=False, checkpoint_dir=str(workdir / "elsewhere"))
    trials = result.study.get_trials()
    assert len(trials) == 4 and (workdir / "elsewhere" / "failing" / "trial-1" / "checkpoint.pt").is_file()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["error"] == "RuntimeError: plugin bug"
    assert trials[1].state == TrialState.COMPLETE
    client = MlflowClient()
    failed = client.search_runs([client.get_experiment_by_name("failing").experiment_id],
                                filter_string="tags.`optuna.trial_number` = '0'")
    assert failed[0].info.status == "FAILED" and failed[0].data.tags["trial.state"] == "FAIL"
    assert failed[0].data.tags["error"] == "RuntimeError: plugin bug" and failed[0].info.run_name.endswith(" · failed")
    assert trials[0].user_attrs["mlflow_run_id"] == failed[0].info.run_id  # a failed trial names its run too
    trained = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert {a.path for a in client.list_artifacts(trained.info.run_id)} == {"spec.yaml"}  # no weights: log_model off
    parent = client.get_run(trained.data.tags["mlflow.parentRunId"])
    assert not client.list_artifacts(parent.info.run_id, "plots")


def test_a_trial_whose_model_cannot_fit_memory_fails_in_a_failed_run_that_it_names(workdir):
    # It failed before its run started: Optuna held a failed trial that MLflow had never heard of.
    raw = study_raw("too-large-trial", n_trials=2, space={"model.dim": {"choice": [16, 16384]}},
                    enqueue=[{"model.dim": 16384}, {"model.dim": 16}])
    raw["model"] = {**raw["model"], "depth": 30}  # at dim 16384: 360 GiB of weights, refused before any is allocated
    trials = run_search(load_spec(raw, ["train.epochs=1"]), progress=False).study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "GiB for their weights alone" in trials[0].user_attrs["error"]
    client = MlflowClient()
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("too-large-trial").experiment_id],
                                                          filter_string="tags.`mlflow.parentRunId` LIKE '%'")}
    assert sorted(runs) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    failed = runs[trials[0].user_attrs["mlflow_run_id"]]
    assert failed.info.status == "FAILED" and failed.data.tags["error"] == trials[0].user_attrs["error"]


@register("head", "test_nan_when_evaluated_head")
class NanWhenEvaluatedHead:
    """A head that trains as a linear one and gives NaN logits in evaluation: a finite loss in
    training, a non-finite validation loss."""

    def __new__(cls, dim: int, num_classes: int):
        import torch

        class Head(torch.nn.Linear):
            def forward(self, x):
                logits = super().forward(x)
                return logits if self.training else torch.full_like(logits, float("nan"))

        return Head(dim, num_classes)


def test_a_non_finite_objective_fails_its_trial_which_is_not_retried_and_the_study_goes_on(workdir):
    raw = study_raw("non-finite", n_trials=2, metric="val_loss", space={
        "model.head.type": {"choice": ["linear", "test_nan_when_evaluated_head"]}},
        enqueue=[{"model.head.type": "test_nan_when_evaluated_head"}, {"model.head.type": "linear"}])
    trials = run_search(load_spec(raw, ["train.epochs=1"]), progress=False).study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # nothing queued again
    assert trials[0].user_attrs["error"] == "objective is not finite: [nan]"
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("non-finite").experiment_id],
                                filter_string="tags.`optuna.trial_number` = '0'")
    assert run.info.status == "FAILED" and run.data.tags["error"] == "objective is not finite: [nan]"


def test_a_study_with_tracking_disabled_makes_no_mlflow_store_no_run_and_offers_no_ui(tmp_path, monkeypatch, capsys):
    from vit_search.cli import main

    store = tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**study_raw("untracked", n_trials=2),
                                                        "tracking": {"enabled": False}}))
    assert main(["run", "spec.yaml", "--set", "train.epochs=1", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "vit-search best spec.yaml" in said and "vit-search ui" not in said  # nothing logged to compare there
    trials = optuna.load_study(study_name="untracked", storage="sqlite:///optuna.db").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert not store.parent.exists() and not (tmp_path / "mlruns").exists()
    assert not [t for t in trials if "mlflow_run_id" in t.user_attrs]


def test_a_study_whose_every_trial_failed_exits_1_saying_so(workdir, capsys):
    from vit_search.cli import main

    raw = {**study_raw("all-failing", n_trials=2, space={"model.depth": {"int": [1, 2]}}),
           "tracking": {"enabled": False}}
    raw["model"] = {**raw["model"], "head": {"type": "test_exploding_head"}}
    (workdir / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", "spec.yaml", "--quiet"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: all 2 trials this worker ran failed; the last: RuntimeError: plugin bug")


@pytest.mark.slow
def test_best_export_round_trips_through_train(workdir, capsys):
    from vit_search.cli import main

    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("roundtrip", n_trials=2)))
    result = run_search(load_spec(spec_path), progress=False)
    assert main(["best", str(spec_path), "--export", "best.yaml"]) == 0
    best = yaml.safe_load((workdir / "best.yaml").read_text())
    assert "search" not in best and best["model"]["depth"] == result.study.best_trial.params["model.depth"]
    best_trial = result.study.best_trial
    assert best["tracking"]["tags"] == {"vit_search.retrain_of": f"study roundtrip trial {best_trial.number}",
                                        "vit_search.retrain_of_run": best_trial.user_attrs["mlflow_run_id"]}
    capsys.readouterr()
    assert main(["train", "best.yaml"]) == 0  # in this process too: what is compared is the value, not a start-up
    assert f"val_accuracy {result.study.best_value:.4f}" in capsys.readouterr().out
    # The retrained run is found from the trial it repeats.
    (retrained,) = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("roundtrip").experiment_id],
        filter_string=f"tags.`vit_search.retrain_of_run` = '{best_trial.user_attrs['mlflow_run_id']}'")
    assert retrained.data.tags["vit_search.retrain_of"] == f"study roundtrip trial {best_trial.number}"
    assert not [key for key in retrained.data.params if key.startswith("tracking.tags")]  # tags, not params too
    assert main(["best", str(spec_path), "--export", "missing/best.yaml"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --export missing/best.yaml: cannot write it (No such file or directory); name a file in a folder "
        "that exists and can be written"]


def test_an_export_is_written_whole_or_not_at_all(tmp_path):
    from vit_search.cli import BadInput, _export

    (tmp_path / "taken").mkdir()
    with pytest.raises(BadInput, match="cannot write it"):
        _export(tmp_path / "taken", "model: {}\n")  # a folder of that name: nothing replaces it
    (tmp_path / "afile").write_text("")
    with pytest.raises(BadInput, match="afile/best.yaml: cannot write it"):
        _export(tmp_path / "afile" / "best.yaml", "model: {}\n")  # a file where its folder should be
    os.mkfifo(tmp_path / "pipe")  # as a device (/dev/full, /dev/null) would be, it is not replaced by the file
    with pytest.raises(BadInput, match="pipe: not a regular file"):
        _export(tmp_path / "pipe", "model: {}\n")
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)
    _export(tmp_path / "best.yaml", "model: {}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "best.yaml", "pipe", "taken"]  # no partial file left
    assert (tmp_path / "best.yaml").read_text() == "model: {}\n"


def test_a_trial_run_left_without_its_state_is_given_it_when_the_study_runs_again(workdir):
    # Its worker lost the tracking server as the trial ended (the run FINISHED, its state never tagged).
    spec = load_spec(study_raw("untagged", n_trials=1), ["train.epochs=1"])
    study = run_search(spec, progress=False).study
    client = MlflowClient()
    (run,) = children_of(client, open_study(spec).attr(PARENT_RUN))
    client.delete_tag(run.info.run_id, "trial.state")
    run_search(spec, progress=False)  # finished already: it trains nothing, and sets the runs right
    assert client.get_run(run.info.run_id).data.tags["trial.state"] == study.get_trials()[0].state.name == "COMPLETE"


def test_a_study_whose_plots_cannot_be_drawn_says_so_and_still_finishes_its_parent_run(workdir, monkeypatch, capsys):
    # As a library fails to load under an address-space limit ("failed to map segment"): the parent was left RUNNING.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    spec = load_spec(study_raw("no-plots", plots=True, n_trials=1), ["train.epochs=1"])
    run_search(spec, progress=False)
    assert "note: the study's plots were not drawn (ModuleNotFoundError: " in capsys.readouterr().err
    parent = MlflowClient().get_run(open_study(spec).attr(PARENT_RUN))
    assert parent.info.status == "FINISHED" and not MlflowClient().list_artifacts(parent.info.run_id, "plots")


@pytest.mark.slow
def test_pruner_stops_weak_trials_early(workdir):
    spec = load_spec(study_raw("pruned", n_trials=6, pruner="median", sampler="random",
                               space={"train.lr": {"float": [1.0e-6, 1.0e-2], "log": True}},
                               enqueue=[{"train.lr": 1.0e-2}] * 4 + [{"train.lr": 1.0e-6}] * 2),
                     ["train.epochs=6"])
    result = run_search(spec, progress=False)
    states = [t.state for t in result.study.get_trials()]
    assert TrialState.PRUNED in states[4:]
    pruned = [t for t in result.study.get_trials() if t.state == TrialState.PRUNED]
    assert all(len(t.intermediate_values) < 6 for t in pruned)
    # Their runs say why in pruned_reason alone: a filter on `error` finds failures, not pruned trials.
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("pruned").experiment_id],
                              filter_string="tags.`trial.state` = 'PRUNED'")
    assert len(runs) == len(pruned) and {r.info.status for r in runs} == {"KILLED"}
    assert {t.user_attrs["mlflow_run_id"] for t in pruned} == {r.info.run_id for r in runs}  # found from Optuna too
    assert all("error" not in r.data.tags and r.data.tags["pruned_reason"].startswith("pruned by median after epoch ")
               for r in runs), [r.data.tags for r in runs]


# Separate worker processes on one journal storage (exactly n_trials, distinct points, one MLflow parent):
# test_distinct.py.
def _storage(url: str):
    from vit_search.search.storage import open_storage

    return open_storage(url)


def test_a_study_on_a_real_redis_server_runs_its_trials_under_the_redis_lock(workdir, redis_url):
    import redis

    name = f"redis-{os.getpid()}-{time.time_ns()}"
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump({**study_raw(name, n_trials=2, storage=redis_url),
                                         "tracking": {"enabled": False}}))
    finish(worker(spec_path, workdir))
    storage = _storage(redis_url)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert len(trials) == 2 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert trials[0].params != trials[1].params
    assert not redis.Redis.from_url(redis_url).exists(f"vit-search:{name}")  # the study lock was given back
    optuna.delete_study(study_name=name, storage=storage)


def _redis_server(folder: Path, port: int) -> subprocess.Popen:
    """A Redis server of the test's own, keeping its data in ``folder`` (append-only file), so that
    it can be stopped and started again with the study in it."""
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    deadline = time.monotonic() + 30
    while True:  # until it answers
        try:
            redis.Redis(port=port, socket_connect_timeout=1).ping()
            return proc
        except redis.exceptions.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)


@pytest.mark.slow
def test_a_postgresql_study_lock_whose_connection_is_cut_ends_without_an_error_and_is_taken_again(postgres_url):
    # An administrator's pg_terminate_backend (or a server restart) cut the lock's connection mid-body: the
    # unlock on it raised, and the worker died in the "unexpected failure" line.
    import zlib

    import psycopg

    from vit_search.search.storage import study_lock

    name = f"cut-{os.getpid()}-{time.time_ns()}"
    key = zlib.crc32(f"vit-search:{name}".encode()) & 0x7FFFFFFF
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        with study_lock(postgres_url, name, timeout=30):
            (cut,) = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                                   "AND objid = %s AND granted", (key,)).fetchall()
            assert cut == (True,)
        with study_lock(postgres_url, name, timeout=30):  # the server ended the session, and its lock with it
            assert admin.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
                                 (key,)).fetchone() == (1,)


def test_a_redis_study_lock_is_kept_while_its_holder_lives_and_freed_soon_after_a_kill(redis_url):
    import redis

    from vit_search.search.storage import study_lock

    name, url = f"lease-{os.getpid()}", f"{redis_url}/6"
    key = f"vit-search:{name}"
    redis.Redis.from_url(url).delete(key)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from vit_search.search import storage
storage.REDIS_LEASE_SECONDS = 1.0
with storage.study_lock({url!r}, {name!r}):
    print("held", flush=True)
    time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(2.5)  # past the 1 s lease: renewed, so still held
        assert redis.Redis.from_url(url).exists(key)
        with pytest.raises(StorageError, match="another worker held the study lock for 1 s"):
            with study_lock(url, name, timeout=1):
                pass
        holder.kill()  # outright: no release
        holder.wait()
        with study_lock(url, name, timeout=60):  # the lease runs out in about a second, not the wait's 60 s
            assert redis.Redis.from_url(url).exists(key)
        assert not redis.Redis.from_url(url).exists(key)
    finally:
        holder.kill()


def test_a_storage_that_goes_away_mid_trial_is_one_line_and_the_resumed_study_loses_no_trial(workdir):
    pytest.importorskip("redis", reason="redis is needed for Redis storages (pip install -e '.[test]')")
    if not shutil.which("redis-server"):
        pytest.skip("no redis-server on PATH: this test stops a Redis server of its own (apt-get install redis-server)")
    from conftest import free_port

    folder, port = workdir / "redis", free_port()
    folder.mkdir()
    url = f"redis://127.0.0.1:{port}"
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("lost-storage", n_trials=3, storage=url)))
    server = _redis_server(folder, port)
    proc = worker(spec_path, workdir, "--set", "train.epochs=6")
    client = MlflowClient()
    deadline = time.monotonic() + 180
    while True:  # stop the storage while a trial trains
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no trial started"
        experiment = client.get_experiment_by_name("lost-storage")
        training = experiment and client.search_runs(
            [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
        if any(r.data.tags.get("optuna.trial_number") for r in training or []):
            break
        time.sleep(0.2)
    server.terminate()  # a clean shutdown: what it holds is on disk
    server.wait(timeout=30)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"Optuna storage {url} does not answer" in errors[0], err[-3000:]
    # MLflow says so until the study resumes: the study's run stopped (KILLED, as after Ctrl-C), and why.
    experiment_id = client.get_experiment_by_name("lost-storage").experiment_id
    parent = [r for r in client.search_runs([experiment_id]) if "optuna.trial_number" not in r.data.tags][0]
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == errors[0].removeprefix("error: ")
    assert "RUNNING" not in {r.info.status for r in client.search_runs([experiment_id])}  # the trial's run FAILED too

    server = _redis_server(folder, port)
    try:
        # Run again, at the spec's 2 epochs (the 6 kept a trial training for the stop): the study resumes.
        # (In this process: no start-up to pay.)
        run_search(load_spec(spec_path), progress=False)
        storage = _storage(url)
        trials = optuna.load_study(study_name="lost-storage", storage=storage).get_trials()
    finally:
        server.terminate()
        server.wait(timeout=30)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].system_attrs[RETRIED]  # the trial in training, retried
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    runs = client.search_runs([client.get_experiment_by_name("lost-storage").experiment_id])
    status = {r.data.tags["optuna.trial_number"]: r.info.status for r in runs if "optuna.trial_number" in r.data.tags}
    assert status == {str(t.number): "FAILED" if t.state == TrialState.FAIL else "FINISHED" for t in trials}
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "error" not in parent.data.tags  # the resumed study ended it


@pytest.mark.slow
def test_a_killed_worker_loses_no_trial_when_the_study_is_resumed(workdir):
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("killed", n_trials=4), sort_keys=False))
    # Long enough trials that the kill lands inside one.
    proc = worker(spec_path, workdir, "--set", "train.epochs=4")
    storage = _storage(study_raw("killed")["search"]["storage"])
    client = MlflowClient()
    deadline = time.monotonic() + 180
    while True:  # kill it in the middle of training a trial, after one has completed
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no trial started"
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
        except KeyError:
            trials = []
        experiment = client.get_experiment_by_name("killed")
        training = experiment and client.search_runs(
            [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
        if any(t.state == TrialState.COMPLETE for t in trials) and any(
            r.data.tags.get("optuna.trial_number") for r in (training or []) if r.info.status == "RUNNING"
        ):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # Run again, at the spec's 2 epochs (the 4 kept a trial training for the kill); in this process: no start-up.
    run_search(load_spec(spec_path), progress=False)
    trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(killed) == 1 and killed[0].system_attrs[RETRIED]
    assert killed[0].user_attrs["error"].startswith("worker died")
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == killed[0].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4 and len(trials) == 5
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    dead = [r for r in runs if r.data.tags.get("optuna.trial_number") == str(killed[0].number)]
    assert len(dead) == 1 and dead[0].info.status == "FAILED"


def test_grid_search_ends_when_the_grid_is_covered(workdir):
    spec = load_spec(study_raw("grid", n_trials=10, sampler="grid", space={"model.depth": {"int": [1, 3]}}),
                     ["train.epochs=1"])
    result = run_search(spec, progress=False)
    trials = result.study.get_trials()
    assert sorted(t.params["model.depth"] for t in trials) == [1, 2, 3]
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    parent = open_study(spec).attr(PARENT_RUN)
    assert MlflowClient().get_run(parent).info.status == "FINISHED"  # ended, though 3 < n_trials


def test_a_grid_point_another_worker_is_training_is_not_drawn_again(workdir):
    spec = load_spec(study_raw("grid-busy", n_trials=10, sampler="grid", space={"model.depth": {"int": [1, 2]}}))
    study = open_study(spec).study
    first, _ = study.ask(), study.ask()  # two workers, each training one point
    assert {t.system_attrs["grid_id"] for t in study.get_trials()} == {0, 1}
    assert study.sampler.all_started(study) and not study.sampler.is_exhausted(study)
    study.tell(first, 0.5)
    assert study.sampler.all_started(study)  # the second still trains: nothing left to start


def test_enqueued_configuration_may_name_a_whole_block(workdir):
    block = {"type": "einsum", "heads": 4}
    spec = load_spec(study_raw("enqueue-block", n_trials=1, space={
        "model.attention": {"choice": [{"type": "sdpa", "heads": 2}, block]}}, enqueue=[{"model.attention": block}]),
        ["train.epochs=1"])
    (trial,) = run_search(spec, progress=False).study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.params["model.attention"] == "{type: einsum, heads: 4}"


def test_a_trial_another_worker_failed_does_not_stop_its_live_worker(workdir):
    """A live worker judged dead (stale heartbeat) finds its trial failed and retried: it goes on."""
    from vit_search.search.study import fail_stale_trials, open_study, worker_loop

    spec = load_spec(study_raw("judged-dead", n_trials=2))
    handle, other = open_study(spec), open_study(spec)  # this worker's and another worker's view

    def run_trial(trial, drawn):
        if trial.number == 0:
            fail_stale_trials(other, grace=-1)  # every heartbeat looks stale to the other worker
            trial.set_user_attr("val_accuracy", 0.5)  # as run_search does after training: refused
        return [0.5]

    report = worker_loop(handle, 2, lambda trial: None, run_trial, heartbeat=0.1)
    trials = handle.study.get_trials()
    assert report.trials_run == [0, 1, 2] and [t.state for t in trials] == [
        TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].user_attrs["error"].startswith("worker died") and trials[1].user_attrs["retry_of"] == 0


def test_a_configuration_whose_worker_dies_every_time_is_retried_twice_and_no_more(workdir):
    from vit_search.search.study import fail_stale_trials, open_study, sample_spec, worker_loop

    spec = load_spec(study_raw("dies-again", n_trials=1))
    handle, other = open_study(spec), open_study(spec)

    def run_trial(trial, drawn):
        fail_stale_trials(other, grace=-1)  # its worker "dies" in every attempt: another worker fails it
        return [0.5]

    worker_loop(handle, 1, lambda trial: sample_spec(spec, trial), run_trial, heartbeat=0.1)
    trials = handle.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3  # the first try and two retries
    assert [bool(t.system_attrs.get(RETRIED)) for t in trials] == [True, True, False]  # the third is not queued
    assert trials[0].params == trials[1].params == trials[2].params


@pytest.mark.parametrize("where", ["worker-loop", "stopped-at-once"])
def test_a_stop_signal_between_failing_a_trial_and_queueing_it_again_loses_no_retry(workdir, where):
    # Seen once in CI: the launcher's SIGTERM landed after the trial was failed, before its retry was queued.
    from vit_search.search.study import WORKER, _worker_id, interrupt_own_trials, worker_loop

    handle = open_study(load_spec(study_raw(f"held-{where}", n_trials=1)))
    tell = handle.study.tell

    def tell_then_signal(*args, **kwargs):
        told = tell(*args, **kwargs)
        if kwargs.get("state") == TrialState.FAIL:
            os.kill(os.getpid(), signal.SIGINT)  # lands between the failure and the queued retry
        return told

    def run_trial(trial, drawn):
        raise KeyboardInterrupt  # the first Ctrl-C, in the trial's step

    handle.study.tell = tell_then_signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # Another thread, as a worker has (MLflow's, a packed neighbour's): the kernel may hand it the signal.
    done = threading.Event()
    threading.Thread(target=done.wait, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            if where == "worker-loop":
                worker_loop(handle, 1, lambda trial: None, run_trial, heartbeat=0.1)
            else:  # a second Ctrl-C left the trial mid-step in its thread: failed and queued from outside
                trial = handle.study.ask()
                handle.storage.set_trial_system_attr(trial._trial_id, WORKER, _worker_id())
                interrupt_own_trials(handle, "interrupted (Ctrl-C)")
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous)
    assert [t.state for t in handle.study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]


def test_a_retried_trial_keeps_the_attributes_it_was_queued_with():
    from vit_search.search.study import StudyHandle, queue_again

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="queued")
    study.enqueue_trial({"x": 1.0}, user_attrs={"subnets.trial_number": 7, "inherited_val_accuracy": 0.5})
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
    trial.set_user_attr("error", "worker died")  # what the first try learnt is not carried over
    assert queue_again(StudyHandle(study, storage, "memory"), trial.number)
    retry = study.get_trials(states=(TrialState.WAITING,))[0]
    assert retry.user_attrs == {"subnets.trial_number": 7, "inherited_val_accuracy": 0.5, "retry_of": 0}


def test_the_storage_is_the_flag_then_the_environment_then_the_spec_then_beside_mlflows_store(monkeypatch):
    from vit_search.search.storage import STORAGE_ENV, journal_path
    from vit_search.search.study import storage_url_of

    spec = load_spec(study_raw("where", storage="sqlite:///spec.db"))
    monkeypatch.setenv(STORAGE_ENV, "sqlite:///env.db")
    assert storage_url_of(spec, "sqlite:///flag.db") == "sqlite:///flag.db"
    assert storage_url_of(spec) == "sqlite:///env.db"
    monkeypatch.delenv(STORAGE_ENV)
    assert storage_url_of(spec) == "sqlite:///spec.db"
    spec.search.storage = None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/tracking/mlflow.db")
    assert storage_url_of(spec) == "sqlite:////srv/tracking/optuna.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert storage_url_of(spec) == "sqlite:///optuna.db"  # the working directory
    assert [journal_path(url) for url in ("study.log", "runs/a.journal", "b.jsonl", "journal:c", "sqlite:///d.log")] == [
        Path("study.log"), Path("runs/a.journal"), Path("b.jsonl"), Path("c"), None]


@pytest.mark.parametrize("layout", ["sqlite", "journal"])
def test_a_storage_in_a_folder_that_does_not_exist_yet_is_created(workdir, layout):
    url = f"sqlite:///{workdir / 'new' / 'dir' / 's.db'}" if layout == "sqlite" else f"journal:{workdir / 'new' / 's.log'}"
    spec = load_spec(study_raw(f"new-folder-{layout}", n_trials=1, storage=url, constraints={"max_params": 1000}))
    (trial,) = run_search(spec, progress=False).study.get_trials()  # pruned by the constraint: nothing trains
    assert trial.state == TrialState.PRUNED


@pytest.mark.parametrize("url, message", [
    ("foo.db", "storage 'foo.db' is not a storage URL; write sqlite:///foo.db for a SQLite file or journal:foo.db"),
    ("foo://host/db", "storage 'foo://host/db': unknown database kind 'foo'; use one of sqlite:///"),
    ("sqlite://", "storage 'sqlite://': an in-memory SQLite database cannot be shared"),
    ("postgresql+pg8000://user:secret@host/db",
     "storage 'postgresql+pg8000://user:***@host/db' needs the Python module 'pg8000', which is not installed"),
])
def test_an_unusable_storage_url_is_refused_naming_it(url, message):
    from vit_search.search.storage import StorageError, check_url

    with pytest.raises(StorageError) as raised:
        check_url(url)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


@pytest.mark.parametrize("kind", ["sqlite:///", "journal:"])
def test_a_storage_file_that_is_a_device_or_pipe_is_refused_before_it_is_read(tmp_path, kind):
    from vit_search.search.storage import check_file

    os.mkfifo(tmp_path / "pipe")  # as /dev/zero would be read without end, a pipe would block the open
    with pytest.raises(StorageError, match=f"storage '{kind}{tmp_path}/pipe': {tmp_path}/pipe is not a regular file"):
        check_file(f"{kind}{tmp_path / 'pipe'}")


@pytest.mark.parametrize("storage, said", [
    ("foo.db", "storage 'foo.db' is not a storage URL; write sqlite:///foo.db for a SQLite file or journal:foo.db "
               "for a journal file (--storage or search.storage)"),
    pytest.param("journal:/proc/vit-search-study.log", "storage 'journal:/proc/vit-search-study.log': its folder /proc "
                 "takes no files", marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, a "
                                                            "folder that takes no files, as root too")),
], ids=["not-a-url", "folder-takes-no-files"])
def test_cli_run_with_a_bad_storage_exits_2_with_one_line_and_writes_nothing(workdir, cli_here, storage, said):
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("bad-storage")))
    before = sorted(workdir.iterdir())
    result = cli_here("run", str(spec_path), "--storage", storage, cwd=workdir)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {said}"), line
    assert sorted(workdir.iterdir()) == before  # no mlflow.db made before the refusal


def test_cli_run_of_a_study_stored_with_other_directions_exits_2(workdir, cli_here):
    from vit_search.search.study import open_study

    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("directions"), sort_keys=False))
    open_study(load_spec(spec_path))  # created maximising val_accuracy
    result = cli_here("run", str(spec_path), "--set", "search.metric=[val_loss, parameters]",
                 "--set", "search.direction=[minimize, minimize]", cwd=workdir)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --set search.direction=[minimize, minimize]: search.direction [minimize, minimize] "
                           "does not match study 'directions' in sqlite:///") and "created with maximize" in line
    assert "set a new search.study_name" in line
    assert optuna.load_study(study_name="directions", storage=study_raw("x")["search"]["storage"]).get_trials() == []


def test_the_shared_values_are_the_unsearched_data_model_and_train_values_but_where_or_how_fast_a_trial_runs():
    from vit_search.search.fixed import shared_values

    raw = {**STUDY, "search": {**STUDY["search"], "space": {"model.preset": {"choice": ["vit_ti_16", "vit_s_16"]},
                                                            "train.lr": {"float": [1e-3, 1e-2]},
                                                            "model.ffn.type": {"choice": ["mlp", "swiglu"]}}}}
    values = shared_values(load_spec(raw))
    assert not [key for key in values if key.startswith("model.") or key == "train.lr"]  # all drawn with the preset
    assert values["seed"] == 0 and values["train.epochs"] == 2 and values["data.image_size"] == 8
    assert "data.num_workers" not in values and "train.checkpoint_dir" not in values and "train.cuda_graph" not in values
    values = shared_values(load_spec(STUDY))  # depth, lr and the pooling searched: the pooling's arguments too
    assert values["model.dim"] == 16 and values["model.ffn.ratio"] == 2
    assert not [key for key in values if key.startswith("model.pooling") or key in ("model.depth", "train.lr")]


@pytest.mark.parametrize("worker, told", [(None, True), ("0", True), ("1", False)])
def test_the_joining_note_is_said_once_for_a_jobs_command_by_its_first_worker(monkeypatch, capsys, worker, told):
    from vit_search.search.fixed import say_joining

    if worker is not None:
        monkeypatch.setenv("VIT_SEARCH_WORKER", worker)
    say_joining({"train.epochs": 2}, {"train.epochs": 1}, "shared")
    assert capsys.readouterr().err.startswith("note: train.epochs 2 differs") is told


def test_a_worker_on_another_number_of_processes_than_the_studys_first_trials_is_told_once(workdir, capsys,
                                                                                            monkeypatch):
    from vit_search.search.fixed import LAUNCH
    from vit_search.search.study import open_study

    spec = load_spec(study_raw("launch-size", n_trials=1))
    run_search(spec, progress=False)
    assert "note:" not in capsys.readouterr().err
    handle = open_study(spec)
    assert handle.attr(LAUNCH) == 1
    # As a study begun under `accelerate launch` on 2 processes records it (test_scale launches one for real): a
    # worker on one process trains at half the batch a step, which the leaderboard does not show. It was silent.
    handle.set_attr(LAUNCH, 2)
    spec.search.n_trials = 2
    run_search(spec, progress=False)
    assert ("note: this worker trains each trial on 1 process, study 'launch-size''s first trials on 2: a step takes "
            "train.batch_size images on each, so its trials join the same leaderboard at another batch; set a new "
            "search.study_name to keep them apart") in capsys.readouterr().err
    monkeypatch.setenv("VIT_SEARCH_WORKER", "1")  # a --jobs worker but the first: its first worker says it
    spec.search.n_trials = 3
    run_search(spec, progress=False)
    assert "note:" not in capsys.readouterr().err


def test_a_worker_under_other_shared_values_is_told_and_best_exports_the_best_trial_as_it_was_trained(workdir, capsys):
    from vit_search.cli import main
    from vit_search.search.fixed import SHARED_VALUES
    from vit_search.search.study import open_study

    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("shared", n_trials=1), sort_keys=False))
    run_search(load_spec(spec_path, ["train.epochs=1"]), progress=False)
    assert "note:" not in capsys.readouterr().err
    # Searched values, and where or how fast a worker runs, differ without a word.
    assert open_study(load_spec(spec_path, ["train.epochs=1", "train.lr=0.5", "model.pooling.type=mean",
                                            "data.num_workers=0", "train.cuda_graph=false"])).differs == {}
    # Another worker trains 2 epochs: told so, and its trial records it.
    study = run_search(load_spec(spec_path, ["search.n_trials=2"]), progress=False).study
    assert ("note: train.epochs 2 differs from study 'shared', whose first trials were trained with 1: this worker's "
            "trials join the same leaderboard; set a new search.study_name") in capsys.readouterr().err
    first, second = study.get_trials()
    assert SHARED_VALUES not in first.system_attrs and second.system_attrs[SHARED_VALUES] == {"train.epochs": 2}
    best = study.best_trial.number
    trained, other = (1, 2) if best == 0 else (2, 1)
    # best exports the best trial only under the values it was trained with.
    assert main(["best", str(spec_path), "--set", f"train.epochs={other}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().endswith(
        f"train.epochs {other} differs from the value the best trial ({best}) of study 'shared' was trained with, "
        f"{trained}; pass --set train.epochs={trained} to export it as it was trained")
    # The best command that a worker under other values prints passes the best trial's (it repeated the worker's).
    from vit_search.search.next_steps import next_steps

    said = next_steps(str(spec_path), [f"train.epochs={other}", "train.lr=0.003"], None, study, True,
                      load_spec(spec_path, [f"train.epochs={other}", "train.lr=0.003"]))
    (command,) = [line.split("   #")[0].split() for line in said if " best " in line]
    assert command[3:5] == ["--set=train.lr=0.003", f"--set=train.epochs={trained}"], command
    assert main(command[1:]) == 0
    assert yaml.safe_load((workdir / "best.yaml").read_text())["train"]["epochs"] == trained
    # An export that cannot be written prints nothing on stdout: not a table, then the error.
    capsys.readouterr()
    assert main(["best", str(spec_path), "--set", f"train.epochs={trained}", "--export", str(workdir)]) == 2
    assert capsys.readouterr().out == ""
    parent = open_study(load_spec(spec_path)).attr(PARENT_RUN)  # its best_spec.yaml: the same values
    logged = Path(MlflowClient().download_artifacts(parent, "best_spec.yaml", str(workdir)))
    assert yaml.safe_load(logged.read_text())["train"]["epochs"] == trained


def test_a_recreated_study_does_not_retag_the_runs_of_an_older_study_of_the_same_name(workdir):
    first = study_raw("recreated", n_trials=1, constraints={"max_params": 1000})  # pruned, untrained
    run_search(load_spec(first), progress=False)
    # The same name and experiment in a fresh storage: its trial 0 fails (a head that cannot run).
    second = study_raw("recreated", n_trials=1, storage=f"sqlite:///{workdir / 'other.db'}",
                       space={"model.head.type": {"choice": ["test_exploding_head"]}})
    assert run_search(load_spec(second), progress=False).study.get_trials()[0].state == TrialState.FAIL
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("recreated").experiment_id],
                              filter_string="tags.`optuna.trial_number` = '0'", order_by=["attributes.start_time"])
    assert [r.data.tags["trial.state"] for r in runs] == ["PRUNED", "FAIL"]
    assert "error" not in runs[0].data.tags and runs[0].info.status == "KILLED"


def test_best_on_a_storage_without_the_study_exits_2_and_creates_nothing(workdir, capsys):
    from vit_search.cli import main  # in this process: an exception out of main fails the test as a traceback would

    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("absent")))
    for storage in (f"sqlite:///{workdir / 'typo.db'}", f"journal:{workdir / 'typo.log'}"):
        capsys.readouterr()
        assert main(["best", str(spec_path), "--storage", storage]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "no study 'absent'" in line and "--storage" in line
    assert not list(workdir.glob("typo.*"))
    other = f"sqlite:///{workdir / 'other.db'}"
    optuna.create_study(study_name="someone-else", storage=other)
    capsys.readouterr()
    assert main(["best", str(spec_path), "--storage", other]) == 2
    assert "no study 'absent'" in capsys.readouterr().err
    assert [s.study_name for s in optuna.get_all_study_summaries(other)] == ["someone-else"]


def test_best_prints_the_top_n_completed_trials_best_first(workdir, capsys):
    # README: `best SPEC --top N` prints the top trials; pruned and failed ones are counted, not ranked
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    from vit_search.cli import main

    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("top-n", space={"model.depth": {"int": [1, 6]}})))
    study = optuna.create_study(study_name="top-n", storage=f"sqlite:///{workdir / 'optuna.db'}", direction="maximize")
    depth = {"model.depth": IntDistribution(1, 6)}
    for d, value in ((1, 0.5), (2, 0.9), (3, 0.7), (4, 0.8)):
        study.add_trial(create_trial(params={"model.depth": d}, distributions=depth, value=value,
                                     user_attrs={"test_accuracy": value - 0.01, "parameters": 1000 * d}))
    study.add_trial(create_trial(params={"model.depth": 5}, distributions=depth, state=TrialState.PRUNED))
    study.add_trial(create_trial(params={"model.depth": 6}, distributions=depth, state=TrialState.FAIL))
    capsys.readouterr()

    assert main(["best", str(spec_path), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "study 'top-n': 4 complete, 1 pruned, 1 failed"
    assert lines[1].split() == ["trial", "value", "test_acc", "params", "model.depth"]
    assert [line.split() for line in lines[3:5]] == [["1", "0.9000", "0.8900", "2,000", "2"],
                                                    ["3", "0.8000", "0.7900", "4,000", "4"]]
    assert len(lines) > 5 and "  depth: 2" in lines[5:]  # the best trial's spec follows the table


def test_a_parent_run_a_start_left_unnamed_is_deleted_by_the_next_start_not_left_running(workdir):
    # A start whose tracking server went away between making the parent run and naming it in the study left
    # that run RUNNING for ever, beside the one the next start made (both named after the study).
    from vit_search.search.study_runs import PENDING_TAG

    raw = study_raw("orphan", n_trials=1)
    client = MlflowClient()
    experiment = client.create_experiment("orphan")
    orphan = client.create_run(experiment, run_name="orphan", tags={
        PENDING_TAG: "1", "optuna.study_name": "orphan", "optuna.storage": raw["search"]["storage"]}).info.run_id
    run_search(load_spec(raw), progress=False)
    assert client.get_run(orphan).info.lifecycle_stage == "deleted"
    (parent,) = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and PENDING_TAG not in parent.data.tags


def test_a_stop_that_lands_while_a_trial_is_drawn_queues_it_again_rather_than_leave_it_running(workdir):
    # A second Ctrl-C (which raises at once) met a supernet's phase 2 drawing its next subnet in 2 of 3 tries: the
    # trial stayed RUNNING, to be failed as a dead worker's by the next start, one of its two retries spent.
    from vit_search.search.study import RETRIED, open_study, worker_loop

    handle = open_study(load_spec(study_raw("stopped-drawing", n_trials=1)))

    def draw(trial):
        raise KeyboardInterrupt

    report = worker_loop(handle, 1, draw, lambda trial, drawn: [0.5], heartbeat=0.1)
    trials = handle.study.get_trials()
    assert report.interrupted and [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["error"] == "interrupted (Ctrl-C)" and trials[0].system_attrs.get(RETRIED)
