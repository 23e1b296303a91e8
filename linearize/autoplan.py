"""Automatic layer selection: score every layer on calibration data, then choose kinds under a budget.

Scores, cheapest first:
- attention statistics from one teacher pass: per layer and head, the normalized entropy of the
  attention rows and their locality (the mass on the last `window` keys, which a hybrid's window
  computes exactly);
- a short stage-1 attention transfer with every layer converted to each candidate kind (layers are
  independent in stage 1: each sees the teacher's hidden states), giving each layer's held-out
  relative output error per kind, and the layer's impact: the calibration perplexity increase when
  that layer alone is converted with its transferred parameters.
The planner gives each layer the kind with the lowest impact (error, with `scores="stats"`: the
first candidate) and keeps softmax where the best kind's impact is highest, as many layers as the
budget says.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .adapters import decoder_layers
from .convert import converted
from .outputs import atomic_dir
from .errors import PlanError
from .kinds.base import LinearizedAttention
from .plan import SOFTMAX, LayerPlan, LayerSpec, parse_spec, specs_to_string

BUDGET_FORMS = "softmax=K (keep K softmax layers), ratio=R (R converted layers per softmax layer), ppl=X% " \
               "(at most X% calibration perplexity increase after stage 1) or cache=X% (softmax kept in the heads " \
               "where recall lives, the cache at 4k tokens at most X% of the teacher's KV cache)"


@dataclass(frozen=True)
class Budget:
    """How much to convert: keep `softmax=K` layers, a `ratio=R` of converted to softmax layers, or
    at most a `ppl=X%` increase of the calibration perplexity (measured with stage-1 parameters)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Budget":
        m = re.fullmatch(r"\s*(softmax|ratio|ppl|cache)\s*=\s*([0-9.]+)\s*(%?)\s*", str(text))
        if not m:
            raise PlanError(f"cannot parse budget {text!r}: use {BUDGET_FORMS}")
        kind, value = m[1], float(m[2]) / (100 if m[3] else 1)
        if kind == "softmax" and value != int(value):
            raise PlanError(f"budget {text!r}: softmax=K takes a whole number of layers")
        if kind == "ratio" and value <= 0:
            raise PlanError(f"budget {text!r}: the ratio must be > 0")
        if kind == "cache" and not 0 < value <= 1:
            hint = f": for {m[2]} percent write cache={m[2]}%" if not m[3] and 1 < value <= 100 else ""
            raise PlanError(f"budget {text!r}: the cache fraction must be in (0, 100%]{hint}")
        return cls(kind, value)

    def softmax_layers(self, num_layers: int) -> int | None:
        """How many layers keep softmax (None for perplexity and cache budgets: measured, not fixed)."""
        if self.kind == "softmax":
            if not 0 <= self.value <= num_layers:
                raise PlanError(f"budget softmax={int(self.value)}: this model has {num_layers} layers")
            return int(self.value)
        if self.kind == "ratio":
            return min(num_layers, int(num_layers / (self.value + 1) + 0.5))
        return None

    def __str__(self) -> str:
        return f"{self.kind}={self.value:.1%}" if self.kind in ("ppl", "cache") else f"{self.kind}={self.value:g}"


@dataclass
class Scores:
    """Per-layer scores; lists are indexed by layer, dicts by candidate kind (its spec string)."""

    kinds: list[str]
    window: int
    entropy: list[list[float]]  # [layer][head] mean normalized entropy of the attention rows (0 = one key, 1 = uniform)
    locality: list[list[float]]  # [layer][head] mean attention mass on the last `window` keys
    transfer: dict[str, list[float]] = field(default_factory=dict)  # held-out relative output error after stage 1
    impact: dict[str, list[float]] = field(default_factory=dict)  # calibration ppl / teacher - 1, that layer alone converted
    teacher_ppl: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.entropy)

    def best(self) -> tuple[list[str], list[float]]:
        """Each layer's best kind and its difficulty (impact, else transfer error, else non-locality)."""
        table = self.impact or self.transfer
        if not table:
            return [self.kinds[0]] * self.num_layers, [1 - sum(h) / len(h) for h in self.locality]
        pairs = [min((table[k][i], k) for k in self.kinds) for i in range(self.num_layers)]
        return [k for _, k in pairs], [v for v, _ in pairs]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scores":
        return cls(**d)


