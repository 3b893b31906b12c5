"""Fine-tuning by parameter name: which parameters ``train.freeze`` leaves untrained, and each
parameter's layer for ``train.layer_decay`` (as in BEiT and timm). Names only: no torch here, so a
spec's patterns are checked when it is loaded.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

# Parameters before the first block: the patch embedding, the position embedding and the pooling's
# prefix token(s), which enter with the patches (a pooling block's own weights are rare; they sit here too).
_INPUT_PARTS = ("patch_embed", "pos_embed", "pool")


def frozen(names: Iterable[str], patterns: Iterable[str]) -> set[str]:
    """The parameter names that any of the fnmatch ``patterns`` (``blocks.[0-5].*``) matches."""
    patterns = list(patterns)
    return {name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)}


def unmatched(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The patterns that match no parameter name (a typo would otherwise freeze nothing, silently)."""
    names = list(names)
    return [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]


def layer_of(name: str, depth: int) -> int:
    """A parameter's layer: 0 for the patch and position embeddings and class token, i + 1 for
    ``blocks.i``, depth + 1 for the final norm, the head and anything else after the blocks."""
    parts = name.split(".")
    if parts[0] in _INPUT_PARTS:
        return 0
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    return depth + 1


def lr_scale(name: str, depth: int, decay: float | None) -> float:
    """The factor on the learning rate of a parameter: ``decay ** (depth + 1 - layer)``, so the head
    trains at ``lr`` and each block below it at ``decay`` times the one above (1 without decay)."""
    if decay is None:
        return 1.0
    return decay ** (depth + 1 - layer_of(name, depth))
