"""Training a model with a recipe (:mod:`repsim.recipes`), from scratch or fine-tuning; resumable.

The training split lives on the device as uint8 and each batch is augmented there, so a GPU
never waits for a CPU data loader. A run keeps its state in ``<run_dir>/state.pt`` and a log
line per epoch in ``<run_dir>/log.jsonl``: the same command again continues where it stopped
and ends where an uninterrupted run would. Every save also writes the float16 checkpoint with
the metrics of those very weights, so a run stopped early leaves an honestly-labelled one.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import numbers
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from repsim import __version__, checkpoints, paths, recipes, registry
from repsim.errors import UserError, is_whole
from repsim.evaluation import evaluate, hardware, to_device, train_precision
from repsim.recipes import Recipe
from repsim.weights import checkpoint_dir, replace_head, sha256_file


@dataclasses.dataclass
class TrainConfig:
    model: str
    dataset: str = "cifar10"  # a dataset with a train split (not the bundled probe set)
    recipe: str = "paper"
    epochs: int | None = None  # None: the recipe's
    batch_size: int | None = None
    lr: float | None = None
    train_fraction: float = 1.0
    seed: int = 0  # training subset, data order, augmentation, dropout
    weights_seed: int | None = None  # random init and a replaced head; None: seed
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
    snapshots: str | list[int] | None = None  # "0,1,5,every:10": see repsim.checkpoints


def _resolve(cfg: TrainConfig) -> tuple[TrainConfig, Recipe]:
    """``cfg`` with the recipe's epochs, batch size and lr where it leaves them None and its
    dataset's name in lower case (as data loads it), and the recipe; UserError for bad values."""
    from repsim.data import DATASETS

    recipe = recipes.get_recipe(cfg.recipe)
    if not isinstance(cfg.dataset, str) or cfg.dataset.lower() not in DATASETS:
        # An image folder has one split, which would be scored as the test split too; the
        # bundled probe set has test images only.
        raise UserError(f"dataset={cfg.dataset!r} cannot be trained on; valid: "
                        f"{', '.join(DATASETS)} (a train split and a separate test split); fix: "
                        "dataset=cifar10 with data_root=DIR holding cifar10/train and "
                        "cifar10/test")
    cfg = dataclasses.replace(cfg, dataset=cfg.dataset.lower(), **{
        k: getattr(recipe, k) for k in ("epochs", "batch_size", "lr") if getattr(cfg, k) is None})
    cfg = _plain_numbers(cfg)
    if not 0 < cfg.lr < math.inf:
        raise UserError(f"lr={cfg.lr} is not positive; valid: a finite float > 0, e.g. 1e-4")
    if not 0 < cfg.train_fraction <= 1:
        raise UserError(f"train_fraction={cfg.train_fraction} is out of range; valid: (0, 1], "
                        "e.g. 0.1 for 10% of each class")
    if cfg.time_limit is not None and not cfg.time_limit > 0:
        raise UserError(f"time_limit={cfg.time_limit} is not positive; valid: minutes > 0, e.g. 8")
    return cfg, recipe


