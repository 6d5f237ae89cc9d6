"""A DeepEP-style expert-parallel Buffer (V1 call shapes, normal and low-latency modes) over torch.distributed.

Usage, on every rank of ``group``::

    buffer = Buffer(group)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, per_local_expert, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    ...  # run the local experts on recv_x
    combined_x, combined_w, _ = buffer.combine(expert_out, handle, topk_weights=recv_w)

Transport is ``all_to_all_single`` (gloo on CPU, NCCL on GPU); rows cross as bytes, so FP8 payloads work everywhere.
Differences from DeepEP:

* ``async_finish=True`` starts the payload exchange and returns at once with the outputs allocated and an
  ``EventOverlap`` (dsv3.ep.event): its ``wait()`` / ``current_stream_wait()`` waits for the exchange and fills the
  outputs (the unpacking runs then), so computation can overlap the communication. The small count/status exchange
  of a non-cached dispatch stays synchronous (the receive sizes come from it); an asynchronous non-cached dispatch
  adds one more small exchange, of the per-expert counts, so that ``num_recv_tokens_per_expert_list`` is known
  before the rows arrive. ``previous_event`` is waited for before the call starts. The low-latency calls take
  ``async_finish`` and ``return_recv_hook``: the event and the hook are the same completion, and bad input there
  raises at that wait, on every rank. ``config`` / ``allocate_on_comm_stream`` / the buffer sizes are accepted for
  call compatibility only (every call allocates what it needs).
* A non-cached dispatch moves a small status message first (token counts, an input-error flag, the row width and
  num_experts of every rank): bad input on any rank makes every rank raise ``EPInputError`` (a ValueError) before any
  payload moves, instead of a deadlock. Layout and cached-dispatch/combine checks are local and raise only on the
  rank that has the bad input.
* Within one node there is no RDMA rank: ``num_tokens_per_rdma_rank`` is always None.
* low_latency_dispatch/combine (dsv3.ep.low_latency) return contiguous row-major FP8 scales, leave the rows past
  each expert's count unspecified (as DeepEP), and check topk_idx on the host, so they are not CUDA-graph capturable
  yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.ep.event import EventOverlap, wait_previous
from dsv3.ep.layout import INDEX_DTYPES, check_num_experts, check_topk_idx, dispatch_layout
from dsv3.ep.low_latency import LowLatencyHandle, low_latency_combine, low_latency_dispatch
from dsv3.ep.transport import column_offsets, exchange_rows, pack_rows, row_bytes, unpack_into, unpack_rows
from dsv3.ops.ep import combine_reduce

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None),) if d is not None)


class EPInputError(ValueError):
    """Invalid input to a Buffer call (raised before any payload moves)."""


@dataclass
class DispatchHandle:
    """What combine and a cached dispatch need from a dispatch.

    send_token: int64 [S], the source token of each row sent, grouped by destination rank, ascending within a rank.
    send_counts: rows sent to each rank, [R]; recv_counts: rows received from each rank, [R].
    num_tokens: N, the tokens of this rank.
    """

    send_token: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int

    @property
    def num_recv_tokens(self) -> int:
        return sum(self.recv_counts)


def _describe(t: object) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _expect(t: object, name: str, dtypes: tuple, shape: tuple) -> torch.Tensor:
    """t must be a tensor of one of dtypes and the given shape (None matches any size)."""
    ok = (
        isinstance(t, torch.Tensor)
        and t.dtype in dtypes
        and t.dim() == len(shape)
        and all(want in (None, got) for want, got in zip(shape, t.shape, strict=True))
    )
    if not ok:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        dims = ", ".join("*" if s is None else str(s) for s in shape)
        raise EPInputError(f"{name}: expected {names} [{dims}], got {_describe(t)}")
    return t


def _payload(x: object) -> list[torch.Tensor]:
    """x [N, H] in a float dtype, or (x_fp8 e4m3 [N, H], scales f32 [N, S]) -> the tensors that travel."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise EPInputError(f"x: expected a tensor or a pair (x_fp8, scales), got a tuple of {len(x)}")
        q = _expect(x[0], "x[0] (FP8 payload)", FP8_DTYPES, (None, None))
        _expect(x[1], "x[1] (scales)", (torch.float32,), (q.shape[0], None))
        return list(x)
    return [_expect(x, "x", FLOAT_DTYPES, (None, None))]


def _event_and_hook(event: EventOverlap | None, async_finish: bool, return_recv_hook: bool) -> tuple:
    """(event, hook) of a low-latency call: the same completion, as DeepEP's event and as its receive hook."""
    return (event if async_finish else None), (event if return_recv_hook else None)


