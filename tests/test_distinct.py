"""Distinct points: no two trials of a study share a point while unused ones remain, however many
workers draw, and a resumed study does not draw its earlier points again."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from vit_search.search.distinct import enumerate_points
from vit_search.search.space import parse_space
from vit_search.search.study import WORKER, open_study, sample_spec, worker_loop
from vit_search.spec import load_spec

from test_study import finish, study_raw, worker

# 2 x 2 x 2 = 8 points: six draws from one seeded random state collide easily, and did.
SMALL_SPACE = {"model.depth": {"int": [1, 2]}, "model.pooling.type": {"choice": ["cls", "mean"]},
               "model.attention.heads": {"choice": [1, 2]}}


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def points(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.get_trials() if t.params]


def run_without_training(spec, n_trials: int) -> optuna.Study:
    """A worker of the spec's study whose objective is a made-up function of the point: the draws
    are those of a real worker, without the training."""
    handle = open_study(spec)

    def draw(trial):
        return sample_spec(spec, trial)

    def score(trial, sampled):
        trial_spec, _ = sampled
        return [trial_spec.model.depth / 10 + (trial_spec.model.pooling["type"] == "mean") / 5 + trial_spec.train.lr]

    worker_loop(handle, n_trials, draw, score, heartbeat=1, grace=5)
    return handle.study


def study_spec(name: str, **search):
    return load_spec({**study_raw(name, **search), "tracking": {"enabled": False}})


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2"])
def test_one_worker_with_a_fixed_seed_draws_the_same_sequence_on_a_fresh_study(workdir, sampler):
    first = run_without_training(study_spec("seq-a", n_trials=10, sampler=sampler), 10)
    second = run_without_training(study_spec("seq-b", n_trials=10, sampler=sampler), 10)
    assert points(first) == points(second) and len(set(points(first))) == 10
    other_seed = load_spec({**study_raw("seq-c", n_trials=10, sampler=sampler), "seed": 1, "tracking": {"enabled": False}})
    assert points(run_without_training(other_seed, 10)) != points(first)


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp"])
def test_a_resumed_study_does_not_draw_its_earlier_points_again(workdir, sampler):
    spec = study_spec(f"resume-{sampler}", n_trials=8, sampler=sampler, space=SMALL_SPACE)
    run_without_training(spec, 4)  # stopped after four trials...
    study = run_without_training(spec, 8)  # ...and the same command again, a new process's sampler
    assert len(points(study)) == 8 and len(set(points(study))) == 8


def test_workers_asking_in_turn_never_draw_a_point_another_has(workdir):
    spec = study_spec("in-turn", n_trials=8, sampler="tpe", space=SMALL_SPACE)
    handles = [open_study(spec) for _ in range(3)]  # three workers' views of one study, same seed
    trials = []
    for i in range(8):  # each asks while the others' trials still run (constant liar's blind spot)
        trial = handles[i % 3].study.ask()
        sample_spec(spec, trial)
        trials.append(trial)
    assert len(set(points(handles[0].study))) == 8


def test_an_exhausted_space_repeats_points_instead_of_stopping(workdir):
    spec = study_spec("exhausted", n_trials=6, sampler="tpe", space={"model.depth": {"int": [1, 2]},
                                                                     "model.pooling.type": {"choice": ["cls", "mean"]}})
    study = run_without_training(spec, 6)
    drawn = points(study)
    assert len(drawn) == 6 and len(set(drawn[:4])) == 4 and set(drawn[4:]) <= set(drawn[:4])


def test_queued_points_are_not_drawn_again(workdir):
    queued = {"model.depth": 1, "model.pooling.type": "cls", "model.attention.heads": 1}
    spec = study_spec("queued", n_trials=8, sampler="random", space=SMALL_SPACE, enqueue=[queued])
    assert len(set(points(run_without_training(spec, 8)))) == 8


def test_conditional_points_enumerate_only_where_their_block_applies():
    dims = parse_space({"model.ffn.type": {"choice": ["mlp", "swiglu"]}, "model.ffn[mlp].ratio": {"choice": [2, 4]}})
    assert sorted(map(str, enumerate_points(dims, {}, 100))) == sorted(map(str, [
        {"model.ffn.type": "mlp", "model.ffn[mlp].ratio": 2}, {"model.ffn.type": "mlp", "model.ffn[mlp].ratio": 4},
        {"model.ffn.type": "swiglu"}]))


@pytest.mark.slow
def test_three_worker_processes_on_one_journal_storage_run_exactly_n_trials_at_pairwise_distinct_points(workdir):
    from mlflow.tracking import MlflowClient

    from vit_search.search.storage import open_storage

    url = f"journal:{workdir / 'study.log'}"
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("three-processes", n_trials=6, sampler="tpe", space=SMALL_SPACE,
                                                  storage=url)))
    # A new MLflow store too, which the workers starting at once must not both make (MLflow's migrations
    # run at once fail on each other's tables).
    store = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    processes = [worker(spec_path, workdir, "--set", "train.epochs=1", env={"MLFLOW_TRACKING_URI": store})
                 for _ in range(3)]
    outputs = [finish(proc) for proc in processes]
    study = optuna.load_study(study_name="three-processes", storage=open_storage(url))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 6
    assert len(set(points(study))) == 6
    assert sum(int(out.split("this worker: ")[1].split(" trial")[0]) for out in outputs) == 6  # "1 trial", "2 trials"
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("three-processes").experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 6
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1  # one parent


# A head whose training waits, in each process, until two processes have begun a trial (60 s at
# most): one quick worker cannot take every trial before the others have started, however loaded
# the machine, so the study is shared whenever the workers run at once.
TWO_PROCESSES_HEAD = """
import os
import time
from pathlib import Path

