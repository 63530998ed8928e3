"""Running a model on the device: precision, input preparation, accuracy and loss.

:func:`evaluate` scores a model on a split held on its device (training's evaluations);
:func:`evaluate_model` is ``repsim eval``.
"""

from __future__ import annotations

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

from repsim import __version__, paths
from repsim.assets import DEFAULT_DATASET
from repsim.errors import UserError, is_whole


def _cpuinfo(key: str) -> str:
    """The value of the first ``key`` line of /proc/cpuinfo ('' where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16 flags)."""
    flags = _cpuinfo("flags").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_precision(dev: torch.device, precision: str = "auto") -> str:
    """"bf16" (autocast) or "fp32" for training on ``dev``.

    "auto": bf16 on CUDA and on CPUs with native bf16 (a ResNet-18 step at batch 100 ran
    1.84x faster than fp32 on an AVX512-BF16 EPYC), fp32 elsewhere (emulated bf16 is slow).
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"precision={precision!r} is unknown; valid: auto, bf16, fp32")
    if precision != "auto":
        return precision
    return "bf16" if dev.type == "cuda" or cpu_has_native_bf16() else "fp32"


def hardware(dev: torch.device) -> str:
    """The GPU's name, or the CPU's and its thread count (recorded with results)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads (CPU)"


def autocast(dev: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on ``dev`` (CUDA or CPU) when ``cpu_bf16`` (the name predates CUDA
    honouring it), else exact float32."""
    # Evaluation passes nothing: under bf16 close logits tie and argmax takes the lower class
    # (vit_cifar: 4 of 1,000 predictions from the rounding of its float32 logits alone).
    kind = "cuda" if dev.type == "cuda" else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=bool(cpu_bf16))


def prepare(spec, images: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> the model's input (channels-last for ResNets: faster convs)."""
    from repsim.models import preprocess

    x = preprocess(spec, images)
    if spec.family == "resnet":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def to_device(ps, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A probe set's images ``(N, H, W, 3)`` uint8 and labels ``(N,)`` int64 on ``dev``."""
    x = torch.from_numpy(np.ascontiguousarray(ps.images)).to(dev)
    y = torch.from_numpy(np.asarray(ps.labels, dtype=np.int64)).to(dev)
    return x, y


@torch.inference_mode()
def evaluate(model: nn.Module, spec, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500, progress: bool = False) -> dict[str, float]:
    """Top-1 accuracy (%), mean cross-entropy (nats, summed in float64) and ``n`` of ``model``
    on ``images`` ``(N, H, W, 3)`` uint8 and ``labels`` ``(N,)`` int64 on its device, from
    float32 logits on every device."""
    from tqdm import tqdm

    from repsim.hooks import eval_mode

    _check_batch_size(batch_size)
    if len(images) == 0 or len(labels) != len(images):
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}): evaluate needs "
                         "one label per image and at least one image")
    dev = images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct, broken = (torch.zeros((), dtype=torch.int64, device=dev) for _ in range(2))
    starts = range(0, len(images), batch_size)
    # eval_mode, not model.train(was_training) after: that would switch a part kept in eval
    # mode during training (frozen BatchNorm) to train mode, and skip it on an error.
    with eval_mode(model):
        for s in tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False):
            x = prepare(spec, images[s:s + batch_size])
            y = labels[s:s + batch_size].long()  # cross_entropy takes int64 targets only
            with autocast(dev):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            ok = torch.isfinite(logits).all(1)  # NaN logits argmax to class 0: no guess
            correct += ((logits.argmax(1) == y) & ok).sum()
            broken += (~ok).sum()
    n = len(images)
    if broken.item():
        warnings.warn(f"{broken.item()} of {n} images gave non-finite logits (a diverged or "
                      "overflowing model?); they count as wrong", RuntimeWarning, stacklevel=2)
    return {"accuracy": 100.0 * correct.item() / n, "loss": loss_sum.item() / n, "n": n}


def _check_batch_size(batch_size: int) -> None:
    # Below 1, range() over the batch starts is empty (top-1 would read 0 %) or refuses.
    if not is_whole(batch_size):
        raise UserError(f"batch_size={batch_size} is not valid; pass a positive number of "
                        "images per forward pass, e.g. batch_size=500")