class Buffer:
    """Expert-parallel dispatch and combine among the ranks of ``group`` (the default group when None).

    Rank r owns experts [r*E/R, (r+1)*E/R). num_nvl_bytes, num_rdma_bytes, low_latency_mode and num_qps_per_rank
    are accepted so DeepEP call sites port unchanged; nothing is preallocated.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 1,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("dsv3.ep.Buffer needs torch.distributed to be initialized (init_process_group)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)

    # -----------------------------------------------------------------------------------------------------------------
    # Layout
    # -----------------------------------------------------------------------------------------------------------------

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: object = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """topk_idx int32/int64 [N, k] (-1 = no expert) -> (num_tokens_per_rank int32 [R], None,
        num_tokens_per_expert int32 [E], is_token_in_rank bool [N, R], event). Local: no communication, so the
        event of async_finish=True is complete already (it exists for DeepEP's call shape)."""
        wait_previous(previous_event)
        check_num_experts(num_experts, self.group_size)
        check_topk_idx(topk_idx, num_experts)
        per_rank, per_expert, in_rank = dispatch_layout(topk_idx, num_experts, self.group_size)
        event = EventOverlap() if async_finish else None
        return per_rank, None, per_expert, in_rank, event

    # -----------------------------------------------------------------------------------------------------------------
    # Dispatch
    # -----------------------------------------------------------------------------------------------------------------

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        config: object = None,
        previous_event: object = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send each token once to every rank owning one of its experts.

        x: float [N, H], or (x_fp8 e4m3 [N, H], scales f32 [N, S]). Without a handle: topk_idx int [N, k],
        topk_weights f32 [N, k] and the layout from get_dispatch_layout. Returns (recv_x, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert_list, handle, event) (event: None unless async_finish):

        * recv_x: rows grouped by source rank, each source's tokens in ascending order (a pair for an FP8 x);
        * recv_topk_idx [M, k] (topk_idx's dtype): local expert ids, -1 where the expert lives on another rank;
        * recv_topk_weights f32 [M, k]: the weights, 0 where recv_topk_idx is -1;
        * num_recv_tokens_per_expert_list: rows per local expert, each rounded up to expert_alignment.

        With a handle from an earlier dispatch the same rows move again without exchanging the layout, and only
        recv_x is returned: (recv_x, None, None, None, handle, event).
        """
        wait_previous(previous_event)
        if handle is not None:
            return self._cached_dispatch(x, handle, async_finish)
        problem, send_token, send_counts, parts, num_experts = None, None, [0] * self.group_size, [], 0
        try:
            parts, send_token, send_counts, num_experts = self._check_dispatch(
                x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                expert_alignment,
            )  # fmt: skip
        except EPInputError as error:
            problem = error
        device = parts[0].device if parts else torch.device("cpu")
        recv_counts = self._exchange_status(send_counts, problem, row_bytes(parts), num_experts, device)
        local_experts = num_experts // self.group_size
        if async_finish:
            # The counts per local expert must be known before the rows arrive: every source sends its counts for
            # this rank's experts (a small exchange, after the status one has proven that every rank agrees on E).
            per_expert = self._exchange_equal(num_tokens_per_expert.to(torch.int64).view(self.group_size, -1)).sum(0)
        buf, work = exchange_rows(pack_rows(parts, send_token), send_counts, recv_counts, self.group, async_finish)
        m = sum(recv_counts)
        recv = [torch.empty(m, t.shape[1], dtype=t.dtype, device=device) for t in parts]
        recv_x = (recv[0], recv[1]) if isinstance(x, tuple) else recv[0]
        recv_topk_idx, recv_topk_weights = recv[-2], recv[-1]

        def finish() -> None:
            unpack_into(buf, recv)
            # Global expert ids -> this rank's local ids in place; the weights of other ranks' experts -> 0.
            local = recv_topk_idx - self.rank * local_experts
            mine = (recv_topk_idx >= 0) & (local >= 0) & (local < local_experts)
            recv_topk_idx.copy_(torch.where(mine, local, torch.full_like(local, -1)))
            recv_topk_weights.copy_(torch.where(mine, recv_topk_weights, torch.zeros_like(recv_topk_weights)))

        if not async_finish:
            finish()
            per_expert = torch.bincount(recv_topk_idx[recv_topk_idx >= 0].long(), minlength=local_experts)
        per_expert = (per_expert + expert_alignment - 1) // expert_alignment * expert_alignment
        handle = DispatchHandle(send_token, send_counts, recv_counts, parts[0].shape[0])
        event = EventOverlap(work, finish) if async_finish else None
        return recv_x, recv_topk_idx, recv_topk_weights, per_expert.tolist(), handle, event

    def _check_dispatch(
        self, x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, alignment
    ):
        """Validate a non-cached dispatch; returns (tensors to send, send_token, send_counts, num_experts)."""
        r = self.group_size
        parts = _payload(x)
        n = parts[0].shape[0]
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
            raise EPInputError(f"expert_alignment: expected a positive int, got {alignment!r}")
        per_expert = _expect(num_tokens_per_expert, "num_tokens_per_expert", INDEX_DTYPES, (None,))
        try:
            num_experts = check_num_experts(per_expert.shape[0], r)
        except ValueError as error:
            raise EPInputError(f"num_tokens_per_expert: {error}") from None
        topk_idx = _expect(topk_idx, "topk_idx", INDEX_DTYPES, (n, None))
        try:
            check_topk_idx(topk_idx, num_experts)
        except ValueError as error:
            raise EPInputError(str(error)) from None
        _expect(topk_weights, "topk_weights", (torch.float32,), tuple(topk_idx.shape))
        in_rank = _expect(is_token_in_rank, "is_token_in_rank", (torch.bool,), (n, r))
        per_rank = _expect(num_tokens_per_rank, "num_tokens_per_rank", INDEX_DTYPES, (r,))
        # Destination-major order: (rank, token) pairs sorted by rank, then token.
        send_token = in_rank.t().nonzero()[:, 1]
        send_counts = in_rank.sum(0).tolist()
        if per_rank.tolist() != send_counts:
            raise EPInputError(f"num_tokens_per_rank {per_rank.tolist()} disagrees with is_token_in_rank {send_counts}")
        return [*parts, topk_idx, topk_weights], send_token, send_counts, num_experts

    def _exchange_status(self, send_counts, problem, width, num_experts, device) -> list[int]:
        """Every rank learns the rows it will receive, and whether any rank's input is bad; raises on every rank."""
        r = self.group_size
        status = torch.tensor([[c, problem is not None, width, num_experts] for c in send_counts], dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        status = status.to(device)
        received = torch.empty_like(status)
        dist.all_to_all_single(received, status, group=self.group)
        received = received.cpu()
        bad = [src for src in range(r) if received[src, 1]]
        if problem is not None:
            raise problem
        if bad:
            raise EPInputError(f"dispatch aborted: rank(s) {bad} of the group passed invalid input")
        widths, experts = received[:, 2].tolist(), received[:, 3].tolist()
        if len(set(widths)) > 1 or len(set(experts)) > 1:
            raise EPInputError(f"dispatch aborted: ranks disagree on row bytes {widths} or num_experts {experts}")
        return received[:, 0].tolist()

    def _exchange_equal(self, send: torch.Tensor) -> torch.Tensor:
        """A small all_to_all of equal int64 blocks (on the GPU when the group is NCCL's), returned on the host."""
        if dist.get_backend(self.group) == "nccl":
            send = send.to(torch.device("cuda", torch.cuda.current_device()))
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send.contiguous(), group=self.group)
        return received.cpu()

    def _cached_dispatch(self, x, handle: DispatchHandle, async_finish: bool):
        if not isinstance(handle, DispatchHandle):
            raise EPInputError(f"handle: expected a DispatchHandle from dispatch, got {type(handle).__name__}")
        parts = _payload(x)
        if parts[0].shape[0] != handle.num_tokens:
            raise EPInputError(f"x: the handle is for {handle.num_tokens} tokens, got {parts[0].shape[0]}")
        buf, work = exchange_rows(
            pack_rows(parts, handle.send_token), handle.send_counts, handle.recv_counts, self.group, async_finish
        )
        like = [(t.dtype, t.shape[1]) for t in parts]
        if not async_finish:
            recv = unpack_rows(buf, like)
            return (tuple(recv) if isinstance(x, tuple) else recv[0]), None, None, None, handle, None
        m = handle.num_recv_tokens
        recv = [torch.empty(m, cols, dtype=dtype, device=buf.device) for dtype, cols in like]
        recv_x = (recv[0], recv[1]) if isinstance(x, tuple) else recv[0]
        return recv_x, None, None, None, handle, EventOverlap(work, lambda: unpack_into(buf, recv))

    # -----------------------------------------------------------------------------------------------------------------
    # Combine
    # -----------------------------------------------------------------------------------------------------------------

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        config: object = None,
        previous_event: object = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """Send each received row back to its source token and add the copies up.

        x: float [M, H], rows in dispatch's receive order; topk_weights: optional f32 [M, k]. Returns
        (combined_x [N, H] in x's dtype, combined_topk_weights f32 [N, k] or None, event): per token, the sum of the
        rows (and weights) sent back by every rank it reached, added in fp32 in rank order from +0 and rounded once;
        a token that reached no rank gets zeros.
        """
        wait_previous(previous_event)
        if not isinstance(handle, DispatchHandle):
            raise EPInputError(f"handle: expected the DispatchHandle of a dispatch, got {type(handle).__name__}")
        m = handle.num_recv_tokens
        parts = [_expect(x, "x", FLOAT_DTYPES, (m, None))]
        if topk_weights is not None:
            parts.append(_expect(topk_weights, "topk_weights", (torch.float32,), (m, None)))
        buf, work = exchange_rows(pack_rows(parts), handle.recv_counts, handle.send_counts, self.group, async_finish)
        n = handle.num_tokens
        combined_x = torch.empty(n, x.shape[1], dtype=x.dtype, device=x.device)
        combined_w = torch.empty(n, parts[-1].shape[1], device=x.device) if topk_weights is not None else None

        def finish() -> None:
            # Rows come back grouped by the rank that held them, and a rank returns each token at most once: the
            # kernel adds every token's copies in fp32 in rank order from +0, straight from the received bytes.
            offsets = column_offsets([(t.dtype, t.shape[1]) for t in parts])
            for t, out, offset in zip(parts, (combined_x, combined_w), offsets, strict=False):
                out.copy_(combine_reduce(buf, t.dtype, t.shape[1], handle.send_token, handle.send_counts, n, offset))

        if async_finish:
            return combined_x, combined_w, EventOverlap(work, finish)
        finish()
        return combined_x, combined_w, None

    # -----------------------------------------------------------------------------------------------------------------
    # Low latency (decode)
    # -----------------------------------------------------------------------------------------------------------------

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool = True,
        round_scale: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """Dispatch into the masked layout of a grouped GEMM, with fixed-size exchanges (see dsv3.ep.low_latency).

        x: bf16/fp16/fp32 [N, H] with N <= T = num_max_dispatch_tokens_per_rank (the same T on every rank);
        topk_idx int [N, k], -1 = no expert, distinct experts per token. Returns (recv_x, recv_count, handle, event,
        hook), event with async_finish and hook with return_recv_hook (else None). recv_x is (e4m3 [L, T*R, H],
        scales f32 [L, T*R, H/128]) with use_fp8 (H a multiple of 128; power-of-two scales with round_scale;
        contiguous, not DeepEP's column-major scales) and x's dtype [L, T*R, H] without; local expert e's
        recv_count[e] (int32 [L]) rows come first in its slab, by source rank then token; the rest are unspecified. Too
        many tokens or an expert id out of range on any rank raises ValueError on every rank (at the wait when
        asynchronous) on the CPU. On a GPU nothing reads device data on the host, so the call can be captured in a
        CUDA graph: an id out of range takes no expert and handle.errors (int32 [1]) counts the ranks that sent bad
        input; too many tokens still raises on the rank that has them, after taking part in the exchange.
        """
        _expect(x, "x", FLOAT_DTYPES, (None, None))
        _expect(topk_idx, "topk_idx", INDEX_DTYPES, (x.shape[0], None))
        if isinstance(num_max_dispatch_tokens_per_rank, bool) or not isinstance(num_max_dispatch_tokens_per_rank, int):
            raise EPInputError(
                f"num_max_dispatch_tokens_per_rank: expected an int, got {num_max_dispatch_tokens_per_rank!r}"
            )
        if num_max_dispatch_tokens_per_rank < 1:
            raise EPInputError(
                f"num_max_dispatch_tokens_per_rank: expected >= 1, got {num_max_dispatch_tokens_per_rank}"
            )
        if use_fp8 and x.shape[1] % 128:
            raise EPInputError(f"x: hidden size {x.shape[1]} is not a multiple of 128 (use_fp8=True)")
        recv_x, recv_count, handle, event = low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, self.group,
            async_finish or return_recv_hook,
        )  # fmt: skip
        return recv_x, recv_count, handle, *_event_and_hook(event, async_finish, return_recv_hook)

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """x [L, T*R, H] (expert outputs in low_latency_dispatch's layout) -> (combined_x [N, H] in x's dtype, event,
        hook): combined_x[t] = sum over slots k with an expert of topk_weights[t, k] * that expert's output row,
        added in fp32 in slot order from +0 and rounded once. topk_idx must be the one given to the dispatch."""
        if not isinstance(handle, LowLatencyHandle):
            raise EPInputError(f"handle: expected a LowLatencyHandle, got {type(handle).__name__}")
        local = handle.num_experts // self.group_size
        rows = handle.num_max_dispatch_tokens_per_rank * self.group_size
        _expect(x, "x", FLOAT_DTYPES, (local, rows, handle.hidden))
        _expect(topk_idx, "topk_idx", INDEX_DTYPES, tuple(handle.topk_idx.shape))
        _expect(topk_weights, "topk_weights", (torch.float32,), tuple(handle.topk_idx.shape))
        combined, event = low_latency_combine(
            x, topk_idx, topk_weights, handle, self.group, async_finish or return_recv_hook
        )
        return combined, *_event_and_hook(event, async_finish, return_recv_hook)
