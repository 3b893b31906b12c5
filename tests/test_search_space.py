"""The search space: ``search.space`` entries -> Optuna suggestions, conditional block arguments,
malformed entries, ``check_space`` (file:line problems before any trial) and the two commands that
read the space without training (``validate``, ``run --dry-run``).

Real Optuna studies throughout (in memory, or sqlite in tmp_path) and real specs from YAML files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

from vit_search.search.space import SpaceError, check_space, fill, parse_dimension, parse_space, sample
from vit_search.search.study import SAMPLERS, sample_spec, trial_spec
from vit_search.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = """\
name: space-test
seed: 0
data: {dataset: digits, image_size: 16}
model:
  dim: 32
  depth: 2
  patch_embed: {type: conv, patch_size: 4}
  attention: {type: sdpa, heads: 4}
  ffn: {type: mlp, ratio: 2}
train: {epochs: 1}
"""

CONDITIONAL = """\
model.ffn.type: {choice: [mlp, swiglu]}
model.ffn[mlp].ratio: {choice: [2, 4]}
"""

ATTENTION_BLOCKS = "model.attention: {choice: [{type: sdpa, heads: 4}, {type: einsum, heads: 2}]}\n"


def study_text(space: str, extra: str = "", base: str = BASE) -> str:
    """A spec with ``space`` (YAML lines, one entry a line) under search.space, ``extra`` under search."""
    return (base + "search:\n  sampler: random\n  space:\n" + textwrap.indent(textwrap.dedent(space), "    ")
            + textwrap.indent(textwrap.dedent(extra), "  "))


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the only line of ``text`` holding ``needle``."""
    (line,) = [i for i, row in enumerate(text.splitlines(), 1) if needle in row]
    return line


def random_study(seed: int = 0) -> optuna.Study:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))


def draw(dims, base: dict, n: int, seed: int = 0) -> list[tuple[dict, dict, optuna.trial.FrozenTrial]]:
    """``n`` trials of a RandomSampler study: (filled raw spec, drawn values, the stored trial)."""
    study, out = random_study(seed), []
    for _ in range(n):
        trial = study.ask()
        out.append(sample(dims, base, trial))
        study.tell(trial, 0.0)
    return [(raw, drawn, frozen) for (raw, drawn), frozen in zip(out, study.get_trials(deepcopy=False))]


# -- each distribution kind ---------------------------------------------------------------------
def test_choice_of_scalars_draws_only_listed_values_and_sets_them_in_the_spec(write_spec):
    spec = load_spec(write_spec(study_text("model.pooling.type: {choice: [cls, mean]}\n"
                                           "model.depth: {choice: [1, 3]}\n")))
    dims = parse_space(spec.search.space)
    seen = set()
    for raw, drawn, frozen in draw(dims, spec.raw, 30):
        assert drawn["model.pooling.type"] in ("cls", "mean") and drawn["model.depth"] in (1, 3)
        assert raw["model"]["pooling"] == {"type": drawn["model.pooling.type"]}  # a block created by its type
        assert raw["model"]["depth"] == drawn["model.depth"] and frozen.params == drawn
        seen.add((drawn["model.pooling.type"], drawn["model.depth"]))
    assert len(seen) == 4


def test_choice_of_whole_blocks_puts_the_mapping_in_the_spec_and_a_yaml_label_in_optuna(write_spec, tmp_path):
    spec = load_spec(write_spec(study_text(ATTENTION_BLOCKS)))
    choices = [{"type": "sdpa", "heads": 4}, {"type": "einsum", "heads": 2}]
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="blocks", storage=url, sampler=optuna.samplers.RandomSampler(seed=1))
    built = {}
    for _ in range(12):
        trial = study.ask()
        trial_spec_, drawn = sample_spec(spec, trial)
        study.tell(trial, 0.0)
        assert trial_spec_.model.attention in choices and drawn["model.attention"] == trial_spec_.model.attention
        assert trial_spec_.search is None  # a trial is a plain spec
        built[trial.number] = trial_spec_.model.attention
    assert len({b["type"] for b in built.values()}) == 2

    # What the sqlite storage keeps (read back through a fresh load): YAML text naming each mapping.
    stored = optuna.load_study(study_name="blocks", storage=url).trials
    for frozen in stored:
        label = frozen.params["model.attention"]
        assert isinstance(label, str) and label in ("{type: sdpa, heads: 4}", "{type: einsum, heads: 2}")
        assert yaml.safe_load(label) == built[frozen.number]
        assert frozen.distributions["model.attention"].choices == ("{type: sdpa, heads: 4}", "{type: einsum, heads: 2}")


