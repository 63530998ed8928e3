"""Model zoo: registered architectures, their weights, preprocessing and layer names.

A model is a registry name (:func:`list_models`, :func:`register_model`) or ``timm:<any timm
model>``; its layers are the strings users type (``embed``, ``blocks.3``, ``stem``,
``layer2.1``, globs such as ``blocks.*``). ViT layer outputs are ``(n, 1 + tokens, d)``, ResNet
layer outputs ``(n, c, h, w)``. Weights files are read by :mod:`repsim.weights`.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import timm.data
import timm.models
import torch
import torch.nn.functional as F
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from repsim.errors import UserError
from repsim.layers import match_layers
from repsim.weights import checkpoint_dir, load_into, read_state_dict, sha256_file

TIMM_PREFIX = "timm:"
_NO_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
_INTERPOLATIONS = ("bilinear", "bicubic")  # the modes F.interpolate antialiases
_FAMILIES = ("vit", "resnet", "other")
_HEAD_KEYS = {"vit": "head.weight", "resnet": "fc.weight"}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, feed and describe one model (no weights)."""

    name: str  # registry name, e.g. "vit_cifar" or "timm:resnet18"
    family: str  # "vit", "resnet" or "other": decides layer aliases and defaults
    input_size: int  # square input side in pixels
    mean: tuple[float, float, float]  # normalisation; (0,0,0) with std (1,1,1) = none
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" | "bicubic"
    num_classes: int
    default_weights: str | None  # "checkpoints/<file>.pt", "timm", "torchvision" or None
    description: str


@dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    build: Callable[[int], nn.Module]  # num_classes -> model with random init
    head_key: str | None  # classifier weight in a state dict: a file's class count
    pretrained: Callable[[int], nn.Module] | None = None  # num_classes -> pretrained model
    pretrained_tag: str | None = None  # provenance, e.g. "torchvision:ResNet18_Weights..."


_REGISTRY: dict[str, _Entry] = {}

# --------------------------------------------------------------------------- registry


