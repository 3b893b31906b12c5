"""search.strategy: supernet: the space checks, the sandwich step, scoring with inherited weights and
constraints, finalists and the export round trip, a plugin's elastic block; real sqlite and MLflow."""

from __future__ import annotations

import contextlib

import os
import signal
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from vit_search.model.elastic import extract_subnet, set_subnet
from vit_search.model.vit import build_vit
from vit_search.registry import REGISTRY
from vit_search.schema import ModelSpec
from vit_search.search.study import StudyHandle
from vit_search.search.supernet import LOGGED, load_supernet, ranked, run_supernet_search
from vit_search.search.supernet_space import SupernetSpace
from vit_search.search.supernet_train import SandwichStep, SubnetDraw, supernet_spec
from vit_search.spec import load_spec
from vit_search.train import train

REPO = Path(__file__).resolve().parents[1]
SPEC = {
    "name": "supernet",
    "seed": 0,
    "data": {"dataset": "digits", "image_size": 8},
    "model": {"dim": 32, "depth": 2, "patch_embed": {"type": "conv", "patch_size": 2},
              "attention": {"type": "sdpa", "heads": 2}, "ffn": {"type": "mlp", "ratio": 2}},
    "train": {"epochs": 1, "batch_size": 64, "lr": 3.0e-3, "warmup_epochs": 0.5},
    "search": {"strategy": "supernet", "sampler": "random", "pruner": "none",
               "supernet": {"n_subnets": 8, "finalists": 1, "random_subnets": 1, "top_runs": 2},
               "space": {"model.depth": {"int": [1, 2]}, "model.dim": {"choice": [16, 32]},
                         "model.attention.heads": {"choice": [2, 4]},
                         "model.layers.0.ffn.ratio": {"choice": [1, 2]},
                         "model.layers.1.ffn.ratio": {"choice": [1, 2]}}},
}