def test_int_range_draws_integers_within_bounds_on_the_step_and_log_scaled(write_spec):
    spec = load_spec(write_spec(study_text("model.depth: {int: [2, 8], step: 2}\n"
                                           "train.batch_size: {int: [8, 512], log: true}\n"
                                           "train.epochs: {int: [1, 3]}\n")))
    dims = parse_space(spec.search.space)
    depths, batches, epochs = set(), [], set()
    for raw, _drawn, frozen in draw(dims, spec.raw, 200):
        depth, batch, epoch = raw["model"]["depth"], raw["train"]["batch_size"], raw["train"]["epochs"]
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in (depth, batch, epoch))
        assert depth in (2, 4, 6, 8) and 8 <= batch <= 512 and 1 <= epoch <= 3
        assert frozen.distributions["train.batch_size"].log and frozen.distributions["model.depth"].step == 2
        depths.add(depth)
        epochs.add(epoch)
        batches.append(batch)
    assert depths == {2, 4, 6, 8} and epochs == {1, 2, 3}
    # log-uniform on [8, 512]: half the draws fall below 64 (a uniform draw would put 11% there)
    assert sum(b < 64 for b in batches) > 0.35 * len(batches)


def test_float_range_draws_within_bounds_on_the_step_and_log_scaled(write_spec):
    spec = load_spec(write_spec(study_text("train.lr: {float: [1.0e-4, 1.0e-2], log: true}\n"
                                           "train.weight_decay: {float: [0.0, 0.1], step: 0.025}\n"
                                           "train.label_smoothing: {float: [0.0, 0.2]}\n")))
    dims = parse_space(spec.search.space)
    lrs, decays = [], set()
    for raw, _, frozen in draw(dims, spec.raw, 200):
        lr, decay, smoothing = raw["train"]["lr"], raw["train"]["weight_decay"], raw["train"]["label_smoothing"]
        assert 1.0e-4 <= lr <= 1.0e-2 and 0.0 <= decay <= 0.1 and 0.0 <= smoothing <= 0.2
        assert abs(decay / 0.025 - round(decay / 0.025)) < 1e-9
        assert frozen.distributions["train.lr"].log and not frozen.distributions["train.label_smoothing"].log
        lrs.append(lr)
        decays.add(round(decay, 9))
    assert decays == {0.0, 0.025, 0.05, 0.075, 0.1}
    assert sum(lr < 1.0e-3 for lr in lrs) > 0.35 * len(lrs)  # log-uniform: half below 1e-3 (uniform: 9%)


def test_grid_lists_every_value_of_choices_and_stepped_ranges():
    assert parse_dimension("model.depth", {"int": [2, 8], "step": 2}).grid() == [2, 4, 6, 8]
    assert parse_dimension("model.depth", {"int": [2, 4]}).grid() == [2, 3, 4]
    assert parse_dimension("train.weight_decay", {"float": [0.0, 0.1], "step": 0.025}).grid() == [
        0.0, 0.025, 0.05, 0.075, 0.1]
    # Never past high, and high itself where a step lands on it despite float rounding.
    assert parse_dimension("train.lr", {"float": [0.0, 1.0], "step": 0.6}).grid() == [0.0, 0.6]
    assert parse_dimension("train.lr", {"float": [0.1, 0.7], "step": 0.2}).grid() == [0.1, 0.3, 0.5, 0.7]
    blocks = parse_dimension("model.attention", yaml.safe_load(ATTENTION_BLOCKS)["model.attention"])
    assert blocks.grid() == ["{type: sdpa, heads: 4}", "{type: einsum, heads: 2}"]


def test_grid_of_a_float_range_without_step_raises_space_error():
    with pytest.raises(SpaceError, match="grid search needs a step"):
        parse_dimension("train.lr", {"float": [1.0e-4, 1.0e-2], "log": True}).grid()


def test_grid_sampler_visits_every_combination_once_yaml_labels_included(write_spec):
    spec = load_spec(write_spec(study_text("model.depth: {int: [1, 3]}\n" + ATTENTION_BLOCKS)))
    dims = parse_space(spec.search.space)
    study = optuna.create_study(sampler=SAMPLERS["grid"](0, dims, None))
    seen = []
    # ask/tell as the worker loop does, until the sampler says the grid is covered.
    while not study.sampler.is_exhausted(study):
        trial = study.ask()
        built, _ = sample_spec(spec, trial)
        seen.append((built.model.depth, built.model.attention["type"]))
        study.tell(trial, 0.0)
    assert sorted(seen) == [(d, t) for d in (1, 2, 3) for t in ("einsum", "sdpa")]
    assert {t.params["model.attention"] for t in study.trials} == {"{type: sdpa, heads: 4}", "{type: einsum, heads: 2}"}


