"""Training and evaluation: the study's recipe, a stronger one, fine-tuning; resumable.

The whole training split lives on the device as ``(N, H, W, 3)`` uint8 (150 MB for
CIFAR-10); each batch is gathered, augmented and preprocessed there, so a GPU never waits
for a CPU data loader. The same code runs on CPU.

A run keeps its state in ``<run_dir>/state.pt`` (model, optimiser, schedule, RNG states,
epoch), rewritten atomically after every epoch, and logs one JSON line per epoch to
``<run_dir>/log.jsonl``. Running the same command again continues from the last finished
epoch and ends where an uninterrupted run would. After every epoch the deliverable
checkpoint (float16 weights plus provenance and metrics) is written to ``out`` and listed in
the ``manifest.json`` next to it, so a run stopped early still leaves a usable,
honestly-labelled checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repsim import __version__, augment, paths
from repsim.errors import UserError


@dataclass(frozen=True)
class Recipe:
    """An optimisation recipe; ``epochs``/``batch_size``/``lr`` are CLI-overridable defaults."""

    name: str
    optimizer: str  # "adam" | "adamw" | "sgd" (Nesterov)
    lr: float  # peak learning rate
    weight_decay: float
    batch_size: int
    epochs: int
    warmup_epochs: int  # linear warm-up from lr/100, then the schedule
    schedule: str  # "constant" | "cosine" | "triangular" (per step, to 0 at the last step)
    label_smoothing: float
    cutout: int  # side in pixels of one zeroed square per image; 0 = off
    description: str
    source: str = ""  # where the recipe and its reported accuracy come from
    momentum: float = 0.9  # sgd only
    pad_mode: str = "zeros"  # random-crop padding: "zeros" or "reflect"
    decay_all: bool = False  # weight decay on norms and biases too (as in the recipe's source)
    start_factor: float = 0.2  # triangular: lr starts at start_factor * lr ...
    peak_at: float = 0.2  # ... and peaks at this fraction of all steps
    randaugment: int = 0  # RandAugment ops per image (0 = off) ...
    ra_magnitude: int = 9  # ... at this magnitude (of 30)
    mixup: float = 0.0  # MixUp Beta alpha (0 = off)
    cutmix: float = 0.0  # CutMix Beta alpha (0 = off); with both on, CutMix half the time


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("paper", "adam", 1e-4, 0.0, 100, 500, 0, "constant", 0.0, 0,
               "Zhu, Chen & Yang 2023: Adam 1e-4, batch 100, 500 epochs, 4-px-padded random "
               "crop + horizontal flip, no pixel normalisation",
               source="Zhu, Chen & Yang 2023 (ViT 81.36 %, ResNet-18 92.8 %)"),
        Recipe("strong", "adamw", 1e-3, 0.05, 128, 200, 10, "cosine", 0.1, 8,
               "small-data ViT recipe: AdamW 1e-3 (wd 0.05), 10 warm-up epochs, cosine decay, "
               "label smoothing 0.1, crop + flip + 8-px cutout"),
        Recipe("fast-resnet", "sgd", 0.2, 5e-4, 500, 80, 0, "triangular", 0.0, 12,
               "fast ResNet-18: SGD Nesterov (momentum 0.9, wd 5e-4 on every weight), batch "
               "500, triangular lr 0.04 -> 0.2 at 20 % of steps -> 0, 4-px reflect-padded "
               "translate + flip + 12-px cutout, 80 epochs (the source's 32 gave 91.2 % at "
               "40 on the JPEG copy; 80 gave 92.6 %)",
               source="Keller Jordan, cifar10-airbench research/train_resnet18.py "
                      "(about 94 % in 32 epochs)",
               pad_mode="reflect", decay_all=True),
        Recipe("fast-resnet-ls", "sgd", 0.2, 5e-4, 500, 100, 0, "triangular", 0.2, 12,
               "fast-resnet with label smoothing 0.2 (airbench94's) and 100 epochs",
               source="Keller Jordan, cifar10-airbench (train_resnet18.py; label smoothing "
                      "0.2 from airbench94.py); not yet run here",
               pad_mode="reflect", decay_all=True),
        Recipe("fast-vit-aug", "adamw", 1e-3, 0.05, 500, 200, 10, "cosine", 0.1, 0,
               "small-data ViT regularisation on top of fast-vit: AdamW 1e-3 (wd 0.05, not on "
               "norms, biases, tokens), 10 warm-up epochs, cosine, label smoothing 0.1, "
               "RandAugment (2 ops, magnitude 9), MixUp 0.8 / CutMix 1.0, crop + flip",
               source="DeiT (Touvron et al. 2021) and Lee et al. 2021 (ViT for small-size "
                      "datasets) regularisation; fast-vit overfits the JPEG copy at 70 %; "
                      "not yet run here",
               randaugment=2, mixup=0.8, cutmix=1.0),
        Recipe("fast-vit", "adamw", 3e-4, 0.0, 500, 200, 0, "cosine", 0.0, 0,
               "fast small ViT: AdamW 3e-4 (no weight decay), batch 500, cosine to 0 over "
               "200 epochs, no warm-up, 4-px-padded crop + flip",
               source="mrothroc/mixlab-cookbook vit-cifar10-muon (this architecture, best "
                      "AdamW: 82.56 +- 0.19 % at 200 epochs)"),
    )
}



@dataclass
class TrainConfig:
    model: str
    dataset: str = "cifar10"
    recipe: str = "paper"
    epochs: int | None = None  # None: the recipe's
    batch_size: int | None = None
    lr: float | None = None
    train_fraction: float = 1.0
    seed: int = 0
    weights: str | None = None  # start point: None = scratch or the model's pretrained
    device: str | None = None
    data_root: str | None = None
    out: str | None = None  # final checkpoint; default checkpoints/<run name>.pt
    run_dir: str | None = None  # resume state + log; default $REPSIM_CACHE/runs/<run name>
    eval_batch_size: int = 500
    restart: bool = False
    max_steps: int | None = None  # stop after this many optimiser steps (tests, smoke runs)
    progress: bool = True
    compile: bool = False  # torch.compile the training forward/backward
    eval_every: int = 1  # evaluate + save the resumable state every K epochs and at the end
    time_limit: float | None = None  # minutes: stop after the last epoch that fits
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA and native-bf16 CPUs) | "bf16" | "fp32"


# --------------------------------------------------------------------------- small pieces


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"recipe {name!r} is unknown; valid: {', '.join(RECIPES)}; "
                        "fix: pass --recipe paper or --recipe strong")
    return RECIPES[name]


def run_name(cfg: TrainConfig) -> str:
    """``vit_cifar`` for the study's default run, else the settings that differ."""
    parts = [cfg.model.replace(":", "-")]
    if cfg.dataset != "cifar10":
        parts.append(cfg.dataset)
    if cfg.recipe != "paper":
        parts.append(cfg.recipe)
    if cfg.train_fraction != 1.0:
        parts.append(f"frac{cfg.train_fraction:g}")
    if cfg.seed != 0:
        parts.append(f"seed{cfg.seed}")
    return "_".join(parts)


