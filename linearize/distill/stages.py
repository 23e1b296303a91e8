"""The two distillation stages and the loop they share.

Stage 1, attention transfer: every converted layer runs in "transfer" mode, computing the teacher's
softmax output and its own from the same frozen projections on the same hidden states. Each layer's
MSE is backpropagated inside its own forward and the teacher output flows on (detached), so only one
layer's graph is alive at a time: memory does not grow with the number of converted layers, and
the forward stops after the last converted layer. Only the kinds' new parameters train.

Stage 2, LoRA fine-tune: peft LoRA on the converted layers' projections (the new parameters may
train too), next-token cross-entropy plus an optional KL to the teacher, which is the same model
with adapters disabled and layers in "teacher" mode: no second copy in memory.
"""

from __future__ import annotations

import inspect
import math
import pickle
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..errors import LinearizeError
from ..eval.perplexity import autocast, token_nll
from ..kinds.base import LinearizedAttention
from ..outputs import atomic_dir
from .fsdp import clip_grad_norm_, full, gather_optimizer_state, like, scatter_optimizer_state


@contextmanager
def attention_mode(model: nn.Module, mode: str, on_transfer: Callable | None = None) -> Iterator[list[LinearizedAttention]]:
    """Put every converted layer in `mode` ("student", "teacher", "transfer") for the block."""
    layers = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
    saved = [(m.mode, m.on_transfer) for m in layers]
    for m in layers:
        m.mode, m.on_transfer = mode, on_transfer
    try:
        yield layers
    finally:
        for m, (mode_, cb) in zip(layers, saved):
            m.mode, m.on_transfer = mode_, cb


def new_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the conversion added (feature maps, gates, mixing factors), by full name."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, LinearizedAttention):
            out.update({f"{prefix}.{name}": p for name, p in m.new_named_parameters()})
    return out


class _StopForward(Exception):
    pass


def attention_ce(mod: LinearizedAttention, q: Tensor, k: Tensor) -> Tensor:
    """Cross-entropy of the layer's attention weights against the teacher's softmax weights (Hedgehog's
    loss), for kinds whose whole attention matrix is one feature-map product (`hedgehog`)."""
    q, k = mod.mixer_qkv(q, k)  # softmax_heads are exact: nothing to learn there
    teacher = mod.softmax_weights(q, k)
    return -(teacher * mod.attention_weights(q, k).clamp_min(1e-12).log()).sum(-1).mean()


def transfer_losses(
    model: nn.Module, batch: Tensor, train: bool, attn_ce_weight: float = 0.0, stop_early: bool = True,
) -> dict[int, tuple[float, float]]:
    """One stage-1 pass: {layer: (loss, relative squared error of the output)}; the loss is the output
    MSE plus `attn_ce_weight` x the attention-weight cross-entropy where the kind has one. With
    `train`, gradients are accumulated. `stop_early=False` runs the whole forward (FSDP needs every
    layer's forward to finish)."""
    device = batch.device
    layers = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
    last = max(m.layer_idx for m in layers)

    def on_transfer(mod: LinearizedAttention, student: Tensor, teacher: Tensor, q: Tensor, k: Tensor) -> None:
        diff = student.float() - teacher  # fp32, reading the teacher as it is (no fp32 copy of it)
        squares = diff.square().sum()  # one pass gives the MSE and the relative error
        loss = squares / diff.numel()
        if attn_ce_weight and mod.kind == "hedgehog":
            loss = loss + attn_ce_weight * attention_ce(mod, q, k)
        if train:
            loss.backward()
        with torch.no_grad():  # off the graph: kept until the pass ends, these must not hold `diff` alive
            norm = torch.linalg.vector_norm(teacher, dtype=torch.float32)
            pending[mod.layer_idx] = torch.stack([loss.detach(), squares.detach() / norm.square().clamp_min(1e-12)])
        if mod.layer_idx == last and stop_early:
            raise _StopForward

    pending: dict[int, Tensor] = {}  # read once after the pass: a read per layer would stall the GPU 2 x layers times a step
    with attention_mode(model, "transfer", on_transfer), torch.no_grad(), autocast(device):
        try:
            model(input_ids=batch, use_cache=False)
        except _StopForward:
            pass
    if not pending:
        return {}
    values = torch.stack(list(pending.values())).tolist()
    return {layer: (pair[0], pair[1]) for layer, pair in zip(pending, values)}


