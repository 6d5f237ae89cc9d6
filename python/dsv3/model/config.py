"""DeepSeek-V3 `config.json`: parsed into frozen dataclasses and checked for consistency before anything is built."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.reference.layers import yarn_softmax_scale
from dsv3.reference.mla import LATENT_DIM, ROPE_DIM


class ConfigError(ValueError):
    """A config.json that is malformed, inconsistent, or describes a model dsv3 cannot run."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (`rope_scaling` with type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class QuantizationConfig:
    """Block-scaled FP8 weights: e4m3 values plus a float32 `<name>_scale_inv` per weight_block_size tile."""

    weight_block_size: tuple[int, int] = (128, 128)
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # each routed expert; the shared expert is n_shared_experts times wider
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None  # None: a plain q_proj instead of the q_a_proj -> norm -> q_b_proj factorization
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    moe_layer_freq: int
    num_nextn_predict_layers: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    quantization: QuantizationConfig | None  # None: every weight is stored unquantized (bf16)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """Attention scale, with YaRN's magnitude correction squared in when rope_scaling asks for it."""
        if self.rope_scaling is None:
            return self.qk_head_dim**-0.5
        return yarn_softmax_scale(self.qk_head_dim, self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)

    def is_moe_layer(self, layer: int) -> bool:
        """Layers before first_k_dense_replace use a dense MLP, later ones MoE every moe_layer_freq layers.

        The MTP layers (index >= num_hidden_layers) follow the same rule, so they are MoE in DeepSeek-V3.
        """
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def mtp_layers(self) -> range:
        """Checkpoint indices of the multi-token-prediction modules: they follow the main layers."""
        return range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        return _parse(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (or the config.json inside a checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return _parse(raw)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------------

_MISSING = object()


def _get(raw: dict[str, Any], key: str, kind: type, default: Any = _MISSING, minimum: float | None = None) -> Any:
    value = raw.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"missing required key {key!r}")
    if value is None and default is None:
        return None
    # JSON has one number type: accept 40 for a float field, but not 40.5 (or true) for an int field.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value}")
    return value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(raw: dict[str, Any], key: str, default: str, supported: tuple[str, ...]) -> None:
    value = raw.get(key, default)
    _require(value in supported, f"{key}: {value!r} is not supported (supported: {', '.join(supported)})")


def _parse_rope_scaling(raw: Any) -> RopeScaling | None:
    if raw is None:
        return None
    _require(isinstance(raw, dict), f"rope_scaling: expected an object or null, got {raw!r}")
    kind = raw.get("type", raw.get("rope_type"))
    if kind in ("default", None) and "factor" not in raw:
        return None
    _require(kind == "yarn", f"rope_scaling: unknown rope type {kind!r} (DeepSeek-V3 uses 'yarn')")
    scaling = RopeScaling(
        factor=_get(raw, "factor", float, minimum=1.0),
        original_max_position_embeddings=_get(raw, "original_max_position_embeddings", int, minimum=1),
        beta_fast=_get(raw, "beta_fast", float, 32.0),
        beta_slow=_get(raw, "beta_slow", float, 1.0),
        mscale=_get(raw, "mscale", float, 1.0),
        mscale_all_dim=_get(raw, "mscale_all_dim", float, 0.0),
    )
    _require(
        scaling.beta_fast > scaling.beta_slow > 0,
        f"rope_scaling: need beta_fast > beta_slow > 0, got {scaling.beta_fast} and {scaling.beta_slow}",
    )
    return scaling


def _parse_quantization(raw: Any) -> QuantizationConfig | None:
    if raw is None:
        return None
    _require(isinstance(raw, dict), f"quantization_config: expected an object, got {raw!r}")
    _one_of(raw, "quant_method", "fp8", ("fp8",))
    _one_of(raw, "fmt", "e4m3", ("e4m3",))
    _one_of(raw, "activation_scheme", "dynamic", ("dynamic",))
    block = raw.get("weight_block_size")
    _require(
        block == [128, 128],
        f"quantization_config.weight_block_size: only [128, 128] blocks are supported, got {block!r}",
    )
    return QuantizationConfig(weight_block_size=(128, 128))


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    value = raw.get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    _require(
        all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids),
        f"eos_token_id: expected a token id or a list of them, got {value!r}",
    )
    return tuple(ids)


