"""The DeepSeek-V3 transformer: embedding, decoder layers, final norm and head, and the MTP module(s)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3.model.attention import MLAttention
from dsv3.model.backend import Backend
from dsv3.model.batch import AttentionBatch
from dsv3.model.config import ModelConfig
from dsv3.model.linear import Linear
from dsv3.model.mlp import MLP, MoE
from dsv3.model.parallel import Parallel, RowParallelLinear
from dsv3.model.weights import Checkpoint, load_checkpoint
from dsv3.reference.layers import yarn_cos_sin_cache
from dsv3.reference.mla import FP8_ROW_BYTES, HEAD_DIM, PAGE_SIZE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class DecoderLayer:
    """x + attn(norm(x)), then + mlp(norm(...)), with the residual stream in the model's dtype."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], layer: int, build):
        prefix = f"model.layers.{layer}"
        self.input_norm = build.vector(f"{prefix}.input_layernorm.weight")
        self.post_attention_norm = build.vector(f"{prefix}.post_attention_layernorm.weight")
        self.attention = MLAttention(
            config, build.scope(f"{prefix}.self_attn."), build.linear_factory(f"{prefix}.self_attn."), build.dtype,
            build.device,
        )  # fmt: skip
        if config.is_moe_layer(layer):
            self.mlp = MoE(
                config, build.scope(f"{prefix}.mlp."), build.linear_factory(f"{prefix}.mlp."), build.device,
                build.parallel,
            )  # fmt: skip
        else:
            self.mlp = MLP(build.linear_factory(f"{prefix}."), "mlp")
        self.eps = config.rms_norm_eps

    def __call__(self, x, batch, kv_cache, cos_sin, backend) -> torch.Tensor:
        attention = self.attention(backend.rms_norm(x, self.input_norm, self.eps), batch, kv_cache, cos_sin, backend)
        h, x = backend.fused_add_rms_norm(attention, x, self.post_attention_norm, self.eps)
        return x + (self.mlp(h, backend) if isinstance(self.mlp, MoE) else self.mlp(h))


