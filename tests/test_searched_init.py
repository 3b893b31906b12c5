"""Searched values of a fine-tuning study (``model.init`` from a weights file): ``validate`` refuses what a
trial's build would (a ``train.freeze`` pattern matching no parameter or every one, an image size the patch
size does not divide) in one line at the search.space key, and a relative ``model.init.path`` drawn from the
space is read from the spec's folder, as the spec's own is, in ``validate`` and in the trials alike.

Each test saves a tiny vit-search model's state dict beside its spec and runs the real command line from
another working directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vit_search.model import build_model
from vit_search.spec import load_spec

SOURCE = {"name": "source", "data": {"dataset": "digits", "image_size": 16},
          "model": {"dim": 16, "depth": 2, "patch_embed": {"type": "conv", "patch_size": 4},
                    "attention": {"type": "sdpa", "heads": 2}, "ffn": {"type": "mlp", "ratio": 2}}}

FINETUNE = """\
name: finetune
data: {{dataset: digits, image_size: 16}}
model:
  init: {{from: file, path: {weights}}}
  attention: {{heads: 2}}
train: {{epochs: 1}}
search:
  sampler: random
  space:
{space}"""


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A vit-search state dict (2 blocks, patches of 4) in the spec's folder, tmp_path."""
    path = tmp_path / "weights.pt"
    torch.save(build_model(load_spec(SOURCE)).state_dict(), path)
    return path


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory that is not the spec's folder (and holds no weights)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    return cwd


def finetune(write_spec, space: str, weights: str = "weights.pt") -> tuple[Path, str]:
    text = FINETUNE.format(weights=weights, space="".join(f"    {line}\n" for line in space.splitlines()))
    return write_spec(text), text


def line_of(text: str, needle: str) -> int:
    (line,) = [i for i, row in enumerate(text.splitlines(), 1) if needle in row]
    return line


# -- validate refuses a searched value the trial's build would refuse -----------------------------------------
@pytest.mark.parametrize(("choices", "said"), [
    ("[[], [blocks.9.*]]", "value ['blocks.9.*'] does not fit the spec: train.freeze.0: 'blocks.9.*' matches no parameter"),
    ('[[head.*], ["*"]]', "value ['*'] does not fit the spec: train.freeze: freezes every parameter, so nothing would train"),
])
def test_validate_refuses_a_searched_freeze_that_a_trial_could_not_train_at_its_space_key(
        write_spec, weights, elsewhere, cli_here, choices, said):
    path, text = finetune(write_spec, f"train.freeze: {{choice: {choices}}}")
    result = cli_here("validate", path, cwd=elsewhere)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {path}:{line_of(text, 'train.freeze:')}: search.space.train.freeze: {said}"), line
    assert "Traceback" not in result.stderr


def test_validate_refuses_a_searched_freeze_as_it_refuses_the_same_value_set_directly(
        write_spec, weights, elsewhere, cli_here):
    path, _ = finetune(write_spec, "train.lr: {choice: [0.001]}")
    direct = cli_here("validate", path, "--set", "train.freeze=[blocks.9.*]", cwd=elsewhere)
    searched = cli_here("validate", path, "--set", "search.space={train.freeze: {choice: [[blocks.9.*]]}}", cwd=elsewhere)
    assert direct.returncode == searched.returncode == 2
    reason = "train.freeze.0: 'blocks.9.*' matches no parameter"
    assert reason in direct.stderr and reason in searched.stderr and len(searched.stderr.splitlines()) == 1


def test_validate_accepts_searched_freezes_that_leave_something_to_train(write_spec, weights, elsewhere, cli_here):
    path, _ = finetune(write_spec, 'train.freeze: {choice: [[], [patch_embed.*, pos_embed.*], ["blocks.[01].*"]]}')
    result = cli_here("validate", path, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok (finetune, 1 searched values)"


def test_validate_refuses_a_searched_image_size_the_patch_size_does_not_divide(write_spec, weights, elsewhere, cli_here):
    path, text = finetune(write_spec, "data.image_size: {choice: [16, 18]}")
    result = cli_here("validate", path, cwd=elsewhere)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {path}:{line_of(text, 'data.image_size:')}: search.space.data.image_size: value 18 "
                           f"does not fit the spec: "), line
    assert "not divisible by patch size 4x4" in line