def spec_raw(name: str, **supernet) -> dict:
    search = {**SPEC["search"], "supernet": {**SPEC["search"]["supernet"], **supernet},
              "storage": f"sqlite:///{Path.cwd() / 'optuna.db'}"}
    return {**SPEC, "name": name, "tracking": {"experiment": name, "plots": False}, "search": search}


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def test_validate_names_what_a_supernet_varies_and_its_largest_and_smallest_subnet(cli_here, write_spec):
    path = write_spec(yaml.safe_dump(SPEC, sort_keys=False))
    result = cli_here("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "supernet over model.depth, model.dim" in result.stdout
    # 8 at depth 1, 16 at depth 2: layer 1's ratio is no value of a subnet without layer 1 (it said 32).
    assert "(24 subnets)" in result.stdout
    assert "largest subnet: depth 2, dim 32, attention.heads 4, ffn.ratio 2" in result.stdout
    assert "smallest subnet: depth 1, dim 16, attention.heads 2, ffn.ratio 1" in result.stdout


@pytest.mark.parametrize("key,value,says", [
    ("model.patch_embed.patch_size", {"choice": [2, 4]}, "patch_embed 'conv' is not elastic in 'patch_size'"),
    ("model.ffn.type", {"choice": ["mlp", "swiglu"]}, "block type choices cannot share weights"),
    ("train.lr", {"float": [0.001, 0.01]}, "strategy supernet searches the model's sizes only"),
    ("model.attention.dropout", {"choice": [0.0, 0.1]}, "unknown argument"),
    ("model.layers.5.ffn.ratio", {"choice": [1, 2]}, "no layer 5"),
    ("model.drop_path_rate", {"choice": [0.0, 0.1]}, "not a size a supernet can share weights over"),
    # Sizes are ordered: these failed with a TypeError out of max()
    ("model.ffn.hidden_dim", {"choice": [None, 64]}, "and None is no number; give numbers only"),
    ("model.attention.heads", {"choice": [2, "4"]}, "and '4' is no number; give numbers only"),
])
def test_a_space_a_supernet_cannot_share_weights_over_is_one_line_and_exit_2(cli_here, write_spec, key, value, says):
    raw = {**SPEC, "search": {**SPEC["search"], "space": {key: value}}}
    result = cli_here("validate", str(write_spec(yaml.safe_dump(raw))))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and says in lines[0], result.stderr


def test_a_supernet_study_from_pretrained_weights_is_one_line_and_exit_2(write_spec, tmp_path, capsys):
    from vit_search.cli import main
    from vit_search.model import build_vit

    weights = tmp_path / "weights.pt"
    # Weights of another width: the line that matters came after "model.dim: 32 does not fit the weights"
    torch.save(build_vit(load_spec({**SPEC, "model": {**SPEC["model"], "dim": 16}, "search": None})).state_dict(), weights)
    raw = {**SPEC, "model": {**SPEC["model"], "init": {"from": "file", "path": str(weights)}}}
    assert main(["validate", str(write_spec(yaml.safe_dump(raw)))]) == 2  # in this process: it trains nothing
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "model.init: a supernet starts from fresh weights; remove model.init or use strategy: trials" in line


def test_a_supernet_study_ranked_by_train_loss_is_one_line_and_exit_2(cli_here, write_spec):
    raw = {**SPEC, "search": {**SPEC["search"], "metric": "train_loss", "direction": "minimize"}}
    result = cli_here("validate", str(write_spec(yaml.safe_dump(raw))))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "search.metric: train_loss" in lines[0], result.stderr


@pytest.mark.parametrize("heads, end, impossible", [
    ([4, 6], "its largest subnet (depth 2, dim 32, attention.heads 6, ffn.ratio 2)", 6),
    ([3, 4], "the supernet (depth 2, dim 32, attention.heads 3, ffn.ratio 2)", 3),  # attention's capacity: fewest heads
])
def test_validate_refuses_a_space_whose_supernet_or_largest_or_smallest_subnet_cannot_exist(cli_here, write_spec,
                                                                                            heads, end, impossible):
    raw = spec_raw("no-ends")
    raw["search"]["space"] = {"model.dim": {"choice": [24, 32]}, "model.attention.heads": {"choice": heads}}
    result = cli_here("validate", write_spec(yaml.safe_dump(raw, sort_keys=False)))
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.endswith(f": search.space: {end} cannot exist, and the sandwich rule trains it at every step: dim 32 "
                         f"is not divisible by heads {impossible}; choose heads that divide dim")


def test_a_stepped_range_the_step_does_not_reach_gives_the_supernet_the_ends_that_are_drawn(cli_here, write_spec):
    # depth 1..4 step 2 draws 1 and 3: the supernet and its largest subnet were built at depth 4, never drawn
    raw = {**SPEC, "search": {**SPEC["search"], "space": {"model.depth": {"int": [1, 4], "step": 2},
                                                          "model.dim": {"int": [16, 40], "step": 16}}}}
    result = cli_here("validate", write_spec(yaml.safe_dump(raw)))
    assert result.returncode == 0, result.stderr
    assert "largest subnet: depth 3, dim 32," in result.stdout and "smallest subnet: depth 1, dim 16," in result.stdout


def test_dry_run_of_a_supernet_study_shows_the_subnets_phase_2_would_draw(cli_here, write_spec):
    result = cli_here("run", str(write_spec(yaml.safe_dump(SPEC))), "--dry-run", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("supernet study: the first 3 subnets phase 2 would draw")
    assert [line.split(":")[0] for line in lines[1:]] == ["subnet 0", "subnet 1", "subnet 2"]
    assert all("depth " in line and "dim " in line for line in lines[1:])


def test_the_sandwich_step_trains_the_largest_the_smallest_and_random_subnets_on_one_batch():
    from accelerate import Accelerator

    spec = load_spec(SPEC)
    space = SupernetSpace.of(spec)
    draw = SubnetDraw(space, seed=0, random_subnets=2)
    torch.manual_seed(0)
    model = build_vit(supernet_spec(spec, space))
    first = draw.subnets(7, lambda m: True)
    assert first[0] == draw.largest and first[1] == draw.smallest and len(first) == 4
    assert draw.subnets(7, lambda m: True) == first  # the same step draws the same subnets (resume)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = SandwichStep(draw, model, optimizer, scheduler, torch.nn.CrossEntropyLoss(), None, Accelerator(cpu=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = step(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))  # digits: one channel
    assert torch.isfinite(loss)
    after = model.state_dict()
    # Weights only the largest subnet has (its second layer's wider FFN units) moved too.
    assert not torch.equal(before["blocks.1.ffn.fc1.weight"][32:], after["blocks.1.ffn.fc1.weight"][32:])
    assert model.active_depth == 2 and model.blocks[0].attn.sample["heads"] == 4  # left as the largest


def test_the_sandwich_step_skips_subnets_that_cannot_exist():
    # docs/plugins.md: a block raises ValueError for a subnet that cannot exist (heads that do not divide
    # dim); the subnet is then skipped. Width 32 with 3 heads is drawn here, and cannot exist.
    from accelerate import Accelerator

    raw = {**SPEC, "search": {**SPEC["search"], "space": {**SPEC["search"]["space"], "model.dim": {"choice": [24, 32, 48]},
                                                            "model.attention.heads": {"choice": [3, 4]}}}}
    spec = load_spec(raw)
    space = SupernetSpace.of(spec)
    draw = SubnetDraw(space, seed=0, random_subnets=6)
    drawn = [m for n in range(10) for m in draw.subnets(n, lambda m: True)]
    impossible = [m for m in drawn if m.model_dump()["attention"]["heads"] == 3 and m.dim == 32]
    model = build_vit(supernet_spec(spec, space))
    with pytest.raises(ValueError):
        set_subnet(model, impossible[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = SandwichStep(SubnetDraw(space, seed=0, random_subnets=6), model, optimizer, scheduler,
                        torch.nn.CrossEntropyLoss(), None, Accelerator(cpu=True))
    for _ in range(10):  # the same steps' draws as above: each meets the impossible subnet and goes on
        assert torch.isfinite(step(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])))


def test_phase_1_trains_the_supernet_through_train_with_a_sandwich_step(workdir):
    spec = load_spec(spec_raw("phase1"))
    space = SupernetSpace.of(spec)
    from functools import partial

    result = train(supernet_spec(spec, space), checkpoint_dir=workdir / "sn", progress=False,
                   make_step=partial(SandwichStep, SubnetDraw(space, 0, 1)))
    assert result.history[0]["train_loss"] > 0 and 0 <= result.metrics["val_accuracy"] <= 1
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["cuda_graph"].startswith("off")
    assert not load_supernet(spec, space, workdir / "sn" / "checkpoint.pt").training  # phase 2's start
    # Read as tensors alone: phase 2 finds the file by a path in the study's storage, which other hosts write.
    torch.save({"model": {}, "planted": _Planted()}, workdir / "planted.pt")
    from vit_search.errors import UnreadableCheckpoint

    with pytest.raises(UnreadableCheckpoint, match=r"planted.pt: not a readable checkpoint \(UnpicklingError\)"):
        load_supernet(spec, space, workdir / "planted.pt")


def test_fewer_supernet_epochs_than_phase_1_trained_are_refused_by_the_key_the_user_set(workdir):
    from vit_search.errors import CheckpointMismatch
    from vit_search.search.supernet_train import train_supernet

    raw = spec_raw("fewer")
    raw["search"]["supernet"] = {**raw["search"]["supernet"], "epochs": 2}
    spec = load_spec(raw)
    space = SupernetSpace.of(spec)
    train_supernet(spec, space, workdir / "sn", None)
    raw["search"]["supernet"]["epochs"] = 1
    with pytest.raises(CheckpointMismatch) as err:
        train_supernet(load_spec(raw), space, workdir / "sn", None)
    assert str(err.value).startswith("the study's supernet, stopped in phase 1, cannot go on under this spec: "
                                     "search.supernet.epochs 1 is fewer than the 2 epochs it has trained; set "
                                     "search.supernet.epochs to 2 or more, or run with the spec it started with"), err.value


class _Planted:
    """An object a weights file must not be able to bring in (unpickling it could run any code)."""


def test_a_supernet_study_scores_subnets_under_constraints_and_trains_finalists_that_export_reproduces(workdir):
    raw = spec_raw("study")
    raw["search"]["constraints"] = {"max_params": 12000}
    spec = load_spec(raw)
    result = run_supernet_search(spec, progress=False)
    storage = spec.search.storage
    scores = optuna.load_study(study_name="study:subnets", storage=storage).get_trials()
    assert len(scores) == 8
    for trial in scores:
        if trial.state == TrialState.COMPLETE:
            assert trial.user_attrs["parameters"] <= 12000 and 0 <= trial.values[0] <= 1
        else:  # rejected before scoring: never scored
            assert trial.state == TrialState.PRUNED and "params" in trial.user_attrs["pruned_reason"]
            assert "val_accuracy" not in trial.user_attrs
    assert any(t.state == TrialState.PRUNED for t in scores)
    (finalist,) = result.study.get_trials()
    assert finalist.state == TrialState.COMPLETE and finalist.user_attrs["parameters"] <= 12000

    client = MlflowClient()
    experiment = client.get_experiment_by_name("study").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and "val_accuracy" in parent.data.metrics  # phase 1's curves
    assert "subnets.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    phases = sorted(r.data.tags.get("supernet.phase", "3") for r in runs if r is not parent and
                    r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert phases == ["2: scored subnet", "2: scored subnet", "3"]
    # Scored subnets' runs carry the score they inherited, the rank-1 one the study's best.
    scored = sorted((r for r in runs if r.data.tags.get("supernet.phase") == "2: scored subnet"),
                    key=lambda r: int(r.data.tags["supernet.rank"]))
    assert all({"inherited_val_accuracy", "inherited_val_loss"} <= set(r.data.metrics) for r in scored)
    assert scored[0].data.metrics["inherited_val_accuracy"] == parent.data.metrics["best_inherited_val_accuracy"]
    assert scored[0].data.metrics["inherited_val_accuracy"] >= scored[1].data.metrics["inherited_val_accuracy"]

    from vit_search.search.report import best_spec

    exported = load_spec(yaml.safe_load(best_spec(spec, result.study).to_yaml(exclude_search=True)))
    again = train(exported, checkpoint_dir=workdir / "again", progress=False)
    assert again.metrics["val_accuracy"] == pytest.approx(finalist.values[0], abs=1e-9)


def test_finalists_can_start_from_their_inherited_weights(workdir):
    spec = load_spec(spec_raw("inherited", finalists_init="inherited", n_subnets=3))
    result = run_supernet_search(spec, progress=False)
    (finalist,) = result.study.get_trials()
    assert finalist.state == TrialState.COMPLETE, finalist.user_attrs.get("error")
    assert list((workdir / "runs" / "inherited" / "finalists").glob("inherited-*.pt"))


def test_finalists_are_trained_in_full_whatever_pruner_the_spec_names(workdir):
    raw = spec_raw("unpruned", finalists=2)
    raw["search"]["pruner"] = "successive_halving"  # a trials study's pruner: it stopped finalists after an epoch
    raw["train"] = {**raw["train"], "epochs": 2}
    result = run_supernet_search(load_spec(raw), progress=False)
    assert isinstance(result.study.pruner, optuna.pruners.NopPruner)
    assert [t.state for t in result.study.get_trials()] == [TrialState.COMPLETE] * 2


@pytest.mark.parametrize("second_stop", [False, True], ids=["failed", "second-ctrl-c-as-its-run-is-marked"])
def test_a_failed_finalists_checkpoint_and_inherited_weights_are_removed_as_a_trials_are(workdir, monkeypatch,
                                                                                          second_stop):
    import vit_search.search.run as run_module
    from vit_search.search.study_runs import StudyRuns

    real_train = run_module.train

    def train_then_fail(spec, **kwargs):  # a fault once the finalist's first checkpoint is on disk
        real_train(spec, **kwargs)
        raise RuntimeError("the finalist fails after training")

    def cut_short(self, parent, frozen):  # a second Ctrl-C lands as the failed finalist's run is marked (it once
        raise KeyboardInterrupt           # left its files on disk for good: its retry trains under another number)

    monkeypatch.setattr(run_module, "train", train_then_fail)
    if second_stop:
        monkeypatch.setattr(StudyRuns, "_record_trial_end", cut_short)
    spec = load_spec(spec_raw("failing", finalists_init="inherited", n_subnets=3))
    with pytest.raises(KeyboardInterrupt) if second_stop else contextlib.nullcontext():
        run_supernet_search(spec, progress=False)
    (finalist,) = optuna.load_study(study_name="failing", storage=spec.search.storage).get_trials()
    assert finalist.state == TrialState.FAIL and "the finalist fails" in finalist.user_attrs["error"]
    assert sorted(p.name for p in (workdir / "runs" / "failing" / "finalists").iterdir()) == []


def _parent_run(study: optuna.Study):
    from vit_search.search.study import PARENT_RUN

    return MlflowClient().get_run(StudyHandle(study, study._storage, "").attr(PARENT_RUN))


def test_a_damaged_supernet_or_an_unwritable_inherited_file_queues_the_finalist_again_and_goes_on_once_mended(workdir):
    raw = spec_raw("mended", finalists_init="inherited", n_subnets=3)
    assert run_supernet_search(load_spec(raw), progress=False).study.get_trials()[0].state == TrialState.COMPLETE
    weights = workdir / "runs" / "mended" / "supernet" / "checkpoint.pt"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])  # disk trouble after phase 1
    raw["search"]["supernet"]["finalists"] = 2
    # It was an OSError out of torch.load (exit 1, no file named) that left the parent run RUNNING.
    result = run_supernet_search(load_spec(raw), progress=False)
    assert result.stopped.exit_code == 2
    assert str(result.stopped).startswith(f"{weights}: not a readable checkpoint (")
    assert "put the file back, or give the study a new search.study_name" in str(result.stopped)
    assert "queued again" in str(result.stopped) and "--resume" not in str(result.stopped)
    assert [t.state for t in result.study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert _parent_run(result.study).info.status == "KILLED"
    weights.write_bytes(whole)
    result = run_supernet_search(load_spec(raw), progress=False)
    assert result.stopped is None and sum(t.state == TrialState.COMPLETE for t in result.study.get_trials()) == 2

    # The next finalist's inherited file cannot be written (a full disk, a file size limit): not failed for good.
    raw["search"]["supernet"]["finalists"] = 3
    blocker = Path("runs", "mended", "finalists", "inherited-3.pt")
    (blocker / "in-the-way").mkdir(parents=True)
    result = run_supernet_search(load_spec(raw), progress=False)
    assert result.stopped.exit_code == 1
    assert str(result.stopped).startswith(f"cannot write the finalist's inherited weights {blocker}: ")
    assert str(result.stopped).endswith("(trial 3 is queued again; then run the same command)")
    failed = result.study.get_trials()[3]
    assert failed.state == TrialState.FAIL and result.study.get_trials()[4].state == TrialState.WAITING
    assert MlflowClient().get_run(failed.user_attrs["mlflow_run_id"]).info.status == "FAILED"  # its run says why
    assert _parent_run(result.study).info.status == "KILLED"
    import shutil

    shutil.rmtree(blocker)
    result = run_supernet_search(load_spec(raw), progress=False)
    assert result.stopped is None and sum(t.state == TrialState.COMPLETE for t in result.study.get_trials()) == 3
    assert _parent_run(result.study).info.status == "FINISHED"

    # A space widened since phase 1, more subnets to score: the supernet on disk is another model's (it was a
    # RuntimeError of torch's, exit 1).
    from vit_search.errors import CheckpointMismatch

    raw["search"]["supernet"]["n_subnets"] = 4
    raw["search"]["space"]["model.dim"] = {"choice": [16, 64]}
    with pytest.raises(CheckpointMismatch) as refused:
        run_supernet_search(load_spec(raw), progress=False)
    assert str(refused.value).startswith(
        f"{weights}: the study's supernet was trained for another search.space or model (size mismatch for ")
    assert "run with the spec it was trained with, or give the study a new search.study_name" in str(refused.value)


def test_a_damaged_checkpoint_of_a_stopped_phase_1_names_the_way_out_of_a_study_and_ends_its_parent_run(workdir):
    from vit_search.errors import UnreadableCheckpoint
    from vit_search.search.supernet import TRAINED

    raw = spec_raw("phase1-damaged", finalists=0, n_subnets=2)
    study = run_supernet_search(load_spec(raw), progress=False).study
    StudyHandle(study, study._storage, "").set_attr(TRAINED, None)  # as if phase 1 had stopped after its epoch
    folder = Path("runs", "phase1-damaged", "supernet")
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UnreadableCheckpoint) as refused:
        run_supernet_search(load_spec(raw), progress=False)
    # It said "run without --resume", which `run` does not have.
    assert str(refused.value) == (f"the study's supernet, stopped in phase 1, cannot go on: {folder / 'checkpoint.pt'}: "
                                  f"not a readable checkpoint (UnpicklingError); delete {folder} to train its supernet "
                                  f"afresh, or give the study a new search.study_name")
    parent = _parent_run(study)
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == str(refused.value)  # it was left RUNNING


