"""`distill`: load -> convert -> stage 1 -> stage 2 -> save, with checkpoints and a metrics report.

Checkpoints live beside the output, in `<out>.ckpt/`, each written atomically; the output folder
appears only when the model is complete. Runs on CPU, one GPU, or several under `torchrun` or
`accelerate launch` (data parallel: each process draws its own slice of every batch and gradients
are averaged; sharded with FSDP when the launcher asks for it, see `fsdp.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from transformers import PretrainedConfig

from ..adapters import adapter_for
from ..convert import convert
from ..errors import LinearizeError
from ..info import resolve_plan
from ..loading import load
from ..outputs import atomic_dir, check_out
from ..plan import SOFTMAX, LayerPlan, LayerSpec, specs_to_string
from . import fsdp
from .config import DistillConfig
from .data import pack, read_texts, split, teacher_cache, teacher_texts
from .recall_data import recall_rows
from .stages import (Checkpoint, attention_mode, held_out_transfer, lm_loss, new_parameters, perplexity, set_checkpointing,
                     train_loop, transfer_losses)


def _distributed() -> tuple[torch.device, int, int]:
    """(device, rank, world size) from the variables `torchrun` / `accelerate launch` set; joins the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return device, 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, torch.distributed.get_rank(), world


def resolve_dtypes(cfg: DistillConfig, device: torch.device, config: PretrainedConfig) -> tuple[torch.dtype, torch.dtype]:
    """(original weights, trained parameters) dtypes of a run on the model of `config`. "auto" keeps a bfloat16
    checkpoint in bfloat16 on a GPU (exactly its weights, half float32's memory: 15 instead of 30 GiB at 8B) and
    float32 otherwise; bfloat16 computes under CUDA's autocast, so a CPU run refuses it before loading anything."""
    weights = cfg.dtype
    if weights == "auto":  # the checkpoint's own dtype where that is bfloat16 and a GPU computes
        saved = device.type == "cuda" and str(getattr(config, "dtype", None)).removeprefix("torch.")
        weights = "bfloat16" if saved == "bfloat16" else "float32"
    if device.type != "cuda":
        for key, value in (("dtype", weights), ("train_dtype", cfg.train_dtype)):
            if value == "bfloat16":
                raise LinearizeError(f"{key}=bfloat16 needs a GPU (it computes under CUDA's bf16 autocast) and this run "
                                     f"has none: set {key}=float32")
    return getattr(torch, weights), getattr(torch, cfg.train_dtype)


def _check_same_run(work: Path, cfg: DistillConfig, world: int) -> None:
    """Refuse checkpoints that `cfg` on `world` processes would not continue exactly: another recipe, or another
    global batch (batch_size x processes; each step draws that many rows, so a run may resume on another
    number of GPUs with batch_size scaled to keep it)."""
    if not (work / "recipe.yaml").is_file():
        raise LinearizeError(f"the checkpoints in {work} have no recipe.yaml, so they cannot be checked against this "
                             "recipe: delete them to start afresh")
    try:  # an edited or cut-off recipe.yaml (or processes file): no batch sizes to compare
        saved = yaml.safe_load((work / "recipe.yaml").read_text())
        processes = int((work / "processes").read_text()) if (work / "processes").is_file() else 1
        sizes = {stage: saved[stage].pop("batch_size") for stage in ("stage1", "stage2")}
        damaged = processes < 1 or not all(type(n) is int and n > 0 for n in sizes.values())
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        damaged = True
    if damaged:
        raise LinearizeError(f"the checkpoints' recipe {work / 'recipe.yaml'} is damaged (it gives no stage1 and stage2 "
                             f"batch sizes): restore it, or delete {work} to start afresh")
    new = cfg.to_dict()
    for stage in ("stage1", "stage2"):
        rows, per = sizes[stage] * processes, new[stage].pop("batch_size")
        if rows != per * world:
            fix = f"resume with {stage}.batch_size={rows // world}" if rows % world == 0 else \
                  f"resume on a number of processes that divides {rows}"
            raise LinearizeError(f"the checkpoints in {work} were made on {processes} process(es) drawing {rows} rows a "
                                 f"{stage} step, this run draws {per * world} ({per} x {world}): {fix}")
    for recipe in (saved, new):  # compiled or not, the same computation
        recipe.pop("compile", None)
    if saved != new:
        raise LinearizeError(f"the checkpoints in {work} were made with another recipe; resume with the same one, or delete them")