import torch
from torch import nn

from vit_search.registry import register

ARRIVED = Path(__file__).parent / "arrived"


@register("head", "distinct_test_two_processes")
class TwoProcessesHead(nn.Linear):
    def __init__(self, dim, num_classes):
        super().__init__(dim, num_classes)

    def forward(self, pooled):
        if self.training and torch.is_grad_enabled() and pooled.device.type != "meta":
            ARRIVED.mkdir(exist_ok=True)
            (ARRIVED / str(os.getpid())).touch()
            deadline = time.monotonic() + 60
            while len(list(ARRIVED.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        return super().forward(pooled)
"""


@pytest.mark.slow
def test_jobs_workers_share_exactly_n_trials_at_pairwise_distinct_points(workdir, cli):
    spec_path = workdir / "study.yaml"
    (workdir / "two_processes_head.py").write_text(TWO_PROCESSES_HEAD)
    raw = study_raw("jobs-distinct", n_trials=6, sampler="tpe", space=SMALL_SPACE)
    raw = {**raw, "plugins": ["two_processes_head.py"], "tracking": {"enabled": False},
           "model": {**raw["model"], "head": {"type": "distinct_test_two_processes"}}}
    spec_path.write_text(yaml.safe_dump(raw))
    # Each worker packs two trials in threads: six draws at once, none of them told of the others' yet.
    # The storage is the command's --storage, which the workers take from its word on their standard
    # input (not from their command lines, where `ps` would show a password).
    elsewhere = f"sqlite:///{workdir / 'elsewhere.db'}"
    result = cli("run", str(spec_path), "--jobs", "3", "--trials-per-gpu", "2", "--storage", elsewhere,
                 "--set", "train.epochs=1", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "study 'jobs-distinct': 6 complete" in result.stdout
    assert result.stderr.count("OMP_NUM_THREADS=") == 3  # three workers, each with its share of the cores
    assert result.stderr.count("trials-at-once=2") == 3
    assert not (workdir / "optuna.db").exists()  # the spec's own storage was never opened
    study = optuna.load_study(study_name="jobs-distinct", storage=elsewhere)
    trials = study.get_trials()
    assert len(trials) == 6 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert len(set(points(study))) == 6
    assert len({t.system_attrs[WORKER] for t in trials}) >= 2  # the workers shared the study
    assert len(list((workdir / "arrived").iterdir())) >= 2  # ... because two were training at once
