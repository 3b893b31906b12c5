"""The model: the ViT assembled from registered blocks (:mod:`.vit`), what it costs (:mod:`.cost`),
its per-stage summary (:mod:`.summary`), weights from torchvision (:mod:`.weights`) and timm
(:mod:`.timm_weights`), fitted to another input (:mod:`.resample`), and the weights a spec starts from
(:mod:`.pretrained`: ``model.init``)."""

from __future__ import annotations

from ..presets import PRESETS
from .pretrained import build_model
from .resample import adapt_input_channels, resample_position_embedding
from .timm_weights import from_timm
from .vit import EncoderBlock, LayerScale, VisionTransformer, build_on_meta, build_vit, count_parameters
from .weights import from_torchvision

__all__ = ["PRESETS", "EncoderBlock", "LayerScale", "VisionTransformer", "adapt_input_channels", "build_model",
           "build_on_meta", "build_vit", "count_parameters", "from_timm", "from_torchvision",
           "resample_position_embedding"]