PLAIN = """\
name: plain
data: {{dataset: digits, image_size: 16}}
model: {{dim: 16, depth: 2, patch_embed: {{type: conv, patch_size: 4}}, attention: {{type: sdpa, heads: 2}}}}
train: {{epochs: 1}}
search:
  sampler: random
  space:
{space}"""


@pytest.mark.parametrize("space", [
    "model.depth: {choice: [2, 4]}\ntrain.freeze: {choice: [[], [blocks.3.*]]}",  # blocks.3 where depth is 4
    "model.patch_embed.patch_size: {choice: [4, 3]}\ndata.image_size: {choice: [16, 18]}",  # 18 in patches of 3
])
def test_validate_accepts_a_searched_value_that_builds_beside_another_searched_value(write_spec, elsewhere, cli_here,
                                                                                       space):
    path = write_spec(PLAIN.format(space="".join(f"    {line}\n" for line in space.splitlines())))
    result = cli_here("validate", path, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    # Only some combinations build: the others are pruned as infeasible, and --dry-run says which.
    assert cli_here("run", path, "--dry-run", "8", cwd=elsewhere).returncode == 0


def test_validate_refuses_a_searched_freeze_that_no_searched_depth_makes_match(write_spec, elsewhere, cli_here):
    space = "model.depth: {choice: [2, 4]}\ntrain.freeze: {choice: [[], [blocks.7.*]]}"
    text = PLAIN.format(space="".join(f"    {line}\n" for line in space.splitlines()))
    path = write_spec(text)
    result = cli_here("validate", path, cwd=elsewhere)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {path}:{line_of(text, 'train.freeze:')}: search.space.train.freeze: value "
                           f"['blocks.7.*'] does not fit the spec: train.freeze.0: 'blocks.7.*' matches no parameter"), line


# -- a searched relative weights path is read from the spec's folder ----------------------------------------------
def test_validate_reads_a_searched_relative_weights_path_from_the_specs_folder(write_spec, weights, elsewhere, cli_here):
    path, _ = finetune(write_spec, "model.init.path: {choice: [weights.pt]}")
    result = cli_here("validate", path, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    # As the spec's own path is: --set model.init.path is read from the spec's folder too.
    assert cli_here("validate", path, "--set", "model.init.path=weights.pt", cwd=elsewhere).returncode == 0


def test_validate_names_a_missing_searched_weights_file_in_the_specs_folder(write_spec, weights, elsewhere, cli_here):
    path, text = finetune(write_spec, "model.init.path: {choice: [weights.pt, missing.pt]}")
    result = cli_here("validate", path, cwd=elsewhere)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {path}:{line_of(text, 'model.init.path:')}: search.space.model.init.path: "), line
    assert f"{path.parent.resolve() / 'missing.pt'}: no such file" in line and str(elsewhere) not in line


def test_validate_reads_searched_whole_init_sections_and_enqueued_paths_from_the_specs_folder(
        write_spec, weights, elsewhere, cli_here):
    path, _ = finetune(write_spec, "model.init: {choice: [{from: file, path: weights.pt}]}")
    result = cli_here("validate", path, "--set", "search.enqueue=[{model.init: {from: file, path: weights.pt}}]",
                      cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    path, _ = finetune(write_spec, "model.init.path: {choice: [weights.pt]}")
    result = cli_here("validate", path, "--set", "search.enqueue=[{model.init.path: weights.pt}]", cwd=elsewhere)
    assert result.returncode == 0, result.stderr


def test_trials_read_a_searched_relative_weights_path_from_the_specs_folder(write_spec, weights, elsewhere, cli_here):
    path, _ = finetune(write_spec, "model.init.path: {choice: [weights.pt]}\ntrain.freeze: {choice: [[], [blocks.0.*]]}")
    result = cli_here("run", path, "--dry-run", "3", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and not any("infeasible" in line for line in lines), result.stdout
    assert all(f"model.init.path={weights.resolve()}" in line for line in lines), result.stdout
    assert list(elsewhere.iterdir()) == []