def _parse(raw: dict[str, Any]) -> ModelConfig:
    _one_of(raw, "model_type", "deepseek_v3", ("deepseek_v3",))
    _one_of(raw, "topk_method", "noaux_tc", ("noaux_tc",))
    _one_of(raw, "scoring_func", "sigmoid", ("sigmoid",))
    _one_of(raw, "hidden_act", "silu", ("silu",))
    _require(not raw.get("attention_bias", False), "attention_bias: true is not supported (DeepSeek-V3 has none)")
    _require(not raw.get("tie_word_embeddings", False), "tie_word_embeddings: true is not supported")
    heads = _get(raw, "num_attention_heads", int, minimum=1)
    kv_heads = _get(raw, "num_key_value_heads", int, heads, minimum=1)
    _require(kv_heads == heads, f"num_key_value_heads={kv_heads}: MLA needs it equal to num_attention_heads={heads}")

    config = ModelConfig(
        vocab_size=_get(raw, "vocab_size", int, minimum=1),
        hidden_size=_get(raw, "hidden_size", int, minimum=1),
        intermediate_size=_get(raw, "intermediate_size", int, minimum=1),
        moe_intermediate_size=_get(raw, "moe_intermediate_size", int, minimum=1),
        num_hidden_layers=_get(raw, "num_hidden_layers", int, minimum=1),
        num_attention_heads=heads,
        q_lora_rank=_get(raw, "q_lora_rank", int, None, minimum=1),
        kv_lora_rank=_get(raw, "kv_lora_rank", int, minimum=1),
        qk_nope_head_dim=_get(raw, "qk_nope_head_dim", int, minimum=1),
        qk_rope_head_dim=_get(raw, "qk_rope_head_dim", int, minimum=2),
        v_head_dim=_get(raw, "v_head_dim", int, minimum=1),
        n_routed_experts=_get(raw, "n_routed_experts", int, minimum=1),
        n_shared_experts=_get(raw, "n_shared_experts", int, 0, minimum=0),
        num_experts_per_tok=_get(raw, "num_experts_per_tok", int, minimum=1),
        n_group=_get(raw, "n_group", int, minimum=1),
        topk_group=_get(raw, "topk_group", int, minimum=1),
        routed_scaling_factor=_get(raw, "routed_scaling_factor", float, 1.0, minimum=0.0),
        norm_topk_prob=_get(raw, "norm_topk_prob", bool, True),
        first_k_dense_replace=_get(raw, "first_k_dense_replace", int, 0, minimum=0),
        moe_layer_freq=_get(raw, "moe_layer_freq", int, 1, minimum=1),
        num_nextn_predict_layers=_get(raw, "num_nextn_predict_layers", int, 0, minimum=0),
        max_position_embeddings=_get(raw, "max_position_embeddings", int, minimum=1),
        rms_norm_eps=_get(raw, "rms_norm_eps", float, 1e-6, minimum=0.0),
        rope_theta=_get(raw, "rope_theta", float, 10000.0, minimum=1.0),
        rope_scaling=_parse_rope_scaling(raw.get("rope_scaling")),
        quantization=_parse_quantization(raw.get("quantization_config")),
        bos_token_id=_get(raw, "bos_token_id", int, None, minimum=0),
        eos_token_ids=_eos_ids(raw),
    )
    _check_consistency(config)
    return config


def _check_consistency(c: ModelConfig) -> None:
    # The paged latent cache stores kv_lora_rank + qk_rope_head_dim values per token in a fixed 512 + 64 layout.
    _require(
        c.kv_lora_rank == LATENT_DIM and c.qk_rope_head_dim == ROPE_DIM,
        f"kv_lora_rank={c.kv_lora_rank}, qk_rope_head_dim={c.qk_rope_head_dim}: the latent KV cache needs "
        f"{LATENT_DIM} and {ROPE_DIM}",
    )
    _require(
        c.n_routed_experts % c.n_group == 0,
        f"n_routed_experts={c.n_routed_experts} is not divisible by n_group={c.n_group}",
    )
    group_size = c.n_routed_experts // c.n_group
    _require(group_size >= 2, f"n_group={c.n_group}: each group needs at least 2 experts, got {group_size}")
    _require(c.topk_group <= c.n_group, f"topk_group={c.topk_group} exceeds n_group={c.n_group}")
    _require(
        c.num_experts_per_tok <= c.topk_group * group_size,
        f"num_experts_per_tok={c.num_experts_per_tok} exceeds the {c.topk_group * group_size} experts of "
        f"topk_group={c.topk_group} groups",
    )
    _require(
        c.first_k_dense_replace <= c.num_hidden_layers,
        f"first_k_dense_replace={c.first_k_dense_replace} exceeds num_hidden_layers={c.num_hidden_layers}",
    )
    for token in (c.bos_token_id, *c.eos_token_ids):
        _require(token is None or token < c.vocab_size, f"token id {token} is outside vocab_size={c.vocab_size}")
    if c.rope_scaling is not None:
        _require(
            math.isfinite(c.rope_scaling.factor) and c.rope_scaling.original_max_position_embeddings > 0,
            f"rope_scaling: invalid factor {c.rope_scaling.factor}",
        )