def register_model(name: str, *, family: str = "other", input_size: int = 32,
                   mean: tuple[float, float, float] = _NO_NORM[0],
                   std: tuple[float, float, float] = _NO_NORM[1],
                   interpolation: str = "bilinear", num_classes: int = 10,
                   weights: str | os.PathLike | None = None, head_key: str | None = None,
                   description: str = ""):
    """Decorator (timm-style) that makes ``build(num_classes) -> nn.Module`` a model name
    usable everywhere (``load_model``, ``extract``, ``repsim --import MODULE``, analyses). The
    model sees ``(n, 3, input_size, input_size)`` float in [0, 1] normalised by ``mean``/``std``.
    ``weights``: its default state-dict file (relative: in :func:`checkpoint_dir`); ``head_key``:
    the classifier weight, whose rows give a file's class count; ``family``: "vit" (timm ViT),
    "resnet" (``layer1`` .. ``layer4``) or "other"."""
    if name in _REGISTRY or name.startswith(TIMM_PREFIX):
        raise ValueError(f"model name {name!r} is taken; choose another")
    if family not in _FAMILIES:
        raise ValueError(f"family={family!r} is unknown; valid: {', '.join(_FAMILIES)}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is unknown; valid: "
                         f"{', '.join(_INTERPOLATIONS)}")
    spec = ModelSpec(name, family, int(input_size), tuple(float(v) for v in mean),
                     tuple(float(v) for v in std), interpolation, int(num_classes),
                     None if weights is None else os.fspath(weights),
                     description or f"user model {name}")

    def deco(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        _REGISTRY[name] = _Entry(spec, build, head_key)
        return build

    return deco


@register_model("vit_cifar", family="vit", weights="checkpoints/vit_cifar.pt",
                head_key="head.weight", description="the study's small ViT (patch 4, dim 512, "
                "depth 6, 8 heads, MLP 512, ~9.5M params) trained from scratch on CIFAR-10")
def _vit_cifar(num_classes: int) -> nn.Module:
    # A plain timm VisionTransformer so module names and forward_intermediates match timm.
    return VisionTransformer(img_size=32, patch_size=4, num_classes=num_classes, embed_dim=512,
                             depth=6, num_heads=8, mlp_ratio=1.0, class_token=True,
                             pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.0)


@register_model("resnet18_cifar", family="resnet", weights="checkpoints/resnet18_cifar.pt",
                head_key="fc.weight", description="ResNet-18 with a CIFAR stem (3x3 stride-1 "
                "conv1, no max-pool), ~11.2M params, trained from scratch on CIFAR-10")
def _resnet18_cifar(num_classes: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    # 32 px inputs: keep full resolution into layer1 instead of the ImageNet 4x downsample.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _family(model: nn.Module) -> str:
    if isinstance(model, VisionTransformer) and hasattr(model, "norm_pre"):
        return "vit"
    return "resnet" if all(hasattr(model, f"layer{i}") for i in range(1, 5)) else "other"


def _timm_family(arch: str) -> str:
    try:
        # The meta device allocates no memory and runs no real init: cheap even for huge models.
        with torch.device("meta"):
            return _family(timm.create_model(arch, pretrained=False))
    except Exception:  # some constructors compute on tensors; family is only a hint then
        return "other"


def _timm_entry(arch: str, name: str | None = None, family: str | None = None,
                description: str | None = None) -> _Entry:
    """The entry of timm architecture ``arch`` (``arch.tag`` allowed), preprocessing and class
    count from its pretrained config."""
    cfg = timm.models.get_pretrained_cfg(arch)
    data = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    interp = data["interpolation"] if data["interpolation"] in _INTERPOLATIONS else "bilinear"
    family = family or _timm_family(arch)
    head_key = _HEAD_KEYS.get(family) or (
        f"{cfg.classifier}.weight" if isinstance(cfg.classifier, str) else None)
    has_weights = bool(cfg.hf_hub_id or cfg.url or cfg.file)
    spec = ModelSpec(name or TIMM_PREFIX + arch, family, int(data["input_size"][-1]),
                     tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                     interp, int(cfg.num_classes or 1000), "timm" if has_weights else None,
                     description or f"timm model {arch}")
    tag = f"timm:{cfg.architecture}.{cfg.tag}" if cfg.tag else f"timm:{arch}"

    def build(num_classes: int, pretrained: bool = False) -> nn.Module:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)

    return _Entry(spec, build, head_key,
                  functools.partial(build, pretrained=True) if has_weights else None, tag)


def _resnet18_imagenet() -> _Entry:
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    tf = weights.transforms()
    spec = ModelSpec("resnet18_imagenet", "resnet", int(tf.crop_size[0]),
                     tuple(float(v) for v in tf.mean), tuple(float(v) for v in tf.std),
                     "bilinear", len(weights.meta["categories"]), "torchvision",
                     "torchvision ResNet-18 trained on ImageNet-1k (IMAGENET1K_V1)")

    def pretrained(num_classes: int) -> nn.Module:
        model = torchvision.models.resnet18(weights=weights)
        if num_classes != model.fc.out_features:  # another task: a fresh (seeded) classifier
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model

    return _Entry(spec, lambda n: torchvision.models.resnet18(num_classes=n), "fc.weight",
                  pretrained, f"torchvision:{weights}")


_VIT_IMAGENET = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
_REGISTRY["vit_imagenet"] = _timm_entry(
    _VIT_IMAGENET, "vit_imagenet", "vit",
    f"ViT-B/16 pretrained on ImageNet-21k, fine-tuned on ImageNet-1k (timm {_VIT_IMAGENET})")
_REGISTRY["resnet18_imagenet"] = _resnet18_imagenet()


@functools.lru_cache(maxsize=64)
def _timm_named(name: str) -> _Entry:
    arch = name[len(TIMM_PREFIX):]
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(TIMM_PREFIX + c for c in close)}; " if close else ""
        raise UserError(f"unknown timm model {arch!r} in {name!r}; {hint}valid: 'timm:<name>' "
                        "for any name in timm.list_models(), e.g. timm:resnet18")
    try:
        timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # "arch.badtag": timm knows the architecture but not the tag
        tags = timm.list_pretrained(arch.split(".")[0] + ".*")
        raise UserError(f"unknown pretrained tag in {name!r}; valid tags: "
                        f"{', '.join(tags[:8]) or 'none'}; fix: use one or drop the '.tag'"
                        ) from None
    return _timm_entry(arch)


