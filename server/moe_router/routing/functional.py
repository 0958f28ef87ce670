"""Routing math as small typed functions that the routers call in order.

Vocabulary (as Megatron's moe_utils): ``logits`` are raw gate outputs [T, E];
``scores`` are logits after softmax/sigmoid; ``probs`` are the per-expert
probabilities the aux loss uses; ``indices``/``weights`` are the [T, k] selection.
All functions are pure: no I/O, no globals, vectorised over tokens and experts.
Token dropping (capacity) has its own module, :mod:`moe_router.routing.capacity`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_router.routing.router_config import ScoringFunction

__all__ = [
    "GATE_MAX_BLOCK_ROWS",
    "batch_invariant_linear",
    "batch_invariant_elementwise",
    "gate_block_rows",
    "gate_columns",
    "score",
    "topk_lowest_index",
    "top_k_mask",
    "renormalize",
    "compute_aux_loss",
    "aux_loss_from_counts",
    "compute_seq_aux_loss",
    "compute_z_loss",
    "tokens_per_expert",
    "load_balance_score",
    "pad_selection",
]


_ALIGNMENT = 64  # bytes; torch's CPU allocator aligns every tensor this way

GATE_MAX_BLOCK_ROWS = 256
"""Largest gate block: calls of more rows are cut into blocks of this many."""


def gate_block_rows(num_rows: int) -> int:
    """Rows per gate block for a call of ``num_rows`` tokens: the next power of two,
    at most :data:`GATE_MAX_BLOCK_ROWS` (so padding never doubles a call past 256 rows)."""
    return min(GATE_MAX_BLOCK_ROWS, 1 << max(num_rows - 1, 0).bit_length())


def gate_columns(weight: torch.Tensor) -> torch.Tensor:
    """weight [E, D] as the fp32 columns [1, D, E] :func:`batch_invariant_linear` multiplies
    by (a view of it when it is fp32)."""
    if weight.dtype != torch.float32:
        weight = weight.float()
    return weight.t().unsqueeze(0)


def batch_invariant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_rows: int | None = None,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gate matmul x [T, D] @ weight[E, D]^T whose rows do not depend on the other rows.

    A plain ``F.linear`` picks its BLAS kernel and blocking by the number of rows, so a
    token's logits change in the last bits when it is routed together with other
    tokens (measured on this project's CPUs: a few rows in every mixed batch). Here the
    rows are cut into blocks of ``block_rows`` (default :func:`gate_block_rows` of T;
    the tail zero-padded) multiplied as one batched matmul of identical
    [block_rows, D] problems. Measured here over 608 mixes of shapes, sizes and batch
    mates: with power-of-two blocks a call's rows come out bit-identical whether its
    blocks are multiplied alone or among other calls' blocks of the same size (odd
    block sizes were not). ``RouterBase.route_many`` relies on that.

    The BLAS kernel's result also depends on where a block starts in memory (a block
    starting 4 or 8 bytes past a 16-byte boundary came out different in the last bits
    on this project's CPUs), so every block starts on a 64-byte boundary: when
    ``block_rows * D`` elements are not a multiple of 64 bytes (small blocks of an odd
    D) the blocks are laid out with a padded batch stride. For T <= 256 the cost is one
    [B, D] gemm with B < 2T; larger calls match ``F.linear`` within noise.
    ``columns``: :func:`gate_columns` of ``weight`` when the caller keeps them.
    Returns [T, E].
    """
    num_rows, dim = x.shape
    if block_rows is None:
        block_rows = gate_block_rows(num_rows)
    blocks = _aligned_blocks(x, block_rows)
    w_t = gate_columns(weight) if columns is None else columns
    if blocks.shape[0] > 1:
        w_t = w_t.expand(blocks.shape[0], dim, weight.shape[0])
    out = torch.bmm(blocks, w_t).reshape(-1, weight.shape[0])
    if out.shape[0] != num_rows:
        out = out[:num_rows]
    if bias is not None:
        out = out + bias
    return out


_ELEMENTWISE_ALIGN = 64  # floats: a multiple of every CPU vector width times its unroll
_ELEMENTWISE_BLOCK = 32768  # torch's CPU grain size: a smaller op never splits across threads