def _forward_collecting(model: nn.Module, rows: torch.Tensor, batch_size: int, on_layer: Callable) -> None:
    """Teacher forward passes over `rows` in transfer mode; `on_layer(module, student, teacher, q, k)` per layer."""
    from .distill.stages import attention_mode

    device = next(model.parameters()).device
    with attention_mode(model, "transfer", on_layer), torch.no_grad():
        for i in range(0, len(rows), batch_size):
            model(input_ids=rows[i : i + batch_size].to(device), use_cache=False)


def attention_statistics(model: nn.Module, rows: torch.Tensor, window: int, batch_size: int = 4,
                         probe_kind: str = "hedgehog") -> tuple[list[list[float]], list[list[float]]]:
    """Per layer and head: mean normalized entropy of the teacher's attention rows (queries t >= 1) and
    mean mass on the last `window` keys (queries t >= window, which have keys outside the window)."""
    n = len(decoder_layers(model))
    t = rows.shape[1]
    if t <= window:
        raise PlanError(f"calibration sequences of {t} tokens cannot measure locality in a {window}-token window: "
                        "use longer sequences or a smaller window")
    sums = {"entropy": [None] * n, "locality": [None] * n}

    def on_layer(mod: LinearizedAttention, student: Any, teacher: Any, q: torch.Tensor, k: torch.Tensor) -> None:
        p = mod.softmax_weights(q, k)  # [B,H,T,T] fp32
        pos = torch.arange(t, device=p.device)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)[..., 1:] / torch.log(pos[1:] + 1.0)
        near = (pos[None, :] > pos[:, None] - window) & (pos[None, :] <= pos[:, None])
        loc = (p * near).sum(-1)[..., window:]
        for key, v in (("entropy", ent.mean(-1).sum(0)), ("locality", loc.mean(-1).sum(0))):
            i = mod.layer_idx
            sums[key][i] = v if sums[key][i] is None else sums[key][i] + v

    with converted(model, f"*:{probe_kind}"):  # any kind: only the teacher's q/k are read
        _forward_collecting(model, rows, batch_size, on_layer)
    return tuple([(s / len(rows)).tolist() for s in sums[key]] for key in ("entropy", "locality"))


def _new_state(module: LinearizedAttention) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.new_named_parameters()}


