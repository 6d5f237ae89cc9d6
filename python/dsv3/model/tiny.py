"""`dsv3 make-tiny`: a small random DeepSeek-V3 checkpoint in exactly the official layout.

It has every structural feature of the real model at toy size: q/kv low-rank attention with the real 512 + 64 latent,
a dense layer then MoE layers (grouped routing, shared expert, correction bias), YaRN rope scaling, the MTP module,
FP8 e4m3 weights with 128x128 `weight_scale_inv` blocks (576-row kv_a_proj has a partial edge block, as in the real
model), several safetensors shards with an index, and a tokenizer with a chat template.

The block scales are powers of two, so every dequantized weight (e4m3 value times scale) is exact in bf16: the
checkpoint written by `convert --to-bf16` then holds exactly the weights the FP8 one means.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv3.model.checkpoint_writer import write_sharded
from dsv3.model.config import ModelConfig
from dsv3.model.tensors import checkpoint_tensors
from dsv3.model.tiny_tokenizer import write_tiny_tokenizer
from dsv3.reference.quant import FP8_DTYPE, ceil_div, expand_block_scales, quantize_with_scale, scale_from_amax

TINY_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 384,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "ep_size": 1,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 32,
    "qk_nope_head_dim": 32,
    "topk_method": "noaux_tc",
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 4,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 512,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def quantize_pow2_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128-block FP8 quantization with power-of-two scales: (e4m3 [N, K], f32 [ceil(N/128), ceil(K/128)])."""
    n, k = w.shape
    padded = w.new_zeros(ceil_div(n, block) * block, ceil_div(k, block) * block)
    padded[:n, :k] = w.abs()
    amax = padded.view(ceil_div(n, block), block, ceil_div(k, block), block).amax(dim=(1, 3))
    scale = scale_from_amax(amax, ue8m0=True)
    return quantize_with_scale(w, expand_block_scales(scale, n, k, block)), scale


def _random_value(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """fp32 values of a plausible magnitude for tensor `name`, so activations stay O(1) through the layers."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=generator)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=generator)
    # Linear layers [out, in]: unit-variance outputs for unit-variance inputs; per-row gains vary the block scales.
    fan_in = shape[1]
    gains = torch.exp(0.5 * torch.randn(shape[0], 1, generator=generator))
    return torch.randn(shape, generator=generator) * gains / fan_in**0.5


def make_tiny_checkpoint(directory: str | Path, seed: int = 0, num_shards: int = 3) -> Path:
    """Write the tiny checkpoint (config, FP8 shards + index, tokenizer) into `directory`; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw_config = dict(TINY_CONFIG)
    tokenizer_size = write_tiny_tokenizer(directory, raw_config["vocab_size"], raw_config["max_position_embeddings"])
    assert tokenizer_size <= raw_config["vocab_size"], "the tiny tokenizer outgrew the tiny vocabulary"
    config = ModelConfig.from_dict(raw_config)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in checkpoint_tensors(config).items():
        if name.endswith("_scale_inv"):
            continue  # written with its weight
        value = _random_value(name, spec.shape, generator)
        if spec.dtype == FP8_DTYPE:
            tensors[name], tensors[f"{name}_scale_inv"] = quantize_pow2_blocks(value)
        else:
            tensors[name] = value.to(spec.dtype)
    # The MTP module's embedding and head are copies of the main ones in the official checkpoint.
    for layer in config.mtp_layers:
        tensors[f"model.layers.{layer}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[f"model.layers.{layer}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    write_sharded(tensors, directory, num_shards)
    (directory / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    return directory
