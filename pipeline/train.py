"""The one training engine, reused by every training stage.

- Optimizer and learning-rate schedule from :class:`pipeline.config.TrainCfg`;
  the schedule is a pure function of (epoch, step), so resuming needs no
  scheduler state.
- Every random draw of epoch ``e`` (shuffling, augmentation, anything using
  torch's global generator such as Gumbel noise) is seeded from
  ``(seed, e)``. An interrupted run resumed from its last checkpoint therefore
  takes exactly the same steps as an uninterrupted one: same final metrics.
- A checkpoint (model, optimizer, history) is written atomically after every
  epoch and removed when training ends; it is reused only if its fingerprint
  (config, data, starting weights, and the code itself) matches the current run.
  With ``keep_state`` the last one stays, with the final and test results, for
  the caller to remove once everything after training went through (a stage
  that fails at logging then reruns without training or testing again: same
  results, same timing).
- Validation every epoch, test once at the end; progress through tqdm.
- Data-parallel under torchrun (:mod:`pipeline.distributed`): the model is
  wrapped in DDP and each rank trains on its share ``[rank::world]`` of every
  global batch (``batch_size`` stays the global batch; the permutation and the
  augmentation are drawn for the whole batch, from the same seeds), so the
  steps match the single-process run but for batch statistics and summation
  order. Rank 0 writes the resume state.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline import distributed
from pipeline.checkpoint import load_resume, resume_fingerprint, save_resume
from pipeline.config import ResizedCropCfg, TrainCfg
from pipeline.data import TensorTask
from pipeline.data.streamed import FileImages, MappedImages, is_streamed
from pipeline.errors import ConfigError

# Extra loss terms a method adds to the task loss:
# (model, inputs, logits, targets, progress in [0, 1]) -> {name: scalar tensor}.
ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, float], dict[str, torch.Tensor]]
EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class Hooks:
    """What a method plugs into the engine (all optional).

    ``epoch_start(epoch)`` runs before each training epoch (temperature
    schedules, Gumbel noise switch, threshold resets); ``extra_loss`` adds
    terms to the task loss; ``epoch_metrics(model)`` adds numbers to each
    epoch's record after validation (e.g. executed fraction, kernel sparsity).
    """

    epoch_start: Callable[[int], None] | None = None
    extra_loss: ExtraLoss | None = None
    epoch_metrics: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass
class FitResult:
    history: list[dict[str, float]]
    final: dict[str, float]
    resumed_from: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    test_correct: list[float] = field(default_factory=list)  # per test image, from the pass that gave test_acc


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = all cores) and return the count in use."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    """Seed torch's global generator; call before building a model so its init is reproducible."""
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def learning_rate(cfg: TrainCfg, epoch: int, step: int, steps_per_epoch: int) -> float:
    """LR at ``step`` of ``epoch`` (0-based): linear warm-up, then cosine / step / constant."""
    base = cfg.optimizer.lr
    t = epoch + step / steps_per_epoch
    warm = cfg.schedule.warmup_epochs
    if t < warm:
        return base * (t + 1.0 / steps_per_epoch) / warm
    if cfg.schedule.name == "cosine":
        progress = (t - warm) / max(1e-9, cfg.epochs - warm)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule.name == "step":
        return base * cfg.schedule.gamma ** sum(epoch >= m for m in cfg.schedule.milestones)
    return base


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the parameters exempt from weight decay: the ones a module lists in its
    ``no_weight_decay()`` (e.g. SD-Conv's thresholds, which decay would pull to 0)."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        exempt = getattr(module, "no_weight_decay", None)
        if callable(exempt):
            out.update(f"{prefix}.{n}" if prefix else n for n in exempt())
    return out


def make_optimizer(cfg: TrainCfg, named_params: list[tuple[str, nn.Parameter]],
                   exempt: set[str] = frozenset()) -> torch.optim.Optimizer:
    """SGD or AdamW over ``named_params``; the ``exempt`` names get no weight decay."""
    o = cfg.optimizer
    decay = [p for n, p in named_params if n not in exempt]
    plain = [p for n, p in named_params if n in exempt]
    groups = [{"params": decay, "weight_decay": o.weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


class Normalizer:
    """uint8 [N, C, H, W] -> normalised float32, with optional pad-and-crop / flip augmentation."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).clamp_min(1e-6).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor | FileImages | MappedImages) -> torch.Tensor | MappedImages:
        """A normalised batch; of a streamed split, its lazily normalised view (decoded batch by batch)."""
        if is_streamed(x):
            return MappedImages(x, self)
        return (x.float().div_(255.0) - self.mean) / self.std


def normalized(data: TensorTask, split: str) -> torch.Tensor:
    """The images of one split of ``data``, normalised (no augmentation)."""
    return Normalizer(data.mean, data.std)(data.splits[split][0])


def resized_crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                       gen: torch.Generator) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of ``n`` random-resized crops: torchvision's RandomResizedCrop.get_params
    (area fraction uniform in ``scale``, aspect log-uniform in ``ratio``, 10 tries, then the centre crop at
    the nearest allowed aspect), drawn from ``gen``."""
    area, log_lo, log_hi = h * w, math.log(ratio[0]), math.log(ratio[1])
    boxes = []
    for _ in range(n):
        draws = torch.rand(10, 4, generator=gen, dtype=torch.float64).tolist()
        for u_area, u_ratio, u_top, u_left in draws:
            target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
            aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                boxes.append((int(u_top * (h - ch + 1)), int(u_left * (w - cw + 1)), ch, cw))
                break
        else:
            aspect = w / h
            if aspect < ratio[0]:
                cw, ch = w, round(w / ratio[0])
            elif aspect > ratio[1]:
                ch, cw = h, round(h * ratio[1])
            else:
                cw, ch = w, h
            boxes.append(((h - ch) // 2, (w - cw) // 2, ch, cw))
    return boxes


def augment(x: torch.Tensor, padding: int, hflip: bool, gen: torch.Generator,
            resized_crop: ResizedCropCfg | None = None) -> torch.Tensor:
    """Random-resized crop (bilinear, back to the batch's size), pad-and-crop (zero padding) and horizontal
    flip on a uint8 batch, in that order, each when asked for."""
    if resized_crop is not None:
        n, _, h, w = x.shape
        boxes = resized_crop_boxes(n, h, w, tuple(resized_crop.scale), tuple(resized_crop.ratio), gen)
        x = torch.cat([F.interpolate(x[i : i + 1, :, t : t + ch, l : l + cw].float(), size=(h, w), mode="bilinear",
                                     align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
                       for i, (t, l, ch, cw) in enumerate(boxes)])
    if padding:
        n, _, h, w = x.shape
        padded = F.pad(x, (padding,) * 4)
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=gen)
        x = torch.stack([padded[i, :, r : r + h, c : c + w] for i, (r, c) in enumerate(offsets.tolist())])
    if hflip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normalizer, batch_size: int) -> dict[str, float]:
    """Loss and accuracy of ``model`` in eval mode over (x, y)."""
    return evaluate_images(model, x, y, norm, batch_size)[0]


@torch.no_grad()
def evaluate_images(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normalizer,
                    batch_size: int) -> tuple[dict[str, float], list[float]]:
    """:func:`evaluate`'s loss and accuracy, and per image 1.0 where ``model`` classifies it right, else 0.0,
    from the same forward pass (their mean is the accuracy even where eval is random, e.g. random masks)."""
    model.eval()
    loss_sum, correct = 0.0, []
    for i in range(0, len(y), batch_size):
        logits = model(norm(x[i : i + batch_size]))
        target = y[i : i + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).double().tolist()
    n = max(1, len(y))
    return {"loss": loss_sum / n, "acc": sum(correct) / n}, correct


def fit(
    model: nn.Module,
    data: TensorTask,
    cfg: TrainCfg,
    seed: int,
    resume_path: Path,
    fingerprint: str,
    on_epoch: EpochHook | None = None,
    hooks: Hooks | None = None,
    desc: str = "train",
    params: list[nn.Parameter] | None = None,
    test: bool = True,
    keep_state: bool = False,
) -> FitResult:
    """Train ``model`` on ``data.splits['train']``, validate each epoch, test at the end.

    ``on_epoch(epoch, metrics)`` is called for every epoch, also for epochs
    restored from a checkpoint, so a resumed run logs a complete history.
    ``params`` restricts the optimised parameters (linear probes).
    ``test=False`` never touches the test split (searches select on validation).
    """
    hooks = hooks or Hooks()
    ranks, me = distributed.world_size(), distributed.rank()
    if cfg.batch_size % ranks:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {ranks} data-parallel processes")
    threads = set_threads(distributed.local_threads(cfg.threads) if ranks > 1 else cfg.threads)
    torch.manual_seed(seed)
    norm = Normalizer(data.mean, data.std)
    x_train, y_train = data.splits["train"]
    n = len(y_train)
    steps = max(1, n // cfg.batch_size)  # drop the last partial batch: BN needs > 1 sample
    named = [(n, p) for n, p in model.named_parameters() if params is None or any(p is q for q in params)]
    optimizer = make_optimizer(cfg, named, no_weight_decay(model))
    net = model
    if ranks > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=None)

    history: list[dict[str, float]] = []
    start = 0
    done = None
    fingerprint = resume_fingerprint(fingerprint)
    state = load_resume(resume_path, fingerprint)
    if state is not None:
        done = state.get("result")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = [dict(h) for h in state["history"]]
        start = int(state["epoch"]) + 1
        if distributed.is_main():
            tqdm.write(f"{desc}: resuming after epoch {start} from {resume_path}")
        if on_epoch:
            for h in history:
                on_epoch(int(h["epoch"]), h)

    t_train = 0.0
    for epoch in range(start, cfg.epochs):
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        torch.manual_seed(epoch_seed(seed, epoch) + 1 + me)  # e.g. Gumbel noise: each rank its own
        model.train()
        if hooks.epoch_start:  # after train(): a hook may put parts of the model back in eval mode
            hooks.epoch_start(epoch)
        perm = torch.randperm(n, generator=gen)
        loss_sum = correct = seen = 0
        extras_sum: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(range(steps), desc=f"{desc} {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, mininterval=1.0,
                   disable=not distributed.is_main())
        for step in bar:
            lr = learning_rate(cfg, epoch, step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb = augment(x_train[idx], cfg.augment.crop_padding, cfg.augment.hflip, gen, cfg.augment.resized_crop)
            yb = y_train[idx]
            if ranks > 1:
                xb, yb = xb[me::ranks], yb[me::ranks]
            inputs = norm(xb)
            logits = net(inputs)
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            total = loss
            if hooks.extra_loss is not None:
                progress = (epoch + step / steps) / cfg.epochs
                for name, value in hooks.extra_loss(model, inputs, logits, yb, progress).items():
                    total = total + value
                    extras_sum[name] = extras_sum.get(name, 0.0) + value.item() * len(yb)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        bar.close()
        t_train += time.perf_counter() - t0
        if ranks > 1:  # the epoch's numbers over the global batches
            keys = sorted(extras_sum)
            totals = distributed.sum_across_ranks([loss_sum, correct, seen, *(extras_sum[k] for k in keys)])
            loss_sum, correct, seen = totals[:3]
            extras_sum = dict(zip(keys, totals[3:]))
        val = evaluate(model, *data.splits["val"], norm, cfg.eval_batch_size)
        record = {
            "epoch": float(epoch),
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            **{f"train_{k}": v / seen for k, v in extras_sum.items()},
        }
        if hooks.epoch_metrics:
            record.update(hooks.epoch_metrics(model))
        history.append(record)
        if distributed.is_main():
            tqdm.write(
                f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                f"train acc {record['train_acc']:.4f} val acc {record['val_acc']:.4f} ({time.perf_counter() - t0:.1f}s)"
            )
            save_resume(resume_path, fingerprint, epoch=epoch, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), history=history)
        distributed.barrier()
        if on_epoch:
            on_epoch(epoch, record)

    if done is not None:  # trained and tested by the execution that kept this state
        return FitResult(history, dict(done["final"]), start, dict(done["timing"]), list(done["test_correct"]))
    last = history[-1]
    final = {
        "val_acc": last["val_acc"],
        "best_val_acc": max(h["val_acc"] for h in history),
        "train_acc": last["train_acc"],
        "epochs": float(cfg.epochs),
    }
    if test:
        measured, test_correct = evaluate_images(model, *data.splits["test"], norm, cfg.eval_batch_size)
        final = {"test_acc": measured["acc"], "test_loss": measured["loss"], **final}
    timing = {"train_seconds": t_train, "threads": float(threads)}
    if t_train > 0:
        timing["train_images_per_second"] = (cfg.epochs - start) * steps * cfg.batch_size / t_train
    test_correct = [float(v) for v in test_correct] if test else []
    distributed.barrier()
    if distributed.is_main():
        if keep_state:
            save_resume(resume_path, fingerprint, epoch=cfg.epochs - 1, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), history=history,
                        result={"final": final, "timing": timing, "test_correct": test_correct})
        else:
            resume_path.unlink(missing_ok=True)  # finished: a later run starts afresh
    return FitResult(history, final, start, timing, test_correct)
