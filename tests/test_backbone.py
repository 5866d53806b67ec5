"""The backbone's block-by-block forward: the plain path equals OpenCLIP's own, the value-value
path follows its definition, and token hooks change what the blocks see."""
import math

import torch

from rareclip_core.backbone import (
    VisionOptions,
    create_clip_model,
    value_value_attention,
    vision_forward,
)


def tiny_visual(tiny_config):
    return create_clip_model(tiny_config).visual.eval()


@torch.inference_mode()
def test_plain_path_equals_openclip_intermediates(tiny_config):
    visual = tiny_visual(tiny_config)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = vision_forward(visual, images, VisionOptions(blocks=(1, 3, 4)))
    reference = visual.forward_intermediates(images, indices=[0, 2, 3], intermediates_only=True, output_fmt="NLC",
                                             output_extra_tokens=True)
    for block, tokens, prefix in zip((1, 3, 4), reference["image_intermediates"], reference["image_intermediates_prefix"]):
        assert torch.allclose(out.tokens[block], torch.cat([prefix, tokens], dim=1), atol=1e-6)
    assert out.value_tokens == {} and torch.equal(out.final, out.tokens[4])


@torch.inference_mode()
def test_value_value_attention_is_softmax_of_v_vt_per_head():
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 5, 8)
    v = x @ attention.in_proj_weight[16:].T + attention.in_proj_bias[16:]  # the value slice
    heads = []
    for h in range(2):
        vh = v[0, :, 4 * h : 4 * h + 4]
        heads.append(torch.softmax(vh @ vh.T / math.sqrt(4), dim=-1) @ vh)
    expected = attention.out_proj(torch.cat(heads, dim=1))[None]
    assert torch.allclose(value_value_attention(attention, x), expected, atol=1e-6)


@torch.inference_mode()
def test_value_value_path_starts_from_the_ordinary_stream(tiny_config):
    visual = tiny_visual(tiny_config)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    out = vision_forward(visual, images, VisionOptions(blocks=(2, 3, 4), value_value_from=3))
    assert set(out.value_tokens) == {3, 4}
    blocks = visual.transformer.resblocks
    o2 = out.tokens[2]
    v3 = o2 + value_value_attention(blocks[2].attn, blocks[2].ln_1(o2))  # v_2 = o_2, no MLP on the path
    v4 = v3 + value_value_attention(blocks[3].attn, blocks[3].ln_1(out.tokens[3]))
    assert torch.allclose(out.value_tokens[3], v3, atol=1e-6) and torch.allclose(out.value_tokens[4], v4, atol=1e-6)


@torch.inference_mode()
def test_token_hook_changes_what_the_blocks_see(tiny_config):
    visual = tiny_visual(tiny_config)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    prompts = torch.randn(1, 3, 64)
    seen = []

    def hook(block, x):  # append 3 prompt tokens before block 2, drop them before block 4
        seen.append((block, x.shape[1]))
        if block == 2:
            return torch.cat([x, prompts], dim=1)
        return x[:, :197] if block == 4 else x

    out = vision_forward(visual, images, VisionOptions(blocks=(2, 4), token_hook=hook))
    assert seen == [(1, 197), (2, 197), (3, 200), (4, 200)]
    assert out.tokens[2].shape[1] == 200 and out.tokens[4].shape[1] == 197
    plain = vision_forward(visual, images, VisionOptions(blocks=(4,)))
    assert not torch.allclose(out.tokens[4], plain.tokens[4])
