"""A study's MLflow runs: parent-run updates from workers at once, trial run names, the leaderboard."""

from __future__ import annotations

import multiprocessing
import urllib.parse
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from vit_search.search.study import open_study, sample_spec
from vit_search.search.study_runs import StudyRuns
from vit_search.spec import load_spec

WORKERS, ROUNDS = 3, 4


def tiny_study(folder: Path, name: str) -> dict:
    return {
        "name": name, "seed": 0, "data": {"dataset": "digits", "image_size": 8},
        "model": {"dim": 16, "depth": 1, "patch_embed": {"type": "conv", "patch_size": 2},
                  "attention": {"type": "sdpa", "heads": 2}},
        "train": {"epochs": 1, "batch_size": 64},
        "tracking": {"experiment": "concurrent", "plots": False},
        "search": {"n_trials": 1, "sampler": "random", "pruner": "none", "storage": f"sqlite:///{folder / 'optuna.db'}",
                   "space": {"model.depth": {"int": [1, 2]}, "model.attention.heads": {"choice": [2, 4]}}},
    }


def _finish_each_study(folder: str, uri: str, barrier, errors) -> None:
    """One worker process: for each round's study, wait for the others, then finish its parent run."""
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    for round_ in range(ROUNDS):
        spec = load_spec(tiny_study(Path(folder), f"race-{round_}"))
        runs = StudyRuns(spec, open_study(spec))
        barrier.wait(timeout=300)
        try:
            runs.finish()
        except Exception as err:  # the test's failure, reported by the parent process
            errors.put(f"round {round_}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")