GRID_STUDY = """\
name: grid-enqueue
seed: 0
data: {dataset: digits, image_size: 8}
model: {dim: 16, depth: 1, patch_embed: {type: conv, patch_size: 4}, attention: {type: sdpa, heads: 2}}
train: {epochs: 1, batch_size: 64, warmup_epochs: 0}
tracking: {experiment: grid-enqueue, plots: false, log_model: false}
search:
  sampler: grid
  pruner: none
  space:
    model.attention.heads: {choice: [1, 2, 4]}
    model.pooling.type: {choice: [cls, mean]}
"""


def test_grid_study_counts_an_enqueued_point_and_tries_every_point_once(write_spec, tmp_path, monkeypatch, sqlite_uri):
    from vit_search.search.run import run_search

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    # Optuna's grid gave the enqueued trial no point and trained it twice; the study ends when the grid is covered.
    spec = load_spec(write_spec(GRID_STUDY + f"  storage: sqlite:///{tmp_path / 'optuna.db'}\n  n_trials: 10\n"
                                "  enqueue:\n    - {model.attention.heads: 4, model.pooling.type: cls}\n"))
    trials = run_search(spec, progress=False).study.get_trials()
    points = [(t.params["model.attention.heads"], t.params["model.pooling.type"]) for t in trials]
    assert points[0] == (4, "cls")
    assert sorted(points) == [(h, p) for h in (1, 2, 4) for p in ("cls", "mean")]
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}


def test_grid_fills_the_keys_an_enqueued_trial_leaves_out_from_an_unused_point(write_spec):
    spec = load_spec(write_spec(GRID_STUDY))
    study = optuna.create_study(sampler=SAMPLERS["grid"](0, parse_space(spec.search.space), None))
    # The first leaves heads out; (4, mean) is the second's, queued behind it: the first takes another.
    study.enqueue_trial({"model.pooling.type": "mean"})
    study.enqueue_trial({"model.attention.heads": 4, "model.pooling.type": "mean"})
    seen = []
    while not study.sampler.all_started(study):
        trial = study.ask()
        built, _ = sample_spec(spec, trial)  # Optuna's grid refused a key left out here
        seen.append((built.model.attention["heads"], built.model.pooling["type"]))
        study.tell(trial, 0.0)
    assert seen[0][1] == "mean" and seen[0] != (4, "mean") and seen[1] == (4, "mean")
    assert sorted(seen) == [(h, p) for h in (1, 2, 4) for p in ("cls", "mean")]


# -- conditional spaces -------------------------------------------------------------------------
def test_block_argument_is_drawn_exactly_in_trials_that_choose_its_block(write_spec):
    spec = load_spec(write_spec(study_text(CONDITIONAL)))
    study, kinds = random_study(3), set()
    for _ in range(30):
        trial = study.ask()
        built, drawn = sample_spec(spec, trial)
        study.tell(trial, 0.0)
        frozen = study.trials[trial.number]
        ffn_type = frozen.params["model.ffn.type"]
        assert ("model.ffn[mlp].ratio" in frozen.params) == (ffn_type == "mlp") == ("model.ffn[mlp].ratio" in drawn)
        assert built.model.ffn["type"] == ffn_type
        if ffn_type == "mlp":
            assert built.model.ffn == {"type": "mlp", "ratio": frozen.params["model.ffn[mlp].ratio"]}
        else:
            assert built.model.ffn == {"type": "swiglu", "ratio": 2}  # the spec's own ratio stays
        kinds.add((ffn_type, built.model.ffn["ratio"]))
    assert kinds == {("mlp", 2), ("mlp", 4), ("swiglu", 2)}


@pytest.mark.parametrize("strategy", ["standard", "supernet"])
def test_a_layers_own_key_is_drawn_exactly_in_trials_deep_enough_to_have_that_layer(write_spec, strategy):
    # docs/search.md: "it is drawn only in subnets deep enough to have that layer, in both strategies".
    space = ("model.depth: {int: [1, 3]}\n"
             + "".join(f"model.layers.{i}.ffn.ratio: {{choice: [1, 2]}}\n" for i in range(3)))
    extra = "strategy: supernet\n" if strategy == "supernet" else ""
    spec = load_spec(write_spec(study_text(space, extra)))
    study, depths = random_study(1), set()
    for _ in range(30):
        trial = study.ask()
        built, drawn = sample_spec(spec, trial)
        study.tell(trial, 0.0)
        depth = built.model.depth
        assert sorted(k for k in study.trials[trial.number].params if k.startswith("model.layers.")) == [
            f"model.layers.{i}.ffn.ratio" for i in range(depth)]
        assert {int(i): layer["ffn"]["ratio"] for i, layer in built.model.layers.items()} == {
            i: drawn[f"model.layers.{i}.ffn.ratio"] for i in range(depth)}
        depths.add(depth)
    assert depths == {1, 2, 3}


