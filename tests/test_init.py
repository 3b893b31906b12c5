"""``model.init``: every source (file, torchvision, timm, mlflow) made and saved here, offline; the model
section taken from the weights; resampled position embeddings, adapted channels, new heads; and one
error line for every init that cannot be used."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from vit_search.files import PROXY_VARIABLES
from vit_search.errors import WeightsError
from vit_search.model import build_model, build_vit, from_timm, resample_position_embedding
from vit_search.model.pretrained import init_report
from vit_search.model.weight_sources import OFFLINE_ENV
from vit_search.spec import SpecError, load_spec

# A small source model: width 48 is none of the paper's, so a bare state dict of it needs the spec's heads.
SOURCE = {"dim": 48, "depth": 2, "image_size": 16, "in_channels": 1, "num_classes": 7,
          "patch_embed": {"type": "conv", "patch_size": 4}, "attention": {"type": "sdpa", "heads": 3},
          "ffn": {"type": "mlp", "ratio": 2}}
DIGITS_16 = {"dataset": "digits", "image_size": 16}  # 1 channel, 10 classes


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter redrawn (no zero biases or unit norms left to hide a wrong mapping), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture
def source_file(tmp_path):
    """A vit-search model saved as a bare state dict; returns (model, path)."""
    model = randomised(build_vit(SOURCE))
    path = tmp_path / "ours.pth"
    torch.save(model.state_dict(), path)
    return model, path


def spec_from(path, model: dict | None = None, data: dict | None = None, **top):
    return load_spec({"name": "ft", "data": data or DIGITS_16,
                      "model": {"init": {"from": "file", "path": str(path)}, **(model or {})}, **top})


def same_outputs(ours: nn.Module, theirs: nn.Module, shape: tuple[int, ...]) -> float:
    images = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours.eval()(images) - theirs.eval()(images)).abs().max().item()


# -- the model section comes from the weights ---------------------------------------------------------------
def test_a_file_gives_the_model_section_and_its_weights(source_file):
    source, path = source_file
    spec = spec_from(path, {"attention": {"heads": 3}}, data={**DIGITS_16, "image_size": 16})
    assert (spec.model.dim, spec.model.depth, spec.model.patch_embed["patch_size"]) == (48, 2, 4)
    assert spec.model.ffn == {"type": "mlp", "ratio": 2.0} and spec.model.pooling["type"] == "cls"
    ours = build_model(spec)
    # Same image size, but 10 classes where the weights have 7: all but the head carried over.
    assert ours.head.fc.out_features == 10
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ours.eval().forward_features(images), source.forward_features(images), atol=1e-6)


def test_same_size_and_classes_reproduce_the_source_model(source_file):
    source, path = source_file
    spec = spec_from(path, {"attention": {"heads": 3}},
                     data={"dataset": "synthetic", "image_size": 16, "channels": 1, "num_classes": 7})
    assert same_outputs(build_model(spec), source, (1, 16, 16)) <= 1e-6


def test_the_spec_round_trips_with_its_init(source_file, tmp_path, monkeypatch):
    _, path = source_file
    monkeypatch.chdir(tmp_path)
    spec = load_spec({"name": "ft", "data": DIGITS_16,
                      "model": {"init": {"from": "file", "path": "ours.pth"}, "attention": {"heads": 3}}})
    assert spec.model.init.path == str(path)  # relative to the spec's folder (here: the working directory)
    again = load_spec(yaml.safe_load(spec.to_yaml()))
    assert again.to_dict() == spec.to_dict()
    assert spec.to_dict()["model"]["init"] == {"from": "file", "path": str(path)}
    assert spec.flat()["model.init.from"] == "file"


def test_a_train_checkpoint_records_its_model_so_nothing_need_be_set(source_file, tmp_path):
    source, _ = source_file
    path = tmp_path / "checkpoint.pt"
    # As `vit-search train` writes it: the weights under "model", the model section under "model_spec".
    data = {"dataset": "synthetic", "image_size": 16, "channels": 1, "num_classes": 7}  # the source model's
    recorded = load_spec({"name": "s", "data": data, "model": SOURCE}).model.model_dump(mode="json", by_alias=True)
    torch.save({"model": source.state_dict(), "optimizer": {}, "epoch": 3, "model_spec": recorded}, path)
    spec = spec_from(path)  # no heads given: the checkpoint says 3
    assert spec.model.attention["heads"] == 3 and spec.model.ffn["ratio"] == 2
    assert "checkpoint" in init_report(spec.model)
    with pytest.raises(SpecError, match="model.attention.heads: 4 does not fit the weights of model.init, which have 3"):
        spec_from(path, {"attention": {"heads": 4}})
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(build_model(spec).eval().forward_features(images), source.forward_features(images),
                              atol=1e-6)


TV_SMALL = dict(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=384, num_classes=5)
SYNTHETIC_32 = {"dataset": "synthetic", "image_size": 32, "channels": 3, "num_classes": 5}


def test_a_torchvision_state_dict_file_gives_torchvisions_model(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

    torch.manual_seed(0)
    reference = randomised(TorchvisionViT(**TV_SMALL))
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 9}, path)  # a training script's checkpoint
    spec = spec_from(path, data=SYNTHETIC_32)  # width 192: the paper's Ti, so 3 heads
    assert (spec.model.dim, spec.model.depth, spec.model.attention["heads"], spec.model.ffn["ratio"]) == (192, 2, 3, 2)
    assert "(torchvision state dict)" in init_report(spec.model)
    assert same_outputs(build_model(spec), reference, (3, 32, 32)) <= 1e-5


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_timm_state_dict_file_gives_timms_model(tmp_path, suffix):
    timm = pytest.importorskip("timm", reason="a timm model to save needs timm: pip install 'vit-search[timm]'")
    reference = randomised(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                             depth=2, num_classes=5))
    path = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), path)
    else:
        torch.save(reference.state_dict(), path)
    spec = spec_from(path, data=SYNTHETIC_32)
    assert (spec.model.dim, spec.model.depth, spec.model.patch_embed["patch_size"]) == (192, 2, 8)
    assert "(timm state dict)" in init_report(spec.model)
    assert same_outputs(build_model(spec), reference, (3, 32, 32)) <= 1e-5


def test_torchvisions_default_weights_name_their_member():
    spec = load_spec({"name": "tv", "data": {**SYNTHETIC_32, "image_size": 224},
                      "model": {"init": {"from": "torchvision", "name": "vit_b_16", "weights": "DEFAULT"}}})
    assert "torchvision vit_b_16 ViT_B_16_Weights.IMAGENET1K_V1" in init_report(spec.model)


# -- fitted to the spec: image size, channels, classes ----------------------------------------------------
def test_patch_kernels_adapt_to_channels_as_timms_adapt_input_conv():
    from vit_search.model import adapt_input_channels

    kernels = torch.randn(8, 3, 4, 4)
    assert torch.allclose(adapt_input_channels(kernels, 1), kernels.sum(1, keepdim=True))
    four = adapt_input_channels(kernels, 4)
    assert torch.allclose(four, torch.cat([kernels, kernels[:, :1]], 1) * 3 / 4)
    timm_models = pytest.importorskip("timm.models", reason="comparing with timm needs timm: pip install 'vit-search[timm]'")
    for channels in (1, 2, 4, 7):
        assert torch.allclose(adapt_input_channels(kernels, channels), timm_models.adapt_input_conv(channels, kernels))


def test_another_image_size_resamples_the_position_embedding(source_file):
    source, path = source_file
    spec = spec_from(path, {"attention": {"heads": 3}}, data={**DIGITS_16, "image_size": 32})
    ours = build_model(spec)
    expected = resample_position_embedding(source.pos_embed.weight.detach(), (8, 8), (4, 4))
    assert ours.pos_embed.weight.shape == (1, 65, 48)
    assert torch.equal(ours.pos_embed.weight.detach(), expected)
    assert torch.equal(ours.pos_embed.weight[:, 0], source.pos_embed.weight[:, 0])  # the class token's slot kept
    assert torch.equal(ours.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert "position embeddings resampled 4x4 -> 8x8" in init_report(spec.model)


def test_other_classes_get_a_new_head_initialised_as_usual(source_file):
    source, path = source_file
    spec = spec_from(path, {"attention": {"heads": 3}})
    torch.manual_seed(5)
    ours = build_model(spec)
    torch.manual_seed(5)
    fresh = build_vit(spec)  # the same draws: the new head is the one a fresh model gets
    assert torch.equal(ours.head.fc.weight, fresh.head.fc.weight) and ours.head.fc.weight.shape == (10, 48)
    assert not torch.equal(ours.blocks[0].ffn.fc1.weight, fresh.blocks[0].ffn.fc1.weight)
    assert "a new head for 10 classes (the weights have 7)" in init_report(spec.model)


def test_other_channels_adapt_the_patch_kernels(source_file):
    source, path = source_file
    spec = spec_from(path, {"attention": {"heads": 3}},
                     data={"dataset": "synthetic", "image_size": 16, "channels": 3, "num_classes": 7})
    ours = build_model(spec)
    # A grey image given as 3 equal channels gets the response the 1-channel model gives it.
    grey = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(grey.expand(-1, 3, -1, -1)), source(grey), atol=1e-5)


def test_the_spec_sets_dropouts_on_top(source_file):
    _, path = source_file
    spec = spec_from(path, {"attention": {"heads": 3, "attn_dropout": 0.1}, "drop_path_rate": 0.1,
                            "ffn": {"dropout": 0.2}})
    assert spec.model.attention["attn_dropout"] == 0.1 and spec.model.ffn == {"type": "mlp", "ratio": 2.0, "dropout": 0.2}


# -- what cannot carry the weights ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"dim": 64}, "model.dim: 64 does not fit the weights of model.init, which have 48; leave model.dim out"),
        ({"depth": 3}, "model.depth: 3 does not fit the weights of model.init, which have 2"),
        ({"ffn": {"ratio": 4}}, "model.ffn.ratio: 4 does not fit the weights of model.init, which have 2.0"),
        ({"pooling": "mean"}, "model.pooling.type: 'mean' does not fit the weights of model.init, which have 'cls'"),
        ({"patch_embed": {"patch_size": 8}}, "model.patch_embed.patch_size: 8 does not fit"),
        ({"ffn": {"hidden_dim": 64}}, "model.ffn: does not fit the weights of model.init: blocks.0.ffn.fc1.bias is 64 "
                                      "here and 96 in them; leave model.ffn out"),
        ({"preset": "vit_ti_16"}, "model.dim: 192 does not fit the weights of model.init, which have 48"),
    ],
    ids=["dim", "depth", "ratio", "pooling", "patch", "hidden_dim", "preset"],
)
def test_what_cannot_carry_the_weights_is_named_with_the_checkpoints_value(source_file, model, message):
    _, path = source_file
    model = {"attention": {"heads": 3}, **model} if "attention" not in model else model
    with pytest.raises(SpecError) as err:
        spec_from(path, model)
    assert message in err.value.problems[0]  # a preset sets several keys: each is a line of its own


def test_a_bare_state_dict_of_an_odd_width_asks_for_heads(source_file):
    _, path = source_file
    with pytest.raises(SpecError, match="model.init: .*the weights do not record the number of heads.*set model.attention.heads"):
        spec_from(path)


def _damaged(state: dict, how: str) -> dict:
    state = dict(state)
    if how == "removed":
        del state["blocks.1.attn.proj.weight"]
    elif how == "extra":
        state["blocks.0.extra.weight"] = torch.zeros(3)
    else:
        state["blocks.1.attn.proj.weight"] = torch.zeros(48, 10)
    return state


@pytest.mark.parametrize(("how", "said"), [("removed", "blocks.1.attn.proj.weight is absent in them and 48x48 in it"),
                                           ("extra", "blocks.0.extra.weight is 3 in them and absent in it"),
                                           ("misshaped", "blocks.1.attn.proj.weight is 48x10 in them and 48x48 in it")])
def test_a_damaged_state_dict_is_blamed_on_the_file_not_on_keys_the_spec_never_wrote(source_file, tmp_path, how, said):
    source, bare = source_file
    # A train checkpoint records its model: the spec writes nothing but model.init
    recorded = load_spec({"name": "s", "data": {"dataset": "synthetic", "image_size": 16, "channels": 1, "num_classes": 7},
                          "model": SOURCE}).model.model_dump(mode="json", by_alias=True)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": _damaged(source.state_dict(), how), "model_spec": recorded}, checkpoint)
    torch.save(_damaged(source.state_dict(), how), bare)
    # A bare state dict of width 48 needs the spec's heads, which have nothing to do with the damage
    for path, model in ((checkpoint, {}), (bare, {"attention": {"heads": 3}})):
        with pytest.raises(SpecError) as err:
            spec_from(path, model)
        (problem,) = err.value.problems
        assert problem.startswith(f"<spec>: model.init: the weights of model.init (file {path} "), problem
        assert said in problem and "damaged or edited by hand" in problem and "leave model" not in problem, problem


def test_a_timm_state_dicts_activation_and_epsilon_come_from_the_spec_as_it_records_neither(tmp_path):
    import functools

    timm = pytest.importorskip("timm", reason="a timm model to save needs timm: pip install 'vit-search[timm]'")
    reference = randomised(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                             num_classes=5, act_layer="relu",
                                             norm_layer=functools.partial(nn.LayerNorm, eps=1e-5)))
    path = tmp_path / "timm_relu.pth"
    torch.save(reference.state_dict(), path)
    spec = spec_from(path, {"ffn": {"activation": "relu"}, "norm_eps": 1e-5}, data=SYNTHETIC_32)
    assert spec.model.ffn["activation"] == "relu" and spec.model.norm_eps == 1e-5
    assert same_outputs(build_model(spec), reference, (3, 32, 32)) <= 1e-5
    plain = spec_from(path, data=SYNTHETIC_32)  # unset: timm's defaults
    assert plain.model.ffn["activation"] == "gelu" and plain.model.norm_eps == 1e-6
    # Where the file records one (a train checkpoint's model section has its epsilon), it is still the weights'
    source = build_vit(SOURCE)
    recorded = load_spec({"name": "s", "data": {"dataset": "synthetic", "image_size": 16, "channels": 1, "num_classes": 7},
                          "model": SOURCE}).model.model_dump(mode="json", by_alias=True)
    torch.save({"model": source.state_dict(), "model_spec": recorded}, tmp_path / "checkpoint.pt")
    with pytest.raises(SpecError, match="model.norm_eps: 1e-05 does not fit the weights of model.init, which have 1e-06"):
        spec_from(tmp_path / "checkpoint.pt", {"norm_eps": 1e-5})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text", "not a torch or safetensors file (it begins b'not weights')"),
        ({"a.weight": torch.zeros(2)}, "not a torchvision, timm or vit-search ViT state dict"),
        ({"epoch": 3}, "holds no state dict"),
        (None, "no such file"),
    ],
    ids=["not_torch", "other_model", "no_tensors", "missing"],
)
def test_a_wrong_file_is_one_error_at_model_init(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content == "text":
        path.write_text("not weights")
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(SpecError) as err:
        spec_from(path)
    (problem,) = err.value.problems
    assert problem.startswith("<spec>: model.init: ") and message in problem, problem


def _unreadable_files(tmp_path):
    """Files torch.load(weights_only=True) refuses, each as someone may hand one in: name -> path."""
    import argparse
    import pickle

    state = {"w": torch.zeros(4)}
    files = {name: tmp_path / f"{name}.pth" for name in ("empty", "text", "truncated", "train_args", "pickled")}
    files["empty"].write_bytes(b"")
    files["text"].write_text("hello, this is not a checkpoint")
    torch.save(state, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:100])  # a copy cut short
    # timm's train.py checkpoint: the weights, and the script's arguments
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, files["train_args"])
    files["pickled"].write_bytes(pickle.dumps(state, protocol=4))  # torch warns of the protocol
    return files


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("empty", "is empty (0 bytes)"),
        ("text", "not a torch or safetensors file (it begins b'hello, this '); name a file written by torch.save"),
        ("truncated", "a torch.save archive that is truncated or damaged; copy it again"),
        ("train_args", "holds Python objects other than tensors (the first: argparse.Namespace), which are not loaded "
                       "(loading them could run any code); save the state dict alone: torch.save(model.state_dict(), PATH)"),
        ("pickled", "a pickle written by pickle.dump (or another tool), not torch.save"),
    ],
)
def test_an_unreadable_weights_file_says_what_it_is_and_how_to_save_it_in_one_line(tmp_path, cli_here, name, said):
    import warnings

    path = _unreadable_files(tmp_path)[name]
    spec_path = tmp_path / "ft.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "ft", "data": DIGITS_16, "model": {"init": {"from": "file", "path": "x"}}}))
    with warnings.catch_warnings(record=True) as warned:  # torch's pickle-protocol warning would be two more lines
        warnings.simplefilter("always")
        result = cli_here("validate", spec_path, "--set", f"model.init.path={path}")
    assert result.returncode == 2 and not warned, [str(w.message) for w in warned]
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: --set model.init.path={path}: model.init: {path}: " + line.split(f"{path}: ", 2)[2]
    assert said in line, line
    # Never torch's advice to load unsafely, its ANSI escapes, or its bare exception text ("101")
    assert "weights_only=False" not in line and "arbitrary code" not in line and "\x1b" not in line, line


def test_a_missing_absolute_weights_path_is_not_said_to_be_read_from_the_spec_folder(tmp_path):
    with pytest.raises(SpecError) as err:
        spec_from(tmp_path / "gone.pth")
    (problem,) = err.value.problems
    assert problem.endswith(f"{tmp_path / 'gone.pth'}: no such file; check the path"), problem
    assert "relative path" not in problem


def test_a_missing_checkpoint_says_which_command_writes_it_and_where(tmp_path):
    with pytest.raises(SpecError) as err:
        spec_from(tmp_path / "runs" / "pretrain" / "checkpoint.pt")
    (problem,) = err.value.problems
    assert f"{tmp_path / 'runs' / 'pretrain' / 'checkpoint.pt'}: no such file; check the path (`vit-search train` writes " \
           "runs/NAME/checkpoint.pt under the folder it runs in" in problem, problem


def test_init_keys_follow_the_source():
    with pytest.raises(SpecError, match="model.init: from torchvision takes name, weights: missing weights"):
        load_spec({"name": "x", "model": {"init": {"from": "torchvision", "name": "vit_b_16"}}})
    with pytest.raises(SpecError, match="model.init.from: Input should be 'torchvision', 'timm', 'file' or 'mlflow'"):
        load_spec({"name": "x", "model": {"init": {"from": "hub", "name": "x"}}})


def test_a_searched_key_that_the_weights_fix_fails_the_space_check(source_file):
    from vit_search.search.space import check_space

    _, path = source_file
    spec = spec_from(path, {"attention": {"heads": 3}}, search={"space": {
        "model.depth": {"int": [2, 4]}, "train.lr": {"float": [1e-4, 1e-3]},
        "train.freeze": {"choice": [[], ["patch_embed.*"], ["blocks.[0-0].*"]]}}})
    (problem,) = check_space(spec)
    assert "search.space.model.depth: value 4 does not fit the spec: model.depth: 4 does not fit the weights" in problem


# -- torchvision and timm: through torch's cache, never the network -----------------------------------------
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's cache in tmp_path, downloads off: a source is read only from what the test puts there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


TORCHVISION_INIT = {"from": "torchvision", "name": "vit_b_32", "weights": "IMAGENET1K_V1"}


def test_torchvision_weights_are_read_from_torchs_cache(hub):
    import torchvision

    spec = load_spec({"name": "tv", "data": {"dataset": "synthetic", "image_size": 64, "channels": 3},
                      "model": {"init": TORCHVISION_INIT}})
    assert (spec.model.dim, spec.model.depth, spec.model.attention["heads"], spec.model.patch_embed["patch_size"]) == \
        (768, 12, 12, 32)
    with pytest.raises(WeightsError, match=f"not cached and {OFFLINE_ENV} is set: put the file at {hub}/vit_b_32-d86f8d99.pth "
                                           "\\(download it from https://download.pytorch.org/models/vit_b_32-d86f8d99.pth"):
        build_model(spec)
    # ViT-B/32 is 88M parameters: each tensor is one distinct number broadcast to its shape, so the
    # file is a few kilobytes and every tensor still tells where it went.
    with torch.device("meta"):
        reference = torchvision.models.vit_b_32()
    state = {name: torch.full((1,), float(i)).expand(t.shape) for i, (name, t) in enumerate(reference.state_dict().items())}
    hub.mkdir(parents=True)
    torch.save(state, hub / "vit_b_32-d86f8d99.pth")
    ours = build_model(spec)
    index = {name: i for i, name in enumerate(state)}
    assert torch.all(ours.blocks[5].attn.qkv.weight == index["encoder.layers.encoder_layer_5.self_attention.in_proj_weight"])
    assert torch.all(ours.norm.bias == index["encoder.ln.bias"])
    assert ours.head.fc.out_features == 10 and ours.pos_embed.weight.shape == (1, 5, 768)  # resampled 7x7 -> 2x2
    assert f"cached at {hub}/vit_b_32-d86f8d99.pth" in init_report(spec.model)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_are_read_from_torchs_cache_and_match_timm(hub, suffix):
    timm = pytest.importorskip("timm", reason="the timm source needs timm: pip install 'vit-search[timm]'")
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    spec = load_spec({"name": "tm", "data": {"dataset": "synthetic", "image_size": 224, "channels": 3,
                                             "num_classes": 1000}, "model": {"init": {"from": "timm", "name": name}}})
    assert (spec.model.dim, spec.model.depth, spec.model.attention["heads"]) == (192, 12, 3)
    with pytest.raises(WeightsError, match=f"put the file at {hub}/timm/{name}.safetensors "
                                           f"\\(download it from https://huggingface.co/timm/{name}/"):
        build_model(spec)
    reference = randomised(timm.create_model(name, pretrained=False))
    (hub / "timm").mkdir(parents=True)
    if suffix == ".safetensors":  # as Hugging Face serves timm's weights
        from safetensors.torch import save_file

        save_file(reference.state_dict(), hub / "timm" / f"{name}{suffix}")
    else:
        torch.save(reference.state_dict(), hub / "timm" / f"{name}{suffix}")
    assert same_outputs(build_model(spec), reference, (3, 224, 224)) <= 1e-5
    assert same_outputs(from_timm(reference), reference, (3, 224, 224)) <= 1e-5


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """Downloads allowed, but the Hugging Face Hub at a port where nothing listens (as a machine without a
    network finds it, at once), and its cache in tmp_path: returns that cache's folder."""
    from huggingface_hub import constants

    from conftest import free_port

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    for proxy in PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # what HF_ENDPOINT sets
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # what HF_HUB_CACHE sets
    return tmp_path / "hf"