def test_a_finished_scoring_phase_does_not_read_the_supernet_again_for_finalists_trained_from_scratch(workdir):
    raw = spec_raw("no-reread", n_subnets=3)
    run_supernet_search(load_spec(raw), progress=False)
    (workdir / "runs" / "no-reread" / "supernet" / "checkpoint.pt").unlink()  # the space it took, freed
    raw["search"]["supernet"]["finalists"] = 2
    result = run_supernet_search(load_spec(raw), progress=False)
    assert result.stopped is None and [t.state for t in result.study.get_trials()] == [TrialState.COMPLETE] * 2


def test_finalists_that_start_otherwise_than_the_studys_first_are_told_they_share_its_leaderboard(workdir, capsys):
    raw = spec_raw("init-changed", n_subnets=3)
    run_supernet_search(load_spec(raw), progress=False)
    assert "note:" not in capsys.readouterr().err
    raw["search"]["supernet"].update(finalists=2, finalists_init="inherited")  # it was accepted without a word
    result = run_supernet_search(load_spec(raw), progress=False)
    assert [t.state for t in result.study.get_trials()] == [TrialState.COMPLETE] * 2
    assert ("note: search.supernet.finalists_init inherited differs from study 'init-changed', whose first finalists "
            "started from scratch: this worker's finalists join the same leaderboard; set a new search.study_name to "
            "keep them apart") in capsys.readouterr().err