def _plain_numbers(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its counts and seeds as int and its reals as float (numpy's too: they are
    written to JSON); UserError for another type, a count below 1 or a negative seed."""
    plain: dict[str, Any] = {}
    for name, low in (("epochs", 1), ("batch_size", 1), ("eval_every", 1), ("max_steps", 0),
                      ("seed", 0), ("weights_seed", 0), ("eval_batch_size", 1)):
        value = getattr(cfg, name)
        if value is None and name in ("max_steps", "weights_seed"):  # None: not set
            continue
        if name.endswith("seed") and not is_whole(value, 0):
            raise UserError(f"{name}={value!r} is no seed; valid: an integer >= 0, e.g. 0")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise UserError(f"{name}={value!r} is not an integer; valid: an integer >= {low}")
        if value < low:
            raise UserError(f"{name}={value} is {'not positive' if low else 'negative'}; "
                            f"valid: an integer >= {low}")
        plain[name] = int(value)
    for name in ("lr", "train_fraction", "time_limit"):  # their ranges: checked by the caller
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real | None):
            raise UserError(f"{name}={value!r} is not a number; valid: a float, e.g. 0.5")
        plain[name] = None if value is None else float(value)
    return dataclasses.replace(cfg, **plain)


def run_name(cfg: TrainConfig) -> str:
    """``vit_cifar`` for the study's default run, else the settings that differ."""
    differing = [(cfg.dataset != "cifar10", cfg.dataset), (cfg.recipe != "paper", cfg.recipe),
                 (cfg.train_fraction != 1.0, f"frac{cfg.train_fraction:g}"),
                 (cfg.seed != 0, f"seed{cfg.seed}"),
                 (cfg.weights_seed is not None, f"wseed{cfg.weights_seed}")]
    return "_".join([cfg.model.replace(":", "-"), *(part for on, part in differing if on)])


def _out_path(cfg: TrainConfig) -> Path:
    """``out``, else ``checkpoints/<run name>.pt``; a folder refused (else: at the 1st save)."""
    out = Path(cfg.out).expanduser() if cfg.out else checkpoint_dir() / f"{run_name(cfg)}.pt"
    if out.is_dir():
        raise UserError(f"out={out} is a folder; valid: the checkpoint's file path, e.g. "
                        f"{out / run_name(cfg)}.pt; fix: out=PATH of a file")
    return out


def _identity(cfg: TrainConfig, recipe: Recipe) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    weights = cfg.weights
    if weights not in (None, "random", "timm", "torchvision"):  # a file: one however spelled
        weights = str(Path(weights).expanduser().resolve())
    ident = {"model": cfg.model, "dataset": cfg.dataset,
             "recipe": recipes.training_fields(dataclasses.asdict(recipe)),
             "batch_size": cfg.batch_size, "lr": cfg.lr, "train_fraction": cfg.train_fraction,
             "seed": cfg.seed, "weights": weights}
    if cfg.weights_seed is not None:  # absent otherwise, so older runs still resume
        ident["weights_seed"] = cfg.weights_seed
    if (arch := registry.user_architecture(cfg.model)) is not None:  # the user's code may change
        ident["architecture"] = arch
    if recipe.schedule != "constant" or recipe.warmup_epochs:  # lr_at uses the planned length
        ident["epochs"] = cfg.epochs
    return ident


def initial_model(name: str, weights: str | None, num_classes: int, seed: int
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """The starting point of a run, on CPU, in train mode, and its provenance.

    ``weights`` None: from scratch for models whose default weights come from training
    (vit_cifar, resnet18_cifar) or are ``"random"``, else the pretrained weights;
    ``"random"``: from scratch; a path: that file. A pretrained start with another class count
    gets a fresh head. ``seed`` seeds the random init and the new head (provenance
    ``init_seed``: None if none is drawn).
    """
    from repsim.models import build_model, load_model

    default = registry.get_spec(name).default_weights or ""
    if (weights or default) == "random" or (weights is None and default.startswith("checkpoints/")):
        model, drawn = build_model(name, num_classes, seed), True
        prov = {"init": "random", "init_sha256": None}
    else:
        model, p = load_model(name, weights, seed=seed)
        drawn = p["num_classes"] != num_classes
        model = replace_head(model, num_classes, seed) if drawn else model
        prov = {"init": p["weights"], "init_sha256": p["weights_sha256"]}
    return model.train(), {**prov, "init_seed": seed if drawn else None}


# --------------------------------------------------------------------------- a run


class _Run:
    """What the training loop reads and advances: settings (``cfg`` with the recipe's defaults
    filled in), data on the device, model, optimiser and progress; resumed unless restarted."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        from repsim.models import resolve_device

        self.spec = registry.get_spec(cfg.model)
        self.cfg, self.recipe = cfg, recipe = _resolve(cfg)
        self.snap_epochs = checkpoints.snapshot_epochs(cfg.snapshots, cfg.epochs)
        self.dev = dev = resolve_device(cfg.device)
        precision = train_precision(dev, cfg.precision)
        self.name = run_name(cfg)
        self.out = _out_path(cfg)
        self.run_dir = run_dir
        self.state_path, self.log_path = self.run_dir / "state.pt", self.run_dir / "log.jsonl"
        from repsim.data import CLASS_COUNTS  # known before any image is read: a start's
        num_classes = CLASS_COUNTS[cfg.dataset]  # head is settled, a useless weights_seed refused
        model, init_prov = initial_model(cfg.model, cfg.weights, num_classes,
                                         cfg.seed if cfg.weights_seed is None else cfg.weights_seed)
        if cfg.weights_seed is not None and init_prov["init_seed"] is None:
            raise UserError(f"weights_seed={cfg.weights_seed} has no effect: {init_prov['init']} "
                            f"sets every parameter, its {num_classes}-class head included; fix: "
                            "drop weights_seed= (seed= seeds data, dropout), or weights='random'")
        if init_prov["init_sha256"] and Path(init_prov["init"]).resolve() == self.out.resolve():
            raise UserError(f"out={self.out} is the run's start file (weights="
                            f"{init_prov['init']}); its first save would overwrite the weights "
                            "it starts from; fix: another out=PATH")
        data_prov = self._load_data()
        model = model.to(dev)
        if self.spec.family == "resnet":
            model = model.to(memory_format=torch.channels_last)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv once
            # cuDNN's attention has produced NaNs on Hopper; flash and memory-efficient remain.
            torch.backends.cuda.enable_cudnn_sdp(False)
        # Checkpoints come from `model`, never from the compiled wrapper, so their keys carry
        # no "_orig_mod." prefix, and evaluation runs the plain module (no second compile).
        self.model = model
        self.forward = torch.compile(model) if cfg.compile else model  # shares its parameters
        self.opt = recipes.make_optimizer(model, recipe, cfg.lr, dev)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)  # data order, augmentation
        self.meta = {  # checkpoint provenance fixed for the whole run
            "name": self.out.stem, "model": cfg.model, "num_classes": num_classes,
            "recipe": dataclasses.asdict(recipe), "epochs_planned": cfg.epochs,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, **init_prov,
            "data": data_prov, "hardware": hardware(dev), "precision": precision,
            "repsim_version": __version__, "torch_version": str(torch.__version__)}
        self.steps_per_epoch = math.ceil(len(self.y_train) / cfg.batch_size)
        self.start_epoch, self.resumed_from = 0, None
        self.step = 0  # optimiser steps since epoch 0, counting those of resumed sessions
        self.images_seen, self.train_seconds = 0, 0.0  # this session's step loops
        torch.manual_seed(cfg.seed)  # dropout
        if self.state_path.is_file() and not cfg.restart:
            self._resume()
        else:  # from scratch: a saved state, log and snapshots beside `out` are another run's
            for old in (self.state_path, self.log_path):  # (train made run_dir, to hold it)
                old.unlink(missing_ok=True)
            checkpoints.clear_snapshots(self.out)

    def _resume(self) -> None:
        """Load the saved state; refused when it belongs to other settings."""
        state = checkpoints.read_state(self.state_path, self.out)
        ident = _identity(self.cfg, self.recipe)  # states saved before resolving: as typed
        saved = state.get("identity")  # older states hold all of the recipe, its prose too
        if isinstance(saved, dict) and saved.get("recipe") is not None:
            saved = {**saved, "recipe": recipes.training_fields(saved["recipe"])}
        if saved not in (ident, {**ident, "weights": self.cfg.weights}):
            raise checkpoints.other_settings(saved, ident, self.state_path, self.out)
        checkpoints.check_state(state, self.state_path, self.dev.type, self.meta["precision"],
                                self.meta["init"], self.meta["init_sha256"])
        checkpoints.check_train_data(state, self.state_path, self.train_data)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        checkpoints.set_rng(state["rng"], self.gen, self.dev)
        self.start_epoch = self.resumed_from = int(state["epoch"])
        if self.start_epoch > self.cfg.epochs:  # a constant schedule resumes across epochs=
            warnings.warn(f"{self.name} has trained {self.start_epoch} epochs, more than "
                          f"epochs={self.cfg.epochs}; nothing to do; fix: restart=True to train "
                          f"{self.cfg.epochs} from scratch (replacing {self.out})", stacklevel=4)
            self.cfg = dataclasses.replace(self.cfg, epochs=self.start_epoch)  # as it stands
            self.meta["epochs_planned"] = self.start_epoch
        self.step = self.start_epoch * self.steps_per_epoch
        # Rows of epochs after the saved state (a save interrupted before the state) go.
        checkpoints.write_log(self.log_path, [r for r in checkpoints.read_log(self.log_path)
                                   if r["epoch"] <= self.start_epoch])

    def _load_data(self) -> dict[str, Any]:
        """Put the training subset and the test split on the device as ``(N, H, W, 3)`` uint8
        and ``(N,)`` int64; returns their provenance."""
        from repsim.data import balanced_subset, load_probe_set

        cfg = self.cfg
        train_ps, test_ps = (load_probe_set(cfg.dataset, split, data_root=cfg.data_root,
                                            progress=cfg.progress) for split in ("train", "test"))
        try:
            keep = (balanced_subset(train_ps.labels, cfg.train_fraction, cfg.seed)
                    if cfg.train_fraction < 1 else np.arange(len(train_ps.labels)))
        except UserError:  # its message names its own parameter, not train_fraction
            raise UserError(f"train_fraction={cfg.train_fraction} selects no images of the "
                            f"{len(train_ps.labels)} in {cfg.dataset} train; valid: a fraction "
                            "that keeps at least one image of a class; fix: a larger "
                            "train_fraction") from None
        whole = cfg.train_fraction == 1  # no copy of the whole split to fingerprint it
        self.train_data = checkpoints.train_data_record(
            train_ps.images if whole else train_ps.images[keep], train_ps.labels[keep])
        keep_t = torch.from_numpy(keep).to(self.dev)
        self.x_train, self.y_train = (t[keep_t] for t in to_device(train_ps, self.dev))
        self.x_test, self.y_test = to_device(test_ps, self.dev)
        return {"dataset": cfg.dataset, "train_source": train_ps.source, "n_train": len(keep),
                "n_train_total": len(train_ps.labels), "train_fraction": cfg.train_fraction,
                "train_ids_sha256": paths.ids_digest(np.asarray(train_ps.ids)[keep]),
                "train_sha256": self.train_data["sha256"],
                "n_test": len(test_ps.labels),
                "augmentation": recipes.describe_augmentation(self.recipe)}


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or continue training) one model; returns the run's summary.

    Each epoch trains on a fresh permutation of the training subset; the run is saved
    (:func:`_save`) every ``eval_every`` epochs, at the ``snapshots`` epochs, after the last,
    and before a ``time_limit`` would cut the next epoch, which is then not started.
    ``max_steps`` stops mid-epoch without saving, but saves an epoch it ends (tests, smoke
    runs). Summary keys: checkpoint and manifest (their paths, also for a run finished before),
    run_dir, log, curve, epochs, epochs_planned, test_accuracy, test_loss, resumed_from (the
    saved epoch it went on from, or None), finished_before (True: nothing was left to train),
    seconds, steps, train_images_per_second, precision, compiled, stopped (None, "max_steps" or
    "time limit"), stopped_early, snapshots (the epochs kept).
    """
    t_start = time.perf_counter()
    registry.get_spec(cfg.model)  # an unknown model's one line before its run_name is formed
    c = _resolve(cfg)[0]
    run_dir = Path(c.run_dir).expanduser() if c.run_dir else paths.cache_dir("runs", run_name(c))
    with checkpoints.hold_run(run_dir, _out_path(c)):
        return _train(_Run(cfg, run_dir), t_start)


def _train(run: _Run, t_start: float) -> dict[str, Any]:
    """:func:`train` of ``run``, whose run directory this process holds."""
    cfg = run.cfg
    summary = _first_summary(run)
    # Finished: a new or lost out, or one the manifest does not list (killed between the two).
    if run.start_epoch >= cfg.epochs and not checkpoints.listed(run.out):
        summary.update(_write_checkpoint(run, run.start_epoch, *_scored_half(run), t_start))
    checkpoints.warn_of_lost_snapshots(run.out, run.snap_epochs, run.start_epoch, run.name)
    deadline = t_start + 60.0 * cfg.time_limit if cfg.time_limit else None
    stopped = None  # None | "max_steps" | "time limit"
    epoch_s, finish_s = None, None  # last epoch's training time; longest evaluate + save
    fits = True  # whether one more epoch and its evaluation + save end before the deadline
    pending: list[dict[str, Any]] = []  # log rows of epochs trained since the last save
    if run.start_epoch == 0 and 0 in run.snap_epochs:  # the initialisation, scored
        checkpoints.save_snapshot(run.out, 0, *_scored_half(run), run.meta)
    for epoch in range(run.start_epoch, cfg.epochs):
        if not fits:
            stopped = "time limit"
            break
        row = _train_epoch(run, epoch)
        if row is None:
            stopped = "max_steps"  # a smoke run: no epoch is recorded as finished
            break
        pending.append(row)
        epoch_s = row["seconds"]
        # An evaluation + save not yet measured is assumed to cost one epoch. A snapshot
        # epoch is always saved, so that its weights are scored and kept.
        fits = _fits(epoch_s, epoch_s if finish_s is None else finish_s, deadline)
        # A max_steps that ends this very epoch saves it: the next one would be cut.
        if (epoch + 1 == cfg.epochs or (epoch + 1) % cfg.eval_every == 0
                or epoch + 1 in run.snap_epochs or not fits or run.step == cfg.max_steps):
            t0 = time.perf_counter()
            summary.update(_save(run, epoch + 1, pending, t_start))
            finish_s = max(finish_s or 0.0, time.perf_counter() - t0)
            # Decided again with the save's time, so a stop never leaves an epoch unsaved.
            fits = _fits(epoch_s, finish_s, deadline)
    if run.log_path.is_file():
        from repsim.figures import draw

        fig = draw.training_curve(checkpoints.read_log(run.log_path), run.name)
        summary["curve"] = str(draw.save(fig, run.run_dir / "curve", formats=("png",))[0])
    summary.update(steps=run.step, seconds=time.perf_counter() - t_start, stopped=stopped,
                   snapshots=[s["epoch"] for s in checkpoints.snapshots(run.out)],
                   stopped_early=stopped is not None, compiled=run.forward is not run.model,
                   train_images_per_second=(run.images_seen / run.train_seconds
                                            if run.train_seconds else None))
    return summary


def _first_summary(run: _Run) -> dict[str, Any]:
    """Summary entries known before training (a run finished before: its last metrics)."""
    summary: dict[str, Any] = {"checkpoint": str(run.out),
                               "manifest": str(checkpoints.manifest_path(run.out)),
                               "run_dir": str(run.run_dir), "log": str(run.log_path),
                               "epochs_planned": run.cfg.epochs, "resumed_from": run.resumed_from,
                               "epochs": run.start_epoch, "precision": run.meta["precision"],
                               "finished_before": run.start_epoch >= run.cfg.epochs}
    if run.start_epoch >= run.cfg.epochs:
        last = next((r for r in reversed(checkpoints.read_log(run.log_path))
                     if r.get("test_accuracy") is not None), {})
        summary.update(test_accuracy=last.get("test_accuracy"), test_loss=last.get("test_loss"))
    return summary


def _fits(epoch_s: float, finish_s: float, deadline: float | None) -> bool:
    """Whether one more epoch (+10 %) and an evaluation + save end by ``deadline`` (if any)."""
    return deadline is None or time.perf_counter() + 1.1 * epoch_s + finish_s <= deadline


def _loss_and_backward(run: _Run, forward: nn.Module, x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward; the caller steps. ``y``: ids ``(B,)`` or soft ``(B, classes)``."""
    run.opt.zero_grad(set_to_none=True)
    # The recorded precision on every device (evaluation.autocast is bf16 on any GPU).
    with torch.autocast(run.dev.type, torch.bfloat16, enabled=run.meta["precision"] == "bf16"):
        logits = forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=run.recipe.label_smoothing)
    loss.backward()
    return loss, logits


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any] | None:
    """One pass over the training subset: its log row, or None when ``max_steps`` cut it."""
    t0 = time.perf_counter()
    cfg, dev, n, spe = run.cfg, run.dev, len(run.y_train), run.steps_per_epoch
    run.model.train()
    perm = torch.randperm(n, generator=run.gen, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    # max_steps counts optimiser steps since epoch 0: it may leave this epoch fewer, or none.
    steps = spe if cfg.max_steps is None else min(spe, cfg.max_steps - run.step)
    for i in tqdm(range(steps), desc=f"{run.name} epoch {epoch + 1}/{cfg.epochs}", unit="step",
                  disable=not cfg.progress, leave=False):
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        x, y = recipes.batch(run.x_train[idx], run.y_train[idx], run.spec, run.recipe,
                             run.gen, run.meta["num_classes"])
        for g in run.opt.param_groups:
            g["lr"] = recipes.lr_at(run.step, cfg.epochs * spe, spe, run.recipe, cfg.lr)
        try:
            loss, logits = _loss_and_backward(run, run.forward, x, y)
        except Exception as exc:  # torch.compile fails at its first call, if at all
            if run.forward is run.model:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); training "
                          "continues without it", stacklevel=1)
            run.forward = run.model
            loss, logits = _loss_and_backward(run, run.forward, x, y)
        run.opt.step()
        run.step += 1
        run.images_seen += len(idx)
        loss_sum += loss.detach().double() * len(idx)
        correct += (logits.detach().argmax(1) == run.y_train[idx]).sum()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    run.train_seconds += seconds
    if steps < spe:  # cut short: not a finished epoch
        return None
    row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / n,
           "train_accuracy": 100.0 * correct.item() / n, "test_loss": None,
           "test_accuracy": None, "lr": run.opt.param_groups[0]["lr"], "seconds": seconds}
    if cfg.progress:
        tqdm.write(f"{run.name} epoch {epoch + 1}/{cfg.epochs}: train loss "
                   f"{row['train_loss']:.4f} acc {row['train_accuracy']:.2f}% ({seconds:.1f} s)")
    return row


def _save(run: _Run, epoch_done: int, pending: list[dict[str, Any]], t_start: float
          ) -> dict[str, Any]:
    """Score the float16 weights, then write checkpoint, manifest entry, ``pending`` log rows
    (emptied) and, last, the resumable state; returns the summary entries of this save."""
    cfg = run.cfg
    half, test = _scored_half(run)
    pending[-1].update(test_loss=test["loss"], test_accuracy=test["accuracy"])
    if epoch_done in run.snap_epochs:
        checkpoints.save_snapshot(run.out, epoch_done, half, test, run.meta, pending[-1])
    summary = _write_checkpoint(run, epoch_done, half, test, t_start)
    checkpoints.write_log(run.log_path, checkpoints.read_log(run.log_path) + pending)
    pending.clear()
    # The resumable state goes last: an interruption before it leaves the previous state,
    # from which the same command redoes this save (and drops the log rows past it).
    rng = checkpoints.get_rng(run.gen, run.dev)
    state = {"identity": _identity(cfg, run.recipe), "epoch": epoch_done,
             **{k: run.meta[k] for k in ("precision", "init_sha256")},
             "train_data": run.train_data, "model": run.model.state_dict(),
             "optimizer": run.opt.state_dict(), "rng": rng}
    paths.atomic_write(run.state_path, lambda tmp: torch.save(state, tmp))
    if cfg.progress:
        tqdm.write(f"{run.name} epoch {epoch_done}/{cfg.epochs}: test loss {test['loss']:.4f} "
                   f"acc {test['accuracy']:.2f}%")
    return summary


def _write_checkpoint(run: _Run, epoch_done: int, half: dict[str, torch.Tensor],
                      test: dict[str, float], t_start: float) -> dict[str, Any]:
    """Write the checkpoint of ``half`` (scored ``test``) and its manifest entry; returns the
    summary entries of this save."""
    cfg = run.cfg
    meta = {**run.meta, "epochs": epoch_done, "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "compiled": run.forward is not run.model,
            "minutes_this_session": round((time.perf_counter() - t_start) / 60.0, 2),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    paths.atomic_write(run.out, lambda tmp: torch.save({"state_dict": half, **meta}, tmp))
    snaps = checkpoints.snapshots(run.out)
    manifest = checkpoints.update_manifest(run.out, {
        "name": run.out.stem, "file": run.out.name, "model": cfg.model,
        "dataset": cfg.dataset, "train_fraction": cfg.train_fraction,
        "recipe": run.recipe.name, "epochs": epoch_done, "epochs_planned": cfg.epochs,
        **{k: getattr(cfg, k) for k in ("seed", "batch_size", "lr", "weights_seed")},
        "test_accuracy": round(test["accuracy"], 2), "test_loss": round(test["loss"], 4),
        "sha256": sha256_file(run.out),
        **{k: meta[k] for k in ("hardware", "precision", "minutes_this_session", "date")},
        "data_source": meta["data"]["train_source"], **({"snapshots": snaps} if snaps else {})})
    return {"epochs": epoch_done, "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "manifest": str(manifest)}


def _scored_half(run: _Run) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The checkpoint's float16 weights and their test metrics, as `repsim eval` scores them."""
    half = checkpoints.half(run.model)
    saved = copy.deepcopy(run.model)
    saved.load_state_dict(half)
    return half, evaluate(saved, run.spec, run.x_test, run.y_test, run.cfg.eval_batch_size)