def _entry(name: str) -> _Entry:
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return _timm_named(name)
    close = difflib.get_close_matches(str(name), list_models(), n=3, cutoff=0.5)
    if isinstance(name, str) and timm.is_model(name):  # a bare timm name: the prefix is missing
        close.append(TIMM_PREFIX + name)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(f"unknown model={name!r}; {hint}valid: {', '.join(list_models())} or "
                    "'timm:<any timm model>'")


def list_models() -> list[str]:
    """Registered model names (``timm:<name>`` models are accepted but not listed)."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered name or ``timm:<name>``; UserError if unknown."""
    return _entry(name).spec


def spec_for(model: nn.Module) -> ModelSpec:
    """A :class:`ModelSpec` for a module given directly (not by name): what layer naming
    needs. Its family is inferred, so timm ViTs and ResNets get their aliases and keywords."""
    return ModelSpec(type(model).__name__, _family(model), 0, *_NO_NORM, "bilinear", 0, None,
                     "a module given directly")


def _check_num_classes(num_classes: int | None, spec: ModelSpec) -> int:
    if num_classes is None:
        return spec.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes={num_classes!r} for {spec.name}; valid: a positive "
                        f"integer (default {spec.num_classes})")
    return num_classes


def build_model(name: str, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """The architecture with a seeded random init, in eval mode on CPU. The same ``(name,
    num_classes, seed)`` always gives the same weights; the global RNG is left as it was."""
    entry = _entry(name)
    n = _check_num_classes(num_classes, entry.spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.build(n).eval()


# --------------------------------------------------------------------------- weights


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The ``torch.device`` named (None: cuda when available); UserError if unusable."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"device={name!r} is not a torch device; valid: cpu, cuda, cuda:N, "
                        "mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={str(name)!r} was asked for but no CUDA GPU is available; "
                        "use device='cpu'")
    return dev


def default_weights_file(spec: ModelSpec) -> Path | None:
    """The file behind a model's default weights, or None (timm/torchvision/none). A relative
    name (``checkpoints/<file>.pt``) lives in :func:`checkpoint_dir`; an absolute path is itself."""
    if spec.default_weights in (None, "timm", "torchvision"):
        return None
    path = Path(spec.default_weights).expanduser()
    return path if path.is_absolute() else checkpoint_dir() / path.name


def _load_file(entry: _Entry, path: Path, num_classes: int | None, seed: int
               ) -> tuple[nn.Module, int]:
    spec = entry.spec
    sd, meta = read_state_dict(path)
    head = sd.get(entry.head_key) if entry.head_key else None
    n = num_classes
    if n is None and head is not None and head.ndim == 2:  # the class count the file has
        n = int(head.shape[0])
    elif n is None:
        n = meta.get("num_classes", spec.num_classes)
    note = f" (the file says model {meta['model']!r})" if isinstance(meta.get("model"), str) else ""
    hint = " or drop num_classes=" if num_classes is not None else ""
    return load_into(build_model(spec.name, n, seed), sd, path, spec.name, note, hint), n


def _load_pretrained(entry: _Entry, source: str, n: int, seed: int) -> nn.Module:
    spec = entry.spec
    if entry.pretrained is None or source != spec.default_weights:
        raise UserError(f"weights={source!r} is not available for {spec.name}; valid: "
                        f"{spec.default_weights or 'no default'}, 'random' or a file path")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a replaced classifier head is still reproducible
            return entry.pretrained(n)
    except Exception as e:  # offline: OSError, HF hub / URL errors, ... depending on backend
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(
            f"pretrained weights {entry.pretrained_tag} for {spec.name} are unavailable "
            f"(offline? {type(e).__name__}: {reason}); valid: a cached download, a weights file "
            "or 'random'; fix: run once with internet access to cache them, or pass "
            "weights=PATH (a state dict or checkpoint file) or weights='random'") from None


def _weights_path(spec: ModelSpec, weights: str | os.PathLike | None) -> Path:
    path = default_weights_file(spec) if weights is None else Path(weights).expanduser()
    if weights is None and not path.is_file():
        raise UserError(f"no trained weights for {spec.name}: {path} does not exist (default "
                        "weights live in $REPSIM_CHECKPOINTS or <repo>/checkpoints); fix: run "
                        f"`repsim train --model {spec.name}`, or pass weights=PATH or "
                        "weights='random'")
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"weights file {path} {what}; valid: a state dict or checkpoint file, "
                        "or 'random'")
    return path