def test_after_a_stop_the_scores_line_counts_what_is_scored_so_far_and_more_supernet_epochs_get_a_note(workdir):
    from vit_search.search.supernet import outcome_lines

    raw = spec_raw("so-far", finalists=0, n_subnets=3)
    result = run_supernet_search(load_spec(raw), progress=False)
    raw["search"]["supernet"]["n_subnets"] = 5  # two more to score, as if stopped after three
    lines = outcome_lines(load_spec(raw), result.study, result.storage, interrupted=True)
    # It said "none scored ... (every drawn subnet broke a constraint)" after a stop in phase 1, and named a table
    # not yet logged.
    assert lines[0] == "subnets: 3 of 5 scored so far in study 'so-far:subnets'"
    raw["search"]["supernet"]["epochs"] = 3  # phase 1 trained train.epochs, 1: raising it later trains nothing
    lines = outcome_lines(load_spec(raw), result.study, result.storage, interrupted=False)
    assert lines[1] == ("note: the study's supernet was trained 1 epochs in phase 1, which is over; "
                         "search.supernet.epochs 3 does not train it again (a new search.study_name would)")


@pytest.fixture
def cosine_plugin(monkeypatch):
    """The example plugin's cosine attention registered, and unregistered afterwards."""
    monkeypatch.syspath_prepend(str(REPO / "examples" / "vit-search-cosine-attention"))
    import vit_search_cosine

    yield vit_search_cosine
    REGISTRY._blocks["attention"].pop("cosine", None)
    sys.modules.pop("vit_search_cosine", None)


