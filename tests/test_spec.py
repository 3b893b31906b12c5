"""Specs: loading, overrides, presets, derived values, and one clear line per error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from vit_search.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]
GOOD = """\
name: t
data: {dataset: digits, image_size: 16}
model:
  dim: 32
  depth: 2
  patch_embed: {type: conv, patch_size: 4}
  attention: {type: sdpa, heads: 4}
  ffn: {type: mlp, ratio: 2}
train: {epochs: 1}
"""


def problems(path_or_text, write_spec=None, overrides=()):
    path = write_spec(path_or_text) if write_spec else path_or_text
    with pytest.raises(SpecError) as err:
        load_spec(path, overrides)
    return err.value.problems


def test_design_example_loads_with_derived_values():
    spec = load_spec(REPO / "experiments" / "digits.yaml")
    assert spec.model.in_channels == 1 and spec.model.num_classes == 10 and spec.model.image_size == 16
    assert spec.search.space["model.depth"] == {"int": [2, 6]}
    assert spec.flat()["model.attention.heads"] == 4


def test_every_experiment_file_validates(tmp_path):
    from vit_search.model import build_vit
    from vit_search.search.space import check_space
    from vit_search.train import checkpoint_dir_of

    # finetune-digits.yaml starts from the checkpoint that training pretrain-synthetic.yaml writes; a
    # stand-in of the same model (fresh weights, recorded as `vit-search train` records it) takes its place.
    pretrain = load_spec(REPO / "experiments" / "pretrain-synthetic.yaml")
    stand_in = tmp_path / "checkpoint.pt"
    torch.save({"model": build_vit(pretrain).state_dict(),
                "model_spec": pretrain.model.model_dump(mode="json", by_alias=True)}, stand_in)
    written = yaml.safe_load((REPO / "experiments" / "finetune-digits.yaml").read_text())["model"]["init"]["path"]
    # The documented command, run from the repository root, writes the file the fine-tuning spec names.
    assert (REPO / "experiments" / written).resolve() == (REPO / checkpoint_dir_of(pretrain) / "checkpoint.pt").resolve()
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        overrides = [f"model.init.path={stand_in}"] if path.name == "finetune-digits.yaml" else []
        spec = load_spec(path, overrides)
        assert check_space(spec) == [], path
        if path.name == "finetune-digits.yaml":
            assert (spec.model.dim, spec.model.depth, spec.model.patch_embed["patch_size"]) == (192, 12, 8)
            assert spec.model.num_classes == 10 and spec.model.in_channels == 1


def test_set_overrides_values_as_yaml(write_spec):
    spec = load_spec(write_spec(GOOD), ["model.depth=6", "model.attention.type=einsum", "train.lr=1e-2"])
    assert spec.model.depth == 6 and spec.model.attention["type"] == "einsum" and spec.train.lr == 0.01


def test_set_creates_the_mappings_missing_on_its_path(write_spec):
    path = write_spec("name: bare\n")  # no data, tracking or search section
    spec = load_spec(path, ["tracking.experiment=x", "data.augment.hflip=true", "search.space={}",
                            "search.n_trials=3"])
    assert spec.tracking.experiment == "x" and spec.data.augment.hflip is True and spec.search.n_trials == 3
    assert spec.raw == {"name": "bare", "tracking": {"experiment": "x"}, "data": {"augment": {"hflip": True}},
                        "search": {"space": {}, "n_trials": 3}}


def test_set_given_twice_keeps_the_last_and_a_preset_block_of_another_type_takes_its_defaults(write_spec):
    spec = load_spec(write_spec("name: p\nmodel: {preset: vit_ti_16, attention: {type: einsum}}\n"),
                     ["model.depth=3", "model.depth=5"])
    assert spec.model.depth == 5
    assert spec.model.attention == {"type": "einsum"}  # the preset's sdpa arguments are not carried over


def test_a_spec_file_that_does_not_exist_is_one_line():
    with pytest.raises(SpecError) as raised:
        load_spec("/nonexistent/spec.yaml")
    assert raised.value.problems == ["/nonexistent/spec.yaml: no such file; check the path"]


def test_a_spec_that_is_not_utf8_names_the_line_and_says_to_save_it_as_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: x\n# café\n".encode("latin-1"))
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    assert raised.value.problems == [f"{path}:2: byte 0xe9 cannot be decoded as utf-8 text; save the spec as UTF-8"]


def test_preset_fills_the_model_and_keys_override_it(write_spec):
    spec = load_spec(write_spec("name: p\ndata: {dataset: cifar10, image_size: 224}\n"
                                "model: {preset: vit_s_16, depth: 6, attention: {heads: 4}}\n"), check_model=False)
    assert spec.model.dim == 384 and spec.model.depth == 6
    assert spec.model.attention == {"type": "sdpa", "heads": 4}
    assert spec.model.patch_embed == {"type": "conv", "patch_size": 16}


def test_a_block_may_be_named_by_its_type_alone(write_spec):
    spec = load_spec(write_spec(GOOD + "\n"), ["model.pooling=mean"])
    assert spec.model.pooling == {"type": "mean"}


def test_resolved_yaml_round_trips(write_spec, tmp_path):
    spec = load_spec(write_spec(GOOD))
    again = tmp_path / "again.yaml"
    again.write_text(spec.to_yaml())
    assert load_spec(again).to_dict() == spec.to_dict()


def test_yaml_syntax_error_names_the_line(write_spec):
    (line,) = problems("name: t\nmodel: {dim: 3\n", write_spec)
    assert line.endswith("YAML syntax error: expected ',' or '}', but got '<stream end>'") or "YAML syntax" in line
    assert line.startswith(str(write_spec("x").parent / "spec.yaml"))


def test_empty_file_is_an_error(write_spec):
    (line,) = problems("", write_spec)
    assert "the file is empty" in line


def test_unknown_key_suggests_the_right_one(write_spec):
    (line,) = problems(GOOD.replace("depth: 2", "deph: 2"), write_spec)
    assert line.endswith("spec.yaml:5: model.deph: unknown key 'deph'; did you mean 'depth'?")


def test_wrong_type_names_file_line_and_field(write_spec):
    (line,) = problems(GOOD.replace("epochs: 1", "epochs: many"), write_spec)
    assert "spec.yaml:9: train.epochs:" in line and "valid integer" in line


def test_unknown_block_name_suggests_and_lists(write_spec):
    (line,) = problems(GOOD.replace("type: sdpa", "type: sdpaa"), write_spec)
    assert line.endswith("spec.yaml:7: model.attention.type: unknown attention 'sdpaa'; "
                         "did you mean 'sdpa'? registered: einsum, sdpa")


def test_unknown_block_argument_names_the_block(write_spec):
    (line,) = problems(GOOD.replace("ratio: 2", "ratoi: 2"), write_spec)
    assert line.endswith("spec.yaml:8: model.ffn.ratoi: model.ffn (mlp): unknown argument 'ratoi'; "
                         "did you mean 'ratio'?")


def test_dim_not_divisible_by_heads(write_spec):
    (line,) = problems(GOOD.replace("heads: 4", "heads: 5"), write_spec)
    assert "spec.yaml:7:" in line and "dim 32 is not divisible by heads 5" in line


@pytest.mark.parametrize("heads", [0, -4])
def test_heads_below_one_are_said_as_such_not_as_a_remainder(write_spec, heads):
    (line,) = problems(GOOD.replace("heads: 4", f"heads: {heads}"), write_spec)
    assert "spec.yaml:7:" in line and f"heads {heads}: must be at least 1" in line
    assert "divisible" not in line


def test_sincos2d_position_with_dim_not_divisible_by_4_is_one_error_at_the_position_block(write_spec):
    text = GOOD.replace("dim: 32", "dim: 30").replace("heads: 4", "heads: 3").replace(
        "  attention:", "  position: {type: sincos2d}\n  attention:")
    (line,) = problems(text, write_spec)
    assert line.endswith("spec.yaml:7: model.position (sincos2d): sincos2d needs dim divisible by 4, got 30")
    assert load_spec(write_spec(text.replace("sincos2d", "learned"))).model.dim == 30  # only sincos2d needs it
    assert load_spec(write_spec(text.replace("dim: 30", "dim: 36"))).model.position == {"type": "sincos2d"}


def test_image_size_not_divisible_by_patch_size(write_spec):
    (line,) = problems(GOOD.replace("image_size: 16", "image_size: 18"), write_spec)
    assert "spec.yaml:6:" in line and "image size 18x18 is not divisible by patch size 4x4" in line


@pytest.mark.parametrize("field,line_no", [("dim: 32", 4), ("depth: 2", 5), ("image_size: 16", 2)])
def test_non_positive_sizes_are_refused(write_spec, field, line_no):
    key = field.split(":")[0]
    (line,) = problems(GOOD.replace(field, f"{key}: 0"), write_spec)
    assert f"spec.yaml:{line_no}:" in line and key in line


def test_missing_plugin_is_a_spec_error(write_spec):
    (line,) = problems("plugins: [no_such_plugin_module]\n" + GOOD, write_spec)
    assert "spec.yaml:1: plugins.0: plugin 'no_such_plugin_module' not found" in line


def test_several_problems_are_all_reported(write_spec):
    lines = problems(GOOD.replace("depth: 2", "deph: 2").replace("epochs: 1", "epochs: -1"), write_spec)
    assert len(lines) == 2


def test_bad_override_is_located_at_the_set_flag(write_spec):
    (line,) = problems(GOOD, write_spec, ["model.deph=3"])
    assert line.startswith("--set model.deph=3: model.deph: unknown key 'deph'; did you mean 'depth'?")


def test_a_problem_inside_a_section_an_override_replaced_is_located_at_the_override(write_spec):
    # The file's data section says dataset on line 2; the override replaced the whole section.
    (line,) = problems(GOOD, write_spec, ["data={dataset: image_folder}"])
    assert line.startswith("--set data={dataset: image_folder}: data.dataset: Input should be ")
    (line,) = problems(GOOD.replace("image_size: 16", "image_size: 15"), write_spec, ["data.dataset=digits"])
    assert line.endswith("spec.yaml:6: model.patch_embed (conv): image size 15x15 is not divisible by patch size 4x4; "
                         "change data.image_size or patch_size so that each side divides evenly")  # the file's line


def test_cli_bad_spec_exits_2_with_one_line_and_creates_nothing(write_spec, cli, tmp_path):
    path = write_spec(GOOD.replace("ratio: 2", "ratoi: 2"))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "unknown argument 'ratoi'; did you mean 'ratio'?" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_validate_and_summary_on_a_good_spec(write_spec, cli):
    path = write_spec(GOOD)
    result = cli("summary", str(path), "--set", "model.depth=3")
    assert result.returncode == 0, result.stderr
    assert "blocks.2" in result.stdout and "total parameters:" in result.stdout and "forward FLOPs" in result.stdout
    assert ", 1 channel, 10 classes" in result.stdout.splitlines()[0]  # digits: grey
    assert yaml.safe_load(path.read_text())["model"]["depth"] == 2  # overrides never edit the file


DESIGN_SKETCH = """\
name: digits-vit
seed: 0
plugins: []                      # modules or .py files that register extra blocks
data: {dataset: digits, image_size: 16}
model:
  dim: 64
  depth: 4
  patch_embed: {type: conv, patch_size: 4}
  position: {type: learned}
  attention: {type: sdpa, heads: 4}
  ffn: {type: mlp, ratio: 4}
  pooling: {type: cls}