def load_model(name: str, weights: str | os.PathLike | None = None, *,
               num_classes: int | None = None, seed: int = 0,
               device: str | torch.device | None = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A model with weights, in eval mode on ``device`` (None: cuda when available), plus its
    provenance.

    ``weights``: None -> the model's default weights (its checkpoint file, or timm /
    torchvision pretrained); ``"random"`` -> seeded random init; anything else -> a path.
    With a file and no ``num_classes``, the class count is read from the file's head.
    Provenance keys: model, weights (path, "random", "timm:<tag>" or "torchvision:<tag>"),
    weights_sha256 (of the file, else None), num_classes, seed.
    """
    entry = _entry(name)
    spec = entry.spec
    dev = resolve_device(device)
    source = spec.default_weights if weights is None else os.fspath(weights)
    if source is None:
        raise UserError(f"{spec.name} has no default weights; valid: weights=PATH or "
                        "weights='random'")
    sha = None
    if source == "random":
        n = _check_num_classes(num_classes, spec)
        model, label = build_model(spec.name, n, seed), "random"
    elif source in ("timm", "torchvision"):
        n = _check_num_classes(num_classes, spec)
        model, label = _load_pretrained(entry, source, n, seed), entry.pretrained_tag
    else:
        path = _weights_path(spec, weights)
        model, n = _load_file(entry, path, num_classes, seed)
        sha, label = sha256_file(path), str(path)
    prov = {"model": spec.name, "weights": label, "weights_sha256": sha, "num_classes": n,
            "seed": seed}
    return model.to(dev).eval(), prov


# --------------------------------------------------------------------------- preprocessing


def preprocess(spec: ModelSpec, images: torch.Tensor) -> torch.Tensor:
    """``(n, H, W, 3)`` uint8 on any device -> ``(n, 3, S, S)`` float32 on the same device.

    Scales to [0, 1], resizes to ``S = spec.input_size`` only when ``(H, W) != (S, S)``
    (antialiased ``spec.interpolation``; non-square inputs are stretched), then normalises
    ``(x - mean) / std``.
    """
    x = images
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        what = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, torch.Tensor) else type(x)
        raise UserError(f"images are {what}; valid: an (n, H, W, 3) uint8 torch.Tensor (RGB, "
                        "channels last); fix: torch.from_numpy(a), x.permute(0, 2, 3, 1) or "
                        "x.to(torch.uint8)")
    s = spec.input_size
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    if tuple(x.shape[-2:]) != (s, s):
        x = F.interpolate(x, size=(s, s), mode=spec.interpolation, align_corners=False,
                          antialias=True)
        x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL pipelines clip at uint8, so do we
    if (spec.mean, spec.std) != _NO_NORM:
        mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def preprocessing_info(spec: ModelSpec) -> dict[str, Any]:
    """JSON-able preprocessing description (for provenance / results files)."""
    return {"input_size": spec.input_size, "mean": list(spec.mean), "std": list(spec.std),
            "interpolation": spec.interpolation}


# --------------------------------------------------------------------------- layers


def _aliases(model: nn.Module, spec: ModelSpec) -> dict[str, str]:
    """alias -> module name. 'embed' = norm_pre's output = the input of blocks.0 (tokens incl.
    class token and position embedding); 'stem' = the output of conv1/bn1/relu/maxpool."""
    pair = {"vit": ("embed", "norm_pre"), "resnet": ("stem", "maxpool")}.get(spec.family)
    if pair and isinstance(getattr(model, pair[1], None), nn.Module):
        return {pair[0]: pair[1]}
    return {}


def _candidates(model: nn.Module, spec: ModelSpec) -> list[str]:
    """Every addressable layer in model order; an alias sits just before its module."""
    alias_of = {module: alias for alias, module in _aliases(model, spec).items()}
    out: list[str] = []
    for name, _ in model.named_modules():
        if name in alias_of:
            out.append(alias_of[name])
        if name:  # "" is the model itself
            out.append(name)
    return out


def _keywords(model: nn.Module, spec: ModelSpec) -> dict[str, list[str]]:
    """The layers of the keywords 'default' and 'blocks'."""
    aliases = list(_aliases(model, spec))
    if spec.family == "vit":
        blocks = aliases + [f"blocks.{i}" for i in range(len(model.blocks))]
        return {"default": blocks, "blocks": blocks}
    if spec.family == "resnet":
        stages = [f"layer{i}" for i in range(1, 5)]
        return {"default": aliases + stages, "blocks": aliases + [
            f"{s}.{j}" for s in stages for j in range(len(model.get_submodule(s)))]}
    # Other timm models: their feature-pyramid modules when declared, else top-level children.
    info = getattr(model, "feature_info", None)
    mods = [d.get("module") for d in info if isinstance(d, dict)] if isinstance(info, list) else []
    known = {name for name, _ in model.named_modules()}
    if not mods or not all(m in known for m in mods):
        mods = [name for name, _ in model.named_children()]
    return {"default": mods, "blocks": mods}


def _unknown_layer(layer: str, candidates: list[str], spec: ModelSpec) -> UserError:
    close = difflib.get_close_matches(layer, candidates, n=4, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}; " if close else ""
    return UserError(f"layers={layer!r} matches nothing in {spec.name}; {hint}valid: "
                     f"'default', 'blocks', module names ({', '.join(candidates[:6])}, ...) "
                     "or globs like 'blocks.*'")


def layer_names(model: nn.Module, spec: ModelSpec, request: str | Sequence[str] | None = None
                ) -> list[str]:
    """Resolve a layer request to layer names, in model order and without duplicates.

    ``request``: None / ``"default"`` -> ViT ``["embed", "blocks.0", ...]``, ResNet
    ``["stem", "layer1", ..., "layer4"]``; ``"blocks"`` -> every transformer block / every
    residual block (``"layer1.0"``, ...); otherwise names and globs over module names plus
    aliases (:func:`repsim.layers.match_layers`).
    """
    candidates = _candidates(model, spec)
    return match_layers(candidates, "default" if request is None else request,
                        _keywords(model, spec),
                        lambda part: _unknown_layer(part, candidates, spec))


def module_for(model: nn.Module, spec: ModelSpec, layer: str) -> nn.Module:
    """The module whose forward output is ``layer`` (aliases resolved)."""
    name = _aliases(model, spec).get(layer, layer) if isinstance(layer, str) else ""
    if name:  # get_submodule("") would return the whole model
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    raise _unknown_layer(str(layer), _candidates(model, spec), spec)