def test_the_example_plugins_attention_is_elastic(cosine_plugin):
    base = {"image_size": 8, "in_channels": 3, "num_classes": 5, "patch_embed": {"type": "conv", "patch_size": 2}}
    torch.manual_seed(0)
    net = build_vit(ModelSpec.model_validate({**base, "dim": 32, "depth": 2,
                                              "attention": {"type": "cosine", "heads": 4}})).eval()
    with torch.no_grad():
        net.blocks[0].attn.logit_scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    sub = ModelSpec.model_validate({**base, "dim": 16, "depth": 1, "attention": {"type": "cosine", "heads": 2}})
    set_subnet(net, sub)
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(images), extract_subnet(net, sub).eval()(images), atol=1e-6, rtol=1e-6)


def test_a_study_without_finalists_scores_subnets_and_logs_their_table(workdir, cli_here):
    path = workdir / "scores-only.yaml"
    path.write_text(yaml.safe_dump(spec_raw("scores-only", finalists=0, n_subnets=3)))
    spec = load_spec(path)
    result = cli_here("run", path)
    assert result.returncode == 0, result.stderr
    # It said what phase 2 found and how to go on, not an empty table of finalists.
    assert result.stdout.count("subnets: 3 scored in study 'scores-only:subnets', best inherited val_accuracy") == 1
    assert ("finalists: 0, so no subnet is trained on its own; to train the best 3, run the same command with --set "
            "search.supernet.finalists=3 added at its end") in result.stdout
    assert not result.stdout.endswith("\n\n")  # no next steps (no finalist to export): not an empty line either
    assert "trial " not in result.stdout
    assert not optuna.load_study(study_name="scores-only", storage=spec.search.storage).get_trials()
    best = cli_here("best", path)  # it sent the user to run the same command again, which did nothing
    assert best.returncode == 2 and "trains no subnet on its own (search.supernet.finalists: 0)" in best.stderr
    assert f"run 'vit-search run {path} --set search.supernet.finalists=3'" in best.stderr
    extended = cli_here("run", path, "--n-trials", "5")  # silently ignored before
    assert extended.returncode == 2 and "--n-trials: a supernet study's size is search.supernet.n_subnets" in extended.stderr
    scores = optuna.load_study(study_name="scores-only:subnets", storage=spec.search.storage).get_trials()
    assert len(scores) == 3 and all("train_loss" not in t.user_attrs for t in scores)
    # docs/search.md: a layer's own key is drawn only in subnets deep enough to have that layer.
    assert all(("model.layers.1.ffn.ratio" in t.params) == (t.params["model.depth"] > 1) for t in scores)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("scores-only").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert "subnets.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]


