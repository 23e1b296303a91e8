"""The base of every converted attention layer: reuse the teacher's projections, add a mixer.

A converted layer takes over the original module's q/k/v/o projections (and q/k norms) under
their original names, so pretrained weights stay where they were and checkpoints keep their
keys; a kind adds only its own parameters (feature maps, gates, mixing factors) and implements
`mix`, the sequence mixing on rotary q/k and v. Forward signature and return value match the
HF attention modules, so decoder layers call it unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..kernels import EPS, chunk_gla, gla_step, hybrid_attn, hybrid_step
from ..adapters import Adapter, attention_geometry, key_validity, rotary_fn
from ..cache import state_slot
from ..errors import LinearizeError

State = dict[str, Tensor]


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
        self.scaling, self.softcap = geo["scaling"], geo["softcap"]
        self.adapter, self.options, self.rotary_fn = adapter, options, rotary_fn(attn)
        for name in adapter.modules:
            setattr(self, name, getattr(attn, name))
        self.mode = "student"
        self.on_transfer: Callable[..., None] | None = None
        self.build(options)
        ref = next(attn.parameters())
        for _, p in self.new_named_parameters():
            p.data = p.data.to(device=ref.device, dtype=ref.dtype)

    def new_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what this kind added, not the projections it took over."""
        return [(n, p) for n, p in self.named_parameters() if n.split(".")[0] not in self.adapter.modules]

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
        y, new_state = self.mix(q, k, v, hidden_states, key_validity(attention_mask, t), state)
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
            y, _ = self.mix(q, k, v, x, key_validity(attention_mask, t), None)
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
        qh = q.transpose(1, 2)
        kh, vh = (x.transpose(1, 2).repeat_interleave(rep, 1) for x in (k, v))
        y = nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=self.scaling)
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
        if normalize:
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
        if state is not None and fq.shape[1] == 1:
            o, mem = gla_step(fq[:, 0], fk[:, 0], v[:, 0], None if g is None else g[:, 0], state["S"])
            o = o[:, None]
        else:
            o, mem = chunk_gla(fq, fk, v, g, initial_state=None if state is None else state["S"])
        y = o[..., :-1] / (o[..., -1:] + EPS) if normalize else o
        return y, {"S": mem}

    def windowed_attend(
        self, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, g: Tensor | None,
        valid: Tensor | None, state: State | None,
    ) -> tuple[Tensor, State]:
        """Sliding-window softmax + linear attention beyond the window, one shared normalizer."""
        mix = torch.sigmoid(self.window_logit.float())
        common = dict(window=self.options.window, scale=self.scaling, softcap=self.softcap)
        if state is not None and q.shape[1] == 1:
            y, new = hybrid_step(
                q[:, 0], k[:, 0], v[:, 0], fq[:, 0], fk[:, 0], None if g is None else g[:, 0], mix,
                valid=None if valid is None else valid[:, 0], state=state, **common,
            )
            return y[:, None], new
        return hybrid_attn(q, k, v, fq, fk, g, mix, valid=valid, state=state, **common)