def _load_new_state(module: LinearizedAttention, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, p in module.new_named_parameters():
            p.copy_(state[k])


def transfer_scores(
    model: nn.Module, train_rows: torch.Tensor, val_rows: torch.Tensor, kinds: list[str], *, steps: int,
    batch_size: int, lr: float, seed: int, impact: bool = True, log: Callable[[str], None] = print,
) -> tuple[dict[str, list[float]], dict[str, list[float]], float, dict[str, list[dict[str, torch.Tensor]]]]:
    """Short stage 1 with every layer converted to each kind: ({kind: held-out rel. error per layer},
    {kind: impact per layer} (empty without `impact`), teacher calibration ppl, {kind: trained new
    parameters per layer})."""
    from .distill.stages import Checkpoint, held_out_transfer, new_parameters, perplexity, train_loop, transfer_losses

    device = next(model.parameters()).device
    n = len(decoder_layers(model))
    teacher_ppl = perplexity(model, val_rows, batch_size)
    errors, impacts, trained = {}, {}, {}
    for kind in kinds:
        torch.manual_seed(seed)
        with converted(model, f"*:{kind}"), tempfile.TemporaryDirectory() as tmp:
            params = {k: p.requires_grad_(True) for k, p in new_parameters(model).items()}
            train_loop(f"transfer {kind}", params, lambda b: sum(v[0] for v in transfer_losses(model, b, train=True).values()),
                       train_rows, steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, save_every=steps + 1,
                       ckpt=Checkpoint(Path(tmp)), seed=seed, device=device, log=log)
            for p in params.values():
                p.requires_grad_(False)
            errors[kind] = [r["rel_err"] for r in held_out_transfer(model, val_rows, batch_size)]
            trained[kind] = [_new_state(layer.self_attn) for layer in decoder_layers(model)]
        if impact:
            impacts[kind] = [measure_plan(model, [kind if j == i else SOFTMAX for j in range(n)], trained, val_rows,
                                          batch_size) / teacher_ppl - 1 for i in range(n)]
    return errors, impacts, teacher_ppl, trained


def measure_plan(model: nn.Module, kinds: list[str], trained: dict[str, list[dict[str, torch.Tensor]]],
                 rows: torch.Tensor, batch_size: int) -> float:
    """Calibration perplexity of `model` with layer i converted to kinds[i] (softmax: kept), each
    converted layer carrying its transferred parameters from `trained`."""
    from .distill.stages import perplexity

    plan = specs_to_string([parse_spec(k) for k in kinds])
    with converted(model, plan):
        for i, (kind, layer) in enumerate(zip(kinds, decoder_layers(model))):
            if kind != SOFTMAX:
                _load_new_state(layer.self_attn, trained[kind][i])
        return perplexity(model, rows, batch_size)


def choose(scores: Scores, budget: Budget, evaluate: Callable[[list[str]], float] | None = None) -> list[LayerSpec]:
    """The plan: softmax in the layers with the highest difficulty, each other layer its best kind.

    A perplexity budget converts the easiest layers first and keeps the largest number m whose
    `evaluate(kinds)` (calibration ppl) stays within budget, by bisection (ppl grows with m)."""
    kinds, difficulty = scores.best()
    n = scores.num_layers
    order = sorted(range(n), key=lambda i: (difficulty[i], i))  # easiest first

    def plan_with(m: int) -> list[str]:
        easy = set(order[:m])
        return [kinds[i] if i in easy else SOFTMAX for i in range(n)]

    keep = budget.softmax_layers(n)
    if keep is not None:
        chosen = plan_with(n - keep)
    else:
        if evaluate is None or scores.teacher_ppl is None:
            raise PlanError("a perplexity budget needs measurements: score with transfer (not stats only)")
        bound = scores.teacher_ppl * (1 + budget.value)
        lo, hi = 0, n  # plan_with(lo) is within budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if evaluate(plan_with(mid)) <= bound:
                lo = mid
            else:
                hi = mid - 1
        chosen = plan_with(lo)
    return [parse_spec(k) for k in chosen]


def score_layers(
    model: nn.Module, rows: torch.Tensor, *, kinds: list[str], window: int = 64, scores: str = "transfer",
    steps: int = 50, batch_size: int = 4, lr: float = 0.01, val_fraction: float = 0.25, seed: int = 0,
    impact: bool = True, log: Callable[[str], None] = print,
) -> tuple[Scores, dict[str, list[dict[str, torch.Tensor]]], torch.Tensor]:
    """Scores of every layer of `model` on calibration `rows` ([N, T] token ids); also the trained
    per-layer parameters and the held-out rows (for perplexity budgets)."""
    from .distill.data import split
    from .kinds import validate_spec

    if scores not in ("stats", "transfer"):
        raise PlanError(f"scores must be 'stats' or 'transfer', not {scores!r}")
    if not kinds:
        raise PlanError("give at least one candidate kind")
    for k in kinds:
        if validate_spec(parse_spec(k)).kind == SOFTMAX:
            raise PlanError("softmax is not a candidate kind: the budget decides which layers keep it")
    train_rows, val_rows = split(rows, val_fraction, seed)
    entropy, locality = attention_statistics(model, val_rows, window, batch_size)
    result = Scores(kinds=list(kinds), window=window, entropy=entropy, locality=locality,
                    settings={"scores": scores, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                              "sequences": len(rows), "seq_len": rows.shape[1], "val_sequences": len(val_rows)})
    trained: dict[str, list[dict[str, torch.Tensor]]] = {}
    if scores == "transfer":
        result.transfer, result.impact, result.teacher_ppl, trained = transfer_scores(
            model, train_rows, val_rows, list(kinds), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            impact=impact, log=log)
    return result, trained, val_rows


def calibration_rows(model: nn.Module, tok: Any, source: str = "teacher", *, sequences: int = 32, seq_len: int = 256,
                     seed: int = 0, model_id: str = "", cache_dir: str = "") -> torch.Tensor:
    """Calibration token rows [N, seq_len]: text sampled from the model (cached as distillation's is) or a file."""
    from .distill.config import DataConfig
    from .distill.data import pack, read_texts, teacher_texts

    cfg = DataConfig(source=source, seq_len=seq_len, teacher_sequences=sequences, cache_dir=cache_dir)
    texts = teacher_texts(model, tok, cfg, seed, model_id=model_id) if source == "teacher" else read_texts(cfg)
    rows = pack(texts, tok, seq_len)
    if len(rows) < 4:
        raise PlanError(f"{len(rows)} calibration sequences of {seq_len} tokens: need at least 4 (more text or shorter sequences)")
    return rows[:sequences]


def autoplan(model: nn.Module, rows: torch.Tensor, budget: Budget | str, **score_kwargs: Any) -> tuple[LayerPlan, Scores]:
    """Score `model`'s layers on calibration `rows` and choose a plan under `budget` (see `score_layers`)."""
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    budget.softmax_layers(len(decoder_layers(model)))  # a bad budget fails before any scoring
    scores, trained, val_rows = score_layers(model, rows, **score_kwargs)
    batch = scores.settings["batch_size"]
    specs = choose(scores, budget, lambda kinds: measure_plan(model, kinds, trained, val_rows, batch))
    scores.settings["budget"] = str(budget)
    return LayerPlan.from_string(specs_to_string(specs)), scores


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def report_table(scores: Scores, specs: list[LayerSpec]) -> str:
    """Markdown table: per layer the attention statistics, each kind's error and impact, the choice."""
    from .eval.report import table

    header = ["layer", "entropy", f"local@{scores.window}"]
    header += [f"error {k}" for k in scores.transfer] + [f"impact {k}" for k in scores.impact] + ["plan"]
    rows = []
    for i in range(scores.num_layers):
        row = [str(i), f"{_mean(scores.entropy[i]):.3f}", f"{_mean(scores.locality[i]):.3f}"]
        row += [f"{v[i]:.4f}" for v in scores.transfer.values()] + [f"{v[i]:+.2%}" for v in scores.impact.values()]
        rows.append(row + [specs[i].to_string()])
    return table(header, rows)


def report_plot(scores: Scores, specs: list[LayerSpec]) -> Any:
    """Per-layer figure: attention statistics, then transfer error and impact per kind, softmax layers
    shaded; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = list(range(scores.num_layers))
    panels = 1 + bool(scores.transfer) + bool(scores.impact)
    fig, axes = plt.subplots(panels, 1, figsize=(max(8, scores.num_layers * 0.35), 3.2 * panels), sharex=True, squeeze=False)
    axes = axes[:, 0]
    axes[0].plot(layers, [_mean(h) for h in scores.entropy], marker="o", label="entropy (normalized)")
    axes[0].plot(layers, [_mean(h) for h in scores.locality], marker="s", label=f"mass on last {scores.window} keys")
    axes[0].set(ylim=(0, 1.05), title="attention statistics (mean over heads)")
    for ax, data, title in ((axes[1] if panels > 1 else None, scores.transfer, "stage-1 relative output error"),
                            (axes[2] if panels > 2 else None, scores.impact, "calibration ppl increase, layer alone converted")):
        if ax is None:
            continue
        for kind, values in data.items():
            ax.plot(layers, values, marker="o", label=kind)
        ax.set_yscale("symlog", linthresh=1e-3)  # impacts can be slightly negative
        ax.set(title=title)
    for ax in axes:
        for i, s in enumerate(specs):
            if s.kind == SOFTMAX:
                ax.axvspan(i - 0.5, i + 0.5, color="0.85", zorder=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set(xlabel="layer (shaded: kept softmax)")
    fig.tight_layout()
    return fig


def write_report(out: str | Path, scores: Scores, specs: list[LayerSpec], header: str = "", **output: Any) -> Path:
    """OUT/scores.json, OUT/report.md (the table) and OUT/scores.png, all or nothing; `output`: `atomic_dir`'s
    force and inputs."""
    return _write_scores(out, "scores.json", scores, specs, report_table(scores, specs), header, report_plot(scores, specs), **output)


def _write_scores(out: str | Path, name: str, scores: Any, specs: list[LayerSpec], table_md: str, header: str,
                  fig: Any = None, **output: Any) -> Path:
    """OUT/<name> (the plan and the scores as JSON), OUT/report.md and, given a figure, OUT/scores.png: all or nothing."""
    import json

    plan = specs_to_string(specs)
    with atomic_dir(out, "plan", **output) as tmp:
        Path(tmp, name).write_text(json.dumps({"plan": plan, **scores.to_dict()}, indent=1) + "\n")
        Path(tmp, "report.md").write_text(f"{header}plan: `{plan}`\n\n{table_md}\n")
        if fig is not None:
            fig.savefig(Path(tmp, "scores.png"), dpi=110, bbox_inches="tight")
    return Path(out)


# -- head level: keep softmax where recall lives, under a cache budget ----------------------------

@dataclass
class HeadScores:
    """Per layer and KV head: what turning that head alone into a `streaming` window (with sinks)
    costs, as the relative increase of the next-token loss on copy sequences (recall) and on
    calibration text (language modelling); `score` is their sum, the planner's ranking."""

    copy: list[list[float]]
    text: list[list[float]]
    teacher_copy_loss: float
    teacher_text_loss: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> list[list[float]]:
        return [[c + t for c, t in zip(cl, tl)] for cl, tl in zip(self.copy, self.text)]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score}