def lr_at(step: int, total_steps: int, steps_per_epoch: int, recipe: Recipe, lr: float) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``."""
    warm = recipe.warmup_epochs * steps_per_epoch
    if step < warm:
        return lr * (0.01 + 0.99 * step / warm)
    if recipe.schedule == "constant":
        return lr
    if recipe.schedule == "triangular":
        peak = max(1, int(recipe.peak_at * total_steps))
        if step < peak:
            return lr * (recipe.start_factor + (1.0 - recipe.start_factor) * step / peak)
        return lr * max(0.0, (total_steps - step) / max(1, total_steps - peak))
    t = (step - warm) / max(1, total_steps - warm)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _replace_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A fresh, seeded classifier for a new task (fine-tuning)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(model, "reset_classifier"):  # every timm model
            model.reset_classifier(num_classes)
        elif isinstance(getattr(model, "fc", None), nn.Linear):  # torchvision ResNets
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        else:
            raise UserError(f"cannot find the classifier of {type(model).__name__} to replace; "
                            "fix: fine-tune a timm model or a torchvision ResNet")
    return model


def initial_model(name: str, weights: str | None, num_classes: int, seed: int
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """The starting point of a run, on CPU, in train mode.

    ``weights`` None: from scratch for models whose default weights come from training
    (vit_cifar, resnet18_cifar), else the model's pretrained weights (fine-tuning).
    ``"random"``: from scratch. A path: start from that file. A pretrained start whose
    class count differs from the dataset's gets a fresh classifier head.
    """
    from repsim.models import build_model, load_model
    from repsim.registry import get_spec

    spec = get_spec(name)
    scratch = weights == "random" or (
        weights is None and (spec.default_weights or "").startswith("checkpoints/"))
    if scratch:
        model = build_model(name, num_classes, seed)
        prov = {"init": "random", "init_sha256": None}
    else:
        model, p = load_model(name, weights, seed=seed)
        if p["num_classes"] != num_classes:
            model = _replace_head(model, num_classes, seed)
        prov = {"init": p["weights"], "init_sha256": p["weights_sha256"]}
    return model.train(), prov


@torch.inference_mode()
def evaluate(model: nn.Module, spec, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500, progress: bool = False) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on a whole split.

    ``images`` ``(N, H, W, 3)`` uint8 and ``labels`` ``(N,)`` int64, both on the model's
    device. Sums accumulate in float64.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    dev = images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False):
        x = _prepare(spec, images[s:s + batch_size])
        y = labels[s:s + batch_size]
        with _autocast(dev):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = len(images)
    return {"accuracy": 100.0 * correct.item() / n, "loss": loss_sum.item() / n, "n": n}


def _autocast(dev: torch.device, cpu_bf16: bool = False):
    # Evaluation runs bf16 on GPUs only, so a CPU `repsim eval` is exact float32; training on
    # a CPU with native bf16 (AVX512-BF16, AMX) passes cpu_bf16=True.
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16)


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16 flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_precision(dev: torch.device, precision: str = "auto") -> str:
    """"bf16" (autocast) or "fp32" for training on ``dev``.

    "auto": bf16 on CUDA and on CPUs with native bf16 (a ResNet-18 step at batch 100 ran
    1.84x faster than fp32 on an AVX512-BF16 EPYC), fp32 elsewhere (emulated bf16 is slow).
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"precision {precision!r} is unknown; valid: auto, bf16, fp32")
    if precision != "auto":
        return precision
    return "bf16" if dev.type == "cuda" or cpu_has_native_bf16() else "fp32"