def test_block_argument_of_a_block_left_to_its_default_or_preset_is_drawn(write_spec):
    # No ffn in the spec: the schema's default ffn is an mlp, so its ratio is searched.
    default = load_spec(write_spec(study_text("model.ffn[mlp].ratio: {choice: [2, 4]}\n",
                                              base=BASE.replace("  ffn: {type: mlp, ratio: 2}\n", ""))))
    assert check_space(default) == []
    for raw, drawn, _ in draw(parse_space(default.search.space), default.raw, 5):
        assert raw["model"]["ffn"]["ratio"] == drawn["model.ffn[mlp].ratio"] in (2, 4)
        # The trial's spec loads: the block written without a type is the default mlp, with the drawn ratio.
        assert load_spec(raw).model.ffn == {"type": "mlp", "ratio": drawn["model.ffn[mlp].ratio"]}
    # A preset's attention is sdpa: `attention: {heads: 2}` keeps that type, so sdpa arguments apply.
    dims = parse_space({"model.attention[sdpa].qk_norm": {"choice": [True]},
                        "model.attention[einsum].qk_norm": {"choice": [False]}})
    raw = fill(dims, {"name": "p", "model": {"preset": "vit_ti_16", "attention": {"heads": 2}}},
               {"model.attention[sdpa].qk_norm": True, "model.attention[einsum].qk_norm": False})
    assert raw["model"]["attention"] == {"heads": 2, "qk_norm": True}
    assert load_spec(raw, check_model=False).model.attention == {"type": "sdpa", "heads": 2, "qk_norm": True}


def test_a_whole_block_is_drawn_before_its_own_arguments_whatever_the_written_order(write_spec):
    spec = load_spec(write_spec(study_text("model.attention.heads: {choice: [8]}\n" + ATTENTION_BLOCKS)))
    types = set()
    for raw, drawn, _ in draw(parse_space(spec.search.space), spec.raw, 8):
        assert raw["model"]["attention"] == {**drawn["model.attention"], "heads": 8}
        types.add(drawn["model.attention"]["type"])
    assert types == {"sdpa", "einsum"}


def test_fill_sets_given_values_as_sampling_would_and_skips_arguments_of_unchosen_blocks(write_spec):
    spec = load_spec(write_spec(study_text(CONDITIONAL + ATTENTION_BLOCKS)))
    dims = parse_space(spec.search.space)
    values = {"model.ffn.type": "mlp", "model.ffn[mlp].ratio": 4, "model.attention": "{type: einsum, heads: 2}"}
    raw = fill(dims, spec.raw, values)
    assert raw["model"]["ffn"] == {"type": "mlp", "ratio": 4}
    assert raw["model"]["attention"] == {"type": "einsum", "heads": 2}  # the YAML label read back as the mapping
    raw = fill(dims, spec.raw, {**values, "model.ffn.type": "swiglu"})
    assert raw["model"]["ffn"] == {"type": "swiglu", "ratio": 2}  # ratio belongs to mlp: not set
    assert fill(dims, spec.raw, {"model.attention": {"type": "sdpa", "heads": 4}})["model"]["attention"] == {
        "type": "sdpa", "heads": 4}  # the mapping itself is taken as it is


def test_trial_spec_rebuilds_each_sampled_trial_from_its_stored_params(write_spec):
    spec = load_spec(write_spec(study_text(CONDITIONAL + ATTENTION_BLOCKS)))
    study = random_study(5)
    for _ in range(10):
        trial = study.ask()
        built, _ = sample_spec(spec, trial)
        study.tell(trial, 0.0)
        again = trial_spec(spec, study.trials[trial.number].params)  # what enqueue and best export use
        assert again.to_dict() == built.to_dict()


