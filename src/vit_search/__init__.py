"""vit-search: Vision Transformer blocks in a plugin registry, assembled from YAML specs.

The public API is importable from here; heavy modules (torch) load on first use, so that the
command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "register": "vit_search.registry",
    "describe": "vit_search.registry",
    "list_blocks": "vit_search.registry",
    "load_plugin": "vit_search.registry",
    "Registry": "vit_search.registry",
    "REGISTRY": "vit_search.registry",
    "build_model": "vit_search.model",
    "from_torchvision": "vit_search.model",
    "from_timm": "vit_search.model",
    "resample_position_embedding": "vit_search.model",
    "VisionTransformer": "vit_search.model",
    "PRESETS": "vit_search.presets",
    "load_spec": "vit_search.spec",
    "Spec": "vit_search.schema",
    "SpecError": "vit_search.spec",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vit_search' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