def compile_frozen_blocks(model: torch.nn.Module, backend: str) -> int:
    """torch.compile each decoder layer's norms and MLP in place, where the frozen forward spends its time outside the
    matrix products (RMSNorm's fp32 passes, the gated MLP's activation and product). Regional: modules of one class
    share one compiled graph, whatever the number of layers. Returns how many modules."""
    from ..adapters import decoder_layers

    count = 0
    for layer in decoder_layers(model):
        for name, module in layer.named_children():
            if name == "mlp" or name.endswith("layernorm"):
                module.compile(backend=backend)
                count += 1
    return count


def _check_trainable(cfg: DistillConfig, config: PretrainedConfig, specs: list[LayerSpec]) -> None:
    """Refuse a plan that converts no layer, and LoRA targets that name no projection of the converted layers."""
    if all(s.kind == SOFTMAX for s in specs):
        raise LinearizeError(f"the plan {specs_to_string(specs)!r} converts no layer, so there is nothing to distill: give "
                             "some layers a kind, e.g. '2-:lolcats'")
    projections = [n for n in adapter_for(config.model_type).modules if n.endswith("_proj")]
    if cfg.stage2.steps and not set(cfg.stage2.lora_targets) & set(projections):
        raise LinearizeError(f"stage2.lora_targets={','.join(cfg.stage2.lora_targets)} names none of the converted layers' "
                             f"projections: give some of {','.join(projections)}, or stage2.steps=0")


def _lora_targets(model: torch.nn.Module, names: list[str]) -> list[str]:
    from ..kinds.base import LinearizedAttention

    targets = []
    for prefix, m in model.named_modules():
        if isinstance(m, LinearizedAttention):
            targets += [f"{prefix}.{n}" for n in m.adapter.modules if n in names and isinstance(getattr(m, n), torch.nn.Linear)]
    return targets