def held_out_transfer(model: nn.Module, rows: Tensor, batch_size: int, stop_early: bool = True) -> list[dict[str, float]]:
    """Per converted layer, stage 1's output MSE and relative error on held-out rows (means over batches)."""
    device = next(model.parameters()).device
    per_layer: dict[int, list[tuple[float, float]]] = {}  # layer -> (mse, rel_err) per batch
    for i in range(0, len(rows), batch_size):
        for layer, pair in transfer_losses(model, rows[i : i + batch_size].to(device), train=False, stop_early=stop_early).items():
            per_layer.setdefault(layer, []).append(pair)
    return [{"layer": layer, "mse": sum(p[0] for p in v) / len(v), "rel_err": sum(p[1] for p in v) / len(v)}
            for layer, v in sorted(per_layer.items())]


LOSS_ELEMENTS = 2**27  # logits held at once by `ChunkedLMLoss`: tokens x vocabulary, 512 MiB per fp32 copy


def loss_chunk(vocab: int) -> int:
    """Tokens whose logits `lm_loss` forms at once: LOSS_ELEMENTS per copy whatever the vocabulary (1,046 tokens at
    Llama 3's 128,256 words, 2,730 at SmolLM2's 49,152)."""
    return max(1, LOSS_ELEMENTS // vocab)


def _log_probs(logits: Tensor, cap: float | None) -> tuple[Tensor, Tensor | None]:
    """log_softmax of fp32 `logits` soft-capped by `cap` (Gemma 2: cap x tanh(logits / cap)) and the tanh
    (the cap's derivative needs it); `logits` is overwritten."""
    if not cap:
        return logits.log_softmax(-1), None
    squash = logits.div_(cap).tanh_()
    return (squash * cap).log_softmax(-1), squash


class ChunkedLMLoss(torch.autograd.Function):
    """Mean next-token cross-entropy (weight ce) plus mean KL(teacher || student) (weight kl) from the
    final hidden states h [N,C] (student) and ht [N,C] (teacher, or None) through the frozen output
    head `weight` [V,C] (soft-capped by `cap` as Gemma 2's logits are), `chunk` tokens at a time: the
    gradient for h is formed chunk by chunk in the forward, so no [N x V] tensor is ever whole (an 8B
    model's 128k-token vocabulary makes each fp32 copy 0.5 GB per 1k tokens), and within a chunk four
    [chunk x V] fp32 copies live at most (student and teacher log-probabilities and probabilities,
    the gradient formed in place of the student's)."""

    @staticmethod
    def forward(ctx, h: Tensor, ht: Tensor | None, weight: Tensor, labels: Tensor, ce: float, kl: float,
                cap: float | None, chunk: int) -> Tensor:
        n = h.shape[0]
        grad = torch.empty_like(h, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, n, chunk):
            y = labels[i : i + chunk, None]
            logp, squash = _log_probs(F.linear(h[i : i + chunk], weight).float(), cap)
            total -= ce * logp.gather(1, y).sum()
            g = logp.exp()  # p, turned into the gradient of the logits in place: ce (p - onehot) + kl (p - q)
            if ht is not None:
                logq, _ = _log_probs(F.linear(ht[i : i + chunk], weight).float(), cap)
                q = logq.exp()
                total += kl * torch.vdot(q.flatten(), logq.sub_(logp).flatten())
                g.mul_(ce + kl).sub_(q, alpha=kl)
                del logq, q
            else:
                g.mul_(ce)
            del logp
            g.scatter_add_(1, y, torch.full_like(y, -ce, dtype=g.dtype))
            if squash is not None:
                g.mul_(squash.square_().neg_().add_(1))
            grad[i : i + chunk] = F.linear(g.to(weight.dtype), weight.t()).float() / n
        ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return total / n

    @staticmethod
    def backward(ctx, dloss: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * dloss).to(ctx.h_dtype), None, None, None, None, None, None, None


def final_hidden(model: nn.Module, batch: Tensor) -> Tensor | None:
    """The decoder's last hidden states [B,T,C] (after its final norm) from a forward that forms the
    logits of one token only; None where the chunked loss cannot stand in for the model's own logits
    (an output head that trains or is sharded, a model without logits_to_keep)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or head.weight.requires_grad or isinstance(head.weight, DTensor):
        return None
    if "logits_to_keep" not in inspect.signature(model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward).parameters:
        return None
    seen: dict[str, Tensor] = {}

    def keep(module: nn.Module, args: Any, out: Any) -> None:  # returns None: the output goes on unchanged
        seen["h"] = out[0]

    hook = model.get_decoder().register_forward_hook(keep)
    try:
        model(input_ids=batch, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return seen["h"]


def lm_loss(model: nn.Module, batch: Tensor, ce_weight: float, kl_weight: float, chunk: int | None = None) -> Tensor:
    """Next-token cross-entropy (+ KL(teacher || student) when kl_weight > 0) of a batch, through
    `ChunkedLMLoss` where the model allows (the same value and gradients without whole logits), `chunk`
    tokens at a time (default `loss_chunk` of the vocabulary)."""
    with autocast(batch.device):
        h = final_hidden(model, batch)
    if h is not None:
        ht = None
        if kl_weight:
            with torch.no_grad(), model.disable_adapter(), attention_mode(model, "teacher"), autocast(batch.device):
                ht = final_hidden(model, batch)[:, :-1].reshape(-1, h.shape[-1])
        cap = getattr(model.config, "final_logit_softcapping", None)
        with autocast(batch.device):  # the head's products in bf16 on a GPU, as the model's own forward
            weight = model.get_output_embeddings().weight
            return ChunkedLMLoss.apply(h[:, :-1].reshape(-1, h.shape[-1]), ht, weight, batch[:, 1:].reshape(-1), ce_weight,
                                       kl_weight, cap, chunk or loss_chunk(weight.shape[0]))
    with autocast(batch.device):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    loss = ce_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    if kl_weight:
        with torch.no_grad(), model.disable_adapter(), attention_mode(model, "teacher"), autocast(batch.device):
            teacher = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        kl = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
        loss = loss + kl_weight * kl
    return loss


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each decoder layer in backward (non-reentrant) or stop; transformers renamed the
    methods from gradient_ to activation_checkpointing in 5.2x."""
    new = hasattr(model, "activation_checkpointing_enable")
    if on:
        kwargs = {"use_reentrant": False}
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()


@torch.no_grad()
def perplexity(model: nn.Module, rows: Tensor, batch_size: int, mode: str = "student") -> float:
    """exp(mean next-token NLL) over packed rows; mode "teacher" scores the original attention."""
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    with attention_mode(model, mode):
        for i in range(0, len(rows), batch_size):
            losses = token_nll(model, rows[i : i + batch_size].to(device))
            nll += losses.sum().item()
            n += losses.numel()
    return math.exp(nll / n)


class Checkpoint:
    """A stage's trainable parameters, optimizer, scheduler and progress, written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder

    def exists(self) -> bool:
        return (self.folder / "state.pt").is_file()

    def save(self, params: dict[str, nn.Parameter], opt: Any, sched: Any, step: int, done: bool, history: list,
             write: bool = True) -> None:
        """Whole tensors (sharded ones gathered: under FSDP every process calls this; `write` on one)."""
        state = {"params": {k: full(p.detach()).cpu() for k, p in params.items()}, "optimizer": gather_optimizer_state(opt.state_dict()),
                 "scheduler": sched.state_dict(), "step": step, "done": done, "history": history}
        if write:
            with atomic_dir(self.folder, "checkpoint") as tmp:
                torch.save(state, Path(tmp) / "state.pt")

    def load(self) -> dict[str, Any]:
        """The saved state; tensors and plain values only (nothing else is unpickled: no code runs)."""
        try:
            return torch.load(self.folder / "state.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            why = "holds objects other than tensors and plain values (not loaded: unpickling them could run code)"
        except (RuntimeError, EOFError) as e:
            first = (str(e).strip() or type(e).__name__).splitlines()[0]  # torch's first sentence, not its advice
            why = f"is damaged ({first.split('. ')[0].rstrip('.')})"
        raise LinearizeError(f"checkpoint {self.folder / 'state.pt'} {why}: delete {self.folder.parent} to start afresh")

    def restore_params(self, params: dict[str, nn.Parameter], saved: dict[str, Tensor]) -> None:
        missing = set(params) ^ set(saved)
        if missing:
            raise RuntimeError(f"checkpoint {self.folder} does not match this run (differs in {sorted(missing)[:3]}...)")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(like(saved[k], p))


def _schedule(steps: int) -> Callable[[int], float]:
    warm = max(1, steps // 10)
    return lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ctrl-C waits for the end of the block (main thread): the parameters' update and the step's
    bookkeeping land together, so a checkpoint never holds an update it does not count (a resumed run
    would apply it twice)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # now: Python's own handler raises KeyboardInterrupt
        elif caught and previous != signal.SIG_IGN:
            raise KeyboardInterrupt


def _out_of_memory(name: str, err: Exception, shape: tuple[int, int], device: torch.device, ckpt: Checkpoint) -> str:
    """One line for a stage that ran out of accelerator memory: what it tried, what it had, what lowers it."""
    tried = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", str(err))
    have = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        have = f", {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB in use at the peak of {total / 2**30:.1f} GiB"
    fix = f"lower {name}.batch_size (now {shape[0]}) or data.seq_len (now {shape[1]})"
    if name == "stage2":
        fix += ", set stage2.gradient_checkpointing: true"
    kept = f"; the last checkpoint is in {ckpt.folder} (--resume continues from it)" if ckpt.exists() else ""
    return (f"{name} ran out of {device.type.upper()} memory (tried to allocate {tried.group(1) if tried else 'more'}{have}): "
            f"{fix}, or shard the model over several GPUs (configs/accelerate/fsdp.yaml){kept}")


def train_loop(
    name: str, params: dict[str, nn.Parameter], step_fn: Callable[[Tensor], float], rows: Tensor, *,
    steps: int, batch_size: int, lr: float, weight_decay: float, save_every: int, ckpt: Checkpoint,
    seed: int, device: torch.device, rank: int = 0, world: int = 1, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """AdamW + warmup/cosine over `steps` batches drawn deterministically per step (so a resumed run
    sees the same batches); `step_fn` runs forward and backward and returns the loss."""
    from tqdm.auto import tqdm

    if not params:  # e.g. stage 1 of a plan whose kinds add no parameters (streaming)
        log(f"{name}: nothing to train (the plan's kinds add no parameters), skipped")
        return {"steps": 0, "history": [], "train_tokens": 0}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
    start, history = 0, []
    step_tokens = batch_size * world * rows.shape[1]
    if ckpt.exists():
        state = ckpt.load()
        ckpt.restore_params(params, state["params"])
        opt.load_state_dict(scatter_optimizer_state(state["optimizer"], list(params.values())))
        sched.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        if state["done"]:
            log(f"{name}: finished earlier ({start} steps), loaded from {ckpt.folder}")
            return {"steps": start, "history": history, "resumed_from": start, "train_tokens": start * step_tokens}
        log(f"{name}: resuming at step {start} from {ckpt.folder}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, tokens, step, warm, saving = time.time(), 0, start, None, 0.0
    bar = tqdm(range(start, steps), desc=name, disable=rank != 0, initial=start, total=steps)
    try:
        for step in bar:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = torch.randint(len(rows), (batch_size * world,), generator=g)[rank::world]
            batch = rows[idx].to(device)
            loss = step_fn(batch)
            if world > 1:  # FSDP has already averaged the gradients of sharded parameters
                for p in params.values():
                    if p.grad is not None and not isinstance(p.grad, DTensor):
                        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
                mean = torch.tensor(float(loss), device=device)  # each process saw its slice of the batch
                torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.AVG)
                loss = mean.item()  # the whole batch's loss: the history of one process drawing every row
            with _uninterrupted():  # an update is kept only together with its count
                clip_grad_norm_(params.values(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                tokens += batch.numel() * world
                history.append(round(float(loss), 6))
            warm = warm or (time.time(), len(history))  # after the first step: kernels compiled, memory pools grown
            bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tokens / (time.time() - t0):.0f}")
            if (step + 1) % save_every == 0 or step + 1 == steps:
                t_save = time.time()
                ckpt.save(params, opt, sched, step + 1, step + 1 == steps, history, write=rank == 0)
                saving += time.time() - t_save
    except torch.OutOfMemoryError as e:  # in the step or in the update (the optimizer's first step allocates its state)
        raise LinearizeError(_out_of_memory(name, e, (batch_size, rows.shape[1]), device, ckpt)) from None
    except KeyboardInterrupt:
        if any(isinstance(p, DTensor) for p in params.values()):  # gathering shards now could hang on a peer
            log(f"\n{name}: interrupted; continue with --resume from the last checkpoint in {ckpt.folder}")
        elif rank == 0:
            ckpt.save(params, opt, sched, len(history), False, history)
            log(f"\n{name}: interrupted; checkpoint at step {len(history)} in {ckpt.folder} (continue with --resume)")
        raise
    end = time.time()
    since, done = (warm[0], len(history) - warm[1]) if warm and len(history) > warm[1] else (t0, steps - start)
    # past the first step and without the checkpoint writes (a short run would otherwise charge its final save to a few
    # steps where a long one saves every `save_every`); their seconds are reported beside it
    speed = {"tokens_per_s": round(done * step_tokens / max(end - since - saving, 1e-9), 1), "checkpoint_s": round(saving, 2)}
    if device.type == "cuda":
        speed["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    log(f"{name}: {speed['tokens_per_s']:,.0f} tokens/s" + (f", peak {speed['peak_gib']} GiB" if "peak_gib" in speed else ""))
    return {"steps": steps, "history": history, "resumed_from": start, "seconds": round(end - t0, 1),
            "train_tokens": steps * step_tokens, **speed}