def test_ctrl_c_in_phase_2_stops_the_study_even_where_python_would_drop_it(workdir, monkeypatch, capsys):
    # A Ctrl-C raised where the worker happened to be was lost when it landed in a finalizer ("Exception
    # ignored in ...": the study went on to train its finalists and exited 0) or in code that made it another
    # error (a subnet failed with "AssertionError"). As on the trials path, it now asks the worker to stop.
    from vit_search.search import supernet as supernet_module

    real_score, calls = supernet_module.SubnetScorer.score, []

    class SignalsWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler here, inside the finalizer
            for _ in range(1000):  # bytecodes for the handler to run at
                pass

    def score(self, subnet):
        calls.append(subnet)
        if len(calls) == 2:
            SignalsWhileCollected()  # collected at once: the Ctrl-C lands in its __del__
        return real_score(self, subnet)

    monkeypatch.setattr(supernet_module.SubnetScorer, "score", score)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = run_supernet_search(load_spec(spec_raw("ctrl-c-phase-2", n_subnets=6)), progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.interrupted and result.trials_run == []  # no finalist trained
    # What stops is said as a supernet study has it: it has no trials in training until its finalists
    assert ("stopping (Ctrl-C): the supernet, a subnet being scored or a finalist in training ends after its current step"
            in capsys.readouterr().err)
    scores = optuna.load_study(study_name="ctrl-c-phase-2:subnets", storage=result.storage).get_trials()
    # The subnet being scored stopped at its next batch and waits for the resumed study; none failed otherwise.
    assert [t.state for t in scores] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert scores[1].user_attrs["error"] == "interrupted (Ctrl-C)" and scores[2].user_attrs["retry_of"] == 1
    assert not result.study.get_trials()
    client = MlflowClient()
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("ctrl-c-phase-2").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"


def test_a_resumed_study_whose_score_logging_was_cut_short_has_one_run_per_top_subnet(workdir):
    spec = load_spec(spec_raw("relog", finalists=0, n_subnets=3, top_runs=2))
    run_supernet_search(spec, progress=False)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("relog").experiment_id

    def scored_runs():
        return client.search_runs([experiment], filter_string="tags.`supernet.phase` = '2: scored subnet'")

    kept, cut = scored_runs()
    # What a worker killed while logging leaves: one run not ended, the scores not marked logged.
    client.update_run(cut.info.run_id, status="RUNNING")
    storage = optuna.storages.RDBStorage(spec.search.storage)
    storage.set_study_system_attr(storage.get_study_id_from_name("relog:subnets"), LOGGED, 0)
    run_supernet_search(spec, progress=False)
    runs = scored_runs()
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert kept.info.run_id in {r.info.run_id for r in runs} and cut.info.run_id not in {r.info.run_id for r in runs}
    assert {r.data.tags["subnets.trial_number"] for r in runs} == {kept.data.tags["subnets.trial_number"],
                                                                   cut.data.tags["subnets.trial_number"]}


def test_a_space_smaller_than_n_subnets_gives_each_subnet_one_rank_one_finalist_and_one_run(workdir):
    # Scored again once every subnet was, the best subnet took every finalist's place and every top run's.
    raw = spec_raw("small-space", n_subnets=4, finalists=3, top_runs=3)
    raw["search"]["space"] = {"model.attention.heads": {"choice": [2, 4]}}
    spec = load_spec(raw)
    result = run_supernet_search(spec, progress=False)
    scores = optuna.load_study(study_name="small-space:subnets", storage=spec.search.storage).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in scores) == 4  # scored as asked, repeats included
    finalists = result.study.get_trials()
    assert sorted(t.params["model.attention.heads"] for t in finalists) == [2, 4]
    from vit_search.search.supernet import outcome_lines

    assert outcome_lines(spec, result.study, result.storage, result.interrupted)[1] == (
        "finalists: 2 of 3: only 2 distinct subnets were scored, as many as the space holds that meet "
        "search.constraints (search.supernet.n_subnets 4); widen search.space for more")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("small-space").experiment_id],
                              filter_string="tags.`supernet.phase` = '2: scored subnet'")
    assert sorted(r.data.tags["supernet.rank"] for r in runs) == ["1", "2"]


