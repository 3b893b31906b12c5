"""Data: where images come from (:mod:`.sources`), how a run holds and batches them (:mod:`.loading`),
and batch augmentation on the training device (:mod:`.augment`).

The package itself imports nothing heavy: the spec reads :data:`.sources.DATASETS` without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import DataError  # noqa: F401  (re-exported: `from vit_search.data import DataError`)

_EXPORTS = {
    "DATASETS": "sources", "default_root": "sources", "stratified_split": "sources",
    "DataSplits": "loading", "TensorSplit": "loading", "load_data": "loading", "make_loader": "loading",
    "BatchAugment": "augment",
}

__all__ = sorted([*_EXPORTS, "DataError"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
