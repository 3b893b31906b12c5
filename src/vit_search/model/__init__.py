"""The model: the ViT assembled from registered blocks (:mod:`.vit`), what it costs (:mod:`.cost`),
its per-stage summary (:mod:`.summary`) and weights from elsewhere (:mod:`.weights`)."""

from __future__ import annotations

from ..presets import PRESETS
from .vit import EncoderBlock, LayerScale, VisionTransformer, build_model, build_on_meta, count_parameters
from .weights import from_torchvision

__all__ = ["PRESETS", "EncoderBlock", "LayerScale", "VisionTransformer", "build_model", "build_on_meta",
           "count_parameters", "from_torchvision"]
