"""The mask decoder's two-way transformer for a batch of prompts of one image, with the image-side
work of its first layer done once per image instead of once per prompt.

Before the first layer updates them, the image tokens are the same for every prompt of an image
(the image embedding plus the "no mask" embedding), so the first layer's projections of them
(keys and values of the token-to-image attention, queries of the image-to-token attention) and
the sums with the positional encoding are computed once and repeated. Everything else is the
official layers' own forward. The results are bit-identical to the official transformer's
(``tests/test_sam.py`` checks the outputs against the official generators, and
``test_shared_first_layer_is_bit_identical`` the transformer itself); measured ~35% less CPU time
for the transformer (docs/benchmarks.md).

Conventions: ``image_embedding`` and ``image_pe`` [1, C, h, w]; ``point_embedding`` [B, T, C]
(the output tokens and the prompt's sparse embeddings); returns (queries [B, T, C], image tokens
[B, h*w, C]) as ``TwoWayTransformer.forward`` does for the image repeated B times.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def attention_core_sam(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                       ) -> torch.Tensor:
    """segment_anything's ``Attention.forward`` after the input projections ([B, N, C'] each):
    heads, softmax(q k^T / sqrt(c)) v, heads merged, output projection."""
    q, k, v = (attn._separate_heads(t, attn.num_heads) for t in (q, k, v))
    scores = q @ k.permute(0, 1, 3, 2)                                    # B x heads x Nq x Nk
    scores = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1)
    return attn.out_proj(attn._recombine_heads(scores @ v))


def attention_core_sam2(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                        ) -> torch.Tensor:
    """sam2's ``Attention.forward`` after the input projections (eval: no dropout)."""
    q, k, v = (attn._separate_heads(t, attn.num_heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    return attn.out_proj(attn._recombine_heads(out))


Core = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def two_way_shared_image(transformer: nn.Module, core: Core, image_embedding: torch.Tensor,
                         image_pe: torch.Tensor, point_embedding: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``transformer(image_embedding repeated B times, image_pe repeated, point_embedding)``
    computed with the first layer's image-side projections once (see the module docstring)."""
    b = point_embedding.shape[0]
    keys1 = image_embedding.flatten(2).permute(0, 2, 1)                  # 1 x hw x C
    key_pe = image_pe.flatten(2).permute(0, 2, 1)                        # 1 x hw x C
    layer = transformer.layers[0]  # built with skip_first_layer_pe: no pe in its self-attention
    queries = layer.norm1(layer.self_attn(q=point_embedding, k=point_embedding, v=point_embedding))
    keys1_pe = keys1 + key_pe

    def each(t: torch.Tensor) -> torch.Tensor:  # materialised: the kernels see the official shapes
        return t.expand(b, -1, -1).contiguous()

    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    attn_out = core(t2i, t2i.q_proj(queries + point_embedding), each(t2i.k_proj(keys1_pe)),
                    each(t2i.v_proj(keys1)))
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + point_embedding
    attn_out = core(i2t, each(i2t.q_proj(keys1_pe)), i2t.k_proj(q), i2t.v_proj(queries))
    keys = layer.norm4(keys1 + attn_out)                                  # B x hw x C
    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe,
                                                     v=keys)
    return transformer.norm_final_attn(queries + attn_out), keys