def _with_lora(model: torch.nn.Module, lora: Any) -> torch.nn.Module:
    """peft's `get_peft_model`, without the FutureWarning its check of a deprecated transformers property raises."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, lora)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def distill(
    cfg: DistillConfig, out: str | Path, *, resume: bool = False, force: bool = False, log: Callable[[str], None] = print,
    evaluate: Callable[[torch.nn.Module, Any], dict] | None = None,
) -> dict[str, Any]:
    """Run the whole recipe; returns the summary also written to `<out>/metrics/summary.json`.

    `evaluate(model, tokenizer)`, if given, scores the teacher, the model after stage 1 and the
    final model (summary keys teacher_eval, stage1_eval, final_eval). `force` lets `out` replace a
    folder that another command wrote (see `linearize.outputs`). Under torchrun, a process group the run
    joined is left when it ends (gloo's threads torn down at interpreter exit can abort a process, pytorch#190489).
    """
    joined = torch.distributed.is_initialized()
    try:
        return _distill(cfg, out, resume=resume, force=force, log=log, evaluate=evaluate)
    finally:
        if not joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _distill(
    cfg: DistillConfig, out: str | Path, *, resume: bool, force: bool, log: Callable[[str], None],
    evaluate: Callable[[torch.nn.Module, Any], dict] | None,
) -> dict[str, Any]:
    cfg.check()
    plan = LayerPlan.coerce(cfg.plan).check_kinds()
    out = Path(out)
    output = dict(force=force, inputs=[cfg.model, cfg.data.source])
    check_out(out, "convert", **output)
    config, specs = resolve_plan(cfg.model, plan)  # from the model's config: a plan that does not fit fails before any loading
    _check_trainable(cfg, config, specs)
    device, rank, world = _distributed()
    dtype, train_dtype = resolve_dtypes(cfg, device, config)
    sharded = world > 1 and fsdp.requested()
    if sharded and cfg.compile:
        raise LinearizeError(f"compile={cfg.compile} is not supported under FSDP yet: run without it (compile=null)")
    if device.type == "cuda":  # a recipe that clearly cannot fit fails now, not after minutes of loading
        from .memory import check_fits

        check_fits(config, cfg, torch.cuda.get_device_properties(device).total_memory, world if sharded else 1)
    work = Path(str(out) + ".ckpt")
    recipe = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    trained = any(Checkpoint(work / s).exists() for s in ("stage1", "stage2"))
    finished = (work / "complete").is_file()
    if trained and not resume and not finished:
        raise LinearizeError(f"checkpoints of an unfinished run are in {work}: pass --resume to continue, or delete it")
    if trained and resume:
        _check_same_run(work, cfg, world)
    if finished and not resume and rank == 0:
        shutil.rmtree(work)  # the earlier run finished and saved its model: start afresh
    if sharded and cfg.data.source == "teacher" and not teacher_cache(cfg.data, cfg.seed, str(cfg.model)).is_file():
        raise LinearizeError("FSDP runs cannot sample the teacher corpus (that needs the whole model on one device): set "
                             "data.source to a dataset or file, or fill the cache with one run of the same recipe without FSDP")
    if world > 1:
        torch.distributed.barrier()
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    texts = None if cfg.data.source == "teacher" else read_texts(cfg.data)  # a missing file fails before loading
    # sharded: every process loads on the CPU and keeps only its shards on the GPU after `fsdp.shard`
    model, tok = load(cfg.model, dtype=dtype, device="cpu" if sharded else device)
    model.requires_grad_(False)
    if texts is None:
        texts = teacher_texts(model, tok, cfg.data, cfg.seed, model_id=str(cfg.model))
    train_rows, val_rows = split(pack(texts, tok, cfg.data.seq_len), cfg.data.val_fraction, cfg.seed)
    if cfg.data.recall_mix:  # validation stays plain text, comparable across recipes
        extra = recall_rows(tok, texts, round(len(train_rows) * cfg.data.recall_mix / (1 - cfg.data.recall_mix)), cfg.data.seq_len, cfg.seed)
        train_rows = torch.cat([train_rows, extra])[torch.randperm(len(train_rows) + len(extra), generator=torch.Generator().manual_seed(cfg.seed))]
        log(f"data: {len(extra)} recall-rich rows mixed in ({cfg.data.recall_mix:.0%} of training)")
    log(f"data: {len(train_rows)} train / {len(val_rows)} validation sequences of {cfg.data.seq_len} tokens")
    eval_bs = max(cfg.stage1.batch_size, cfg.stage2.batch_size)
    evals: dict[str, Any] = {}

    def measure(m: torch.nn.Module, name: str) -> float:
        """Validation perplexity of `m`; the caller's `evaluate` result goes to evals[name]."""
        ppl = perplexity(m, val_rows, eval_bs)
        if evaluate:
            evals[name] = evaluate(m, tok)
        return ppl

    if not sharded:
        teacher_ppl = measure(model, "teacher_eval")

    convert(model, plan)
    if cfg.compile:
        log(f"compile: {compile_frozen_blocks(model, cfg.compile)} norms and MLPs through torch.compile ({cfg.compile})")
    # LoRA goes in now (B = 0: no effect until stage 2) so that FSDP can shard the adapters with the rest
    s2 = cfg.stage2
    lora = None
    if s2.steps > 0:
        from peft import LoraConfig

        lora = LoraConfig(r=s2.lora_r, lora_alpha=s2.lora_alpha, lora_dropout=s2.lora_dropout, target_modules=_lora_targets(model, s2.lora_targets))
        model = _with_lora(model, lora)
    params = {k: p.requires_grad_(True) for k, p in new_parameters(model).items()}
    for name, p in model.named_parameters():  # the trained ones: new parameters and LoRA
        if name in params or "lora_" in name:
            p.data = p.data.to(train_dtype)
    if sharded:
        fsdp.shard(model, device, params.values())
        with _as_teacher(model):
            teacher_ppl = measure(model, "teacher_eval")
    common = dict(seed=cfg.seed, device=device, rank=rank, world=world, log=log)
    summary: dict[str, Any] = {"model": str(cfg.model), "plan": model.config.linearize["plan"], "teacher_val_ppl": teacher_ppl}

    if rank == 0:  # only now: a run that fails before training leaves no checkpoint folder
        work.mkdir(parents=True, exist_ok=True)
        (work / "recipe.yaml").write_text(recipe)
        (work / "processes").write_text(str(world))

    # Stage 1: attention transfer; only the new parameters train (adapters off).
    s1 = cfg.stage1
    with _adapters_off(model):

        def step1(batch: torch.Tensor) -> float:
            losses = transfer_losses(model, batch, train=True, attn_ce_weight=s1.attn_ce_weight, stop_early=not sharded)
            return sum(v[0] for v in losses.values())

        m1 = train_loop("stage1", params, step1, train_rows, steps=s1.steps, batch_size=s1.batch_size, lr=s1.lr,
                        weight_decay=s1.weight_decay, save_every=s1.save_every, ckpt=Checkpoint(work / "stage1"), **common)
        m1["val_layer_loss"] = held_out_transfer(model, val_rows, s1.batch_size, stop_early=not sharded)
        summary["stage1_val_ppl"] = measure(model, "stage1_eval")
    log(_table([[r["layer"], f"{r['mse']:.3e}", f"{r['rel_err']:.4f}"] for r in m1["val_layer_loss"]], ["layer", "val MSE", "rel. error"]))
    for p in params.values():
        p.requires_grad_(False)

    # Stage 2: LoRA (+ the new parameters) on next-token prediction (+ KL to the teacher).
    m2: dict[str, Any] = {"steps": 0}
    if lora is not None:
        if s2.gradient_checkpointing:
            set_checkpointing(model, True)
        if s2.train_new_params:
            for p in params.values():
                p.requires_grad_(True)
        params2 = {k: p for k, p in model.named_parameters() if p.requires_grad}
        model.train()

        def step2(batch: torch.Tensor) -> float:
            loss = lm_loss(model, batch, s2.ce_weight, s2.kl_weight)
            loss.backward()
            return loss.item()

        m2 = train_loop("stage2", params2, step2, train_rows, steps=s2.steps, batch_size=s2.batch_size, lr=s2.lr,
                        weight_decay=s2.weight_decay, save_every=s2.save_every, ckpt=Checkpoint(work / "stage2"), **common)
        model.eval()
        if s2.gradient_checkpointing:
            set_checkpointing(model, False)
    if sharded:  # score the sharded model, then give process 0 a whole copy to save
        summary["student_val_ppl"] = measure(model, "final_eval")
        whole = {k: fsdp.full(v).cpu() for k, v in model.state_dict().items()}
        if rank == 0:
            model, _ = load(cfg.model, dtype=dtype, device="cpu")
            convert(model, plan)
            if lora is not None:
                model = _with_lora(model, lora)
            model.load_state_dict(whole)
    if not sharded or rank == 0:
        final = model.merge_and_unload() if lora is not None and s2.merge else model
    if not sharded:
        summary["student_val_ppl"] = measure(final, "final_eval")
    summary.update(evals)
    summary["train_tokens"] = {"stage1": m1.get("train_tokens", 0), "stage2": m2.get("train_tokens", 0)}
    summary["seconds"] = round(time.time() - t0, 1)

    if rank == 0:
        with atomic_dir(out, "convert", **output) as tmp:
            tmp = Path(tmp)
            if lora is not None and not s2.merge:
                final.get_base_model().save_pretrained(tmp)
                final.save_pretrained(tmp / "lora")
            else:
                final.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "plan.yaml").write_text(yaml.safe_dump({"plan": summary["plan"]}))
            (tmp / "recipe.yaml").write_text(recipe)
            (tmp / "metrics").mkdir()
            for name, m in (("stage1", m1), ("stage2", m2), ("summary", summary)):
                (tmp / "metrics" / f"{name}.json").write_text(json.dumps(m, indent=1))
        (work / "complete").write_text(str(out.resolve()))
    if world > 1:
        torch.distributed.barrier()
    return summary


@contextmanager
def _adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """peft adapters skipped for the block (stage 1 trains the new parameters alone)."""
    with (model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()):
        yield


@contextmanager
def _as_teacher(model: torch.nn.Module) -> Iterator[None]:
    """The original model: converted layers in teacher mode, adapters off."""
    with _adapters_off(model), attention_mode(model, "teacher"):
        yield


__all__ = ["distill"]
