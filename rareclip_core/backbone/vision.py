"""A custom forward of OpenCLIP's vision tower, block by block, for detectors that need more than
the plain tokens: a value-value (V-V) attention path beside the ordinary one (AnomalyCLIP's DPAM,
CLIP Surgery; used by AdaptCLIP and Dual-Image CLIP), and hooks that change the token sequence
between blocks (learned prompt tokens, as AFR-CLIP's self-prompting)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class VisionOptions:
    """What `vision_forward` returns and changes. Blocks are 1-indexed."""

    blocks: tuple[int, ...]  # blocks whose output tokens to return (both paths where both exist)
    value_value_from: Optional[int] = None  # the V-V path starts at this block (None: no V-V path)
    token_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None  # (block, B x L x C) -> tokens fed to it


@dataclass
class VisionOutput:
    tokens: dict[int, torch.Tensor]  # block -> B x L x C, the ordinary stream after the block (class token first)
    value_tokens: dict[int, torch.Tensor]  # block -> B x L x C, the V-V path after the block (blocks >= its start)
    final: torch.Tensor  # B x L x C, the ordinary stream after the last block


def value_value_attention(attention: torch.nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """out_proj of V-V self-attention: per head softmax(V V^T / sqrt(d_head)) V with V the value
    projection of x (B x L x C, already layer-normed); heads concatenated; B x L x C."""
    b, n, c = x.shape
    heads = attention.num_heads
    w_v = attention.in_proj_weight[2 * c :]
    b_v = None if attention.in_proj_bias is None else attention.in_proj_bias[2 * c :]
    v = torch.nn.functional.linear(x, w_v, b_v).view(b, n, heads, c // heads).transpose(1, 2)  # B x H x L x d
    weights = torch.softmax(v @ v.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return attention.out_proj(out)


def vision_forward(visual: torch.nn.Module, images: torch.Tensor, options: VisionOptions) -> VisionOutput:
    """Run `visual` (an OpenCLIP VisionTransformer) on normalized images, block by block.

    The ordinary path is the standard one (o_l = block_l(o_{l-1})). With `value_value_from` = s,
    the V-V path starts as v_{s-1} = o_{s-1} and for l >= s: v_l = v_{l-1} +
    out_proj(VV(ln_1(o_{l-1}))), with no MLP on it. `token_hook(l, x)` may replace the tokens fed
    to block l (e.g. append or overwrite prompt tokens); the V-V path follows what it returns.
    """
    x = visual._embeds(images)
    blocks = visual.transformer.resblocks
    wanted = set(options.blocks)
    tokens: dict[int, torch.Tensor] = {}
    value_tokens: dict[int, torch.Tensor] = {}
    v = None
    for index, block in enumerate(blocks, start=1):
        if options.token_hook is not None:
            x = options.token_hook(index, x)
        if options.value_value_from is not None and index >= options.value_value_from:
            v = x if v is None else v
            v = v + block.ls_1(value_value_attention(block.attn, block.ln_1(x)))
            if index in wanted:
                value_tokens[index] = v
        x = block(x)
        if index in wanted:
            tokens[index] = x
    return VisionOutput(tokens, value_tokens, x)