class _Builder:
    """Turns checkpoint tensors into the model's weights: dtype, device, tensor-parallel slicing and Linear wrapping
    in one place."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        backend: Backend,
        parallel: Parallel,
    ):
        self.tensors, self.dtype, self.device, self.backend = tensors, dtype, device, backend
        self.parallel = parallel

    def vector(self, name: str) -> torch.Tensor:
        return self.tensors[name].to(device=self.device, dtype=self.dtype)

    def scope(self, prefix: str) -> dict[str, torch.Tensor]:
        return {name[len(prefix) :]: t for name, t in self.tensors.items() if name.startswith(prefix)}

    def linear(self, name: str) -> Linear | RowParallelLinear:
        weight, scale_inv = self.parallel.shard(
            name, self.tensors[f"{name}.weight"], self.tensors.get(f"{name}.weight_scale_inv")
        )
        linear = Linear(weight, scale_inv, self.dtype, self.backend, self.device)
        return RowParallelLinear(linear, self.parallel) if self.parallel.reduces(name) else linear

    def linear_factory(self, prefix: str):
        return lambda name: self.linear(prefix + name)


class MTPModule:
    """Multi-token prediction: from the main model's final-normed hidden state at t and the embedding of token t + 1,
    predict token t + 2 — eh_proj([enorm(emb); hnorm(h)]), one decoder block (with its own cache), shared_head."""

    def __init__(self, config: ModelConfig, tensors, layer: int, build: _Builder):
        p = f"model.layers.{layer}"
        self.embed = build.vector(f"{p}.embed_tokens.weight")
        self.enorm = build.vector(f"{p}.enorm.weight")
        self.hnorm = build.vector(f"{p}.hnorm.weight")
        self.eh_proj = build.linear(f"{p}.eh_proj")
        self.block = DecoderLayer(config, tensors, layer, build)
        self.head_norm = build.vector(f"{p}.shared_head.norm.weight")
        self.head = build.vector(f"{p}.shared_head.head.weight")
        self.eps = config.rms_norm_eps

    def __call__(self, next_ids, hidden, batch, kv_cache, cos_sin, backend) -> torch.Tensor:
        """next_ids int [T] (token t + 1), hidden [T, H] at t; batch positions are those of t. Returns fp32 logits."""
        e = backend.rms_norm(F.embedding(next_ids, self.embed), self.enorm, self.eps)
        h = backend.rms_norm(hidden, self.hnorm, self.eps)
        x = self.block(self.eh_proj(torch.cat([e, h], dim=-1)), batch, kv_cache, cos_sin, backend)
        return F.linear(backend.rms_norm(x, self.head_norm, self.eps), self.head).float()


def _rope_table(config: ModelConfig) -> torch.Tensor:
    """cos/sin of every position up to max_position_embeddings; without rope_scaling, YaRN with factor 1 is plain
    RoPE."""
    rope = config.rope_scaling
    dims = (config.max_position_embeddings, config.qk_rope_head_dim, config.rope_theta)
    if rope is None:
        return yarn_cos_sin_cache(*dims, factor=1.0)
    return yarn_cos_sin_cache(
        *dims,
        rope.factor,
        rope.original_max_position_embeddings,
        rope.beta_fast,
        rope.beta_slow,
        rope.mscale,
        rope.mscale_all_dim,
    )


class DeepseekV3:
    """The model, as plain tensors: `forward` runs the decoder over a batch of new tokens and fills the caches."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        dtype: str = "float32",
        device: str = "cpu",
        backend: str = "reference",
        parallel: Parallel | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        config = checkpoint.config
        self.config = config
        self.parallel = parallel or Parallel.single()
        self.parallel.check(config)
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device)
        self.backend = Backend(backend, self.device, self.dtype)
        build = _Builder(checkpoint.tensors, self.dtype, self.device, self.backend, self.parallel)
        self.embed = build.vector("model.embed_tokens.weight")
        self.layers = [DecoderLayer(config, checkpoint.tensors, i, build) for i in range(config.num_hidden_layers)]
        self.norm = build.vector("model.norm.weight")
        self.lm_head = build.vector("lm_head.weight")
        self.mtp = (
            [MTPModule(config, checkpoint.tensors, i, build) for i in config.mtp_layers] if checkpoint.has_mtp else []
        )
        self.cos_sin = _rope_table(config).to(self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str = "float32",
        device: str = "cpu",
        backend: str = "reference",
        progress: bool = False,
        parallel: Parallel | None = None,
    ) -> DeepseekV3:
        """Load the checkpoint at `path`; with a `parallel` layout, only this rank's share of it is read."""
        parallel = parallel or Parallel.single()
        config = ModelConfig.from_file(Path(path) / "config.json")
        parallel.check(config)
        checkpoint = load_checkpoint(path, config, progress=progress, keep=parallel.tensor_filter(config))
        return cls(checkpoint, dtype, device, backend, parallel)

    @property
    def num_local_heads(self) -> int:
        """Attention heads this process computes (all of them unless tensor-parallel)."""
        return self.layers[0].attention.heads

    def allocate_kv_cache(
        self, num_pages: int, fp8: bool = False, dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        """One paged latent cache per layer (main layers, then MTP blocks): [num_pages, 64, 1, 576] in `dtype` (by
        default the model's), or the 656-byte FP8 rows as uint8 when fp8."""
        shape = (num_pages, PAGE_SIZE, 1, FP8_ROW_BYTES if fp8 else HEAD_DIM)
        dtype = torch.uint8 if fp8 else (dtype or self.dtype)
        return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(len(self.layers) + len(self.mtp))]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids int [T] (the batch's new tokens) -> final-normed hidden states [T, hidden]."""
        batch = self.backend.plan(batch, self.num_local_heads)
        x = F.embedding(input_ids.to(self.device), self.embed)
        for layer, cache in zip(self.layers, kv_caches[: len(self.layers)], strict=True):
            x = layer(x, batch, cache, self.cos_sin, self.backend)
        return self.backend.rms_norm(x, self.norm, self.config.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] -> fp32 logits [n, vocab]."""
        return F.linear(hidden, self.lm_head).float()

    @torch.inference_mode()
    def mtp_logits(
        self, next_ids: torch.Tensor, hidden: torch.Tensor, batch: AttentionBatch, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Logits of the first MTP module (token t + 2) for each new token t of `batch`; needs a checkpoint with MTP."""
        if not self.mtp:
            raise ValueError("this checkpoint has no MTP module")
        batch = self.backend.plan(batch, self.num_local_heads)
        return self.mtp[0](
            next_ids.to(self.device), hidden, batch, kv_caches[len(self.layers)], self.cos_sin, self.backend
        )