def batch_invariant_elementwise(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn`` (sigmoid, tanh, pow, ...) on x [T, E] whose rows
    do not depend on the other rows.

    On CPU torch computes such functions with SIMD code over the flat buffer and the last
    few elements (the tail) with scalar code, whose results differ in the last bit; and
    splits big tensors across threads at arbitrary offsets. So a token's sigmoid scores
    changed with the number of tokens routed with it (measured here: 6e-8 for E = 16, 60,
    160 in mixed batches; never for E = 256). Here each row is padded to a multiple of 64
    floats and the op runs on blocks of at most 32768 floats: every element then goes
    through the same SIMD code whatever its batch mates (checked with 2 and 16 threads).
    Cost measured here (2 shared cores) for [8, 60]: 14 us against 2 us for the bare
    sigmoid (the pad and its copy); for [8, 256], where nothing is padded, 3.7 against
    3.0. GPUs compute every element the same way; there ``fn(x)`` runs as is.
    Returns [T, E].
    """
    if x.device.type != "cpu" or x.dim() != 2:
        return fn(x)
    rows, width = x.shape
    pad = (-width) % _ELEMENTWISE_ALIGN
    padded = torch.nn.functional.pad(x, (0, pad)) if pad else x.contiguous()
    per_block = max(1, _ELEMENTWISE_BLOCK // (width + pad))
    if rows <= per_block:
        out = fn(padded)
    else:
        out = torch.cat([fn(padded[i : i + per_block]) for i in range(0, rows, per_block)])
    return out.narrow(1, 0, width) if pad else out


def _aligned_blocks(x: torch.Tensor, block_rows: int) -> torch.Tensor:
    """x [T, D] as [ceil(T / block_rows), block_rows, D] blocks, each starting on a
    64-byte boundary, the last one zero-padded; a view of x when it already is that."""
    num_rows, dim = x.shape
    count = max(1, -(-num_rows // block_rows))
    per_line = max(1, _ALIGNMENT // x.element_size())
    stride = -(-(block_rows * dim) // per_line) * per_line
    if (
        stride == block_rows * dim
        and count * block_rows == num_rows
        and x.is_contiguous()
        and x.data_ptr() % _ALIGNMENT == 0
    ):
        return x.view(count, block_rows, dim)
    # A fresh buffer (torch's allocator aligns it); a received message can start anywhere.
    # Only what x does not fill is zeroed: zeroing all of it first cost as much as the
    # copy (DeepSeek-V3, 256 x 7168 fp32 from a gRPC message: 0.63 ms of 8.2).
    buffer = x.new_empty(count * stride)
    if stride > block_rows * dim:  # the gaps between blocks (never read by the matmul)
        buffer.view(count, stride)[:, block_rows * dim :].zero_()
    blocks = buffer.as_strided((count, block_rows, dim), (stride, dim, 1))
    full = num_rows // block_rows
    if full:
        blocks[:full].copy_(x[: full * block_rows].reshape(full, block_rows, dim))
    if full < count:
        tail = num_rows - full * block_rows
        blocks[full, :tail].copy_(x[full * block_rows :])
        blocks[full, tail:].zero_()
    return blocks


def score(logits: torch.Tensor, scoring: ScoringFunction) -> torch.Tensor:
    """Scores [T, E] in fp32 from logits [T, E]: softmax over experts, or per expert
    sigmoid(x) or sqrt(softplus(x)) (DeepSeek-V4's ``sqrtsoftplus``); the per-expert ones
    through :func:`batch_invariant_elementwise`."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    if scoring is ScoringFunction.SOFTMAX:
        return torch.softmax(logits, dim=-1)
    if scoring is ScoringFunction.SQRTSOFTPLUS:
        return batch_invariant_elementwise(torch.nn.functional.softplus, logits).sqrt()
    return batch_invariant_elementwise(torch.sigmoid, logits)


_SORT_WIDTH = 32  # rows at most this wide: the sort is as cheap as top-k and its check ...
_SORT_ROWS = 1024  # ... until this many rows
_SORT_ELEMENTS = 1024  # below this many values the sort is never dearer


def topk_lowest_index(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with ties going to the lower index, on CPU and CUDA alike.

    torch.topk leaves the order of equal values unspecified; a stable descending sort
    keeps equal values in index order, so the lower index wins every tie. Sorting many
    or wide rows costs far more than a top-k (measured here for [256, 128], k = 8:
    1.09 ms against 0.08 ms), so large inputs take the top k + 1 first: when no two of
    those values are equal (real hidden states, nearly always) the top-k is the sort's
    answer, and only a tie falls back to the sort. Small inputs (under 1024 values, or
    rows of at most 32 values and fewer than 1024 rows) sort: there one sort costs less
    than a top-k and its check (measured: [1, 256] 10 against 12.5 us; [256, 8] 17 against
    20 us). Returns (values [..., k], indices [..., k] int64), largest first.
    """
    width = values.shape[-1]
    size = values.numel()
    if k < width and size >= _SORT_ELEMENTS and (
        width > _SORT_WIDTH or size >= _SORT_ROWS * width
    ):
        top_values, top_indices = torch.topk(values, k + 1, dim=-1)
        if not bool((top_values[..., 1:] == top_values[..., :-1]).any()):
            return top_values[..., :k], top_indices[..., :k]
    sorted_values, sorted_indices = torch.sort(values, dim=-1, descending=True, stable=True)
    return sorted_values[..., :k], sorted_indices[..., :k]


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Which entries a top-k along the last dim picks, ties to the lower index: bool [..., E].

    The same set as :func:`topk_lowest_index` without sorting every row: the k-th
    largest value v per row (``torch.topk``), every entry above v, and the lowest-index
    entries equal to v that are still needed. O(E) per row after the top-k.
    """
    kth = torch.topk(values, k, dim=-1).values[..., -1:]
    above = values > kth
    needed = k - above.sum(dim=-1, keepdim=True)
    equal = values == kth
    return above | (equal & (torch.cumsum(equal, dim=-1) <= needed))


def renormalize(weights: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """Rescale [T, k] weights so each row sums to 1 (HF ``norm_topk_prob``; DeepSeek adds eps)."""
    return weights / (weights.sum(dim=-1, keepdim=True) + eps)


def tokens_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [E] int64 from indices [..., k]; -1 padding is ignored."""
    flat = indices.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=num_experts)[:num_experts]


def compute_aux_loss(probs: torch.Tensor, indices: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss  L = E * sum_i f_i * P_i.

    probs: [T, E] routing probabilities; indices: [T, k] chosen experts (-1 ignored).
    f_i = count_i / (T * k) is the fraction of assignments to expert i and
    P_i = mean_t probs[t, i] its mean probability, so uniform routing gives exactly 1
    (Fedus et al. 2021, eq. 4). transformers' ``load_balancing_loss_func`` divides the
    counts by T only (f_i summing to k), so its value is k times this one.
    """
    return aux_loss_from_counts(probs, tokens_per_expert(indices, probs.shape[1]), top_k)


def aux_loss_from_counts(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """:func:`compute_aux_loss` from per-expert assignment counts [E] already at hand."""
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.new_zeros(())
    fraction = counts.to(probs.dtype) / (num_tokens * top_k)
    mean_prob = probs.float().mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def compute_seq_aux_loss(
    probs: torch.Tensor, indices: torch.Tensor, top_k: int, seq_len: int
) -> torch.Tensor:
    """Per-sequence variant (DeepSeek-V3 sequence-wise balance loss): the aux loss of each
    sequence of ``seq_len`` consecutive tokens, averaged over sequences.

    probs: [B*S, E]; indices: [B*S, k].
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.new_zeros(())
    if num_tokens % seq_len:
        raise ValueError(f"seq_len {seq_len} does not divide the {num_tokens} tokens")
    batch = num_tokens // seq_len
    idx = indices.reshape(batch, -1)
    valid = idx >= 0
    one_hot = torch.zeros(batch, num_experts + 1, dtype=probs.dtype, device=probs.device)
    one_hot.scatter_add_(1, torch.where(valid, idx, num_experts), valid.to(probs.dtype))
    fraction = one_hot[:, :num_experts] / (seq_len * top_k)
    mean_prob = probs.float().reshape(batch, seq_len, num_experts).mean(dim=1)
    return (num_experts * (fraction * mean_prob).sum(dim=1)).mean()


def compute_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def load_balance_score(counts: torch.Tensor) -> float:
    """Jain's fairness index of per-expert load, (sum c)^2 / (E * sum c^2).

    1 when every expert gets the same load, 1/E when one expert takes everything,
    independent of the total; 1 when nothing has been routed yet.
    """
    c = counts.double()
    total_sq = float(torch.sum(c * c))
    if total_sq == 0.0:
        return 1.0
    return float(c.sum() ** 2 / (c.numel() * total_sq))


def pad_selection(
    indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's real slots (index >= 0) to the front, pad with -1 / 0.

    Returns (indices int32 [T, k], weights float32 [T, k], num_experts_per_token int32 [T]).
    """
    valid = indices >= 0
    # Stable sort on "is padding" brings real slots forward without reordering them.
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    indices = indices.gather(-1, order)
    weights = weights.gather(-1, order)
    valid = valid.gather(-1, order)
    return (
        torch.where(valid, indices, -1).to(torch.int32),
        torch.where(valid, weights, 0.0).to(torch.float32),
        valid.sum(dim=-1).to(torch.int32),
    )
