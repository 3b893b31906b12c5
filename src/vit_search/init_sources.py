"""Where a model's starting weights can come from (``model.init: {from: ...}``): one table, which the
spec schema takes its names and keys from and :mod:`vit_search.model.weight_sources` reads.

Nothing here imports torch: a spec's init section is checked for its keys before any weights are read.
Adding a source is an entry here and its readers in :mod:`vit_search.model.weight_sources`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InitSource:
    """One kind of weights: the keys its init section needs, those it may add, and an example."""

    required: tuple[str, ...]
    optional: tuple[str, ...]
    example: str


INIT_SOURCES: dict[str, InitSource] = {
    "torchvision": InitSource(("name", "weights"), (), "{from: torchvision, name: vit_b_16, weights: IMAGENET1K_V1}"),
    "timm": InitSource(("name",), (), "{from: timm, name: vit_small_patch16_224.augreg_in21k}"),
    "file": InitSource(("path",), (), "{from: file, path: weights.pth}"),
    "mlflow": InitSource(("run",), ("uri",), "{from: mlflow, run: 0123abcd...}"),
}

INIT_KEYS = ("name", "weights", "path", "run", "uri")
"""Every key an init section may hold besides ``from``; each source takes some of them."""
