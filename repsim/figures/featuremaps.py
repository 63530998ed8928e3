"""CNN feature maps: per image and stage, the ``top`` channels by mean activation (ResNet
stages are post-ReLU: how strongly each fires), their maps and the mean over all channels;
the ``repsim featuremaps`` command and the figure kind ``featuremaps``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repsim import __version__, paths
from repsim.assets import DEFAULT_DATASET
from repsim.errors import UserError, is_whole
from repsim.figures import draw
from repsim.weights import check_weights_seeds


@dataclass(frozen=True)
class StageMaps:
    """One stage's view of ``B`` images: ``maps`` ``(B, k, h, w)`` of the ``channels`` ``(B, k)``
    with ``scores`` ``(B, k)`` (their mean activation, descending) and ``mean_map``
    ``(B, h, w)`` (mean over all ``num_channels`` channels). float32 / int64 numpy arrays."""

    maps: np.ndarray
    channels: np.ndarray
    scores: np.ndarray
    mean_map: np.ndarray
    num_channels: int


def stage_activations(model: nn.Module, x: torch.Tensor | np.ndarray,
                      stages: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """``{stage: (B, C, h, w) float32 tensor on the model's device}`` for the batch ``x`` (a
    tensor or array), in eval mode (BatchNorm on its running statistics, which stay as they
    were); UserError when a stage's output is not a 4-D feature map (e.g. a ViT block) or the
    model says its maps are channels last."""
    from repsim.attention import model_input
    from repsim.hooks import capture, eval_mode

    # A string is capture's own "a,b" request; list() would read it letter by letter.
    request = stages if isinstance(stages, str) else list(stages)
    with torch.inference_mode(), eval_mode(model), capture(model, request, reduce=None) as cap:
        model(model_input(model, x))
        outputs = cap.collect(len(x))  # every stage ran once, samples first
    for name, a in outputs.items():
        if cap.channels_last and a.ndim == 4:  # as repsim.locality: (B, H, W, C) or not?
            raise UserError(f"layer {name!r}: this model says its maps are channels last "
                            "(timm output_fmt 'NHWC'), so which axis holds channels is "
                            "unknown; valid: channels-first CNNs (resnet18_cifar, "
                            "resnet18_imagenet, timm:resnet*); fix: pass such a CNN")
        if a.ndim != 4:
            raise UserError(
                f"{type(model).__name__} layer {name!r} gives outputs of shape {tuple(a.shape)}, "
                "not (batch, channels, h, w) feature maps; valid: convolutional models "
                "(resnet18_cifar, resnet18_imagenet, timm:<a CNN>); fix: pass a CNN, or draw "
                "a ViT's attention with `repsim attention`")
    return {name: a.float() for name, a in outputs.items()}


def top_channels(act: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(channels ``(B, k)`` int64, scores ``(B, k)`` float32): per image, the ``k`` channels of
    ``act`` ``(B, C, h, w)`` with the largest mean activation, strongest first."""
    if not is_whole(k):  # int() made 2.5 two channels and True one
        raise UserError(f"top={k!r} must be a positive whole number of channels, e.g. 8")
    a = torch.as_tensor(act)
    k = min(int(k), a.shape[1])
    scores, idx = a.float().mean(dim=(2, 3)).topk(k, dim=1)
    return idx.cpu().numpy().astype(np.int64), scores.cpu().numpy().astype(np.float32)


def feature_maps(model: nn.Module, x: torch.Tensor | np.ndarray, stages: str | Sequence[str],
                 top: int = 8) -> dict[str, StageMaps]:
    """``{stage: StageMaps}`` for the preprocessed batch ``x`` ``(B, 3, S, S)``: each stage's
    ``top`` strongest channels per image, and its mean map."""
    out = {}
    for name, act in stage_activations(model, x, stages).items():
        channels, scores = top_channels(act, top)
        idx = torch.as_tensor(channels, device=act.device)
        maps = torch.take_along_dim(act, idx[:, :, None, None], dim=1)
        out[name] = StageMaps(maps=maps.cpu().numpy(), channels=channels, scores=scores,
                              mean_map=act.mean(1).cpu().numpy(), num_channels=act.shape[1])
    return out


@dataclass
class FeatureMapsConfig:
    """What ``repsim featuremaps`` computes; ``ids`` overrides ``images``."""

    model: str
    weights: str | None = None
    dataset: str = DEFAULT_DATASET
    split: str = "test"
    data_root: str | None = None
    images: int | None = None  # the first N probe images; None: the first of each class
    ids: list[int] | None = None
    stages: str | None = None  # default: layer1..layer4 for ResNets, else the default layers
    top: int = 8
    probe: int = 1000  # the images are drawn from this probe set
    seed: int = 0  # of the probe subset
    weights_seed: int = 0  # of random weights
    device: str | None = None
    out: str | None = None
    progress: bool = True


def check_cnn(spec) -> None:
    """UserError for a ViT (``spec``: its :class:`repsim.registry.ModelSpec`)."""
    if spec.family == "vit":
        raise UserError(
            f"{spec.name} is a Vision Transformer: it has tokens, not convolutional feature "
            "maps; valid: resnet18_cifar, resnet18_imagenet or timm:<a CNN>; fix: pass a CNN, "
            f"or draw {spec.name}'s attention maps with `repsim attention`")


