"""Pure-PyTorch gated linear attention: the chunked parallel form and the token-by-token recurrence.

Layout [B, T, H, D]. Queries may have more heads than keys/values (GQA): query head h reads the
state of key/value head h // (H // Hk), so repeated keys/values are never materialized.
With log-decay g (<= 0, per key channel [B,T,Hk,K], or one per head [B,T,Hk] as in Mamba-2) the
state evolves as S_t = exp(g_t) * S_{t-1} + k_t v_t^T; without g it is plain causal linear attention.
Packed variable-length batches: B = 1 and `cu_seqlens` [N+1] marks where each sequence starts.
Normalizers are the caller's business (append a ones column to v to get the denominator in the same
pass). All maths in fp32; states are fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grouped(q: Tensor, num_kv_heads: int) -> Tensor:
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def lagged(x: Tensor, n: int) -> Tensor:
    """x [B,T,...] with position t holding token t - n's row, zeros before the first: what a key offset reads."""
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (n, 0))[:, : x.shape[1]]


def with_ones(v: Tensor) -> Tensor:
    """v [..., V] with a last column of ones [..., V+1]: the output's last column is then the normalizer."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)


def check_initial_state(initial_state: Tensor | None, k: Tensor, v: Tensor, cu_seqlens: Tensor | None) -> None:
    """A one-line error for an initial state that is not [N, Hk, K, V] (N: rows, or packed sequences)."""
    want = (k.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1, k.shape[2], k.shape[3], v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(f"initial_state must be [N, Hk, K, V] = {want} (N: rows, or packed sequences), "
                         f"got {tuple(initial_state.shape)}")


def chunk_gla_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    initial_state: Tensor | None = None,
    exclusive: bool = False,
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
    key_offset: int = 0,
    ones: bool = False,
) -> tuple[Tensor, Tensor]:
    """Chunked causal (gated) linear attention.

    q [B,T,H,K], k [B,T,Hk,K], v [B,T,Hk,V], g [B,T,Hk,K] or [B,T,Hk] log-decay or None,
    initial_state [N,Hk,K,V] (the state before the first token; N = B, or the number of sequences).
    Inclusive: o_i = q_i . S_i.  Exclusive: o_i = q_i . S_{i-1} (token i does not see itself).
    key_offset (g None): position i's key and value are token i - key_offset's (zero before the sequence's start).
    ones: v gets a last column of ones (o's last column is then the normalizer q_i . sum of the decayed keys).
    Returns o [B,T,H,V(+1)] (dtype of v) and the final states S_T [N,Hk,K,V(+1)] (fp32).
    """
    if ones:
        v = with_ones(v)
    check_initial_state(initial_state, k, v, cu_seqlens)
    if key_offset and g is not None:
        raise ValueError("key_offset needs g None (the decays would have to be offset too)")
    if g is not None and g.dim() == 3:  # one decay per head: the same for every key channel
        g = g[..., None].expand(k.shape)
    if cu_seqlens is not None:  # each packed sequence on its own, from its own initial state
        bounds = cu_seqlens.tolist()
        runs = [
            chunk_gla_ref(
                q[:, s:e], k[:, s:e], v[:, s:e], None if g is None else g[:, s:e], exclusive=exclusive,
                initial_state=None if initial_state is None else initial_state[n : n + 1], chunk_size=chunk_size,
                key_offset=key_offset,
            )
            for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]
        return torch.cat([o for o, _ in runs], 1), torch.cat([s for _, s in runs], 0)
    if key_offset:
        k, v = lagged(k, key_offset), lagged(v, key_offset)
    b, t, h, kd = q.shape
    hk, vd = k.shape[2], v.shape[-1]
    out_dtype = v.dtype
    qf, kf, vf = _grouped(q.float(), hk), k.float(), v.float()
    gf = g.float() if g is not None else None
    state = (
        initial_state.float()
        if initial_state is not None
        else q.new_zeros(b, hk, kd, vd, dtype=torch.float32)
    )
    diag = -1 if exclusive else 0
    outs = []
    for s in range(0, t, chunk_size):
        e = min(s + chunk_size, t)
        c = e - s
        qc, kc, vc = qf[:, s:e], kf[:, s:e], vf[:, s:e]
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(diag)
        if gf is None:
            o_inter = torch.einsum("bihgk,bhkv->bihgv", qc, state)
            a = torch.einsum("bihgk,bjhk->bihgj", qc, kc)
            a = a * causal[None, :, None, None, :]
            state = state + torch.einsum("bjhk,bjhv->bhkv", kc, vc)
        else:
            gc = gf[:, s:e]
            cum = gc.cumsum(1)  # decay from the chunk start (exclusive of it) to token i, inclusive
            cum_q = cum - gc if exclusive else cum
            o_inter = torch.einsum("bihgk,bhkv->bihgv", qc * cum_q.exp()[:, :, :, None], state)
            rel = cum_q[:, :, None] - cum[:, None, :]  # [B,C,C,Hk,K]: log decay from j to i
            rel = rel.masked_fill(~causal[None, :, :, None, None], float("-inf"))
            a = torch.einsum("bihgk,bjhk,bijhk->bihgj", qc, kc, rel.exp())
            last = cum[:, -1]  # [B,Hk,K]
            k_to_end = kc * (last[:, None] - cum).exp()
            state = state * last.exp()[..., None] + torch.einsum("bjhk,bjhv->bhkv", k_to_end, vc)
        o_intra = torch.einsum("bihgj,bjhv->bihgv", a, vc)
        outs.append(o_inter + o_intra)
    o = torch.cat(outs, 1) if outs else q.new_zeros(b, 0, hk, h // hk, vd, dtype=torch.float32)
    return o.reshape(b, t, h, vd).to(out_dtype), state


def gla_step_ref(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One decode step (inclusive): q [B,H,K], k [B,Hk,K], v [B,Hk,V], g [B,Hk,K] or [B,Hk] or None, state [B,Hk,K,V]."""
    b, h, kd = q.shape
    hk = k.shape[1]
    state = state.float()
    if g is not None:
        g = g[..., None] if g.dim() == 2 else g  # per head: the same decay for every channel
        state = state * g.float().exp()[..., None]
    state = state + k.float()[..., None] * v.float()[..., None, :]
    o = torch.einsum("bhgk,bhkv->bhgv", q.float().reshape(b, hk, h // hk, kd), state)
    return o.reshape(b, h, -1).to(v.dtype), state


def recurrent_gla_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The same (inclusive) maths as `chunk_gla_ref`, one token at a time: the ground truth for tests."""
    b, t, h, kd = q.shape
    hk, vd = k.shape[2], v.shape[-1]
    state = initial_state if initial_state is not None else q.new_zeros(b, hk, kd, vd, dtype=torch.float32)
    outs = []
    for i in range(t):
        o, state = gla_step_ref(q[:, i], k[:, i], v[:, i], None if g is None else g[:, i], state)
        outs.append(o)
    return torch.stack(outs, 1), state
