"""Multi-head latent attention (MLA) of one DeepSeek-V3 layer over a paged latent cache.

Every token caches 576 values: its kv_lora_rank (512) normalized latent and its 64 rope key dims (already rotated).
The two forms of attention over that cache give the same result:

* unabsorbed (prefill): expand the cached latents through kv_b_proj into per-head keys [nope | rope] and values, then
  ordinary causal attention with 192-wide q·k;
* absorbed (decode): fold kv_b_proj's key half into the query (q_latent = q_nope @ W_UK, 512 wide) and its value half
  into the output (out @ W_UV), so attention runs directly on the 576-wide cache rows (FlashMLA's form).

Both use the YaRN softmax scale of the 192-wide product: absorption changes the width of the dot product, not its value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from dsv3.model.backend import Backend
from dsv3.model.batch import AttentionBatch
from dsv3.model.config import ModelConfig
from dsv3.model.linear import Linear
from dsv3.reference.mla import PAGE_SIZE, gather_kv_rows


class MLAttention:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        make_linear,
        dtype: torch.dtype,
        device: torch.device,
    ):
        c = config
        self.config = config
        self.q_proj: Linear | None = None
        if c.q_lora_rank is None:
            self.q_proj = make_linear("q_proj")
        else:
            self.q_a_proj = make_linear("q_a_proj")
            self.q_a_norm = weights["q_a_layernorm.weight"].to(device=device, dtype=dtype)
            self.q_b_proj = make_linear("q_b_proj")
        # The heads this rank computes: all of them, or its tensor-parallel share (q/kv_b rows, o_proj columns).
        self.heads = (self.q_proj or self.q_b_proj).out_features // c.qk_head_dim
        self.kv_a_proj = make_linear("kv_a_proj_with_mqa")
        # q_a_proj and kv_a_proj read the same x: with FP8 weights (q_lora_rank rows are whole scale tiles) they are
        # stacked once at load into one [q_lora_rank + 576, hidden] weight, so one quantization of x and one GEMM
        # serve both (kv_a's 576 rows alone fill few tiles of a GPU).
        self.qkv_a: tuple[torch.Tensor, torch.Tensor] | None = None
        q_a, kv_a = (None, None) if self.q_proj is not None else (self.q_a_proj.fp8, self.kv_a_proj.fp8)
        if q_a is not None and kv_a is not None and c.q_lora_rank % 128 == 0:
            self.qkv_a = tuple(torch.cat([q_a[i], kv_a[i]]) for i in (0, 1))
            self.q_a_proj = self.kv_a_proj = None  # the stacked copy replaces them
        self.kv_a_norm = weights["kv_a_layernorm.weight"].to(device=device, dtype=dtype)
        self.kv_b_proj = make_linear("kv_b_proj")
        self.o_proj = make_linear("o_proj")
        # kv_b_proj rows are, per head, qk_nope_head_dim key rows then v_head_dim value rows.
        kv_b = self.kv_b_proj.dense_weight(dtype).view(self.heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        self.w_uk = kv_b[:, : c.qk_nope_head_dim].contiguous()  # [h, nope, 512]
        self.w_uv_t = kv_b[:, c.qk_nope_head_dim :].transpose(1, 2).contiguous()  # [h, 512, v]

    def __call__(
        self, x: torch.Tensor, batch: AttentionBatch, kv_cache: torch.Tensor, cos_sin: torch.Tensor, backend: Backend
    ) -> torch.Tensor:
        """x [T, hidden] (normed) -> [T, hidden]; writes the T new tokens into kv_cache first."""
        c, t = self.config, x.shape[0]
        if self.qkv_a is not None:
            widths = [c.q_lora_rank, c.kv_lora_rank + c.qk_rope_head_dim]
            q_a, kv_a = backend.fp8_linear(x, self.qkv_a).split(widths, dim=-1)
            q = self.q_b_proj(backend.rms_norm(q_a.contiguous(), self.q_a_norm, c.rms_norm_eps))
        else:
            kv_a = self.kv_a_proj(x)
            if self.q_proj is None:
                q = self.q_b_proj(backend.rms_norm(self.q_a_proj(x), self.q_a_norm, c.rms_norm_eps))
            else:
                q = self.q_proj(x)
        q = q.view(t, self.heads, c.qk_head_dim)
        q_nope, q_rope = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]
        q_rope = backend.apply_rope(q_rope, batch.positions, cos_sin)
        latent, k_rope = kv_a.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = backend.rms_norm(latent.contiguous(), self.kv_a_norm, c.rms_norm_eps)
        k_rope = backend.apply_rope(k_rope, batch.positions, cos_sin)
        backend.append_kv_cache(kv_cache, batch.slot_mapping, latent, k_rope)
        if batch.absorbed:
            out = self._absorbed(q_nope, q_rope, batch, kv_cache, backend)
        else:
            out = self._unabsorbed(q_nope, q_rope, batch, kv_cache)
        return self.o_proj(out.reshape(t, self.heads * c.v_head_dim))

    def _absorbed(self, q_nope, q_rope, batch: AttentionBatch, kv_cache, backend: Backend) -> torch.Tensor:
        b, s_q = len(batch.query_lens), batch.query_lens[0]
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, h, 512]
        q = torch.cat([q_latent, q_rope], dim=-1).view(b, s_q, self.heads, -1)
        out, _ = backend.mla_decode_with_kvcache(
            q, kv_cache, batch, self.config.kv_lora_rank, self.config.softmax_scale, True
        )
        out = out.reshape(b * s_q, self.heads, self.config.kv_lora_rank)
        return torch.bmm(out.transpose(0, 1), self.w_uv_t).transpose(0, 1)  # [T, h, v]

    def _unabsorbed(self, q_nope, q_rope, batch: AttentionBatch, kv_cache) -> torch.Tensor:
        c, dtype = self.config, q_nope.dtype
        q = torch.cat([q_nope, q_rope], dim=-1)  # [T, h, 192]
        # torch's fused CPU attention needs one head size for q, k and v, and otherwise materializes the scores:
        # zero columns widen v to q·k's size (their outputs are dropped). In fp32, since its bf16 variant loses
        # accuracy (9x the float32 model's logit error on the tiny checkpoint); 2.7x faster than the unfused bf16
        # path at 16 x 300 tokens with 16 heads.
        fused_cpu = q.device.type == "cpu"
        if fused_cpu:
            q = q.float()
        outputs, start = [], 0
        for group in _projection_groups(batch.cached_lens):
            # The cache rows (context + new tokens) of a group of sequences go through kv_b_proj in one call.
            rows = _group_rows(kv_cache, batch, group).to(dtype)  # [L, 576]
            kv = self.kv_b_proj(rows[:, : c.kv_lora_rank]).view(rows.shape[0], self.heads, -1)
            k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
            k_rope = rows[:, None, c.kv_lora_rank :].expand(rows.shape[0], self.heads, c.qk_rope_head_dim)
            k = torch.cat([k_nope, k_rope], dim=-1)
            if fused_cpu:
                k, v = k.float(), F.pad(v.float(), (0, c.qk_head_dim - c.v_head_dim))
            first = 0
            for count, n, seq_len in _equal_runs(group, batch.query_lens, batch.cached_lens):
                # `count` consecutive sequences of n new tokens each, the last n of seq_len keys: query j sees keys
                # 0 .. seq_len - n + j (causal aligned to the lower right), attended to in one batched call.
                keys = slice(first, first + count * seq_len)
                out = F.scaled_dot_product_attention(
                    _per_sequence(q[start : start + count * n], count),
                    _per_sequence(k[keys], count),
                    _per_sequence(v[keys], count),
                    attn_mask=causal_lower_right(n, seq_len),
                    scale=c.softmax_scale,
                )
                out = out[..., : c.v_head_dim].to(dtype)
                outputs.append(out.transpose(1, 2).reshape(count * n, self.heads, -1))  # [count n, h, v]
                start += count * n
                first += count * seq_len
        return torch.cat(outputs)


# Cache rows expanded by kv_b_proj at once in prefill: sequences are grouped up to this many rows (one longer
# sequence alone), which bounds the [rows, heads, 256] keys and values held at a time.
PROJECTION_ROWS = 8192


def _group_rows(kv_cache: torch.Tensor, batch: AttentionBatch, group: list[int]) -> torch.Tensor:
    """fp32 [L, 576]: the cache rows of every position of the group's sequences, sequence after sequence, read in one
    gather (the page of position p of sequence i is block_table[i, p // 64])."""
    device = kv_cache.device
    lens = torch.tensor([batch.cached_lens[i] for i in group], device=device)
    total = sum(batch.cached_lens[i] for i in group)
    sequence = torch.repeat_interleave(torch.tensor(group, device=device), lens, output_size=total)
    first = torch.repeat_interleave(lens.cumsum(0) - lens, lens, output_size=total)
    positions = torch.arange(total, device=device) - first
    blocks = batch.block_table[sequence, positions // PAGE_SIZE]
    return gather_kv_rows(kv_cache, blocks, positions % PAGE_SIZE)


def _per_sequence(x: torch.Tensor, count: int) -> torch.Tensor:
    """Rows [count * length, h, d] of `count` equally long sequences -> [count, h, length, d] (a view)."""
    return x.view(count, -1, *x.shape[1:]).transpose(1, 2)


def _equal_runs(group: list[int], query_lens, cached_lens) -> list[tuple[int, int, int]]:
    """The group's sequences as runs of consecutive ones with equal (new tokens, cached length): (count, n, seq_len)."""
    runs: list[tuple[int, int, int]] = []
    for i in group:
        n, seq_len = query_lens[i], cached_lens[i]
        if runs and runs[-1][1:] == (n, seq_len):
            runs[-1] = (runs[-1][0] + 1, n, seq_len)
        else:
            runs.append((1, n, seq_len))
    return runs


def _projection_groups(seq_lens: tuple[int, ...]) -> list[list[int]]:
    """Consecutive sequences grouped so that each group's rows stay within PROJECTION_ROWS."""
    groups: list[list[int]] = []
    rows = 0
    for i, n in enumerate(seq_lens):
        if not groups or rows + n > PROJECTION_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += n
    return groups
