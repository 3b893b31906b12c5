"""torchvision parity: the ViT-B/16 preset's size, and ``from_torchvision`` reproducing torchvision's outputs.

torchvision zero-initialises the classifier head and some biases, and sets every LayerNorm to the
identity, which would hide a wrongly mapped weight. So every parameter of each torchvision model is
re-drawn here (matrices with std 1/sqrt(fan_in), so that activations and attention logits are of
order one; biases, tokens and LayerNorm affines too) before its outputs are compared with ours.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer as TorchvisionViT

from vit_search.errors import WeightsError
from vit_search.model import build_model, count_parameters, from_torchvision
from vit_search.model.weights import _model_section_from_state_dict, _torchvision_key

TOLERANCE = 1e-5  # max abs difference of fp32 logits in eval mode

# The small custom ViT: a width (48) outside the paper's sizes, so a state dict alone cannot give its heads.
SMALL = dict(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=100, num_classes=7)

CONSTRUCTORS = {
    "vit_b_16": torchvision.models.vit_b_16,
    "vit_b_32": torchvision.models.vit_b_32,
    # ViT-L's 24 layers and 16 heads on 64x64 images (16 patches): the mapping is the same at any size,
    # and at 224 its forward passes took 15 s.
    "vit_l_16": partial(torchvision.models.vit_l_16, image_size=64),
    "small": partial(TorchvisionViT, **SMALL),
}
BATCH = {"vit_b_16": 1, "vit_b_32": 2, "vit_l_16": 1, "small": 2}


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter in place: LayerNorm weights ~N(1, 0.2), other vectors ~N(0, 0.1),
    the class token and position embedding ~N(0, 0.5), matrices and kernels ~N(0, 1/fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in norm_weights:
                p.normal_(1.0, 0.2, generator=generator)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1, generator=generator)
            elif p.dim() == 3:  # class_token, pos_embedding: (1, tokens, dim)
                p.normal_(0.0, 0.5, generator=generator)
            else:  # Linear (out, in), Conv2d (out, in, kh, kw), in_proj_weight (3 * dim, dim)
                p.normal_(0.0, p[0].numel() ** -0.5, generator=generator)
    return model


def torchvision_vit(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A torchvision ViT (weights=None) with every parameter randomised, in eval mode.

    Built on the meta device and then materialised: its own initialisation would be overwritten
    anyway, and skipping it saves seconds for ViT-L.
    """
    with torch.device("meta"):
        module = CONSTRUCTORS[name](**kwargs)
    module = randomise_(module.to_empty(device="cpu"), seed).eval()
    assert all(p.std() > 0 for p in module.parameters()), "some parameter is still constant"
    return module


@dataclass
class Reference:
    """A randomised torchvision ViT, an input batch and torchvision's logits for it."""

    module: nn.Module
    images: Tensor
    logits: Tensor


