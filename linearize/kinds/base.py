"""The base of every converted attention layer: reuse the teacher's projections, add a mixer.

A converted layer takes over the original module's q/k/v/o projections (and q/k norms) under
their original names, so pretrained weights stay where they were and checkpoints keep their
keys; a kind adds only its own parameters (feature maps, gates, mixing factors) and implements
`mix`, the sequence mixing on rotary q/k and v. Forward signature and return value match the
HF attention modules, so decoder layers call it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..kernels import EPS, cached_attention, chunk_gla, gla_step, hybrid_attn, hybrid_step
from ..kernels.attention import visible_slots
from ..kernels.gla import with_ones
from ..kernels.hybrid import HedgehogMaps
from .feature_maps import HedgehogFeatureMap
from ..adapters import FUSED_QKV, Adapter, attention_geometry, key_validity, rotary_fn
from ..cache import state_slot
from ..errors import LinearizeError, PlanError

State = dict[str, Tensor]


@dataclass(frozen=True)
class KindOptions:
    """Options every kind takes (each kind's Options dataclass derives from this)."""

    # KV heads that keep exact softmax attention (with their query heads) and a growing KV cache;
    # the kind's mixer runs on the other heads only (head-level hybrid, e.g. retrieval heads kept)
    softmax_heads: tuple[int, ...] = ()

    def check(self) -> None:
        if any(h < 0 for h in self.softmax_heads) or len(set(self.softmax_heads)) != len(self.softmax_heads):
            raise PlanError(f"softmax_heads must be distinct KV head indices >= 0, got {list(self.softmax_heads)}")


@dataclass(frozen=True)
class WindowOptions(KindOptions):
    """Options of the window hybrids (`lolcats`, `lizard`): a softmax window beside a linear memory."""

    window: int = 64  # tokens (including the current one) under exact softmax
    sinks: int = 0  # first tokens every query's window softmax also sees (attention sinks, kept out of the linear part)
    window_init: float = 0.0  # initial logit of the window part's weight (sigmoid): 0 halves; large starts as the window alone

    def check(self) -> None:
        super().check()
        if self.window < 1 or self.sinks < 0:
            raise PlanError(f"window must be >= 1 and sinks >= 0, got window={self.window}, sinks={self.sinks}")


def _runs(heads: list[int], rep: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering KV heads `heads` scaled by `rep` (query heads per KV head)."""
    out: list[tuple[int, int]] = []
    for h in heads:
        if out and out[-1][1] == h * rep:
            out[-1] = (out[-1][0], (h + 1) * rep)
        else:
            out.append((h * rep, (h + 1) * rep))
    return out


def _take(x: Tensor, runs: list[tuple[int, int]]) -> Tensor:
    """The heads (dim 2) of x in `runs`, contiguous (the kernels take dense [B,T,H,D] tensors)."""
    return x[:, :, runs[0][0] : runs[0][1]].contiguous() if len(runs) == 1 else torch.cat([x[:, :, a:b] for a, b in runs], 2)


class LinearizedAttention(nn.Module):
    """Attention replacement; subclasses set `kind`, `Options` and implement `build` and `mix`.

    `mode` selects what forward computes: "student" (the converted layer), "teacher" (the original
    softmax attention from the same projections) or "transfer" (both: `on_transfer(module, student,
    teacher, q, k)` receives the two outputs, with the student's graph, and the rotary q/k; the
    teacher's output flows on, so every layer sees the teacher's hidden states during transfer).
    """

    kind: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, attn: nn.Module, config: Any, adapter: Adapter, options: Any):
        super().__init__()
        geo = attention_geometry(attn, config)
        self.layer_idx = attn.layer_idx
        self.num_heads, self.num_kv_heads = geo["num_heads"], geo["num_kv_heads"]
        self.head_dim, self.hidden_size = geo["head_dim"], geo["hidden_size"]
        self.scaling, self.softcap, self.sliding_window = geo["scaling"], geo["softcap"], geo["sliding_window"]
        self.adapter, self.options, self.rotary_fn = adapter, options, rotary_fn(attn)
        for name in adapter.modules:
            setattr(self, name, getattr(attn, name))
        self.mode = "student"
        self.on_transfer: Callable[..., None] | None = None
        self._split_heads(tuple(getattr(options, "softmax_heads", ())))
        self.build(options)
        ref = next(attn.parameters())
        for _, p in self.new_named_parameters():
            p.data = p.data.to(device=ref.device, dtype=ref.dtype)

    def _split_heads(self, softmax_kv: tuple[int, ...]) -> None:
        """Which heads the kind's mixer runs on (`mixer_heads`, `mixer_kv_heads`, what `build` sizes
        its parameters by) and which keep exact softmax; the projections keep every head."""
        hk, rep = self.num_kv_heads, self.num_heads // self.num_kv_heads
        bad = [h for h in softmax_kv if h >= hk]
        if bad:
            raise PlanError(f"layer {self.layer_idx}: softmax_heads {bad} out of range, this model has {hk} KV heads (0-{hk - 1})")
        if len(softmax_kv) == hk:
            raise PlanError(f"layer {self.layer_idx}: softmax_heads lists every KV head; give the layer kind 'softmax' instead")
        self.softmax_kv = tuple(sorted(softmax_kv))
        mixer_kv = [h for h in range(hk) if h not in self.softmax_kv]
        self.mixer_kv_heads, self.mixer_heads = len(mixer_kv), len(mixer_kv) * rep
        if self.softmax_kv:
            self._runs = {"q": _runs(mixer_kv, rep), "kv": _runs(mixer_kv, 1),
                          "sq": _runs(list(self.softmax_kv), rep), "skv": _runs(list(self.softmax_kv), 1)}
            pieces = []  # (first query head, source, [start, stop) among that source's packed heads)
            for src, runs in (("mixer", self._runs["q"]), ("softmax", self._runs["sq"])):
                packed = 0
                for a, b in runs:
                    pieces.append((a, src, packed, packed + b - a))
                    packed += b - a
            self._merge = [(src, p0, p1) for _, src, p0, p1 in sorted(pieces)]

    def mixer_qkv(self, q: Tensor, k: Tensor, v: Tensor | None = None) -> tuple[Tensor, ...]:
        """q, k (and v) restricted to the heads the kind's mixer handles (all of them without softmax_heads)."""
        if not self.softmax_kv:
            return (q, k) if v is None else (q, k, v)
        out = (_take(q, self._runs["q"]), _take(k, self._runs["kv"]))
        return out if v is None else (*out, _take(v, self._runs["kv"]))

    def student_mix(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, valid: Tensor | None, state: State | None) -> tuple[Tensor, State]:
        """`mix` on the mixer's heads and, for `softmax_heads`, exact attention over their cached keys/values."""
        if not self.softmax_kv:
            return self.mix(q, k, v, x, valid, state)
        mixer_state = None if state is None else {n: t for n, t in state.items() if not n.startswith("sm_")}
        y_mix, new_state = self.mix(*self.mixer_qkv(q, k, v), x, valid, mixer_state)
        qs, ks, vs = (_take(t, self._runs[r]) for t, r in ((q, "sq"), (k, "skv"), (v, "skv")))
        y_sm, kv = self.cached_softmax(qs, ks, vs, valid, state)
        out = {"mixer": y_mix, "softmax": y_sm}
        y = torch.cat([out[src][:, :, p0:p1] for src, p0, p1 in self._merge], 2)
        return y, {**new_state, **kv}

    def cached_softmax(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, state: State | None) -> tuple[Tensor, State]:
        """Exact causal softmax attention of the softmax heads over their cache plus these T tokens:
        q [B,T,h,D], k/v [B,T,hk,D]; the cache keeps k, v (model dtype) and key validity."""
        b, t = q.shape[:2]
        kvalid = valid if valid is not None else torch.ones(b, t, dtype=torch.bool, device=q.device)
        if state is not None and "sm_n" in state:  # a preallocated cache (`static_softmax_cache`)
            return self.static_softmax(q, k, v, kvalid, state)
        if state is not None and "sm_k" in state:
            k, v = torch.cat([state["sm_k"], k], 1), torch.cat([state["sm_v"], v], 1)
            kvalid = torch.cat([state["sm_valid"], kvalid], 1)
        mask = None
        if valid is not None or k.shape[1] > t or self.sliding_window:
            slots = k.shape[1] - t + torch.arange(t, device=q.device)
            mask = visible_slots(slots, k.shape[1], self.sliding_window) & kvalid[:, None, :]
        y = self.attend_masked(q, k, v, mask)
        return y, {"sm_k": k, "sm_v": v, "sm_valid": kvalid}

    def static_softmax(self, q: Tensor, k: Tensor, v: Tensor, kvalid: Tensor, state: State) -> tuple[Tensor, State]:
        """`cached_softmax` on a preallocated cache: the T new keys go to slots n.. in place (n, the fill
        count, a device tensor advanced here), then every query attends over all slots, the unfilled
        ones masked. No host syncs and no new tensors in the state: a CUDA graph can hold the step."""
        n, cache_k = state["sm_n"], state["sm_k"]
        slots = n + torch.arange(q.shape[1], device=q.device)
        for name, x in (("sm_k", k), ("sm_v", v), ("sm_valid", kvalid)):
            state[name].index_copy_(1, slots, x)
        n.add_(q.shape[1])
        y = cached_attention(q, cache_k, state["sm_v"], state["sm_valid"], slots, scale=self.scaling, softcap=self.softcap,
                             window=self.sliding_window)
        return y, {name: state[name] for name in ("sm_k", "sm_v", "sm_valid", "sm_n")}

    def attend_masked(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Softmax attention of q [B,T,h,D] over k/v [B,S,hk,D] where mask [B,T,S] (bool) allows, or
        causal (S = T) when mask is None; a query that may see no key sees all (padding: finite output)."""
        rep = q.shape[2] // k.shape[2]
        if mask is None and self.softcap:
            mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()[None]
        if mask is not None:
            mask = (mask | ~mask.any(-1, keepdim=True))[:, None]
        if self.softcap:  # SDPA cannot soft-cap logits
            weights = self.softmax_weights(q, k, mask)
            y = torch.einsum("bhij,bhjd->bhid", weights, v.transpose(1, 2).repeat_interleave(rep, 1).float()).to(v.dtype)
        else:
            kh, vh = (x.transpose(1, 2).repeat_interleave(rep, 1) for x in (k, v))
            y = nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), kh, vh, attn_mask=mask, is_causal=mask is None, scale=self.scaling)
        return y.transpose(1, 2)

    def new_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what this kind added, not the projections it took over."""
        return [(n, p) for n, p in self.named_parameters() if n.split(".")[0] not in (*self.adapter.modules, FUSED_QKV)]

    def new_parameters(self) -> int:
        """How many parameters this kind adds to the projections it took over."""
        return sum(p.numel() for _, p in self.new_named_parameters())

    def build(self, options: Any) -> None:
        """Create the kind's new parameters."""
        raise NotImplementedError

    def mix(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, valid: Tensor | None, state: State | None) -> tuple[Tensor, State]:
        """Sequence mixing: q [B,T,H,D], k/v [B,T,Hk,D], hidden states x [B,T,C] -> y [B,T,H,D], new state."""
        raise NotImplementedError

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        cache = cache if cache is not None else past_key_values  # transformers renamed it in 5.2x
        b, t, _ = hidden_states.shape
        q, k, v = self.adapter.project(self, hidden_states, position_embeddings)
        if self.mode != "student":
            return self._teacher_forward(q, k, v, hidden_states, attention_mask, cache), None
        slot = state_slot(cache, self.layer_idx) if cache is not None else None
        state = slot.state if slot is not None else None
        y, new_state = self.student_mix(q, k, v, hidden_states, key_validity(attention_mask, t), state)
        if slot is not None:
            slot.store(new_state, t)
        return self.o_proj(y.reshape(b, t, -1)), None

    def _teacher_forward(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, attention_mask: Tensor | None, cache: Any) -> Tensor:
        if cache is not None:
            raise LinearizeError(f"mode {self.mode!r} runs on whole sequences: call the model with use_cache=False")
        b, t = x.shape[:2]
        teacher = self.o_proj(self.softmax_attend(q, k, v, attention_mask).reshape(b, t, -1))
        if self.mode == "teacher":
            return teacher
        with torch.enable_grad():
            y, _ = self.student_mix(q, k, v, x, key_validity(attention_mask, t), None)
            student = self.o_proj(y.reshape(b, t, -1))
            self.on_transfer(self, student, teacher.detach(), q, k)
        return teacher.detach()

    def softmax_weights(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """The original layer's attention probabilities [B,H,T,T] (fp32) on rotary q/k; causal unless
        `mask` (an HF 4D mask, bool or additive) is given."""
        rep = self.num_heads // self.num_kv_heads
        qh, kh = q.transpose(1, 2).float(), k.transpose(1, 2).repeat_interleave(rep, 1).float()
        s = torch.einsum("bhid,bhjd->bhij", qh, kh) * self.scaling
        if self.softcap:
            s = self.softcap * torch.tanh(s / self.softcap)
        if mask is None:
            t = q.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        return torch.softmax(s, -1)

    def softmax_attend(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The original layer's causal softmax attention on the same rotary q/k and v: [B,T,H,D]."""
        rep = self.num_heads // self.num_kv_heads
        mask = attention_mask[..., -q.shape[1] :] if isinstance(attention_mask, Tensor) and attention_mask.dim() == 4 else None
        if self.softcap:  # soft-capped logits (Gemma 2): SDPA cannot apply them, so the plain formula
            weights = self.softmax_weights(q, k, mask)
            vh = v.transpose(1, 2).repeat_interleave(rep, 1).float()
            return torch.einsum("bhij,bhjd->bhid", weights, vh).to(v.dtype).transpose(1, 2)
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        if mask is not None and rep > 1:  # with a mask only SDPA's math path reads grouped heads: give it copies
            kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
        y = nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=self.scaling,
                                                       enable_gqa=mask is None and rep > 1)  # flash reads grouped heads in place
        return y.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, options={self.options}"

    # -- shared mixers ------------------------------------------------------------------------
    def linear_attend(
        self, fq: Tensor, fk: Tensor, v: Tensor, g: Tensor | None, valid: Tensor | None,
        state: State | None, normalize: bool = True,
    ) -> tuple[Tensor, State]:
        """Causal (gated) linear attention over all tokens, normalized by phi(q).sum(phi(k))."""
        if valid is not None:  # padding neither writes to the memory nor decays it
            fk = fk * valid[..., None, None].to(fk.dtype)
            g = g * valid[..., None, None].to(g.dtype) if g is not None else None
        if state is not None and fq.shape[1] == 1:
            if normalize:
                v = with_ones(v)
            o, mem = gla_step(fq[:, 0], fk[:, 0], v[:, 0], None if g is None else g[:, 0], state["S"])
            o = o[:, None]
        else:  # the scan adds the ones column itself
            o, mem = chunk_gla(fq, fk, v, g, initial_state=None if state is None else state["S"], ones=normalize)
        y = o[..., :-1] / (o[..., -1:] + EPS) if normalize else o
        return y, {"S": mem}

    def build_window_mix(self) -> None:
        """The window hybrids' per-head weight of the window part, a logit (sigmoid) starting at `window_init`."""
        self.window_logit = nn.Parameter(torch.full((self.mixer_heads,), float(self.options.window_init)))

    def windowed_attend(
        self, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, valid: Tensor | None, state: State | None,
    ) -> tuple[Tensor, State]:
        """Sliding-window softmax (plus attention sinks) + linear attention beyond the window, one shared
        normalizer, on the kind's feature maps (a decode step with Hedgehog maps applies them in its kernel)."""
        common = dict(window=self.options.window, scale=self.scaling, softcap=self.softcap)
        if state is not None and q.shape[1] == 1:  # the step takes the weight's logit: its sigmoid in the kernel
            one = dict(valid=None if valid is None else valid[:, 0], state=state, logit=True, **common)
            mix = self.window_logit
            g0 = None if g is None else g[:, 0]
            maps = (self.feature_map_q, self.feature_map_k)
            if all(isinstance(m, HedgehogFeatureMap) for m in maps):
                fmaps = HedgehogMaps(maps[0].weight, maps[0].bias, maps[1].weight, maps[1].bias)
                y, new = hybrid_step(q[:, 0], k[:, 0], v[:, 0], None, None, g0, mix, fmaps=fmaps, **one)
            else:
                fq, fk = self.feature_map_q(q[:, 0]), self.feature_map_k(k[:, 0])
                y, new = hybrid_step(q[:, 0], k[:, 0], v[:, 0], fq, fk, g0, mix, **one)
            return y[:, None], new
        fq, fk, mix = self.feature_map_q(q), self.feature_map_k(k), torch.sigmoid(self.window_logit.float())
        return hybrid_attn(q, k, v, fq, fk, g, mix, valid=valid, state=state, sinks=self.options.sinks, **common)


def static_softmax_cache(state: State, capacity: int) -> State:
    """A layer's state with its softmax heads' growing key/value cache (`sm_k`, `sm_v`, `sm_valid`)
    moved into buffers of `capacity` tokens and their fill count `sm_n`, a device tensor: the
    preallocated cache that graphed decoding writes in place."""
    valid = state["sm_valid"]
    b, t = valid.shape
    if capacity < t:
        raise LinearizeError(f"a static key/value cache of {capacity} tokens cannot hold the {t} already cached")
    grow = lambda x: torch.cat([x, x.new_zeros(b, capacity - t, *x.shape[2:])], 1)  # noqa: E731
    n = torch.full((1,), t, dtype=torch.long, device=valid.device)
    return {**state, "sm_k": grow(state["sm_k"]), "sm_v": grow(state["sm_v"]), "sm_valid": grow(valid), "sm_n": n}