def test_a_logged_supernet_study_says_its_scores_once_before_its_finalists_lines(workdir, cli_here):
    path = workdir / "said-once.yaml"
    path.write_text(yaml.safe_dump(spec_raw("said-once", n_subnets=3)))
    for _ in range(2):  # trained, then run again on the finished study
        result = cli_here("run", path)
        assert result.returncode == 0, result.stderr
        scores = "subnets: 3 scored in study 'said-once:subnets', best inherited val_accuracy"
        assert result.stdout.count(scores) == 1, result.stdout
        assert "(their table: subnets.csv of the study's parent run)" in result.stdout
    first = cli_here("run", path, "--set", "search.supernet.finalists=2").stdout
    assert first.count(scores) == 1 and first.index(scores) < first.index("trial 1 COMPLETE"), first


def test_only_scored_subnets_become_finalists_and_raising_finalists_adds_the_next_ranks(workdir, capsys, monkeypatch):
    # Fewer scored subnets than finalists: the sampler filled the rest with subnets never scored, and one
    # of them could be reported best. Raised later, finalists took sampler draws rather than the next ranks.
    monkeypatch.setenv("VIT_SEARCH_LOG_SECONDS", "0")  # a line per epoch
    spec = load_spec(spec_raw("ranks", n_subnets=2, finalists=3, top_runs=1))
    result = run_supernet_search(spec, progress=False, lines=True)
    storage = spec.search.storage

    def scored() -> list[int]:  # best first
        study = optuna.load_study(study_name="ranks:subnets", storage=storage)
        return [t.number for t in ranked(StudyHandle(study, study._storage, storage))]

    def finalists() -> list[int]:
        trials = optuna.load_study(study_name="ranks", storage=storage).get_trials()
        assert all(t.state == TrialState.COMPLETE for t in trials)
        return [t.user_attrs["subnets.trial_number"] for t in trials]

    assert sorted(finalists()) == sorted(scored()) and len(scored()) == 2  # two scored: two finalists, no more
    out = capsys.readouterr().out
    assert "subnets: 2 scored in study 'ranks:subnets', best inherited val_accuracy" in out
    assert out.count(" COMPLETE val_accuracy ") == 2  # a line per finalist, for logs
    # And per epoch, of the supernet (phase 1) and of each finalist: none were printed.
    assert out.count("supernet epoch 1/1: val_accuracy ") == 1 and out.count(" epoch 1/1: val_accuracy ") == 3
    from vit_search.search.supernet import outcome_lines

    assert outcome_lines(spec, result.study, result.storage, result.interrupted)[1] == (
        "finalists: 2 of 3: only 2 subnets were scored (search.supernet.n_subnets 2); raise search.supernet.n_subnets "
        "for more")
    assert result.train_seconds > 0 and result.seconds.epochs > 0  # phase 1 and the finalists trained

    spec = load_spec(spec_raw("ranks", n_subnets=4, finalists=3, top_runs=1))
    run_supernet_search(spec, progress=False)
    assert len(scored()) == 4
    assert len(finalists()) == 3 and finalists()[2] == next(n for n in scored() if n not in finalists()[:2])
    client = MlflowClient()
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("ranks").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    table = client.download_artifacts(parent.info.run_id, "subnets.csv", str(workdir))
    assert len(Path(table).read_text().splitlines()) == 1 + 4  # the scores' table has the two new ones
    assert parent.data.metrics["subnets_scored"] == 4
