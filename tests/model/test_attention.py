"""MLA attention's prefill path: which sequences share one kv_b_proj call and one attention call (their output is what
the model tests pin)."""

from __future__ import annotations

import torch
from safetensors import safe_open

import dsv3
from dsv3.model.attention import PROJECTION_ROWS, _projection_groups
from dsv3.model.transformer import DeepseekV3


def test_prefill_projection_groups_bound_the_rows():
    assert _projection_groups((5, 7, 9)) == [[0, 1, 2]]
    lens = (PROJECTION_ROWS - 10, 10, 1, PROJECTION_ROWS + 5, 3)
    assert _projection_groups(lens) == [[0, 1], [2], [3], [4]]  # a longer sequence goes alone
    assert _projection_groups(()) == []


def test_prefill_attention_runs_group_consecutive_equal_sequences():
    from dsv3.model.attention import _equal_runs

    query_lens, cached_lens = (4, 4, 4, 2, 4, 4), (4, 4, 9, 2, 4, 4)
    assert _equal_runs([0, 1, 2, 3, 4, 5], query_lens, cached_lens) == [(2, 4, 4), (1, 4, 9), (1, 2, 2), (2, 4, 4)]
    assert _equal_runs([3], query_lens, cached_lens) == [(1, 2, 2)]
    assert _equal_runs([], query_lens, cached_lens) == []


def _checkpoint_fp8(path, name: str):
    """(weight, weight_scale_inv) of `name` from the checkpoint's shards."""
    found = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            names = set(f.keys())
            found.update({n: f.get_tensor(n) for n in (f"{name}.weight", f"{name}.weight_scale_inv") if n in names})
    return found[f"{name}.weight"], found[f"{name}.weight_scale_inv"]


def test_fp8_q_a_and_kv_a_projections_are_one_stacked_gemm(tiny_fp8):
    """A bfloat16 model on FP8 weights stacks q_a_proj and kv_a_proj (rows in that order, with their scale tiles) and
    runs them as one GEMM, whose two slices are bit for bit what each projection gives alone."""
    model = DeepseekV3.from_pretrained(tiny_fp8, dtype="bfloat16", backend="kernels")
    attention, config = model.layers[0].attention, model.config
    assert attention.q_a_proj is None and attention.kv_a_proj is None
    codes, scales = attention.qkv_a
    assert codes.shape == (config.q_lora_rank + config.kv_lora_rank + config.qk_rope_head_dim, config.hidden_size)
    q_a = _checkpoint_fp8(tiny_fp8, "model.layers.0.self_attn.q_a_proj")
    kv_a = _checkpoint_fp8(tiny_fp8, "model.layers.0.self_attn.kv_a_proj_with_mqa")
    assert torch.equal(codes.view(torch.uint8), torch.cat([q_a[0], kv_a[0]]).view(torch.uint8))
    assert torch.equal(scales, torch.cat([q_a[1], kv_a[1]]))
    x = torch.randn(5, config.hidden_size, dtype=torch.bfloat16)
    both = dsv3.fp8_linear(x, attention.qkv_a)
    assert torch.equal(both[:, : config.q_lora_rank], dsv3.fp8_linear(x, q_a))
    assert torch.equal(both[:, config.q_lora_rank :], dsv3.fp8_linear(x, kv_a))