def copy_rows(vocab_size: int, special: set[int], length: int, n: int, bos: int, seed: int) -> torch.Tensor:
    """[n, 2 length + 1] rows of BOS + `length` random ordinary tokens shown twice (the copy task's form)."""
    g = torch.Generator().manual_seed(seed)
    ok = torch.tensor([i for i in range(vocab_size) if i not in special])
    seq = ok[torch.randint(len(ok), (n, length), generator=g)]
    return torch.cat([torch.full((n, 1), bos), seq, seq], 1)


def _loss(model: nn.Module, rows: torch.Tensor, start: int, batch_size: int) -> float:
    """Mean next-token loss of `rows` over the predictions of tokens start+1 .. end."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids = rows[i : i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, start:-1].float()
            total += nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, start + 1 :].flatten(), reduction="sum").item()
            count += ids[:, start + 1 :].numel()
    return total / count


def head_scores(model: nn.Module, text_rows: torch.Tensor, copy: torch.Tensor, *, window: int = 64, sinks: int = 4,
                batch_size: int = 8, log: Callable[[str], None] = print) -> HeadScores:
    """Score every KV head by ablation: that head alone a `streaming(window, sinks)` head (the layer's
    other heads kept softmax), the relative loss increase on `copy` rows (second copy) and `text_rows`."""
    layers = decoder_layers(model)
    hk = model.config.get_text_config(decoder=True).num_key_value_heads
    start = (copy.shape[1] - 1) // 2 + 1  # predictions of the second copy (its first token is unknowable)
    base_copy, base_text = _loss(model, copy, start, batch_size), _loss(model, text_rows, 0, batch_size)
    out = {"copy": [], "text": []}
    for i in range(len(layers)):
        row_c, row_t = [], []
        for h in range(hk):
            keep = [j for j in range(hk) if j != h]
            with converted(model, f"{i}:streaming(window={window}, sinks={sinks}, softmax_heads=[{','.join(map(str, keep))}])"):
                row_c.append(_loss(model, copy, start, batch_size) / base_copy - 1)
                row_t.append(_loss(model, text_rows, 0, batch_size) / base_text - 1)
        out["copy"].append(row_c)
        out["text"].append(row_t)
        log(f"layer {i}: copy {' '.join(f'{v:+.3f}' for v in row_c)} | text {' '.join(f'{v:+.4f}' for v in row_t)}")
    return HeadScores(out["copy"], out["text"], base_copy, base_text,
                      {"window": window, "sinks": sinks, "copy_rows": list(copy.shape), "text_rows": list(text_rows.shape)})


def choose_heads(scores: HeadScores, budget: Budget, kind: str, cache_of: Callable[[list[LayerSpec]], float]) -> list[LayerSpec]:
    """Softmax kept in the highest-scoring KV heads, added while `cache_of(specs)` (the cache fraction)
    stays within the budget; every other head becomes `kind`; a layer whose heads all stay is softmax."""
    base = parse_spec(kind)
    n, hk = len(scores.score), len(scores.score[0])

    def specs_with(kept: set[tuple[int, int]]) -> list[LayerSpec]:
        out = []
        for i in range(n):
            heads = sorted(h for h in range(hk) if (i, h) in kept)
            if len(heads) == hk:
                out.append(LayerSpec(SOFTMAX))
            else:
                out.append(LayerSpec(base.kind, {**base.options, **({"softmax_heads": tuple(heads)} if heads else {})}))
        return out

    kept: set[tuple[int, int]] = set()
    if cache_of(specs_with(kept)) > budget.value:
        raise PlanError(f"budget {budget}: even with every head converted to {kind} the cache is "
                        f"{cache_of(specs_with(kept)):.1%} of the teacher's; use a kind with a smaller state or a larger budget")
    ranked = sorted(((s, i, h) for i, row in enumerate(scores.score) for h, s in enumerate(row)), reverse=True)
    for _, i, h in ranked:
        if cache_of(specs_with(kept | {(i, h)})) <= budget.value:
            kept.add((i, h))
    return specs_with(kept)


def with_kind(specs: list[LayerSpec], kind: str) -> list[LayerSpec]:
    """The same softmax layers and softmax heads, every converted head `kind` (e.g. a head plan's training-free twin)."""
    base = parse_spec(kind)
    return [s if s.kind == SOFTMAX else LayerSpec(base.kind, {**base.options, **(
        {"softmax_heads": s.options["softmax_heads"]} if s.options.get("softmax_heads") else {})}) for s in specs]


def head_table(scores: HeadScores, specs: list[LayerSpec]) -> str:
    """Markdown table: per layer each KV head's copy and text cost, the kept heads marked *."""
    from .eval.report import table

    hk = len(scores.score[0])
    rows = []
    for i, spec in enumerate(specs):
        kept = set(range(hk)) if spec.kind == SOFTMAX else set(spec.options.get("softmax_heads", ()))
        rows.append([str(i)] + [f"{'*' if h in kept else ''}{scores.copy[i][h]:+.3f} / {scores.text[i][h]:+.4f}" for h in range(hk)]
                    + [spec.to_string()])
    return table(["layer"] + [f"head {h}: copy / text" for h in range(hk)] + ["plan"], rows)


def autoplan_heads(model: nn.Module, text_rows: torch.Tensor, budget: Budget | str, *, kind: str = "lolcats(window=64)",
                   copy_length: int = 256, copy_items: int = 16, window: int = 64, sinks: int = 4, batch_size: int = 8,
                   seed: int = 0, log: Callable[[str], None] = print) -> tuple[LayerPlan, HeadScores]:
    """Head-level plan under a `cache=X%` budget: score every KV head (`head_scores`) on copy rows made
    here and calibration `text_rows`, keep softmax in the best heads that fit, the rest `kind`."""
    from .info import CacheMeter
    from .kinds import validate_spec

    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    if budget.kind != "cache":
        raise PlanError(f"head-level planning takes a cache=X% budget, not {budget}")
    if validate_spec(parse_spec(kind)).kind == SOFTMAX:
        raise PlanError("softmax is not a candidate kind: the budget decides which heads keep it")
    meter = CacheMeter(model.config)
    tok_vocab = model.config.get_text_config(decoder=True).vocab_size
    special = {t for t in (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) if t is not None}
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    copy = copy_rows(tok_vocab, special, copy_length, copy_items, bos, seed)
    scores = head_scores(model, text_rows, copy, window=window, sinks=sinks, batch_size=batch_size, log=log)
    specs = choose_heads(scores, budget, kind, meter.fraction)
    scores.settings.update({"budget": str(budget), "kind": kind, "cache": meter.summary(specs), "seed": seed})
    return LayerPlan.from_string(specs_to_string(specs)), scores


def write_head_report(out: str | Path, scores: HeadScores, specs: list[LayerSpec], header: str = "", **output: Any) -> Path:
    """OUT/head_scores.json and OUT/report.md (per-head table), all or nothing; `output`: `atomic_dir`'s force and inputs."""
    return _write_scores(out, "head_scores.json", scores, specs, head_table(scores, specs), header, **output)