@pytest.fixture(scope="module")
def reference():
    """Each torchvision model built, randomised and run once per module (ViT-L takes seconds)."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            module = torchvision_vit(name)
            size = module.image_size
            images = torch.randn(BATCH[name], 3, size, size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits = module(images)
            cache[name] = Reference(module, images, logits)
        return cache[name]

    yield get
    cache.clear()


def max_abs_diff(model: nn.Module, ref: Reference) -> float:
    model.eval()
    with torch.no_grad():
        out = model(ref.images)
    assert out.shape == ref.logits.shape
    return (out - ref.logits).abs().max().item()


def test_vit_b_16_preset_has_torchvision_parameter_count_and_shapes(reference):
    ours = build_model({"preset": "vit_b_16", "image_size": 224, "in_channels": 3, "num_classes": 1000})
    theirs = reference("vit_b_16").module
    assert count_parameters(ours) == 86_567_656
    assert sum(p.numel() for p in theirs.parameters()) == 86_567_656
    # Not only the total: every torchvision tensor has its counterpart of the same shape, and no more.
    mapped = {_torchvision_key(key): value.shape for key, value in theirs.state_dict().items()}
    assert mapped == {key: value.shape for key, value in ours.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small", "vit_b_32", "vit_b_16", "vit_l_16"])
def test_from_torchvision_module_reproduces_torchvision_outputs(reference, name):
    ref = reference(name)
    ours = from_torchvision(ref.module)
    diff = max_abs_diff(ours, ref)
    print(f"{name} from module: max abs diff {diff:.3g} (logits up to {ref.logits.abs().max():.3g})")
    assert diff <= TOLERANCE
    assert count_parameters(ours) == sum(p.numel() for p in ref.module.parameters())
    # Copied, not shared: fine-tuning ours leaves the torchvision module untouched.
    theirs_storage = {p.untyped_storage().data_ptr() for p in ref.module.parameters()}
    assert not theirs_storage & {p.untyped_storage().data_ptr() for p in ours.parameters()}


@pytest.mark.parametrize("name", ["small", "vit_b_32", "vit_b_16"])
def test_from_torchvision_state_dict_reproduces_torchvision_outputs(reference, name):
    ref = reference(name)
    # The paper's widths give their head count; the small model's width needs heads=.
    heads = SMALL["num_heads"] if name == "small" else None
    ours = from_torchvision(ref.module.state_dict(), heads=heads)
    assert ours.blocks[0].attn.heads == ref.module.encoder.layers[0].num_heads
    diff = max_abs_diff(ours, ref)
    print(f"{name} from state dict: max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize(
    "constructor",
    [
        torchvision.models.vit_b_16,
        torchvision.models.vit_l_16,
        torchvision.models.vit_h_14,
        partial(TorchvisionViT, 224, 16, num_layers=1, num_heads=3, hidden_dim=192, mlp_dim=768),  # DeiT-Ti
        partial(TorchvisionViT, 224, 16, num_layers=1, num_heads=6, hidden_dim=384, mlp_dim=1536),  # DeiT-S
    ],
    ids=["B", "L", "H", "Ti", "S"],
)
def test_state_dict_of_a_paper_width_gives_torchvision_architecture(constructor):
    # Shapes only: on the meta device ViT-H costs nothing. A state dict does not record heads, so
    # for the paper's widths they come from a table, which must agree with torchvision's models.
    with torch.device("meta"):
        module = constructor()
    section = _model_section_from_state_dict(module.state_dict(), heads=None)
    assert section["attention"]["heads"] == module.encoder.layers[0].num_heads
    assert (section["dim"], section["depth"], section["ffn"]["hidden_dim"]) == (
        module.hidden_dim,
        len(module.encoder.layers),
        module.mlp_dim,
    )
    assert (section["image_size"], section["patch_embed"]["patch_size"], section["num_classes"]) == (
        module.image_size,
        module.patch_size,
        module.num_classes,
    )


def test_from_torchvision_reads_a_state_dict_file(reference, tmp_path):
    ref = reference("small")
    path = tmp_path / "vit.pth"
    torch.save(ref.module.state_dict(), path)
    for source in (path, str(path)):
        assert max_abs_diff(from_torchvision(source, heads=SMALL["num_heads"]), ref) <= TOLERANCE


class NotATensor:
    """An arbitrary object: unpickling it would run code, so weights_only loading must refuse it."""


def test_from_torchvision_refuses_a_file_with_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv_proj.weight": NotATensor()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        from_torchvision(path)


def test_from_torchvision_accepts_pre_0_13_mlp_names(reference):
    ref = reference("small")
    old = {
        key.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): value
        for key, value in ref.module.state_dict().items()
    }
    assert any("mlp.linear_1" in key for key in old)
    assert max_abs_diff(from_torchvision(old, heads=SMALL["num_heads"]), ref) <= TOLERANCE


def test_from_torchvision_keeps_the_module_layernorm_epsilon():
    module = torchvision_vit("small", norm_layer=partial(nn.LayerNorm, eps=1e-2))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = Reference(module, images, module(images))
    ours = from_torchvision(module)
    assert ours.norm.eps == ours.blocks[0].norm1.eps == 1e-2
    assert max_abs_diff(ours, ref) <= TOLERANCE


def test_outputs_agree_to_float64_rounding(reference):
    # In float64 any remaining difference is rounding, not a mapping error: it must vanish.
    small = reference("small")
    theirs = copy.deepcopy(small.module).double()
    ours = from_torchvision(small.module).double().eval()
    images = small.images.double()
    with torch.no_grad():
        diff = (ours(images) - theirs(images)).abs().max().item()
    assert diff <= 1e-12


def test_a_wrong_head_count_changes_the_outputs(reference):
    # The randomised weights make head-splitting mistakes visible far above the tolerance, so the
    # parity tests above would catch a wrong split or a wrong head count.
    ref = reference("small")
    wrong = from_torchvision(ref.module.state_dict(), heads=6)
    assert max_abs_diff(wrong, ref) > 1e-2


def test_state_dict_of_unusual_width_without_heads_is_a_registry_error(reference):
    with pytest.raises(WeightsError, match="cannot infer the number of heads for width 48.*pass heads="):
        from_torchvision(reference("small").module.state_dict())


@pytest.mark.parametrize(
    "extra_key",
    ["encoder.layers.encoder_layer_0.extra.weight", "fc.weight", "encoder.layers.encoder_layer_x.ln_1.weight"],
)
def test_state_dict_with_unknown_key_is_a_registry_error(reference, extra_key):
    state = dict(reference("small").module.state_dict())
    state[extra_key] = torch.zeros(1)
    with pytest.raises(WeightsError, match=f"unexpected key '{extra_key}'"):
        from_torchvision(state, heads=SMALL["num_heads"])


def test_state_dict_missing_a_tensor_is_a_registry_error(reference):
    state = dict(reference("small").module.state_dict())
    del state["encoder.layers.encoder_layer_1.ln_2.bias"]
    with pytest.raises(WeightsError, match="(?s)does not fit.*Missing.*blocks.1.norm2.bias"):
        from_torchvision(state, heads=SMALL["num_heads"])
    del state["heads.head.weight"]
    with pytest.raises(WeightsError, match="no 'heads.head.weight'"):
        from_torchvision(state, heads=SMALL["num_heads"])


@pytest.mark.parametrize(
    "module, message",
    [
        (TorchvisionViT(**SMALL, representation_size=16), "pre_logits"),
        (
            TorchvisionViT(**SMALL, conv_stem_configs=[ConvStemConfig(16, 3, 2)]),
            "unexpected key 'conv_proj.conv_bn_relu_0",
        ),
        (nn.Linear(2, 2), "Linear is not a torchvision VisionTransformer"),
    ],
    ids=["pre_logits", "conv_stem", "not_a_vit"],
)
def test_unsupported_torchvision_models_are_registry_errors(module, message):
    with pytest.raises(WeightsError, match=message):
        from_torchvision(module)