@pytest.mark.slow
def test_workers_finishing_at_once_update_the_parent_run_without_an_error(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) go here, not into the repository
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parents = []
    for round_ in range(ROUNDS):  # a fresh parent run each round: the race is on a tag's first insert
        spec = load_spec(tiny_study(tmp_path, f"race-{round_}"))
        handle = open_study(spec)
        runs = StudyRuns(spec, handle)
        runs.create_parent()
        trial = handle.study.ask()
        sample_spec(spec, trial)
        trial.set_user_attr("mlflow_run_id", f"{round_:032d}")
        trial.set_user_attr("test_accuracy", 0.5)
        handle.study.tell(trial, 0.5)
        parents.append(runs.parent_id)

    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(WORKERS), context.Queue()
    workers = [context.Process(target=_finish_each_study, args=(str(tmp_path), uri, barrier, errors))
               for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, problems
    assert [w.exitcode for w in workers] == [0] * WORKERS
    client = MlflowClient()
    for round_, parent in enumerate(parents):
        run = client.get_run(parent)
        assert run.data.tags["best_run_id"] == f"{round_:032d}" and run.info.status == "FINISHED"


def test_trial_runs_are_named_with_their_values_and_score_and_the_parent_holds_a_leaderboard(tmp_path, monkeypatch):
    from vit_search.search.leaderboard import trials_address
    from vit_search.search.run import run_search

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # An apostrophe in the study's name: MLflow's run filters quoted it wrongly, and the study stopped after
    # its first trial with the parent RUNNING.
    raw = tiny_study(tmp_path, "bob's-study")
    raw["search"]["n_trials"] = 2
    raw["tracking"]["experiment"] = "named"
    result = run_search(load_spec(raw), progress=False)

    client = MlflowClient()
    experiment = client.get_experiment_by_name("named").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {int(r.data.tags["optuna.trial_number"]): r for r in runs if r is not parent}
    for trial in result.study.get_trials():
        child = children[trial.number]
        depth, heads = trial.params["model.depth"], trial.params["model.attention.heads"]
        assert child.info.run_name == (f"trial {trial.number} · depth {depth} · heads {heads} · "
                                       f"val_accuracy {trial.value:.4g}")
        # The parallel-coordinates chart's inputs: the searched params and the metric, on every trial.
        assert child.data.params["model.depth"] == str(depth) and "val_accuracy" in child.data.metrics
    note = parent.data.tags["mlflow.note.content"]
    best = result.study.best_trial
    assert "2 complete, 0 pruned, 0 failed" in note
    assert f"| 1 | [trial {best.number}](#/experiments/{experiment}/runs/{children[best.number].info.run_id}) |" in note
    assert parent.info.status == "FINISHED" and {r.data.tags["trial.state"] for r in children.values()} == {"COMPLETE"}
    # The UI's address lists the study's trials: its filter matches them in MLflow (and not the parent).
    address = urllib.parse.parse_qs(trials_address(experiment, "bob's-study", "val_accuracy").split("?", 1)[1])
    listed = client.search_runs([experiment], filter_string=address["searchFilter"][0])
    assert sorted(r.info.run_id for r in listed) == sorted(r.info.run_id for r in children.values())


@pytest.mark.parametrize("state, values, ending", [
    (optuna.trial.TrialState.COMPLETE, [0.986111, 1234567.0], " · val_accuracy 0.9861 · flops 1.235e+06"),
    (optuna.trial.TrialState.PRUNED, None, " · pruned"),
    (optuna.trial.TrialState.FAIL, None, " · failed"),
])
def test_a_trial_run_name_shows_block_types_under_the_block_and_floats_to_3_digits_then_how_it_ended(state, values,
                                                                                                         ending):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from vit_search.search.leaderboard import score_of, trial_run_name

    params = {"model.depth": 6, "model.pooling.type": "cls", "train.lr": 0.0031415}
    frozen = optuna.trial.create_trial(
        state=state, values=values, params=params,
        distributions={"model.depth": IntDistribution(1, 12), "model.pooling.type": CategoricalDistribution(["cls", "mean"]),
                       "train.lr": FloatDistribution(1e-4, 1e-2, log=True)})
    name = trial_run_name(7, frozen.params, score_of(frozen, ["val_accuracy", "flops"]))
    assert name == "trial 7 · depth 6 · pooling cls · lr 0.00314" + ending


def test_a_trial_run_name_tells_apart_keys_that_end_alike_by_their_layer():
    from vit_search.search.leaderboard import trial_run_name

    params = {"model.depth": 2, "model.layers.0.ffn.ratio": 2, "model.layers.1.ffn.ratio": 4, "model.dim": 16}
    # It read "ratio 2 · ratio 4": which layer had which?
    assert trial_run_name(0, params) == "trial 0 · depth 2 · layers.0.ffn.ratio 2 · layers.1.ffn.ratio 4 · dim 16"


def test_the_top_table_of_a_multi_objective_study_is_sorted_by_its_first_objective():
    from vit_search.search.report import top_table

    study = optuna.create_study(directions=["maximize", "minimize"], study_name="two-objectives")
    for values in [(0.5, 10.0), (0.9, 30.0), (0.7, 5.0), (0.1, 1.0)]:
        study.add_trial(optuna.trial.create_trial(values=list(values), user_attrs={"test_accuracy": values[0]}))
    rows = top_table(study).splitlines()[3:]
    assert [row.split()[0] for row in rows] == ["1", "2", "0", "3"]  # val first, best first; not the Pareto order
    assert rows[0].split()[1:3] == ["0.9000,", "30.0000"]


def test_the_top_tables_header_counts_trials_still_running_or_queued_only_when_there_are_some():
    from vit_search.search.report import top_table

    study = optuna.create_study(direction="maximize", study_name="going-on")
    study.add_trial(optuna.trial.create_trial(value=0.5))
    assert top_table(study).splitlines()[0] == "study 'going-on': 1 complete, 0 pruned, 0 failed"
    study.ask()  # another worker's trial in training
    assert top_table(study).splitlines()[0] == "study 'going-on': 1 complete, 0 pruned, 0 failed, 1 running"
    study.enqueue_trial({})  # an interrupted trial's retry, waiting for the same command again
    assert top_table(study).splitlines()[0] == "study 'going-on': 1 complete, 0 pruned, 0 failed, 1 running, 1 queued"


def test_a_study_without_a_complete_trial_draws_no_plot_and_says_nothing(tmp_path, capfd):
    from optuna.trial import TrialState

    from vit_search.search.report import save_plots

    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        trial = study.ask({"model.depth": optuna.distributions.IntDistribution(1, 4)})
        study.tell(trial, state=TrialState.FAIL)
    capfd.readouterr()
    assert save_plots(study, tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert capfd.readouterr().err == ""  # not Optuna's "no complete trials" once per plot
    trial = study.ask({"model.depth": optuna.distributions.IntDistribution(1, 4)})
    study.tell(trial, 0.5)
    drawn = save_plots(study, tmp_path)  # with one complete trial, what can be drawn is
    assert drawn and all(path.stat().st_size > 0 for path in drawn), drawn