train: {epochs: 30, batch_size: 128, lr: 3.0e-3, weight_decay: 0.05}
search:                          # only `vit-search run` reads this section
  n_trials: 20
  metric: val_accuracy
  direction: maximize
  sampler: tpe
  pruner: hyperband
  space:
    model.depth: {int: [2, 8]}
    model.attention.heads: {choice: [2, 4, 8]}
    model.pooling.type: {choice: [cls, mean]}
    train.lr: {float: [1.0e-4, 1.0e-2], log: true}
tracking: {experiment: digits-vit}   # MLflow URI from MLFLOW_TRACKING_URI, else the local default
"""


def test_the_design_documents_sketch_loads_as_written(write_spec):
    spec = load_spec(write_spec(DESIGN_SKETCH))
    assert spec.train.epochs == 30 and spec.search.sampler == "tpe" and spec.tracking.experiment == "digits-vit"


def test_a_search_without_an_objective_is_refused_at_validate(write_spec):
    path = write_spec("name: none\nsearch:\n  metric: []\n  direction: []\n  space: {}\n")
    (problem,) = problems(path)  # it ran to an internal error in Optuna, after making the study's files
    assert "metric: [] names no objective; give a metric (val_accuracy, by default) or leave it out" in problem


@pytest.mark.parametrize("overrides, says", [
    # The batch is padded whole: it ran out of memory, blamed on the batch size.
    (["data.augment.random_crop_padding=100"], "augment.random_crop_padding 100 is more than the image side 16"),
    # A NaN table: the NaN loss was blamed on the learning rate.
    (["model.position.type=sincos2d", "model.position.temperature=0"], "temperature 0 must be above 0"),
    (["model.position.std=-1"], "std -1 must be at least 0"),
    (["search.constraints.max_params=-1"], "max_params -1 is no size a model can have, so every trial would be pruned"),
])
def test_values_that_validated_and_then_failed_or_pruned_everything_are_refused_at_validate(write_spec, overrides, says):
    path = write_spec("name: odd\ndata: {dataset: digits, image_size: 16}\nsearch:\n  space: {}\n")
    (problem,) = problems(path, overrides=overrides)
    assert says in problem


def test_a_grace_shorter_than_two_heartbeats_is_refused(write_spec):
    path = write_spec("name: beats\nsearch:\n  heartbeat_seconds: 30\n  space: {}\n")
    (problem,) = problems(path, overrides=["search.grace_seconds=45"])
    assert "grace_seconds 45 is less than twice heartbeat_seconds 30" in problem
    assert load_spec(path, ["search.grace_seconds=60"]).search.grace_seconds == 60


@pytest.mark.parametrize("key", ["heartbeat_seconds", "grace_seconds"])
def test_a_heartbeat_or_grace_longer_than_a_day_is_refused(write_spec, key):
    # 1e300 s passed validate, then each trial's heartbeat thread died on time_t overflow with a traceback.
    (problem,) = problems(write_spec("name: beats\nsearch:\n  space: {}\n"), overrides=[f"search.{key}=1e300"])
    assert f"search.{key}: Input should be less than or equal to 86400" in problem


@pytest.mark.parametrize("metric, direction, problem", [
    ("test_accuracy", "maximize", "search.metric: Input should be 'val_accuracy', 'val_loss', 'train_loss', "
                                  "'parameters' or 'flops' (got 'test_accuracy')"),
    (["val_accuracy", "test_loss"], ["maximize", "minimize"],
     "search.metric.1: Input should be 'val_accuracy', 'val_loss', 'train_loss', 'parameters' or 'flops' "
     "(got 'test_loss')"),
])
def test_a_test_metric_is_never_an_objective_and_says_so_in_one_line(metric, direction, problem):
    # The test split takes no part in search decisions. One line, though the schema tries two shapes.
    raw = {"name": "x", "search": {"metric": metric, "direction": direction, "space": {"model.depth": {"int": [1, 2]}}}}
    with pytest.raises(SpecError) as raised:
        load_spec(raw)
    assert raised.value.problems == [f"<spec>: {problem}"]


def test_a_block_written_without_a_type_is_the_default_block_with_those_arguments(write_spec):
    spec = load_spec(write_spec("name: x\nmodel: {attention: {heads: 4}, ffn: {ratio: 2}}\n"))
    assert spec.model.attention == {"type": "sdpa", "heads": 4} and spec.model.ffn == {"type": "mlp", "ratio": 2}
    # As an override on a spec that leaves the block out, too.
    assert load_spec(write_spec("name: x\n"), ["model.attention.heads=2"]).model.attention == {"type": "sdpa", "heads": 2}
    # A preset's block keeps the preset's type and arguments.
    preset = load_spec(write_spec("name: x\nmodel: {preset: vit_ti_16, attention: {proj_dropout: 0.1}}\n")).model.attention
    assert preset["type"] == "sdpa" and preset["heads"] == 3 and preset["proj_dropout"] == 0.1


def test_cache_off_and_on_device_no_load_as_the_docs_write_them_unquoted(write_spec):
    # YAML reads off/no/yes as booleans: they were refused, and the hint's quoted 'false' made a cache folder "false".
    path = write_spec("name: t\ndata: {dataset: digits, cache: off, on_device: no}\n")
    spec = load_spec(path)
    assert (spec.data.cache, spec.data.on_device) == ("off", "no")
    spec = load_spec(path, ["data.on_device=yes", "data.cache=on"])
    assert (spec.data.cache, spec.data.on_device) == ("auto", "yes")