@dataclass
class EvalConfig:
    model: str
    weights: str | None = None  # None: the model's own; "random"; or a file
    dataset: str = DEFAULT_DATASET
    split: str = "test"
    n: int | None = None  # images drawn by `seed`; None: the whole split
    seed: int = 0
    weights_seed: int = 0  # random weights (weights="random")
    device: str | None = None
    data_root: str | None = None
    batch_size: int = 500
    progress: bool = True


def evaluate_model(cfg: EvalConfig) -> dict[str, Any]:
    """``repsim eval``: accuracy and loss of a registered model on a split, with provenance
    (``checkpoint_dataset``: what a checkpoint file was trained on; warns when it is another)."""
    from repsim.data import load_probe_set
    from repsim.models import load_model, resolve_device
    from repsim.registry import get_spec
    from repsim.weights import check_weights_seeds

    check_weights_seeds(vars(cfg))
    _check_batch_size(cfg.batch_size)  # before the data and the model are loaded
    spec = get_spec(cfg.model)
    dev = resolve_device(cfg.device)
    ps = load_probe_set(cfg.dataset, cfg.split, n=cfg.n, seed=cfg.seed, data_root=cfg.data_root,
                        progress=cfg.progress)
    model, prov = load_model(cfg.model, cfg.weights, seed=cfg.weights_seed, device=dev)
    if prov["num_classes"] != len(ps.classes):
        raise UserError(f"{cfg.model} ({prov['weights']}) has {prov['num_classes']} outputs but "
                        f"{cfg.dataset} has {len(ps.classes)} classes; fix: pass weights=PATH "
                        f"trained on {cfg.dataset}, or the matching dataset=NAME")
    _check_manifest(prov)
    trained_on = _trained_on(prov)
    if trained_on is not None and trained_on != ps.dataset:  # transfer may be meant: no error
        shown = ps.dataset + (f" ({cfg.dataset})" if cfg.dataset != ps.dataset else "")
        warnings.warn(f"the weights were trained on {trained_on} but are evaluated on {shown}: "
                      "the accuracy measures transfer, not the model's own task", stacklevel=2)
    if spec.family == "resnet":
        model = model.to(memory_format=torch.channels_last)
    x, y = to_device(ps, dev)
    t0 = time.perf_counter()
    res = evaluate(model, spec, x, y, cfg.batch_size, progress=cfg.progress)
    return {"model": cfg.model, "weights": prov["weights"],
            "weights_sha256": prov["weights_sha256"], "weights_seed": prov["seed"],
            "checkpoint_dataset": trained_on,
            "dataset": cfg.dataset, "split": cfg.split, "data_source": ps.source,
            "seed": ps.seed, "ids_sha256": paths.ids_digest(ps.ids), "n": res["n"],
            "accuracy": res["accuracy"], "loss": res["loss"], "device": str(dev),
            "hardware": hardware(dev), "seconds": time.perf_counter() - t0,
            "repsim_version": __version__}


def _check_manifest(prov: dict[str, Any]) -> None:
    """Warn when the manifest beside a weights file lists another version of it: a training
    run killed between writing the file and its entry left the previous one's metrics."""
    from repsim.checkpoints import listed, manifest_entry, manifest_path

    if prov["weights_sha256"] is None:  # random or pretrained weights: no file
        return
    path = Path(prov["weights"])
    entry = manifest_entry(path)
    if entry is not None and not listed(path, prov["weights_sha256"]):
        warnings.warn(f"{manifest_path(path)} lists another version of {path.name} (sha256 "
                      f"{str(entry.get('sha256'))[:12]}, the file's "
                      f"{prov['weights_sha256'][:12]}): its epochs and metrics are not this "
                      "file's (a training run stopped between writing the two?); fix: rerun "
                      "the training command, which rewrites the entry", stacklevel=3)


def _trained_on(prov: dict[str, Any]) -> str | None:
    """The dataset a weights file's checkpoint metadata says it was trained on (None: a bare
    state dict, or no file)."""
    from repsim.weights import read_state_dict

    if prov["weights_sha256"] is None:  # random or pretrained weights: no file
        return None
    data = read_state_dict(prov["weights"])[1].get("data")  # another's file: anything
    dataset = data.get("dataset") if isinstance(data, dict) else None
    return dataset if isinstance(dataset, str) else None
