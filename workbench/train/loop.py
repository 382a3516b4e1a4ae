"""The training loop: epochs or steps, SGD/AdamW with a cosine or one-cycle schedule, AMP on CUDA,
gradient clipping, a checkpoint after every epoch, resume from one, and a progress bar
with the loss; an optional evaluation after every epoch gives the training curve.

`fit` knows nothing about pruning or quantization: the caller passes the model (pruned,
or fake-quantized for QAT), the batches and a loss function of (outputs, batch).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from ..errors import WorkbenchError
from ..io import atomic_path
from ..models.guards import first_nonfinite
from ..progress import track
from .options import TrainOptions


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" or p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(opts: TrainOptions, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier for step i (0-based)."""

    def factor(i: int) -> float:
        if opts.schedule == "onecycle":  # 30% up from lr/25, then cosine down to lr/1e4
            up = max(1, int(0.3 * total_steps))
            if i < up:
                return 0.04 + 0.96 * i / up
            progress = (i - up) / max(1, total_steps - up)
            return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
        if i < opts.warmup_steps:
            return (i + 1) / opts.warmup_steps
        if opts.schedule == "constant":
            return 1.0
        progress = (i - opts.warmup_steps) / max(1, total_steps - opts.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass
class FitSetup:
    """Where and how `fit` trains, beyond the recipe's TrainOptions."""

    device: torch.device = torch.device("cpu")
    auto_mode: Literal["train", "eval"] = "train"  # what train_mode auto means for this model (the task's choice)
    label: str = "finetune"  # names progress, checkpoints (<label>_epoch<N>.pt) and messages
    checkpoint_dir: Path | None = None  # a checkpoint after every epoch, when set
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # scored after every epoch
    after_step: Callable[[], None] | None = None  # after every optimizer step (QAT re-measures weight ranges)
    fingerprint: dict | None = None  # what the run was (recipe and options): resuming another is refused
    on_epoch: Callable[[dict], None] | None = None  # each finished epoch's history entry (experiment tracking)


def fit(
    model: nn.Module,
    batches,
    opts: TrainOptions,
    loss_fn: Callable[[object, tuple], tuple[torch.Tensor, dict[str, float]]],
    setup: FitSetup | None = None,
) -> list[dict]:
    """Train `model` in place; return the history (one entry per epoch: losses, lr, eval metrics, seconds).

    `batches` is re-iterable (a DataLoader); `loss_fn(outputs, batch)` returns the loss and
    its named parts. See FitSetup for the device, checkpoints, per-epoch evaluation and hooks.
    """
    from .. import distributed

    setup = setup or FitSetup()
    device, label, after_step = setup.device, setup.label, setup.after_step
    checkpoint_dir, evaluate, fingerprint = setup.checkpoint_dir, setup.evaluate, setup.fingerprint
    ddp_model = model
    if distributed.active():
        # One process per GPU: each takes every world_size-th sample, with batch_size / world_size per step,
        # so the global batch is the recipe's; DDP averages the gradients (and keeps BatchNorm buffers
        # equal by broadcasting rank 0's). The checkpoints and the evaluation are rank 0's.
        batches = _sharded(batches, label)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
        if not distributed.is_main():
            checkpoint_dir, evaluate = None, None
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise WorkbenchError(f"{label}: the training data produced no batches")
    total = (opts.epochs * steps_per_epoch if opts.max_steps is None
             else min(opts.max_steps, opts.epochs * steps_per_epoch))
    params = _param_groups(model, opts.weight_decay)
    if not any(g["params"] for g in params):
        raise WorkbenchError(f"{label}: the model has no trainable parameters")
    if opts.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, nesterov=opts.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(params, lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(opts, total))
    amp = opts.amp and device.type == "cuda"
    mode = opts.train_mode if opts.train_mode != "auto" else setup.auto_mode
    history: list[dict] = []
    step, start_epoch = 0, 0
    fingerprint = fingerprint or {}
    if opts.resume:
        step, start_epoch, history = _load_checkpoint(Path(opts.resume), model, optimizer, scheduler, label,
                                                      fingerprint)
    last_good = Path(opts.resume) if opts.resume else None

    for epoch in range(start_epoch, opts.epochs):
        if step >= total:
            break
        if hasattr(getattr(batches, "sampler", None), "set_epoch"):
            batches.sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        model.train(mode == "train")
        if opts.freeze_bn_stats:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        start = time.perf_counter()
        sums: dict[str, float] = {}
        seen = 0
        running = lambda: f"loss {sums.get('loss', 0.0) / max(seen, 1):.4g}"  # noqa: E731  (the epoch's mean so far)
        for batch in track(batches, f"{label} epoch {epoch + 1}/{opts.epochs}",
                           total=min(steps_per_epoch, total - step), status=running):
            if step >= total:
                break
            images = batch[0].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = ddp_model(images)
            loss, parts = loss_fn(outputs, batch)
            if not torch.isfinite(loss):
                raise _diverged(label, f"the loss became {loss.item()}", step + 1, epoch, last_good, opts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opts.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            step += 1
            seen += 1
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
        model.eval()
        entry = {"epoch": epoch + 1, "steps": step, "lr": optimizer.param_groups[0]["lr"],
                 **{k: v / max(seen, 1) for k, v in sums.items()}, "seconds": round(time.perf_counter() - start, 2)}
        # The epoch's last steps may have broken the weights after the loss was checked: no checkpoint of those.
        if broken := _first_nonfinite(model):
            raise _diverged(label, f"the weights became NaN/Inf ({broken})", step, epoch, last_good, opts)
        if evaluate is not None:
            try:
                entry["eval"] = evaluate(model)
            except FloatingPointError as e:  # the scorers' NaN/Inf output check: finite weights that overflow
                raise _diverged(label, f"the end-of-epoch evaluation failed: {e}", step, epoch, last_good,
                                opts) from None
        history.append(entry)
        if setup.on_epoch is not None:
            setup.on_epoch(entry)
        if checkpoint_dir is not None:
            last_good = checkpoint_dir / f"{label}_epoch{epoch + 1}.pt"
            _save_checkpoint(last_good, model, optimizer, scheduler, step, epoch + 1, history, fingerprint)
    model.eval()
    return history


def _first_nonfinite(model: nn.Module) -> str | None:
    """The name of the first tensor breaking the finite rule the model was loaded under (NaN anywhere, Inf in
    parameters, BatchNorm statistics and quantization ranges), or None: an -inf mask buffer is not divergence."""
    found = first_nonfinite(model)
    return found.name if found else None


def _diverged(label: str, what: str, step: int, epoch: int, last_good: Path | None,
              opts: TrainOptions) -> WorkbenchError:
    """The one message for training gone NaN/Inf, wherever it was seen: what, when, what is kept, what to do."""
    kept = (f"the last good checkpoint is checkpoints/{last_good.name} (resume from it with {label}.resume)"
            if last_good else "no epoch had finished, so there is no checkpoint")
    return WorkbenchError(
        f"{label}: {what} at step {step} (epoch {epoch + 1}); training stopped and {kept}. Lower the learning rate "
        f"(lr: {opts.lr}) or set grad_clip"
    )


def _sharded(loader, label: str):
    """The loader's dataset split across ranks, per-rank batch = the loader's batch / world size."""
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data.distributed import DistributedSampler

    from .. import distributed

    world = distributed.world_size()
    if loader.batch_size % world:
        raise WorkbenchError(f"{label}: data.batch_size {loader.batch_size} does not divide over {world} processes; "
                             f"make it a multiple of {world}")
    sampler = DistributedSampler(loader.dataset, shuffle=isinstance(loader.sampler, RandomSampler), seed=0)
    return DataLoader(loader.dataset, batch_size=loader.batch_size // world, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn)


def _save_checkpoint(path: Path, model, optimizer, scheduler, step: int, epoch: int, history: list[dict],
                     fingerprint: dict) -> None:
    # The RNG state too: a resumed run then shuffles the next epoch exactly as an uninterrupted one.
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": step, "epoch": epoch, "history": history, "rng": torch.get_rng_state(), "fingerprint": fingerprint}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# As _save_checkpoint writes them; the fingerprint is compared apart (a missing one reads as other settings).
TRAINING_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "history", "rng")


def _load_checkpoint(path: Path, model, optimizer, scheduler, label: str,
                     fingerprint: dict) -> tuple[int, int, list[dict]]:
    if not path.is_file():
        raise WorkbenchError(f"{label}.resume: checkpoint {path} does not exist: give a checkpoints/*.pt file of an "
                             "earlier run")
    from ..models.checkpoints import check_checkpoint_file, check_loaded_tensors

    check_checkpoint_file(path, f"{label}.resume", f"a checkpoints/{label}_epoch<N>.pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any file at all may be named here: torch says why it is not one in many ways
        raise WorkbenchError(
            f"{label}.resume: {path} is not a checkpoint torch can read "
            f"({(str(e).splitlines() or [type(e).__name__])[0]}): "
            f"give a checkpoints/{label}_epoch<N>.pt file that a {label} stage wrote"
        ) from None
    check_loaded_tensors(state, f"{label}.resume", path)
    if missing := [k for k in TRAINING_CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]:
        what = f"a {type(state).__name__}" if not isinstance(state, dict) else f"a dict without {', '.join(missing)}"
        raise WorkbenchError(
            f"{label}.resume: {path} is not a training checkpoint ({what}; a model's state dict or weights file is "
            f"not one): give a checkpoints/{label}_epoch<N>.pt file that a {label} stage wrote"
        )
    try:
        saved = state.get("fingerprint", {})
        if changed := sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k)):
            raise WorkbenchError(
                f"{label}.resume: {path} comes from a run with other settings ({', '.join(changed)} changed); resume "
                "with the recipe that wrote it, or start afresh without resume"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return int(state["step"]), int(state["epoch"]), list(state["history"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise WorkbenchError(f"{label}.resume: {path} does not fit this model and optimizer "
                             f"({str(e).splitlines()[0]})") from None