def test_timm_weights_without_a_network_are_one_line_at_once_or_read_from_hugging_faces_cache(no_hub):
    timm = pytest.importorskip("timm", reason="the timm source needs timm: pip install 'vit-search[timm]'")
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    raw = {"name": "tm", "data": {"dataset": "synthetic", "image_size": 224, "channels": 3, "num_classes": 1000},
           "model": {"init": {"from": "timm", "name": name}}}
    spec = load_spec(raw)
    # Hugging Face's client retried for about 47 s before it said so.
    with pytest.raises(WeightsError, match=f"cannot download the timm weights {name} \\(127.0.0.1 does not answer "
                                           f"\\(ConnectionRefusedError: .*\\); put the file at .*/timm/{name}.safetensors"):
        build_model(spec)
    # As an earlier download left them in the Hub's cache: read from there, without the Hub.
    from safetensors.torch import save_file

    reference = randomised(timm.create_model(name, pretrained=False))
    snapshot = no_hub / f"models--timm--{name}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (no_hub / f"models--timm--{name}" / "refs").mkdir()
    (no_hub / f"models--timm--{name}" / "refs" / "main").write_text("0" * 40)
    save_file(reference.state_dict(), snapshot / "model.safetensors")
    assert same_outputs(build_model(spec), reference, (3, 224, 224)) <= 1e-5
    assert f"cached at {snapshot / 'model.safetensors'}" in init_report(load_spec(raw).model)


