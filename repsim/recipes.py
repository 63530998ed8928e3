"""Training recipes: optimiser, learning-rate schedule, regularisation and augmentation.

:data:`RECIPES` holds the study's recipe (``paper``) and faster ones, each with where it comes
from; a recipe's augmentation runs on the device (:mod:`repsim.augment`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from repsim import augment
from repsim.errors import UserError
from repsim.evaluation import prepare
from repsim.registry import ModelSpec


@dataclass(frozen=True)
class Recipe:
    """How to train; ``epochs``, ``batch_size`` and ``lr`` are defaults a run may override."""

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
    mix_prob: float = 1.0  # share of batches mixed (MixUp/CutMix); the others keep their labels
    autoaugment: bool = False  # AutoAugment, CIFAR-10 policy
    erasing: float = 0.0  # random-erasing probability per image (0 = off)


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
                      "0.2 from airbench94.py); on an H200: 92.50 % at 100 epochs",
               pad_mode="reflect", decay_all=True),
        Recipe("fast-vit-aug", "adamw", 1e-3, 0.05, 500, 200, 10, "cosine", 0.1, 0,
               "small-data ViT regularisation on top of fast-vit: AdamW 1e-3 (wd 0.05, not on "
               "norms, biases, tokens), 10 warm-up epochs, cosine, label smoothing 0.1, "
               "RandAugment (2 ops, magnitude 9), MixUp 0.8 / CutMix 1.0, crop + flip",
               source="DeiT (Touvron et al. 2021) and Lee et al. 2021 (ViT for small-size "
                      "datasets) regularisation; on an H200 58.0 % after 104 of 160 epochs "
                      "(2.7 s an epoch): too slow a learner for a window",
               randaugment=2, mixup=0.8, cutmix=1.0),
        Recipe("tinyvit", "adamw", 1e-3, 0.05, 256, 300, 30, "cosine", 0.1, 0,
               "small-ViT recipe of Gent Wu 2025 and Lee et al. 2021: AdamW 1e-3 (wd 0.05, not "
               "on norms, biases, position embeddings, prefix tokens), batch 256, 30 warm-up "
               "passes then cosine over 300 passes (the source's 100 'epochs' of 3 passes "
               "each), crop + flip, AutoAugment (CIFAR-10 policy), random erasing 0.25, "
               "MixUp 1.0 / CutMix 1.0 on half the batches, label smoothing 0.1; stochastic "
               "depth 0.1 is the model's",
               source="erow/PoorViTs finetune.py (vit_cifar_tiny 93.65 % on CIFAR-10) and "
                      "aanna0701/SPT_LSA_ViT; not yet run here",
               mixup=1.0, cutmix=1.0, mix_prob=0.5, autoaugment=True, erasing=0.25),
        Recipe("fast-resnet-aa", "sgd", 0.2, 5e-4, 500, 100, 0, "triangular", 0.2, 12,
               "fast-resnet-ls with AutoAugment (CIFAR-10 policy) between the translate + "
               "flip and the cutout: fast-resnet and fast-resnet-ls both stop at 92.5-92.6 % "
               "on the JPEG copy, overfitting; on an H200: 92.82 % at 100 epochs (4.3 "
               "minutes, sharing the GPU) with the cutout before AutoAugment, the order "
               "before it was fixed",
               source="Keller Jordan, cifar10-airbench (train_resnet18.py); AutoAugment + "
                      "cutout as in Cubuk et al. 2019 (CIFAR-10 policy)",
               pad_mode="reflect", decay_all=True, autoaugment=True),
        Recipe("fast-vit-aa", "adamw", 3e-4, 0.05, 256, 150, 5, "cosine", 0.1, 0,
               "small ViT with AutoAugment: AdamW 3e-4 (wd 0.05, not on norms, biases, "
               "tokens), batch 256, 5 warm-up epochs then cosine, label smoothing 0.1, crop + "
               "flip + AutoAugment (CIFAR-10 policy), no MixUp/CutMix; on an H200 (3.1 s an "
               "epoch) 77.5 % after 59 of 70 epochs, still rising; at lr 1e-3 it stalled "
               "(61.0 % after 94 of 100)",
               source="omihub777/ViT-CIFAR (AutoAugment + label smoothing, a ViT of this size: "
                      "90.9 % at 200 epochs on CIFAR-10); fast-vit overfits the JPEG copy at 70 %",
               autoaugment=True),
        Recipe("fast-vit", "adamw", 3e-4, 0.0, 500, 200, 0, "cosine", 0.0, 0,
               "fast small ViT: AdamW 3e-4 (no weight decay), batch 500, cosine to 0 over "
               "200 epochs, no warm-up, 4-px-padded crop + flip",
               source="mrothroc/mixlab-cookbook vit-cifar10-muon (this architecture, best "
                      "AdamW: 82.56 +- 0.19 % at 200 epochs)"),
    )
}


# Fields that do not decide how a run trains: prose (a rewording changes no step) and the
# defaults a run may override (a run's identity holds the values in force).
NOT_TRAINING = ("description", "source", "epochs", "batch_size", "lr")


def training_fields(recipe: Any) -> Any:
    """A recipe's fields (``dataclasses.asdict``) less :data:`NOT_TRAINING`; what a resumed
    run must share with the interrupted one. Anything else (a foreign state's): unchanged."""
    if not isinstance(recipe, dict):
        return recipe
    return {k: v for k, v in recipe.items() if k not in NOT_TRAINING}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; UserError naming the valid ones."""
    if name not in RECIPES:
        raise UserError(f"recipe={name!r} is unknown; valid: {', '.join(RECIPES)}")
    return RECIPES[name]


def lr_at(step: int, total_steps: int, steps_per_epoch: int, recipe: Recipe, lr: float) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``. Warm-up takes
    at most half the steps, so a run shortened below it (``--epochs``) still peaks, then
    decays."""
    warm = min(recipe.warmup_epochs * steps_per_epoch, total_steps // 2)
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


# 1-D parameters that are weights all the same, decayed like matrices: locality
# self-attention's learned per-head temperature (repsim.tinyvit.HeadTemperature) is no norm,
# bias, position embedding or prefix token, and its source (Lee et al. 2021) decays it.
DECAYED_VECTORS = ("attn.q_norm.temperature",)


def make_optimizer(model: nn.Module, recipe: Recipe, lr: float, dev: torch.device
                   ) -> torch.optim.Optimizer:
    """The recipe's optimiser; weight decay skips norms, biases and tokens unless
    ``recipe.decay_all``. Fused kernels on CUDA (one launch for all parameters)."""
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        skip = not recipe.decay_all and (
            (p.ndim <= 1 and not pname.endswith(DECAYED_VECTORS))
            or pname.endswith(("pos_embed", "cls_token", "reg_token")))
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


def describe_augmentation(recipe: Recipe) -> str:
    """The recipe's augmentation in words, in the order applied (recorded in every checkpoint)."""
    parts = [f"{recipe.pad_mode}-padded {augment.PAD}-px translate + flip"]
    if recipe.randaugment:
        parts.append(f"RandAugment {recipe.randaugment} ops, magnitude {recipe.ra_magnitude}")
    if recipe.autoaugment:
        parts.append("AutoAugment (CIFAR-10 policy)")
    if recipe.cutout:
        parts.append(f"cutout {recipe.cutout}")
    if recipe.erasing:
        parts.append(f"random erasing {recipe.erasing}")
    if recipe.mixup or recipe.cutmix:
        share = f" on {recipe.mix_prob:g} of batches" if recipe.mix_prob < 1 else ""
        parts.append(f"MixUp {recipe.mixup} / CutMix {recipe.cutmix}{share}")
    return " + ".join(parts)


def batch(images: torch.Tensor, labels: torch.Tensor, spec: ModelSpec, recipe: Recipe,
          gen: torch.Generator, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's augmentation of ``(B, H, W, 3)`` uint8 images, prepared for the model,
    and the targets: ``labels`` ``(B,)``, or soft targets ``(B, classes)`` when it mixes."""
    x = augment.crop_flip(images, gen, recipe.pad_mode)
    if recipe.randaugment:
        x = augment.rand_augment(x, recipe.randaugment, recipe.ra_magnitude)
    if recipe.autoaugment:
        x = augment.auto_augment(x)
    if recipe.cutout:  # after the policy, as in Cubuk et al. 2019: its ops leave the square
        x = augment.cutout(x, gen, recipe.cutout)
    if recipe.erasing:
        # The mean colour: zero after the model's normalisation, as in the reference code.
        x = augment.random_erase(x, gen, recipe.erasing, tuple(round(255 * m) for m in spec.mean))
    x = prepare(spec, x)
    if recipe.mixup or recipe.cutmix:
        return augment.mix(x, labels, num_classes, gen, recipe.mixup, recipe.cutmix,
                           prob=recipe.mix_prob)
    return x, labels
