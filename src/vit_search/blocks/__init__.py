"""Built-in blocks, one module per kind; importing this package registers them all.

Calling conventions (the model passes the first arguments; the rest are each block's YAML keys):

========== ================================================ ==========================================
kind       built with                                       forward
========== ================================================ ==========================================
patch_embed in_channels, dim, image_size                    images (B,C,H,W) -> tokens (B,N,D); exposes
                                                            ``grid`` (rows, cols) and ``num_patches``
position   dim, num_patches, grid, num_prefix_tokens        tokens -> tokens
attention  dim                                              tokens -> tokens
ffn        dim                                              tokens -> tokens
pooling    dim                                              ``prepend(tokens)`` before the encoder adds
                                                            ``num_prefix_tokens`` tokens; forward pools
                                                            (B,N,D) -> (B,D)
head       dim, num_classes                                 (B,D) -> logits
========== ================================================ ==========================================
"""

from . import attention, ffn, head, patch_embed, pooling, position

__all__ = ["attention", "ffn", "head", "patch_embed", "pooling", "position"]