def test_a_download_host_that_does_not_answer_is_said_at_once_and_a_proxy_is_left_to_its_download(monkeypatch):
    import socket

    from vit_search.files import host_problem

    from conftest import free_port

    for proxy in PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    closed = free_port()
    assert host_problem(f"https://127.0.0.1:{closed}/w.pth").startswith("127.0.0.1 does not answer (ConnectionRefusedError")
    assert host_problem("https://no-such-host.invalid/w.pth").startswith("no-such-host.invalid does not answer (gaierror")
    with socket.create_server(("127.0.0.1", 0)) as listening:
        assert host_problem(f"http://127.0.0.1:{listening.getsockname()[1]}/w.pth") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert host_problem(f"https://127.0.0.1:{closed}/w.pth") is None  # the proxy may reach it: the download says


# -- mlflow: a logged run's weights ---------------------------------------------------------------------------
def test_a_logged_runs_weights_start_a_new_model(tmp_path, monkeypatch, sqlite_uri):
    from vit_search.tracking import load_model
    from vit_search.train import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    raw = {"name": "logged", "seed": 1, "data": {"dataset": "digits", "image_size": 8},
           "model": {**{k: v for k, v in SOURCE.items() if k not in ("image_size", "in_channels", "num_classes")},
                     "patch_embed": {"type": "conv", "patch_size": 2}},
           "train": {"epochs": 1, "batch_size": 64}, "tracking": {"experiment": "init-mlflow"}}
    run_id = train(load_spec(raw)).run_id
    spec = load_spec({"name": "again", "data": {"dataset": "digits", "image_size": 8},
                      "model": {"init": {"from": "mlflow", "run": run_id}}})
    assert spec.model.init.uri == sqlite_uri and spec.model.attention["heads"] == 3
    trained = load_model(run_id)
    assert same_outputs(build_model(spec), trained, (1, 8, 8)) <= 1e-6
    with pytest.raises(SpecError, match="model.init: MLflow run 'nope' in .*: no logged model/spec.yaml"):
        load_spec({"name": "x", "model": {"init": {"from": "mlflow", "run": "nope"}}})


