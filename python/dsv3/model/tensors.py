"""The tensors a DeepSeek-V3 checkpoint holds, derived from its config: names, shapes and dtypes.

FP8 checkpoints store every linear layer of the decoder blocks (attention projections, dense MLP, routed and shared
experts) as e4m3 plus a float32 `<name>_scale_inv` with one entry per 128x128 tile (edge tiles partial); embeddings,
norms, the router, lm_head and the MTP module's own projections stay bf16 and the router's correction bias fp32.
BF16 checkpoints store the same weights in bf16 and have no scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.model.config import ModelConfig
from dsv3.reference.quant import FP8_DTYPE, ceil_div


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _linear(specs: dict[str, TensorSpec], config: ModelConfig, name: str, rows: int, cols: int) -> None:
    """A decoder-block linear layer `name` (without the `.weight` suffix), [rows, cols] = [out, in]."""
    if config.quantization is None:
        specs[f"{name}.weight"] = TensorSpec((rows, cols), torch.bfloat16)
        return
    block_rows, block_cols = config.quantization.weight_block_size
    specs[f"{name}.weight"] = TensorSpec((rows, cols), FP8_DTYPE)
    specs[f"{name}.weight_scale_inv"] = TensorSpec(
        (ceil_div(rows, block_rows), ceil_div(cols, block_cols)), torch.float32
    )


def _vector(specs: dict[str, TensorSpec], name: str, size: int, dtype: torch.dtype = torch.bfloat16) -> None:
    specs[name] = TensorSpec((size,), dtype)


def _mlp(specs: dict[str, TensorSpec], config: ModelConfig, prefix: str, hidden: int, inner: int) -> None:
    _linear(specs, config, f"{prefix}.gate_proj", inner, hidden)
    _linear(specs, config, f"{prefix}.up_proj", inner, hidden)
    _linear(specs, config, f"{prefix}.down_proj", hidden, inner)


def decoder_layer_tensors(config: ModelConfig, layer: int) -> dict[str, TensorSpec]:
    """Attention, MLP or MoE, and the two norms of block `layer` (a main layer or an MTP module's block)."""
    c, h = config, config.hidden_size
    p = f"model.layers.{layer}"
    specs: dict[str, TensorSpec] = {}
    _vector(specs, f"{p}.input_layernorm.weight", h)
    _vector(specs, f"{p}.post_attention_layernorm.weight", h)
    heads = c.num_attention_heads
    if c.q_lora_rank is None:
        _linear(specs, c, f"{p}.self_attn.q_proj", heads * c.qk_head_dim, h)
    else:
        _linear(specs, c, f"{p}.self_attn.q_a_proj", c.q_lora_rank, h)
        _vector(specs, f"{p}.self_attn.q_a_layernorm.weight", c.q_lora_rank)
        _linear(specs, c, f"{p}.self_attn.q_b_proj", heads * c.qk_head_dim, c.q_lora_rank)
    _linear(specs, c, f"{p}.self_attn.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, h)
    _vector(specs, f"{p}.self_attn.kv_a_layernorm.weight", c.kv_lora_rank)
    _linear(specs, c, f"{p}.self_attn.kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
    _linear(specs, c, f"{p}.self_attn.o_proj", h, heads * c.v_head_dim)
    if not c.is_moe_layer(layer):
        _mlp(specs, c, f"{p}.mlp", h, c.intermediate_size)
        return specs
    specs[f"{p}.mlp.gate.weight"] = TensorSpec((c.n_routed_experts, h), torch.bfloat16)
    _vector(specs, f"{p}.mlp.gate.e_score_correction_bias", c.n_routed_experts, torch.float32)
    for expert in range(c.n_routed_experts):
        _mlp(specs, c, f"{p}.mlp.experts.{expert}", h, c.moe_intermediate_size)
    if c.n_shared_experts:
        _mlp(specs, c, f"{p}.mlp.shared_experts", h, c.moe_intermediate_size * c.n_shared_experts)
    return specs


def mtp_module_tensors(config: ModelConfig, layer: int) -> dict[str, TensorSpec]:
    """MTP module `layer`: its own embedding and head copies, the two input norms, eh_proj, then a decoder block."""
    h, v = config.hidden_size, config.vocab_size
    p = f"model.layers.{layer}"
    specs = {
        f"{p}.embed_tokens.weight": TensorSpec((v, h), torch.bfloat16),
        f"{p}.enorm.weight": TensorSpec((h,), torch.bfloat16),
        f"{p}.hnorm.weight": TensorSpec((h,), torch.bfloat16),
        f"{p}.eh_proj.weight": TensorSpec((h, 2 * h), torch.bfloat16),
        f"{p}.shared_head.norm.weight": TensorSpec((h,), torch.bfloat16),
        f"{p}.shared_head.head.weight": TensorSpec((v, h), torch.bfloat16),
    }
    specs.update(decoder_layer_tensors(config, layer))
    return specs


def checkpoint_tensors(config: ModelConfig, include_mtp: bool = True) -> dict[str, TensorSpec]:
    """Every tensor of the checkpoint, by name, in a stable order (embedding, layers, final norm, head, MTP)."""
    h, v = config.hidden_size, config.vocab_size
    specs = {"model.embed_tokens.weight": TensorSpec((v, h), torch.bfloat16)}
    for layer in range(config.num_hidden_layers):
        specs.update(decoder_layer_tensors(config, layer))
    specs["model.norm.weight"] = TensorSpec((h,), torch.bfloat16)
    specs["lm_head.weight"] = TensorSpec((v, h), torch.bfloat16)
    if include_mtp:
        for layer in config.mtp_layers:
            specs.update(mtp_module_tensors(config, layer))
    return specs