def resolve_stages(model: nn.Module, spec, request: str | Sequence[str] | None) -> list[str]:
    """Stage names: the request through :func:`repsim.models.layer_names`; None -> ResNet
    ``layer1..layer4`` (other CNNs: their default layers). UserError for ViTs."""
    from repsim.models import layer_names

    check_cnn(spec)
    if request is None and spec.family == "resnet":
        return [f"layer{i}" for i in range(1, 5)]
    return layer_names(model, spec, request, name="stages")


def run_featuremaps(cfg: FeatureMapsConfig) -> dict[str, Any]:
    """:func:`featuremap_views` of ``cfg.model`` as ``featuremaps_<label>_<stage>.png`` and
    ``featuremaps_<label>.npz`` in ``cfg.out`` (default ``$REPSIM_FIGURES/featuremaps``);
    returns a summary dict (outputs, stages, seconds)."""
    from repsim import models as zoo
    from repsim.data import load_probe_set, pick_images
    from repsim.registry import get_spec

    t0 = time.perf_counter()
    check_weights_seeds(vars(cfg))
    check_cnn(get_spec(cfg.model))  # before any loading
    model, wprov = zoo.load_model(cfg.model, cfg.weights, seed=cfg.weights_seed,
                                  device=zoo.resolve_device(cfg.device))
    probe = load_probe_set(cfg.dataset, cfg.split, n=cfg.probe, seed=cfg.seed,
                           data_root=cfg.data_root, progress=cfg.progress)
    images, ids = pick_images(probe, cfg.images, cfg.ids, cfg.data_root, cfg.progress)
    tag = paths.weights_tag(cfg.weights, cfg.weights_seed)
    label = f"{cfg.model} ({tag})" if tag else cfg.model
    out = Path(cfg.out) if cfg.out else paths.figures_dir("featuremaps")
    res = featuremap_views(model, cfg.model, wprov, label, probe, images, ids, cfg.stages,
                           cfg.top, out / f"featuremaps_{paths.slug(label)}",
                           lambda fig, stem, prov: draw.save(fig, stem, prov, ("png",)))
    return {"outputs": res["outputs"], "out": str(out), "model": cfg.model, "label": label,
            "stages": res["stages"], "n_images": len(ids), "top": cfg.top,
            "seconds": time.perf_counter() - t0}


def featuremap_views(model: nn.Module, name: str, wprov: dict, label: str, probe,
                     images: np.ndarray, ids: np.ndarray, stages: str | Sequence[str] | None,
                     top: int, stem: Path, save) -> dict[str, Any]:
    """One figure per stage (``save(fig, <stem>_<stage>, provenance)``) and ``<stem>.npz``;
    returns ``{"outputs", "stages", "views"}``."""
    from repsim import models as zoo
    from repsim.attention import model_device
    from repsim.registry import get_spec, preprocessing_info

    spec = get_spec(name)
    names = resolve_stages(model, spec, stages)
    x = zoo.preprocess(spec, torch.from_numpy(images).to(model_device(model)))
    views = feature_maps(model, x, {s: zoo.module_for(model, spec, s) for s in names}, top)
    prov = {"model": name, "label": label, "weights": wprov, "stages": names, "top": top,
            "ids": ids.tolist(), "data": probe.provenance(),
            "preprocessing": preprocessing_info(spec),
            "versions": {"repsim": __version__, "torch": torch.__version__}}
    outputs: list[str] = []
    arrays = {}
    for s, v in views.items():
        c, h, w = v.num_channels, v.maps.shape[2], v.maps.shape[3]
        fig = draw.feature_maps(images, v, ids=ids, title=f"{label}: {s} ({c} channels, "
                                f"{h}x{w}), strongest {v.maps.shape[1]} per image")
        key = paths.slug(s)
        outputs += map(str, save(fig, stem.with_name(f"{stem.name}_{key}"), {**prov, "stage": s}))
        arrays.update({f"{key}/maps": v.maps, f"{key}/channels": v.channels,
                       f"{key}/scores": v.scores, f"{key}/mean_map": v.mean_map})
    npz = paths.save_npz(stem.with_name(f"{stem.name}.npz"), ids=ids, images=images,
                         provenance=np.asarray(json.dumps(prov, default=str)), **arrays)
    return {"outputs": outputs + [str(npz)], "stages": names, "views": views}


def build_figure(spec: dict, ctx) -> list[Path]:
    """Figure kind ``featuremaps``: :func:`featuremap_views` of the spec's ``model`` on its
    ``images`` (default: the first of each class) or ``ids``, ``stages``, ``top``."""
    from repsim.registry import get_spec

    ref = ctx.model_ref(spec["model"], spec)
    check_cnn(get_spec(ref.model))
    stages = ctx.names(spec, "stages", "layer names", '"layer1,layer4"')
    model, prov = ctx.model(ref)  # a model without weights skips the figure here
    probe, images, ids = ctx.drawn_images(spec, default=None)
    with ctx.on_device([model]) as (on,):
        res = featuremap_views(on, ref.model, prov, ref.display(), probe, images, ids,
                               stages, ctx.positive_int(spec, "top", 8),
                               ctx.out_dir / ctx.name, lambda fig, stem, p: draw.save(fig, stem))
    ctx.data.update({"model": ref.model, "label": ref.display(), "weights": prov,
                     "image_ids": ids.tolist(), "stages": {
        s: {"channels": v.channels.tolist(), "scores": v.scores.round(6).tolist(),
            "num_channels": v.num_channels} for s, v in res["views"].items()}})
    return [Path(p) for p in res["outputs"]]
