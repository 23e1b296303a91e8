"""Pure-PyTorch sliding-window softmax + linear attention hybrid (the LoLCATs / Lizard layer).

Query i attends with exact softmax to the last W keys (i-W, i] and with feature-map linear
attention, optionally gated by a per-channel decay, to every earlier key j <= i-W. Both parts share
one normalizer, weighted per head by `mix` (weight of the window part, in (0, 1)):

    y_i = (mix * sum_win a_ij v_j + (1-mix) * sum_lin phi(q_i).(decay_ij * phi(k_j)) v_j)
          / (mix * sum_win a_ij     + (1-mix) * sum_lin phi(q_i).(decay_ij * phi(k_j)))

with a_ij = exp(s_ij - max_win s_i) (LoLCATs' max-shifted window scores) and decay_ij =
exp(G_i - G_j), G the running sum of log-decays. With W >= sequence length the linear part is
empty and y is exactly softmax attention. Layout [B, T, H, D]; maths in fp32.

The recurrent state after t tokens: `S` [B,Hk,F,V+1], the linear memory of every token that left
the window (last column: the normalizer), and the last W-1 tokens (`k`, `v`, `fk`, `g`, `valid`) in a
ring buffer: slot `pos % (W-1)` (`pos` [B], a device tensor) holds the oldest token. A decode step
writes its token into that slot and advances `pos`, so every state tensor keeps its address (CUDA
graphs); the parallel form reads the ring back in token order and leaves it in order (pos 0).

Attention sinks (`sinks` > 0, StreamingLLM's observation that softmax heads park attention on the
first tokens): the first `sinks` real tokens of each sequence stay visible to the window softmax
after they leave the window, under the same max shift, and never enter the linear memory. The state
then also holds `sink_k`, `sink_v` [B,NS,Hk,*], their positions `sink_pos` [B,NS] (NO_SINK: empty
slot) and `n` [B], the position of the next token; a query at position t sees a sink at position
p < t - W + 1 (nearer ones are in its window).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..gla.naive import chunk_gla_ref, lagged, with_ones

EPS = 1e-12  # keeps 0/0 (rows with no visible key) finite; real normalizers are far larger
NO_SINK = 2**62  # sink_pos of an empty sink slot: never far enough behind a query to be seen
RING = ("k", "v", "fk", "g", "valid")  # the state's window ring buffers


def empty_state(
    batch: int, window: int, num_kv_heads: int, head_dim: int, value_dim: int,
    feature_dim: int, gated: bool, device: torch.device, sinks: int = 0, dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """State before the first token: empty memory, W-1 invalid (padding) window slots, ring position 0
    (and `sinks` empty sink slots). The memory and log-decays are fp32; the window's keys, values and
    key features are kept in `dtype`, the model's (they come from its projections: no rounding)."""
    p = window - 1
    z, zt = dict(dtype=torch.float32, device=device), dict(dtype=dtype, device=device)
    state = {
        "S": torch.zeros(batch, num_kv_heads, feature_dim, value_dim + 1, **z),
        "k": torch.zeros(batch, p, num_kv_heads, head_dim, **zt),
        "v": torch.zeros(batch, p, num_kv_heads, value_dim, **zt),
        "fk": torch.zeros(batch, p, num_kv_heads, feature_dim, **zt),
        "valid": torch.zeros(batch, p, dtype=torch.bool, device=device),
        "pos": torch.zeros(batch, dtype=torch.long, device=device),
        "tick": torch.zeros(batch, num_kv_heads + 1, dtype=torch.int32, device=device),  # the Triton step's tickets: row, then each KV head
    }
    if gated:
        state["g"] = torch.zeros(batch, p, num_kv_heads, feature_dim, **z)
    if sinks:
        state["sink_k"] = torch.zeros(batch, sinks, num_kv_heads, head_dim, **zt)
        state["sink_v"] = torch.zeros(batch, sinks, num_kv_heads, value_dim, **zt)
        state["sink_pos"] = torch.full((batch, sinks), NO_SINK, dtype=torch.long, device=device)
        state["n"] = torch.zeros(batch, dtype=torch.long, device=device)
    return state