# -- the command line ---------------------------------------------------------------------------------------
def test_bad_inits_are_one_line_and_exit_2(source_file, tmp_path, cli_here):
    source, path = source_file
    (tmp_path / "wrong.pth").write_text("not weights")
    diverged = {**source.state_dict()}
    diverged["blocks.1.ffn.fc1.weight"] = diverged["blocks.1.ffn.fc1.weight"].clone().fill_(float("nan"))
    torch.save(diverged, tmp_path / "diverged.pth")
    torch.save({"model": source.state_dict(), "model_spec": {"dim": "x"}}, tmp_path / "bad-record.pt")
    cases = {
        # It said "1 validation error for ModelSpec", pydantic's first line, naming nothing
        "bad_record": ({"init": {"from": "file", "path": "bad-record.pt"}}, "validate",
                       "the model section it records is not a valid model section here: model.dim: Input should be a "
                       "valid integer, unable to parse string as an integer (got 'x')"),
        # It trained, to "loss became nan ...; lower train.lr": a hint at the wrong thing
        "diverged": ({"init": {"from": "file", "path": "diverged.pth"}, "attention": {"heads": 3}}, "train",
                     "the weights hold NaN or infinite values (blocks.1.ffn.fc1.weight, for one)"),
        "incompatible": ({"init": {"from": "file", "path": str(path)}, "attention": {"heads": 3}, "dim": 64},
                         "validate", "model.dim: 64 does not fit the weights of model.init, which have 48"),
        "wrong_file": ({"init": {"from": "file", "path": "wrong.pth"}}, "validate", "wrong.pth: not a torch or safetensors file"),
        "missing_cache": ({"init": TORCHVISION_INIT}, "train", "put the file at"),
    }
    env = {"TORCH_HOME": str(tmp_path / "torch"), OFFLINE_ENV: "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    for name, (model, command, message) in cases.items():
        spec_path = tmp_path / f"{name}.yaml"
        spec_path.write_text(yaml.safe_dump({"name": name, "data": {"dataset": "synthetic", "image_size": 32,
                                                                     "channels": 1}, "model": model}))
        result = cli_here(command, str(spec_path), cwd=tmp_path, env=env)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {spec_path}:") and message in line, (name, line)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()  # nothing ran, nothing logged


def test_summary_shows_where_the_weights_come_from(source_file, tmp_path, cli):
    _, path = source_file
    spec_path = tmp_path / "ft.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "ft", "data": {"dataset": "digits", "image_size": 32},
                                         "model": {"init": {"from": "file", "path": "ours.pth"},
                                                   "attention": {"heads": 3}}}))
    result = cli("summary", str(spec_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("weights: "))
    assert line == (f"weights: file {path} (vit-search state dict); position embeddings resampled 4x4 -> 8x8; "
                    f"a new head for 10 classes (the weights have 7)")


def test_build_model_takes_a_mapping_with_init(source_file):
    source, path = source_file
    ours = build_model({"init": {"from": "file", "path": str(path)}, "attention": {"heads": 3}, "image_size": 16,
                        "in_channels": 1, "num_classes": 7})
    assert same_outputs(ours, source, (1, 16, 16)) <= 1e-6
    with pytest.raises(WeightsError, match="model.depth: 5 does not fit"):
        build_model({"init": {"from": "file", "path": str(path)}, "attention": {"heads": 3}, "depth": 5,
                     "image_size": 16, "in_channels": 1, "num_classes": 7})



def test_a_layers_own_block_that_does_not_fit_the_weights_is_named_at_its_own_key(source_file):
    # It was blamed on model.ffn, which the spec never wrote.
    _, path = source_file
    with pytest.raises(SpecError) as refused:
        spec_from(path, {"attention": {"heads": 3}, "layers": {1: {"ffn": {"ratio": 4}}}})
    (problem,) = refused.value.problems
    assert problem.startswith("<spec>: model.layers.1.ffn: does not fit the weights of model.init: blocks.1.ffn.")
    assert problem.endswith("; leave model.layers.1.ffn out to take it from them")
