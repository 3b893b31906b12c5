"""``python -m vit_search`` (what ``accelerate launch -m vit_search`` runs)."""

from .cli import entry

entry()