# -- malformed entries --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        ("model..depth", {"int": [1, 2]}, "a key is a dotted path such as model.depth"),
        ("model.ffn[mlp]ratio", {"int": [1, 2]}, "a key is a dotted path"),
        ("model.[mlp].ratio", {"int": [1, 2]}, "a key is a dotted path"),
        ("model.depth", 3, "expected {choice: [...]}, {int: [low, high]} or {float: [low, high]}"),
        ("model.depth", {"int": [1, 4], "choice": [1, 2]}, "give exactly one of choice, int or float"),
        ("model.depth", {"low": 1}, "give exactly one of choice, int or float"),
        ("model.depth", {"int": [1, 4], "steps": 2}, "unknown: steps"),
        ("model.depth", {"choice": []}, "choice needs a non-empty list"),
        ("model.depth", {"choice": 3}, "choice needs a non-empty list"),
        ("model.depth", {"choice": [1, 2], "step": 1}, "step and log apply to int and float ranges, not choice"),
        ("model.depth", {"int": [8, 2]}, "low 8 is above high 2"),
        ("model.depth", {"int": [1]}, "int needs [low, high]"),
        ("train.lr", {"float": [0.0, 1.0], "log": True}, "a log range needs low > 0"),
        ("train.lr", {"float": [1.0e-4, 1.0], "step": 0.1, "log": True}, "a float range takes step or log, not both"),
        ("model.depth", {"int": [1.5, 4]}, "int bounds must be integers"),
        ("train.lr", {"float": [True, 2.0]}, "float bounds must be numbers"),
        ("model.depth", {"int": [1, 8], "step": 0}, "step must be positive"),
        ("model.depth", {"int": [1, 8], "step": 1.5}, "an int range needs an integer step"),
        ("model.depth", {"int": [1, 8], "step": 2, "log": True}, "a log int range takes no step"),
        ("train.lr", {"float": [1.0e-4, 1.0], "log": "yes"}, "log must be true or false"),
        ("name", {"choice": ["a", "b"]}, "'name' cannot be searched"),
        ("plugins", {"choice": [[], ["my_blocks"]]}, "'plugins' cannot be searched"),
        ("search.n_trials", {"int": [1, 2]}, "'search' cannot be searched"),
    ],
)
def test_malformed_entry_raises_space_error_naming_key_and_reason(key, raw, message):
    with pytest.raises(SpaceError) as err:
        parse_dimension(key, raw)
    assert err.value.key == key and str(err.value).startswith(f"{key}: ")
    assert message in err.value.message


def test_int_range_with_step_one_and_log_is_accepted():
    assert parse_dimension("train.batch_size", {"int": [8, 64], "step": 1, "log": True}).log


@pytest.mark.parametrize("raw, high", [
    ({"int": [1, 4], "step": 2}, 3), ({"int": [16, 40], "step": 16}, 32), ({"int": [2, 12], "step": 2}, 12),
    ({"float": [0.0, 0.105], "step": 0.01}, 0.1), ({"float": [0.0, 0.1], "step": 0.01}, 0.1),
])
def test_a_high_the_step_does_not_reach_is_lowered_to_its_last_step_as_optuna_draws_it(raw, high, recwarn):
    dim = parse_dimension("model.depth", raw)
    assert dim.high == high and type(dim.high) is type(raw[next(iter(raw))][1])
    study = optuna.create_study()
    drawn = {dim.suggest(study.ask()) for _ in range(30)}
    assert max(drawn) <= high and not [w for w in recwarn if "divisible" in str(w.message)]  # no warning per draw


# -- check_space: problems located at file:line before any trial ----------------------------------
def check(write_spec, text: str) -> tuple[Path, list[str]]:
    path = write_spec(text)
    return path, check_space(load_spec(path))


def test_check_space_points_at_a_typo_in_a_path_and_suggests_the_field(write_spec):
    text = study_text("model.depth: {int: [1, 3]}\nmodel.deph: {int: [2, 4]}\n")
    path, problems = check(write_spec, text)
    assert problems == [f"{path}:{line_of(text, 'model.deph')}: search.space.model.deph: value 2 does not fit "
                        f"the spec: model.deph: unknown key 'deph'; did you mean 'depth'?"]


def test_check_space_points_at_an_unknown_block_argument_and_suggests_it(write_spec):
    text = study_text("model.attention.hedas: {choice: [2, 4]}\n" + CONDITIONAL.replace("].ratio", "].ratoi"))
    path, problems = check(write_spec, text)
    assert len(problems) == 2
    heads, ratio = problems
    assert heads.startswith(f"{path}:{line_of(text, 'hedas')}: search.space.model.attention.hedas: ")
    assert "unknown argument 'hedas'; did you mean 'heads'?" in heads
    assert ratio.startswith(f"{path}:{line_of(text, 'ratoi')}: search.space.model.ffn[mlp].ratoi: ")
    assert "model.ffn (mlp): unknown argument 'ratoi'; did you mean 'ratio'?" in ratio


def test_check_space_points_at_a_range_end_the_spec_rejects(write_spec):
    text = study_text("model.depth: {int: [0, 3]}\ntrain.lr: {float: [1.0e-4, 1.0e-2], log: true}\n")
    path, problems = check(write_spec, text)
    assert problems == [f"{path}:{line_of(text, 'model.depth')}: search.space.model.depth: value 0 does not fit "
                        f"the spec: model.depth: Input should be greater than 0 (got 0)"]


