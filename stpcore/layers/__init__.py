"""Transformer building blocks of the STPrivacy backbone: tubelet embedding, attention, MLP, block.

Attention with a keep policy, over packed variable-length sets or plain runs through ``stpcore.ops``
(or ``torch.nn.functional.scaled_dot_product_attention`` for plain full attention), so the same layers
run the Triton kernels on a GPU with no code change.
"""

from __future__ import annotations

from stpcore.layers.attention import Attention
from stpcore.layers.block import Block
from stpcore.layers.embed import TubeletEmbed
from stpcore.layers.mlp import Mlp

__all__ = ["Attention", "Block", "Mlp", "TubeletEmbed"]
