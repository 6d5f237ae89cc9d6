"""Parsing the official config, rejecting bad ones, and the checkpoint layout derived from it (no weights needed)."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import pytest
import torch

from dsv3.model.config import ConfigError, ModelConfig
from dsv3.model.tensors import checkpoint_tensors

FIXTURES = Path(__file__).parent.parent / "fixtures"
OFFICIAL = json.loads((FIXTURES / "deepseek_v3_config.json").read_text())
TABLE = {k: v for k, v in json.loads((FIXTURES / "deepseek_v3_tensors.json").read_text()).items() if k != "about"}


@functools.cache
def _official_specs():
    return checkpoint_tensors(ModelConfig.from_dict(OFFICIAL))


DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp32": torch.float32}


def test_official_config_parses():
    c = ModelConfig.from_file(FIXTURES / "deepseek_v3_config.json")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (7168, 61, 128)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        1536,
        512,
        128,
        64,
        128,
    )
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 1, 8, 8, 4)
    assert c.routed_scaling_factor == 2.5 and c.norm_topk_prob and c.first_k_dense_replace == 3
    assert c.rope_scaling.factor == 40 and c.rope_scaling.original_max_position_embeddings == 4096
    assert c.rope_scaling.mscale == c.rope_scaling.mscale_all_dim == 1.0
    assert c.quantization.weight_block_size == (128, 128)
    assert (c.bos_token_id, c.eos_token_ids, c.vocab_size) == (0, (1,), 129280)
    assert list(c.mtp_layers) == [61]
    assert [c.is_moe_layer(i) for i in (0, 2, 3, 60, 61)] == [False, False, True, True, True]
    # 192**-0.5 * (0.1 ln 40 + 1)^2, the scale of the official inference code
    assert c.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 2.302585092994046 * 1.6020599913279623 + 1) ** 2)


def _instances(pattern: str) -> list[str]:
    """Concrete names a table row stands for: N is any layer of its kind, E any expert."""
    name = pattern.split(" ")[0]
    if ".N." not in name:
        return [name]
    if "(dense layers)" in pattern:
        layers = [0, 2]
    elif ".mlp." in name:
        layers = [3, 60, 61]
    else:
        layers = [0, 3, 60, 61]
    names = [name.replace(".N.", f".{layer}.") for layer in layers]
    return [n.replace(".E.", f".{e}.") for n in names for e in (0, 255)] if ".E." in name else names


@pytest.mark.parametrize("pattern", sorted(TABLE))
def test_every_official_tensor_shape_is_derived(pattern):
    specs = _official_specs()
    row = TABLE[pattern]
    for name in _instances(pattern):
        assert specs[name].shape == tuple(row["shape"]), name
        assert specs[name].dtype == DTYPES[row["dtype"]], name
        scale = f"{name}_scale_inv"
        if row["dtype"] == "fp8":
            assert specs[scale].shape == tuple(row["scale_inv"]) and specs[scale].dtype == torch.float32, scale
        else:
            assert scale not in specs


def test_no_tensor_beyond_the_official_table():
    specs = _official_specs()
    patterns = {p.split(" ")[0] for p in TABLE}
    for name in specs:
        exact = re.sub(r"\.experts\.\d+\.", ".experts.E.", name.removesuffix("_scale_inv"))
        generic = re.sub(r"layers\.\d+\.", "layers.N.", exact)
        assert exact in patterns or generic in patterns, name
    # per block: 4 norms + 5 attention linears (weight + scale); dense MLP: 3 linears; MoE: router weight and bias +
    # 257 experts (256 routed, 1 shared) of 3 linears. 3 dense + 58 MoE layers, the MTP block (MoE) and its 6 extra
    # tensors, embeddings, final norm, head.
    attention = 4 + 5 * 2
    dense, moe = attention + 3 * 2, attention + 2 + 257 * 3 * 2
    assert len(specs) == 3 + 3 * dense + 58 * moe + (moe + 6)


def test_bf16_checkpoint_layout_has_no_scales():
    raw = {k: v for k, v in OFFICIAL.items() if k != "quantization_config"}
    specs = checkpoint_tensors(ModelConfig.from_dict(raw))
    assert not any(name.endswith("_scale_inv") for name in specs)
    assert specs["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.bfloat16


def _edited(**changes):
    raw = copy.deepcopy(OFFICIAL)
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_routed_experts": 250}, "not divisible by n_group"),
        ({"topk_group": 9}, "topk_group=9 exceeds n_group=8"),
        ({"num_experts_per_tok": 200}, "num_experts_per_tok=200 exceeds"),
        ({"rope_scaling": {"type": "ntk", "factor": 4}}, "unknown rope type 'ntk'"),
        ({"hidden_size": None}, "missing required key 'hidden_size'"),
        ({"hidden_size": "7168"}, "hidden_size: expected int"),
        ({"kv_lora_rank": 256}, "latent KV cache needs 512"),
        ({"first_k_dense_replace": 62}, "first_k_dense_replace=62 exceeds"),
        ({"eos_token_id": 200000}, "outside vocab_size"),
        ({"num_key_value_heads": 1}, "num_key_value_heads=1"),
        ({"scoring_func": "softmax"}, "scoring_func: 'softmax' is not supported"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "weight_block_size"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict(_edited(**changes))


def test_bad_config_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_edited(topk_group=0)))
    with pytest.raises(ConfigError, match=r"config\.json: topk_group: must be >= 1"):
        ModelConfig.from_file(tmp_path)