def test_check_space_points_at_an_enqueued_key_outside_the_space(write_spec):
    text = study_text("model.depth: {int: [1, 3]}\n",
                      "enqueue:\n  - model.depth: 2\n  - model.depth: 3\n    model.dpth: 3\n")
    path, problems = check(write_spec, text)
    assert problems == [f"{path}:{line_of(text, 'model.dpth')}: search.enqueue.1: 'model.dpth' is not a key of "
                        f"search.space; did you mean 'model.depth'?"]
    text = study_text("{}\n", "enqueue:\n  - model.depth: 2\n")
    path, problems = check(write_spec, text)
    assert problems == [f"{path}:{line_of(text, 'model.depth: 2')}: search.enqueue.0: 'model.depth' is not a key of "
                        f"search.space; search.space is empty: add it there, or leave it out here"]


@pytest.mark.parametrize("other, enqueued, said", [
    # To Python, true is 1: it trained heads 1. A yes/no stays one where the choices are yes/no.
    ("model.attention.qk_norm: {choice: [true, false]}", "{model.attention.qk_norm: false}",
     "true: True is a yes/no value, not one of its choices (1, 2, 4)"),
    # 2.0 trained heads 2 while the spec said 2.0; a decimal for a choice of decimals stays accepted.
    ("train.lr: {choice: [0.001, 0.01]}", "{train.lr: 0.01}",
     "2.0: 2.0 is a decimal number; its choices are integers (1, 2, 4)"),
], ids=["yes-no", "decimal"])
def test_check_space_refuses_an_enqueued_value_of_another_kind_than_a_choice_of_integers(write_spec, other, enqueued,
                                                                                        said):
    value, reason = said.split(": ", 1)
    text = study_text(f"model.attention.heads: {{choice: [1, 2, 4]}}\n{other}\n",
                      f"enqueue:\n  - {enqueued}\n  - {{model.attention.heads: {value}}}\n")
    path, problems = check(write_spec, text)
    assert problems == [f"{path}:{line_of(text, f'heads: {value}')}: search.enqueue.1.model.attention.heads: {reason}; "
                        f"enqueue a value search.space.model.attention.heads can draw"]


def test_check_space_reports_malformed_entries_at_their_line_one_each(write_spec):
    text = study_text("model.depth: {int: [4, 2]}\ntrain.lr: {float: [1, 2], step: 0.5, log: true}\n"
                      "model.pooling.type: {choice: [cls, mean]}\n")
    path, problems = check(write_spec, text)
    assert problems == [
        f"{path}:{line_of(text, 'model.depth')}: search.space.model.depth: low 4 is above high 2",
        f"{path}:{line_of(text, 'train.lr')}: search.space.train.lr: a float range takes step or log, not both",
    ]


def test_check_space_flags_a_block_argument_whose_block_is_never_chosen(write_spec):
    text = study_text("model.ffn[swiglu].hidden_dim: {choice: [48, 64]}\n")
    path, problems = check(write_spec, text)
    assert problems == [f"{path}:{line_of(text, 'hidden_dim')}: search.space.model.ffn[swiglu].hidden_dim: never "
                        f"drawn: model.ffn is never a 'swiglu' (search model.ffn.type with a choice that includes it)"]


def test_check_space_finds_no_problem_in_good_spaces(write_spec):
    assert check_space(load_spec(REPO / "experiments" / "digits.yaml")) == []
    good = study_text(CONDITIONAL + ATTENTION_BLOCKS + "model.attention[einsum].qk_norm: {choice: [true, false]}\n"
                      "train.lr: {float: [1.0e-4, 1.0e-2], log: true}\nmodel.depth: {int: [1, 6], step: 1}\n",
                      "enqueue:\n  - model.ffn.type: mlp\n    model.ffn[mlp].ratio: 4\n")
    assert check(write_spec, good)[1] == []