def _prepare(spec, images: torch.Tensor) -> torch.Tensor:
    from repsim.models import preprocess

    x = preprocess(spec, images)
    if spec.family == "resnet":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _to_device(ps, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(ps.images)).to(dev)
    y = torch.from_numpy(np.asarray(ps.labels, dtype=np.int64)).to(dev)
    return x, y


def _atomic_save(obj: Any, path: Path) -> None:
    paths.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _hardware(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (CPU)"


def _identity(cfg: TrainConfig, recipe: Recipe, epochs: int, batch_size: int, lr: float
              ) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    ident = {"model": cfg.model, "dataset": cfg.dataset, "recipe": dataclasses.asdict(recipe),
             "batch_size": batch_size, "lr": lr, "train_fraction": cfg.train_fraction,
             "seed": cfg.seed, "weights": cfg.weights}
    if recipe.schedule != "constant":  # the schedule depends on the planned length
        ident["epochs"] = epochs
    return ident


def update_manifest(ckpt_path: Path, entry: dict[str, Any]) -> Path:
    """Insert or replace ``entry`` (by name) in the ``manifest.json`` beside the checkpoint."""
    path = ckpt_path.parent / "manifest.json"
    data = {"checkpoints": []}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is not valid JSON; fix or delete it, then rerun") from None
    rows = [r for r in data.get("checkpoints", []) if r.get("name") != entry["name"]]
    rows.append(entry)
    data["checkpoints"] = sorted(rows, key=lambda r: r["name"])
    return paths.write_text(path, json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or continue training) one model; returns the run's summary.

    Summary keys: checkpoint, manifest, run_dir, log, curve, epochs, epochs_planned,
    test_accuracy, test_loss, resumed_from, seconds, steps, train_images_per_second,
    precision, compiled, stopped (None, "max_steps" or "time limit"), stopped_early.
    """
    from tqdm import tqdm

    from repsim.data import balanced_subset, load_probe_set
    from repsim.models import resolve_device
    from repsim.registry import get_spec
    from repsim.weights import checkpoint_dir, sha256_file

    t_start = time.perf_counter()
    spec = get_spec(cfg.model)
    recipe = get_recipe(cfg.recipe)
    epochs = recipe.epochs if cfg.epochs is None else cfg.epochs
    batch_size = recipe.batch_size if cfg.batch_size is None else cfg.batch_size
    lr = recipe.lr if cfg.lr is None else cfg.lr
    for label, v in (("epochs", epochs), ("batch size", batch_size)):
        if v < 1:
            raise UserError(f"{label} {v} is not positive; valid: an integer >= 1")
    if not lr > 0:
        raise UserError(f"learning rate {lr} is not positive; valid: a float > 0, e.g. 1e-4")
    if not 0 < cfg.train_fraction <= 1:
        raise UserError(f"train fraction {cfg.train_fraction} is out of range; valid: "
                        "(0, 1], e.g. 0.1 for 10% of each class")
    if cfg.eval_every < 1:
        raise UserError(f"eval every {cfg.eval_every} epochs is not positive; valid: an "
                        "integer >= 1")
    if cfg.time_limit is not None and not cfg.time_limit > 0:
        raise UserError(f"time limit {cfg.time_limit} minutes is not positive; valid: a "
                        "number > 0, e.g. 8.5")
    dev = resolve_device(cfg.device)
    precision = train_precision(dev, cfg.precision)
    name = run_name(cfg)
    out = Path(cfg.out).expanduser() if cfg.out else checkpoint_dir() / f"{name}.pt"
    run_dir = Path(cfg.run_dir).expanduser() if cfg.run_dir else paths.cache_dir("runs", name)
    state_path, log_path = run_dir / "state.pt", run_dir / "log.jsonl"

    # Data: whole splits as uint8 on the device.
    train_ps = load_probe_set(cfg.dataset, "train", data_root=cfg.data_root,
                              progress=cfg.progress)
    test_ps = load_probe_set(cfg.dataset, "test", data_root=cfg.data_root,
                             progress=cfg.progress)
    keep = (balanced_subset(train_ps.labels, cfg.train_fraction, cfg.seed)
            if cfg.train_fraction < 1 else np.arange(len(train_ps.labels)))
    x_train, y_train = _to_device(train_ps, dev)
    keep_t = torch.from_numpy(keep).to(dev)
    x_train, y_train = x_train[keep_t], y_train[keep_t]
    x_test, y_test = _to_device(test_ps, dev)
    num_classes = len(train_ps.classes)
    n_train = len(keep)
    steps_per_epoch = n_train // batch_size + (n_train % batch_size > 0)
    total_steps = epochs * steps_per_epoch

    ident = _identity(cfg, recipe, epochs, batch_size, lr)
    model, init_prov = initial_model(cfg.model, cfg.weights, num_classes, cfg.seed)
    model = model.to(dev)
    if spec.family == "resnet":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, recipe, lr, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv once
        # cuDNN's attention kernel has produced NaNs on Hopper in recent releases; flash and
        # memory-efficient SDPA remain.
        torch.backends.cuda.enable_cudnn_sdp(False)
    bf16 = precision == "bf16"
    # The compiled module shares its parameters with `model`; checkpoints come from `model`,
    # so their keys never carry torch.compile's "_orig_mod." prefix, and evaluation runs the
    # plain module (no second compile for eval mode).
    forward = torch.compile(model) if cfg.compile else model
    compiled = cfg.compile
    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout

    start_epoch, resumed_from = 0, None
    if state_path.is_file() and not cfg.restart:
        from repsim.weights import read_weights

        state = read_weights(state_path)
        if state.get("identity") != ident:
            raise UserError(f"{state_path} belongs to a run with other settings; valid: the "
                            "same command as before to resume; fix: add --restart to start over, "
                            "or pass another --run-dir")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if dev.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], dev)
        start_epoch = resumed_from = int(state["epoch"])
        _truncate_log(log_path, start_epoch)
    elif cfg.restart and run_dir.exists():
        state_path.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    data_prov = {"dataset": cfg.dataset, "train_source": train_ps.source,
                 "n_train": n_train, "n_train_total": len(train_ps.labels),
                 "train_fraction": cfg.train_fraction,
                 "train_ids_sha256": paths.ids_digest(np.asarray(train_ps.ids)[keep]),
                 "n_test": len(test_ps.labels), "augmentation": describe_augmentation(recipe)}
    summary: dict[str, Any] = {"checkpoint": str(out), "run_dir": str(run_dir),
                               "log": str(log_path), "epochs_planned": epochs,
                               "resumed_from": resumed_from, "epochs": start_epoch,
                               "precision": precision}
    if start_epoch >= epochs:
        summary.update(_last_metrics(log_path))
    deadline = t_start + 60.0 * cfg.time_limit if cfg.time_limit else None
    step = start_epoch * steps_per_epoch
    stopped = None  # None | "max_steps" | "time limit"
    loop_seconds, images_seen = 0.0, 0
    epoch_s, finish_s = None, None  # last epoch's training time; longest evaluate + save
    pending: list[dict[str, Any]] = []  # log rows of epochs trained since the last save

    def save(epoch_done: int) -> None:
        """Evaluate, then write state, log rows, checkpoint and manifest for ``epoch_done``."""
        nonlocal finish_s
        t0 = time.perf_counter()
        test = evaluate(model, spec, x_test, y_test, cfg.eval_batch_size)
        pending[-1].update(test_loss=test["loss"], test_accuracy=test["accuracy"])
        state = {"identity": ident, "epoch": epoch_done, "model": model.state_dict(),
                 "optimizer": opt.state_dict(),
                 "rng": {"data": gen.get_state(), "torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}}
        _atomic_save(state, state_path)
        with open(log_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in pending)
        pending.clear()
        minutes = (time.perf_counter() - t_start) / 60.0
        ckpt_meta = {"name": out.stem, "model": cfg.model, "num_classes": num_classes,
                     "recipe": dataclasses.asdict(recipe), "epochs": epoch_done,
                     "epochs_planned": epochs, "batch_size": batch_size, "lr": lr,
                     "seed": cfg.seed, **init_prov, "data": data_prov,
                     "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                     "hardware": _hardware(dev), "precision": precision,
                     "compiled": compiled, "minutes_this_session": round(minutes, 2),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"),
                     "repsim_version": __version__, "torch_version": str(torch.__version__)}
        save_checkpoint(model, ckpt_meta, out)
        manifest = update_manifest(out, {
            "name": out.stem, "file": out.name, "model": cfg.model, "dataset": cfg.dataset,
            "train_fraction": cfg.train_fraction, "recipe": recipe.name, "epochs": epoch_done,
            "epochs_planned": epochs, "test_accuracy": round(test["accuracy"], 2),
            "test_loss": round(test["loss"], 4), "sha256": sha256_file(out),
            "hardware": ckpt_meta["hardware"], "precision": precision,
            "minutes_this_session": ckpt_meta["minutes_this_session"],
            "date": ckpt_meta["date"], "data_source": train_ps.source})
        summary.update(epochs=epoch_done, test_accuracy=test["accuracy"],
                       test_loss=test["loss"], manifest=str(manifest))
        finish_s = max(finish_s or 0.0, time.perf_counter() - t0)
        if cfg.progress:
            tqdm.write(f"{name} epoch {epoch_done}/{epochs}: test loss {test['loss']:.4f} "
                       f"acc {test['accuracy']:.2f}%")

    for epoch in range(start_epoch, epochs):
        if deadline is not None and epoch_s is not None and not _fits(epoch_s, 0.0, deadline):
            stopped = "time limit"
            break
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n_train, generator=gen, device=dev)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{epochs}",
                   unit="step", disable=not cfg.progress, leave=False)
        for i in bar:
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x, y = _batch(x_train[idx], y_train[idx], spec, recipe, gen, num_classes)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, steps_per_epoch, recipe, lr)
            try:
                loss, logits = _loss_and_backward(forward, opt, x, y, recipe, dev, bf16)
            except Exception as exc:  # torch.compile fails at its first call, if at all
                if forward is model:
                    raise
                warnings.warn(f"torch.compile failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); training "
                              "continues without it", stacklevel=1)
                forward, compiled = model, False
                loss, logits = _loss_and_backward(forward, opt, x, y, recipe, dev, bf16)
            opt.step()
            step += 1
            loss_sum += loss.detach().double() * len(idx)
            correct += (logits.detach().argmax(1) == y_train[idx]).sum()
            images_seen += len(idx)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped = "max_steps"
                break
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        epoch_s = time.perf_counter() - t0
        loop_seconds += epoch_s
        if stopped:
            break  # a smoke run: no epoch is recorded as finished
        pending.append({"epoch": epoch + 1, "train_loss": loss_sum.item() / n_train,
                        "train_accuracy": 100.0 * correct.item() / n_train,
                        "test_loss": None, "test_accuracy": None,
                        "lr": opt.param_groups[0]["lr"], "seconds": epoch_s})
        if cfg.progress:
            r = pending[-1]
            tqdm.write(f"{name} epoch {epoch + 1}/{epochs}: train loss {r['train_loss']:.4f} "
                       f"acc {r['train_accuracy']:.2f}% ({epoch_s:.1f} s)")
        last = epoch + 1 == epochs
        # Save on schedule, at the end, and before a time limit would cut the next epoch
        # (an evaluation + save not yet measured is assumed to cost one epoch).
        if (last or (epoch + 1) % cfg.eval_every == 0
                or (deadline is not None
                    and not _fits(epoch_s, finish_s if finish_s is not None else epoch_s,
                                  deadline))):
            save(epoch + 1)
    if log_path.is_file():
        summary["curve"] = str(plot_curve(log_path, run_dir / "curve.png", title=name))
    summary["steps"] = step
    summary["train_images_per_second"] = images_seen / loop_seconds if loop_seconds else None
    summary["seconds"] = time.perf_counter() - t_start
    summary["stopped"] = stopped
    summary["stopped_early"] = stopped is not None
    summary["compiled"] = compiled
    return summary


def _fits(epoch_s: float, finish_s: float, deadline: float) -> bool:
    """Whether one more epoch (10 % margin) plus an evaluation + save ends before ``deadline``."""
    return time.perf_counter() + 1.1 * epoch_s + finish_s <= deadline


def describe_augmentation(recipe: Recipe) -> str:
    """The recipe's augmentation in words (recorded in every checkpoint)."""
    parts = [f"{recipe.pad_mode}-padded {augment.PAD}-px translate + flip"]
    if recipe.cutout:
        parts.append(f"cutout {recipe.cutout}")
    if recipe.randaugment:
        parts.append(f"RandAugment {recipe.randaugment} ops, magnitude {recipe.ra_magnitude}")
    if recipe.mixup or recipe.cutmix:
        parts.append(f"MixUp {recipe.mixup} / CutMix {recipe.cutmix}")
    return " + ".join(parts)


def _batch(images: torch.Tensor, labels: torch.Tensor, spec, recipe: Recipe,
           gen: torch.Generator, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented, preprocessed batch and its targets (class ids, or soft targets
    ``(B, classes)`` when the recipe mixes images)."""
    x = augment.crop_flip(images, gen, recipe.pad_mode)
    if recipe.cutout:
        x = augment.cutout(x, gen, recipe.cutout)
    if recipe.randaugment:
        x = augment.rand_augment(x, recipe.randaugment, recipe.ra_magnitude)
    x = _prepare(spec, x)
    if recipe.mixup or recipe.cutmix:
        return augment.mix(x, labels, num_classes, gen, recipe.mixup, recipe.cutmix)
    return x, labels


def _loss_and_backward(forward: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                       y: torch.Tensor, recipe: Recipe, dev: torch.device, bf16: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward; gradients land in the parameters, the caller steps.
    ``y``: class ids ``(B,)`` or soft targets ``(B, classes)``."""
    opt.zero_grad(set_to_none=True)
    with _autocast(dev, cpu_bf16=bf16):
        logits = forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
    loss.backward()
    return loss, logits


def make_optimizer(model: nn.Module, recipe: Recipe, lr: float, dev: torch.device
                   ) -> torch.optim.Optimizer:
    """The recipe's optimiser; weight decay skips norms, biases and tokens unless
    ``recipe.decay_all``. Fused kernels on CUDA (one launch for all parameters)."""
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        skip = not recipe.decay_all and (p.ndim <= 1
                                         or pname.endswith(("pos_embed", "cls_token")))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": recipe.momentum, "nesterov": True}
    else:
        cls, kw = (torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW), {}
    if dev.type == "cuda":
        try:
            return cls(groups, lr=lr, fused=True, **kw)
        except (TypeError, RuntimeError):  # a torch without this fused kernel
            pass
    return cls(groups, lr=lr, **kw)


def _truncate_log(log_path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs after the last saved state (a crash between the two)."""
    if not log_path.is_file():
        return
    rows = [ln for ln in log_path.read_text().splitlines()
            if ln.strip() and json.loads(ln)["epoch"] <= epochs_done]
    log_path.write_text("".join(r + "\n" for r in rows))


def _last_metrics(log_path: Path) -> dict[str, Any]:
    rows = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
    tested = [r for r in rows if r.get("test_accuracy") is not None]
    last = tested[-1] if tested else {}
    return {"test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss")}


def save_checkpoint(model: nn.Module, meta: dict[str, Any], path: Path) -> None:
    """Float16 weights (halves the file; loading casts back) plus JSON-able metadata."""
    sd = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.cpu())
          for k, v in model.state_dict().items()}
    _atomic_save({"state_dict": sd, **meta}, path)


def plot_curve(log_path: Path, out: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch (train and test) from a run's JSON-lines log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(log_path).read_text().splitlines() if ln.strip()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for split, style in (("train", "-"), ("test", "--")):
        # Test metrics exist only on evaluated epochs (--eval-every).
        pts = [r for r in rows if r.get(f"{split}_loss") is not None]
        ep = [r["epoch"] for r in pts]
        ax1.plot(ep, [r[f"{split}_loss"] for r in pts], style, marker=".", label=split)
        ax2.plot(ep, [r[f"{split}_accuracy"] for r in pts], style, marker=".", label=split)
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title} loss")
    ax2.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title=f"{title} accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    paths.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- eval


@dataclass
class EvalConfig:
    model: str
    weights: str | None = None
    dataset: str = "cifar10"
    split: str = "test"
    device: str | None = None
    data_root: str | None = None
    batch_size: int = 500
    progress: bool = True


def evaluate_model(cfg: EvalConfig) -> dict[str, Any]:
    """Top-1 accuracy and loss of a registered model on a whole split, with provenance."""
    from repsim.data import load_probe_set
    from repsim.models import load_model, resolve_device
    from repsim.registry import get_spec

    spec = get_spec(cfg.model)
    dev = resolve_device(cfg.device)
    ps = load_probe_set(cfg.dataset, cfg.split, data_root=cfg.data_root, progress=cfg.progress)
    model, prov = load_model(cfg.model, cfg.weights, device=dev)
    if prov["num_classes"] != len(ps.classes):
        raise UserError(f"{cfg.model} ({prov['weights']}) has {prov['num_classes']} outputs but "
                        f"{cfg.dataset} has {len(ps.classes)} classes; fix: pass --weights "
                        f"trained on {cfg.dataset}, or the matching --dataset")
    if spec.family == "resnet":
        model = model.to(memory_format=torch.channels_last)
    x, y = _to_device(ps, dev)
    t0 = time.perf_counter()
    res = evaluate(model, spec, x, y, cfg.batch_size, progress=cfg.progress)
    return {"model": cfg.model, "weights": prov["weights"],
            "weights_sha256": prov["weights_sha256"], "dataset": cfg.dataset,
            "split": cfg.split, "data_source": ps.source, "n": res["n"],
            "accuracy": res["accuracy"], "loss": res["loss"], "device": str(dev),
            "seconds": time.perf_counter() - t0, "repsim_version": __version__}