def _scores(q: Tensor, k: Tensor, scale: float, softcap: float | None) -> Tensor:
    s = torch.einsum("bihgd,bjhd->bihgj", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return s


def _masked_exp(s: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """exp(s - m) where allowed (0 elsewhere) and the row max m (0 for rows with no visible key)."""
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (s - m).exp(), m[..., 0]


def visible(query_seg: Tensor, key_seg: Tensor) -> Tensor:
    """Which keys a query may see, from segment ids (0: padding; bools are segment 1): a valid key of
    the query's own sequence (a padding query sees every valid key, as without segments)."""
    return (key_seg != 0) & ((query_seg == 0) | (key_seg == query_seg))


def window_softmax_ref(
    q: Tensor, ext_k: Tensor, ext_v: Tensor, ext_valid: Tensor, window: int,
    scale: float, softcap: float | None = None, block: int = 64, return_max: bool = False,
) -> tuple[Tensor, ...]:
    """Banded softmax numerator [B,T,H,V] and normalizer [B,T,H] with max-shifted scores (and,
    with `return_max`, the shift m [B,T,H], the row max, 0 for rows with no visible key).

    ext_* hold W-1 context tokens followed by the T tokens of q; query t sees ext tokens [t, t+W-1]
    that `visible` allows, ext_valid [B,W-1+T] holding validity (bool) or segment ids (packed sequences).
    Queries go in blocks of `block`, all blocks at once: block n reads the ext tokens
    [n*block, n*block + block + W - 1) (an unfold, no copy), so the work is one batch of small
    matrix products instead of a loop of launches.
    """
    b, t, h, d = q.shape
    hk = ext_k.shape[2]
    nb = -(-t // block)
    span, pad = block + window - 1, nb * block - t
    def blocks(x: Tensor) -> Tensor:  # [B, W-1+T, ...] -> [B*nb, span, ...], block n = tokens from n*block
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)).unfold(1, span, block)
        return x.movedim(-1, 2).reshape(b * nb, span, *x.shape[2:-1])

    qb = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, pad)).reshape(b * nb, block, hk, h // hk, d)
    i = torch.arange(block, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    band = (j >= i) & (j <= i + window - 1)  # query i of a block sees its tokens [i, i+W-1]
    seg = ext_valid.long()
    query_seg = torch.nn.functional.pad(seg[:, window - 1 :], (0, pad)).reshape(b * nb, block)
    allowed = band[None, :, None, None, :] & visible(query_seg[:, :, None, None, None], blocks(seg)[:, None, None, None, :])
    a, m = _masked_exp(_scores(qb, blocks(ext_k), scale, softcap), allowed)
    num = torch.einsum("bihgj,bjhv->bihgv", a, blocks(ext_v)).reshape(b, nb * block, h, -1)[:, :t]
    den = a.sum(-1).reshape(b, nb * block, h)[:, :t]
    return (num, den, m.reshape(b, nb * block, h)[:, :t]) if return_max else (num, den)


def _combine(num_w: Tensor, den_w: Tensor, num_l: Tensor, den_l: Tensor, mix: Tensor) -> Tensor:
    m = mix.float()
    den = m * den_w + (1 - m) * den_l + EPS
    return (m[..., None] * num_w + (1 - m)[..., None] * num_l) / den[..., None]


def window_combine_ref(
    q: Tensor, ext_k: Tensor, ext_v: Tensor, ext_valid: Tensor, num_l: Tensor, den_l: Tensor, mix: Tensor,
    window: int, scale: float, softcap: float | None = None, dtype: torch.dtype = torch.float32,
    sink: dict[str, Tensor] | None = None, sinks: int = 0,
) -> Tensor:
    """The hybrid's output y [B,T,H,V] in `dtype`: the window softmax (`window_softmax_ref`, with the
    sinks of `sink_table` if given) and the linear part (numerator num_l [B,T,H,V], normalizer den_l
    [B,T,H]) under one normalizer, weighted by mix [H]."""
    if sink is None:
        num_w, den_w = window_softmax_ref(q, ext_k, ext_v, ext_valid, window, scale, softcap)
    else:
        num_w, den_w, m = window_softmax_ref(q, ext_k, ext_v, ext_valid, window, scale, softcap, return_max=True)
        num_w, den_w = add_sinks(num_w, den_w, m, q, sink, sinks, window, scale, softcap)
    return _combine(num_w, den_w, num_l.float(), den_l.float(), mix).to(dtype)


def linear_normalizer(
    fq: Tensor, fk: Tensor, z0: Tensor | None, first: Tensor | None = None, key_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """The undecayed linear part's normalizer phi(q_t) . (z0 + sum_{s<t} phi(k_s)) [B,T,H] in phi(q)'s dtype (as the
    scan's ones column gave it; the backward keeps no fp32 copy of phi(q)), and the final sum z [B,Hk,F] in fp32
    (packed: the last sequence's).
    Packed sequences (B = 1): `first` [T], the index of each token's sequence start, where the sum restarts at 0.
    key_offset (not packed): position t's key features are token t - key_offset's (zero before the first token).
    The memory's ones column as a running sum instead of a value column more in the scan (V+1 columns tile badly:
    129 = three 64-wide blocks); on CUDA `normalizer.linear_normalizer_triton` computes it in tiles."""
    b, t, h, f = fq.shape
    hk = fk.shape[2]
    if key_offset:
        if first is not None:
            raise ValueError("packed sequences (first) need no key_offset")
        fk = lagged(fk, key_offset)
    run = fk.to(torch.float32 if first is None else torch.float64).cumsum(1)  # fp64: exact differences below
    excl = lagged(run, 1)  # keys before t
    if first is not None:  # subtract what came before each token's sequence
        excl = excl - excl[:, first]
    if z0 is not None:
        excl = excl + z0[:, None]
    z = excl[:, -1] + fk[:, -1]  # the last token's sequence, through it
    den = torch.einsum("bthgf,bthf->bthg", fq.reshape(b, t, hk, h // hk, f), excl.to(fq.dtype)).reshape(b, t, h)
    return den, z.float()


def hybrid_attn_ref(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, g: Tensor | None, mix: Tensor,
    *, window: int, scale: float, softcap: float | None = None, valid: Tensor | None = None,
    state: dict[str, Tensor] | None = None, chunk_size: int = 64, scan: Callable[..., tuple[Tensor, Tensor]] = chunk_gla_ref,
    combine: Callable[..., Tensor] = window_combine_ref, normalizer: Callable[..., tuple[Tensor, Tensor]] = linear_normalizer,
    cu_seqlens: Tensor | None = None,
    compute_dtype: torch.dtype | None = torch.float32, sinks: int = 0, offsets: bool = False,
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Parallel form over T new tokens, continuing from `state` (None: start of the sequence).

    q [B,T,H,D] and k [B,T,Hk,D] after rotary; v [B,T,Hk,V]; fq [B,T,H,F], fk [B,T,Hk,F];
    g [B,T,Hk,F] log-decay or None; mix [H]; valid [B,T] (False marks padding) or None.
    Returns y [B,T,H,V] (dtype of v) and the state after the T tokens. `scan` computes the linear
    part (signature of `chunk_gla_ref`), `normalizer` its normalizer when undecayed (signature of `linear_normalizer`)
    and `combine` the window part, with the sinks, and the output (signature of `window_combine_ref`). Kernels can stand in
    for the references there. `compute_dtype` is the dtype of what they get (None: q's own, as the
    kernels take it; they accumulate in fp32 either way). `offsets`: the three take `key_offset` (the kernels do), so a
    fresh window (no state, undecayed, not packed) is read from the new tokens in place, W-1 positions on, instead of
    from the empty context's concatenation and its shifted copies.
    Packed sequences (training): B = 1, cu_seqlens [N+1] and no state; each sequence starts afresh
    (no window, memory or sinks across a boundary) and no state is returned.
    """
    b, t, h, d = q.shape
    hk, vd, f = k.shape[2], v.shape[-1], fk.shape[-1]
    group, groups = torch.zeros(b, t, dtype=torch.long, device=q.device), 1  # which sequence a token is in
    if cu_seqlens is not None:
        if b != 1 or state is not None:
            raise ValueError("packed sequences (cu_seqlens) need batch size 1 and no state")
        seg = torch.repeat_interleave(torch.arange(1, len(cu_seqlens), device=q.device), cu_seqlens.diff().to(q.device))
        valid = seg[None] * (1 if valid is None else valid.long())  # segment ids, 0 for padding
        group, groups = seg[None] - 1, len(cu_seqlens) - 1
    lag = window - 1 if offsets and state is None and g is None and cu_seqlens is None else 0
    if state is None:
        state = empty_state(b, window, hk, d, vd, f, g is not None, q.device, sinks, k.dtype)
    elif sinks and state.get("sink_k", k[:, :0]).shape[1] != sinks:
        raise ValueError(f"the state was made for another number of sinks than {sinks}")
    state = token_order(state)
    sink = None
    if sinks:
        real = torch.ones(b, t, dtype=torch.bool, device=q.device) if valid is None else valid != 0
        sink = sink_table(state, k, v, real, group, groups, sinks)
        fk = fk * ~sink["new"][..., None, None]  # a sink never enters the linear memory
    dt = compute_dtype or q.dtype
    # the ext tokens: the W-1 buffered ones and the new ones, or (lag) from W-1 on, the new ones read in place
    ext = window_tokens(k, v, fk, g, valid, dt) if lag else extend_window(state, k, v, fk, g, valid, dt)
    ext_k, ext_v, ext_fk, ext_valid, ext_g = ext["k"], ext["v"], ext["fk"], ext["valid"], ext.get("g")
    # query t's linear keys are ext tokens < t (lag: the same tensors, which the callables read W-1 positions late)
    keys_fk, keys_v = (ext_fk, ext_v) if lag else (ext_fk[:, :t], ext_v[:, :t])
    keys_g = None if ext_g is None else ext_g[:, :t]
    if cu_seqlens is not None:  # query t's linear keys are ext tokens < t: drop those of an earlier sequence
        same = (ext_valid[:, :t] == ext_valid[:, window - 1 :]).float()[..., None, None]
        keys_fk, keys_g = keys_fk * same, None if keys_g is None else keys_g * same

    # Linear part: query t reads the memory after ext token t-1 (every key up to t-W), which the
    # exclusive scan gives; its decay from there to t covers the W ext tokens [t, t+W-1].
    fq = fq.to(dt)
    if ext_g is not None:
        win_decay = window_sums(ext_g, window, t).exp()  # [B,T,Hk,F]
        fq = (fq.reshape(b, t, hk, h // hk, f) * win_decay[:, :, :, None]).reshape(b, t, h, f).to(dt)
    packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    off = {"key_offset": lag} if lag else {}
    if ext_g is None:  # the normalizer is a running sum of the key features: the scan takes the V columns alone
        num_l, mem = scan(fq, keys_fk, keys_v, None, initial_state=None if packed or lag else state["S"][..., :vd],
                          exclusive=True, chunk_size=chunk_size, **packed, **off)
        first = None if cu_seqlens is None else cu_seqlens[:-1].to(q.device)[group[0]]  # each token's sequence start
        den_l, z = normalizer(fq, keys_fk, None if packed or lag else state["S"][..., vd], first, **off)
        mem = None if packed else torch.cat([mem, z[..., None]], -1)
    else:  # decayed: a column of ones beside the values gives the normalizer
        o_l, mem = scan(fq, keys_fk, with_ones(ext_v[:, :t]), keys_g, initial_state=None if packed else state["S"],
                        exclusive=True, chunk_size=chunk_size, **packed)
        num_l, den_l = o_l[..., :vd], o_l[..., vd]
    y = combine(q, ext_k, ext_v, ext_valid, num_l, den_l, mix, window, scale, softcap, dtype=v.dtype, sink=sink, sinks=sinks,
                **off)
    if packed:
        return y, None
    if lag:  # the window after the new tokens: the empty context's rest, then the newest of them
        ext = {name: torch.cat([state[name][:, t:].to(x.dtype), x[:, max(0, t - lag) :]], 1) for name, x in ext.items()}
    out = shift_window(ext, mem, 0 if lag else t, state)
    if sink is not None:
        out.update(sink_k=sink["k"][:, :sinks], sink_v=sink["v"][:, :sinks], sink_pos=sink["pos"][:, :sinks], n=state["n"] + t)
    return y, out


def sink_table(
    state: dict[str, Tensor], k: Tensor, v: Tensor, real: Tensor, group: Tensor, groups: int, sinks: int,
) -> dict[str, Tensor]:
    """The sinks after T new tokens: the state's, then the first real tokens of each sequence (group
    [B,T], 0..groups-1) until each has `sinks`. Returns `new` [B,T] (which tokens became sinks) and
    `k`, `v` (the state's dtype), `pos` [B, groups*sinks + 1, ...]: sequence g's sinks in slots g*sinks.. (the last
    slot collects the other tokens), `at` [B,T], the new tokens' positions (from the state's `n`), and `group`."""
    b, t = real.shape
    pos = state["n"][:, None] + torch.arange(t, device=k.device)
    r = real.long()
    before = r.cumsum(1) - r  # real tokens before each one in its row
    first = before.new_full((b, groups), NO_SINK).scatter_reduce(1, group, before, "amin")  # ... at its sequence's start
    rank = before - first.gather(1, group) + (state["sink_pos"] != NO_SINK).sum(1, keepdim=True)
    new = real & (rank < sinks)
    slot = torch.where(new, group * sinks + rank, groups * sinks)
    # the token that fills each slot (-1: none): only those rows are gathered, not all T scattered
    src = torch.full((b, groups * sinks + 1), -1, dtype=torch.long, device=k.device)
    src = src.scatter(1, slot, torch.arange(t, device=k.device).expand(b, t))
    src[:, -1] = -1
    out = {"new": new, "at": pos, "group": group}
    for name, x in (("k", k), ("v", v), ("pos", pos)):
        old = state[f"sink_{name}"]
        fill = NO_SINK if name == "pos" else 0
        base = torch.cat([old, old.new_full((b, (groups - 1) * sinks + 1, *old.shape[2:]), fill)], 1)
        shape = (b, src.shape[1], *[1] * (x.dim() - 2))
        took = x.gather(1, src.clamp(min=0).view(shape).expand(*shape[:2], *x.shape[2:])).to(old.dtype)
        out[name] = torch.where((src >= 0).view(shape), took, base)
    return out


def add_sinks(
    num: Tensor, den: Tensor, m: Tensor, q: Tensor, sink: dict[str, Tensor], sinks: int,
    window: int, scale: float, softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """The window softmax's num [B,T,H,V] and den [B,T,H], shifted by their max m [B,T,H], with the
    sinks of `sink_table` that each query sees (at least `window` tokens behind it) added under one max."""
    b, t, h, d = q.shape
    hk, group = sink["k"].shape[2], sink["group"]
    groups = (sink["k"].shape[1] - 1) // sinks
    ks, vs, ps = (x[:, : groups * sinks].unflatten(1, (groups, sinks)) for x in (sink["k"].float(), sink["v"].float(), sink["pos"]))
    qg = q.float().reshape(b, t, hk, h // hk, d)
    if groups == 1:  # every query of a row sees its row's sinks
        ks, vs, ps = ks[:, 0], vs[:, 0], ps[:, 0, None]
        s = torch.einsum("bthgd,bihd->bthgi", qg, ks)
        weigh = "bthgi,bihv->bthgv"
    else:  # packed (B = 1): each query sees its own sequence's sinks
        ks, vs, ps = ks[0, group[0]][None], vs[0, group[0]][None], ps[0, group[0]][None]
        s = torch.einsum("bthgd,btihd->bthgi", qg, ks)
        weigh = "bthgi,btihv->bthgv"
    s = s * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    seen = (sink["at"][..., None] - ps >= window)[:, :, None, None, :]  # [B,T,1,1,NS]
    s = s.masked_fill(~seen, float("-inf"))
    den = den.float().reshape(b, t, hk, h // hk)
    m = m.float().reshape(b, t, hk, h // hk).masked_fill(den == 0, float("-inf"))  # a window that saw no key has no max
    top = torch.maximum(m, s.amax(-1))
    top = top.masked_fill(top == float("-inf"), 0.0)  # nothing visible (padding): the output is 0
    a = (s - top[..., None]).exp()
    shift = (m - top).exp()
    num = num.float().reshape(b, t, hk, h // hk, -1) * shift[..., None] + torch.einsum(weigh, a, vs)
    den = den * shift + a.sum(-1)
    return num.reshape(b, t, h, -1), den.reshape(b, t, h)


def token_order(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state with its window ring read out oldest token first (pos 0): what the parallel form
    continues from, e.g. a chunked prefill after decode steps. Gathers on the device (no sync)."""
    b, p = state["valid"].shape
    idx = (torch.arange(p, device=state["pos"].device) + state["pos"][:, None]) % max(p, 1)  # [B,P]: slot of the i-th oldest
    out = {**state, "pos": torch.zeros_like(state["pos"])}
    for name in RING:
        if name in state:
            out[name] = state[name].gather(1, idx.view(b, p, *[1] * (state[name].dim() - 2)).expand_as(state[name]))
    return out


def window_sums(x: Tensor, width: int, n: int) -> Tensor:
    """out[:, i] = x[:, i : i + width].sum(1) for i < n (x [B, >= n + width - 1, ...]), in blocks of `width` tokens: a
    block's tail plus the next block's head, each from a cumulative sum over `width` tokens (a sum over the whole
    sequence would run serially in T on a GPU, where it is not the innermost dimension, and lose digits to cancellation
    between far-apart partial sums)."""
    blocks = -(-n // width) + 1  # blocks covering [0, n + width - 1)
    x = x[:, : blocks * width]
    x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, blocks * width - x.shape[1]))
    xb = x.view(x.shape[0], blocks, width, *x.shape[2:])
    incl = xb.cumsum(2)
    excl = incl - xb
    out = (incl[:, :-1, -1:] - excl[:, :-1]) + excl[:, 1:]  # block a from offset r on, then block a+1 before r
    return out.reshape(x.shape[0], (blocks - 1) * width, *x.shape[2:])[:, :n]


def window_tokens(
    k: Tensor, v: Tensor, fk: Tensor, g: Tensor | None, valid: Tensor | None, dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The T new tokens as the window reads them (k [B,T,Hk,D], ...; valid [B,T] bool or segment ids, or None):
    in `dtype` (the log-decays in fp32), padding zeroed in the features and decays."""
    pad = None if valid is None else (valid != 0)[..., None, None]
    keep = lambda x: x if pad is None else x * pad  # noqa: E731  (no pass over the tokens without padding)
    new = {"k": k.to(dtype), "v": v.to(dtype), "fk": keep(fk.to(dtype)),
           "valid": torch.ones(k.shape[:2], dtype=torch.bool, device=k.device) if valid is None else valid}
    if g is not None:
        new["g"] = keep(g.float())
    return new


def extend_window(
    state: dict[str, Tensor], k: Tensor, v: Tensor, fk: Tensor, g: Tensor | None, valid: Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The W-1 buffered tokens followed by the T new ones (`window_tokens`): [B, W-1+T, ...]."""
    new = window_tokens(k, v, fk, g, valid, dtype)
    return {name: torch.cat([state[name].to(x.dtype), x], 1) for name, x in new.items()}


def shift_window(ext: dict[str, Tensor], memory: Tensor, num_tokens: int, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state after `num_tokens` new tokens: the new memory and the last W-1 window tokens, in order,
    in the dtypes of the state `like`."""
    pos = torch.zeros(memory.shape[0], dtype=torch.long, device=memory.device)
    window = {name: t[:, num_tokens:].to(like[name].dtype) for name, t in ext.items()}
    return {"S": memory, **window, "pos": pos, "tick": like["tick"]}


class HedgehogMaps(NamedTuple):
    """Hedgehog feature maps of a layer's query heads and key heads (weight [H,D,FD], bias [H,FD]), handed
    to the decode step so that the Triton kernel applies them itself instead of taking phi(q), phi(k)."""

    wq: Tensor
    bq: Tensor
    wk: Tensor
    bk: Tensor


def hedgehog_features(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """phi(x) = [softmax(xW + b), softmax(-(xW + b))] per head: x [..., H, D] -> [..., H, 2 * FD]."""
    z = torch.einsum("...hd,hdf->...hf", x, weight) + bias
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)


def hybrid_step_ref(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, g: Tensor | None, mix: Tensor,
    *, window: int, scale: float, softcap: float | None = None, valid: Tensor | None = None,
    state: dict[str, Tensor], fmaps: HedgehogMaps | None = None, logit: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Recurrent form, one token: q [B,H,D], k/v [B,Hk,*], fq [B,H,F], fk/g [B,Hk,F], valid [B]
    (with `fmaps`, fq and fk are None: the Hedgehog maps of q and k, in fp32; with `logit`, mix is the window
    weight's logit, its sigmoid taken here: in the kernel, no launch of its own).

    The window is the W-1 ring slots plus this token (and the sinks at least W tokens back, when the
    state has sink slots). The oldest token (ring slot pos % (W-1); with W = 1, this token) enters the
    memory after the read, and this token takes its slot; while sink slots are free, a real token
    also takes the next one (and enters no memory). Returns y and a new state; `state` is left
    unchanged (the kernels update it in place instead).
    """
    if logit:
        mix = torch.sigmoid(mix.float())
    if fmaps is not None:
        fq = hedgehog_features(q.float(), fmaps.wq.float(), fmaps.bq.float())
        fk = hedgehog_features(k.float(), fmaps.wk.float(), fmaps.bk.float())
    b, h, d = q.shape
    hk, vd, f = k.shape[1], v.shape[-1], fk.shape[-1]
    p = window - 1
    ns = state["sink_k"].shape[1] if "sink_k" in state else 0
    if ns:
        taken = (state["sink_pos"] != NO_SINK).sum(1)
        new_sink = (torch.ones_like(taken, dtype=torch.bool) if valid is None else valid) & (taken < ns)
        fk = fk * ~new_sink[:, None, None]
    ext = extend_window(state, k[:, None], v[:, None], fk[:, None], None if g is None else g[:, None],
                        None if valid is None else valid[:, None])  # [B,W,...]: ring slots, then this token
    ext_g = ext.get("g")
    keys_k, keys_v, seen = ext["k"], ext["v"], ext["valid"]
    if ns:
        keys_k, keys_v = torch.cat([keys_k, state["sink_k"].float()], 1), torch.cat([keys_v, state["sink_v"].float()], 1)
        seen = torch.cat([seen, state["n"][:, None] - state["sink_pos"] >= window], 1)

    qg = q.float().reshape(b, 1, hk, h // hk, d)
    a, _ = _masked_exp(_scores(qg, keys_k, scale, softcap), seen[:, None, None, None, :])
    num_w = torch.einsum("bihgj,bjhv->bihgv", a, keys_v).reshape(b, h, vd)
    den_w = a.sum(-1).reshape(b, h)

    fqg = fq.float().reshape(b, hk, h // hk, f)
    if ext_g is not None:
        fqg = fqg * ext_g.sum(1).exp()[:, :, None]
    o_l = torch.einsum("bhgf,bhfv->bhgv", fqg, state["S"]).reshape(b, h, vd + 1)
    y = _combine(num_w, den_w, o_l[..., :vd], o_l[..., vd], mix)

    # The oldest window token leaves the window and enters the linear memory; this token takes its slot.
    rows = torch.arange(b, device=q.device)
    slot = state["pos"] % p if p else torch.zeros_like(state["pos"])  # index into ext
    v1 = torch.cat([ext["v"][rows, slot], ext["v"].new_ones(b, hk, 1)], -1)
    mem = state["S"]
    if ext_g is not None:
        mem = mem * ext_g[rows, slot].exp()[..., None]
    mem = mem + ext["fk"][rows, slot][..., None] * v1[:, :, None, :]
    hit = torch.arange(p, device=q.device) == slot[:, None]  # [B,P]
    new = {"S": mem, "pos": state["pos"] + 1, "tick": state["tick"]}
    for name, t in ext.items():
        new[name] = torch.where(hit.view(b, p, *[1] * (t.dim() - 2)), t[:, p:], t[:, :p]).to(state[name].dtype)
    if ns:
        take = (torch.arange(ns, device=q.device) == taken[:, None]) & new_sink[:, None]  # [B,NS]
        new["sink_k"] = torch.where(take[..., None, None], k[:, None].to(state["sink_k"].dtype), state["sink_k"])
        new["sink_v"] = torch.where(take[..., None, None], v[:, None].to(state["sink_v"].dtype), state["sink_v"])
        new["sink_pos"] = torch.where(take, state["n"][:, None], state["sink_pos"])
        new["n"] = state["n"] + 1
    return y.to(v.dtype), new