def test_check_space_loads_plugin_files_beside_the_spec_from_any_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "space_test_plugin_blocks.py").write_text("# a plugin that registers nothing\n")
    spec_path = folder / "spec.yaml"
    spec_path.write_text(study_text("model.depth: {int: [1, 3]}\n").replace(
        "seed: 0\n", "seed: 0\nplugins: [space_test_plugin_blocks.py]\n"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert check_space(load_spec(spec_path)) == []


# -- combinations that cannot be built ----------------------------------------------------------
def test_sample_spec_raises_spec_error_for_a_combination_that_cannot_be_built(write_spec):
    spec = load_spec(write_spec(study_text("model.dim: {choice: [48, 64]}\nmodel.attention.heads: {choice: [3, 4]}\n")))
    assert check_space(spec) == []  # every value fits alone; only some combinations are infeasible
    study = random_study()
    study.enqueue_trial({"model.dim": 64, "model.attention.heads": 3})
    study.enqueue_trial({"model.dim": 48, "model.attention.heads": 3})
    with pytest.raises(SpecError) as err:
        sample_spec(spec, study.ask())
    assert len(err.value.problems) == 1 and "heads" in err.value.problems[0] and "64" in err.value.problems[0]
    built, drawn = sample_spec(spec, study.ask())
    assert (built.model.dim, built.model.attention["heads"]) == (48, 3)
    assert drawn == {"model.dim": 48, "model.attention.heads": 3}


# -- the command line (one fresh process each: about 5 s of imports) -----------------------------
def cli(*args: str, cwd: Path, tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.run([sys.executable, "-m", "vit_search", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def empty_cwd(tmp_path: Path) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def test_cli_validate_of_a_bad_space_exits_2_with_one_line_per_problem(write_spec, empty_cwd):
    text = study_text("model.deph: {int: [2, 4]}\nmodel.attention.hedas: {choice: [2, 4]}\n"
                      "model.depth: {int: [0, 3]}\nmodel.pooling.type: {choice: [cls, mean]}\n")
    path = write_spec(text)
    result = cli("validate", str(path), cwd=empty_cwd)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(": search.space.")[0] for line in lines] == [
        f"error: {path}:{line_of(text, key)}" for key in ("model.deph", "hedas", "model.depth")]
    assert "did you mean 'depth'?" in lines[0] and "did you mean 'heads'?" in lines[1]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(empty_cwd.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "best"])
def test_run_and_best_check_the_space_as_validate_does_before_anything_is_written(write_spec, empty_cwd, capsys,
                                                                                   monkeypatch, command):
    from vit_search.cli import main

    text = study_text("model.deph: {int: [2, 4]}\n")
    path = write_spec(text)
    monkeypatch.chdir(empty_cwd)  # refused before any work: in this process
    assert main([command, str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path}:{line_of(text, 'model.deph')}: search.space.") and "did you mean 'depth'?" in line
    assert list(empty_cwd.iterdir()) == []


def test_dry_run_marks_what_cannot_be_built_or_breaks_a_constraint_with_its_values(write_spec, empty_cwd, capsys,
                                                                                     monkeypatch):
    from vit_search.cli import main

    base = ("name: marks\ndata: {dataset: digits, image_size: 8}\nmodel: {dim: 16, depth: 4, patch_embed: {type: conv, "
            "patch_size: 2}, attention: {type: sdpa, heads: 2}}\nsearch:\n  constraints: {max_params: 12000}\n")
    monkeypatch.chdir(empty_cwd)
    # Heads that no searched dim divides: refused before any trial (every such trial would be pruned).
    assert main(["run", str(write_spec(base + "  space: {model.attention.heads: {choice: [3, 5]}}\n")), "--dry-run"]) == 2
    assert "search.space.model.attention.heads: value 3 does not fit the spec: model.attention (sdpa): dim 16 is not " \
           "divisible by heads 3" in capsys.readouterr().err
    # Heads 3 builds beside dim 24: the one combination that does not is marked.
    grid = "  sampler: grid\n  space: {model.dim: {choice: [16, 24]}, model.attention.heads: {choice: [2, 3]}}\n"
    assert main(["run", str(write_spec(base + grid)), "--dry-run", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    infeasible = [line for line in lines if ": infeasible: " in line]
    assert len(lines) == 4 and len(infeasible) == 1, lines
    assert "infeasible: model.attention (sdpa): dim 16 is not divisible by heads 3" in infeasible[0]
    assert infeasible[0].endswith("[model.dim=16, model.attention.heads=3]"), infeasible[0]
    assert main(["run", str(write_spec(base + "  space: {model.depth: {choice: [4]}}\n")), "--dry-run", "1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "PRUNED: params 13,690 > max_params 12,000" in line and line.endswith("[model.depth=4]")
    assert list(empty_cwd.iterdir()) == []


def test_a_set_of_a_searched_value_is_said_to_be_drawn_over(write_spec, empty_cwd, cli_here):
    path = write_spec(study_text("model.depth: {int: [1, 3]}\n"))
    result = cli_here("run", path, "--dry-run", "2", "--set", "model.depth=5", "--set", "train.epochs=1", cwd=empty_cwd)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("note:")] == [
        "note: --set model.depth=5: model.depth is searched (search.space), so each trial draws its own value over "
        "it; to fix it, remove model.depth from search.space"]
    assert "model.depth=5]" not in result.stdout  # the draw, as said


def test_cli_dry_run_prints_one_line_per_trial_and_writes_nothing(write_spec, empty_cwd):
    path = write_spec(study_text(CONDITIONAL + "model.depth: {int: [1, 3]}\n"))
    result = cli("run", str(path), "--dry-run", "3", cwd=empty_cwd)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    for number, line in enumerate(lines):
        assert line.startswith(f"trial {number}: ") and " parameters, " in line and "MFLOPs" in line
        assert "model.ffn.type=" in line and "model.depth=" in line
        assert ("model.ffn[mlp].ratio=" in line) == ("model.ffn.type=mlp" in line)
    assert list(empty_cwd.iterdir()) == []  # no optuna.db, no mlflow.db or mlruns/, no runs/


def test_cli_run_of_a_spec_without_search_section_exits_2_with_one_line(write_spec, empty_cwd):
    path = write_spec(BASE)
    result = cli("run", str(path), cwd=empty_cwd, tracking_uri=f"sqlite:///{empty_cwd.parent / 'mlflow.db'}")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {path}: no 'search:' section; add one (see experiments/digits.yaml), "
        f"or use 'vit-search train' for a single run"]
    assert list(empty_cwd.iterdir()) == []


@pytest.mark.parametrize("command, flag, message", [
    ("best", "--storage=", "--storage '': empty; give the study's storage (sqlite:///FILE, journal:FILE, "
                           "postgresql://..., redis://...), or leave --storage out for search.storage"),
    ("best", "--export=", "--export '': empty; name the file to write"),
    ("best", "--top=0", "--top 0: must be at least 1 (rows of the top-trials table)"),
    ("train", "--checkpoint-dir= ", "--checkpoint-dir ' ': empty; name a folder, or leave --checkpoint-dir out for "
                                    "train.checkpoint_dir"),
])
def test_an_empty_option_or_a_zero_count_is_one_line_rather_than_the_default(write_spec, empty_cwd, capsys,
                                                                               monkeypatch, command, flag, message):
    from vit_search.cli import main

    monkeypatch.chdir(empty_cwd)  # refused before any work: in this process
    assert main([command, str(write_spec(study_text("model.depth: {int: [1, 3]}\n"))), flag]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert list(empty_cwd.iterdir()) == []


@pytest.mark.parametrize("flag, message", [
    ("--jobs=-1", "--jobs -1: must be 0 (--trials-per-gpu workers per GPU, else one per core) or more"),
    ("--n-trials=0", "--n-trials 0: must be at least 1 (trials in the whole study)"),
    ("--dry-run=0", "--dry-run 0: must be from 1 to 10,000 (configurations to sample), or leave N out for 5"),
    ("--dry-run=1000000", "--dry-run 1000000: must be from 1 to 10,000 (configurations to sample)"),
    ("--trials-per-gpu=0", "--trials-per-gpu 0: must be from 1 to 64 (trials at once in each worker; each holds"),
    ("--trials-per-gpu=65", "--trials-per-gpu 65: must be from 1 to 64"),
    ("--jobs=100000", "--jobs 100000: at most {most} workers on this machine (8 a core); more only contend for it"),
    ("--storage=", "--storage '': empty; give the study's storage (sqlite:///FILE, journal:FILE, postgresql://..., "
                   "redis://...), or leave --storage out for search.storage"),
])
def test_cli_run_refuses_counts_out_of_their_range_with_one_line(write_spec, empty_cwd, cli_here, flag, message):
    path = write_spec(study_text("model.depth: {int: [1, 3]}\n"))
    result = cli_here("run", path, flag, cwd=empty_cwd)  # a study or MLflow store would land in cwd
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {message.format(most=8 * (os.cpu_count() or 1))}"), line
    assert list(empty_cwd.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["run", "{spec}", "--n-trials", "abc"], "vit-search run: argument --n-trials: invalid int value: 'abc'; "
                                             "see 'vit-search run --help'"),
    (["run", "{spec}", "--set"], "vit-search run: argument --set: expected one argument; see 'vit-search run --help'"),
    (["train"], "vit-search train: the following arguments are required: spec; see 'vit-search train --help'"),
    (["run", "{spec}", "--timeout", "3"], "vit-search: unrecognized arguments: --timeout 3; see 'vit-search --help'"),
    (["serve"], "vit-search: argument COMMAND: invalid choice: 'serve' (choose from 'blocks', 'validate', 'summary', "
                "'train', 'prepare', 'run', 'best', 'ui'); see 'vit-search --help'"),
    (["run", "{spec}", "--set", "=3"], "--set =3: expected PATH=VALUE, e.g. --set model.depth=6"),
])
def test_arguments_the_parser_refuses_are_one_line_naming_the_help_to_read(write_spec, empty_cwd, capsys, monkeypatch,
                                                                            args, message):
    from vit_search.cli import main

    monkeypatch.chdir(empty_cwd)  # refused before any work: in this process
    path = str(write_spec(study_text("model.depth: {int: [1, 3]}\n")))
    try:
        code = main([path if arg == "{spec}" else arg for arg in args])
    except SystemExit as exit_:  # argparse leaves through sys.exit, as the program then does
        code = exit_.code
    assert code == 2 and capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert list(empty_cwd.iterdir()) == []
