"""Model names: each one's :class:`ModelSpec` (input, normalisation, classes, default weights)
and builder. Torch-free: torch/torchvision/timm load only to build a model or to resolve a
``timm:<any timm model>`` name, so naming a cached store costs no imports.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim.errors import UserError, is_whole
from repsim.weights import checkpoint_dir

if TYPE_CHECKING:
    from torch import nn

TIMM_PREFIX = "timm:"
NO_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
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
class Entry:
    spec: ModelSpec
    build: Callable[[int], nn.Module]  # num_classes -> model with random init
    head_key: str | None  # classifier weight in a state dict: a file's class count
    pretrained: Callable[[int], nn.Module] | None = None  # num_classes -> pretrained model
    pretrained_tag: str | None = None  # provenance, e.g. "torchvision:ResNet18_Weights..."


_REGISTRY: dict[str, Entry] = {}


def register_model(name: str, *, family: str = "other", input_size: int = 32,
                   mean: tuple[float, float, float] = NO_NORM[0],
                   std: tuple[float, float, float] = NO_NORM[1],
                   interpolation: str = "bilinear", num_classes: int = 10,
                   weights: str | os.PathLike | None = None, head_key: str | None = None,
                   description: str = ""):
    """Decorator (timm-style) that makes ``build(num_classes) -> nn.Module`` a model name usable
    everywhere. The model sees ``(n, 3, input_size, input_size)`` float in [0, 1] normalised
    by ``mean``/``std``. ``weights``: its default state-dict file (relative: in
    :func:`checkpoint_dir`); ``head_key``: the classifier weight, whose rows give a file's class
    count; ``family``: "vit" (timm ViT), "resnet" (``layer1`` .. ``layer4``) or "other"."""
    _check_name(name)
    if family not in _FAMILIES:
        raise ValueError(f"family={family!r} is unknown; valid: {', '.join(_FAMILIES)}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is unknown; valid: "
                         f"{', '.join(_INTERPOLATIONS)}")
    for what, v, least in (("input_size", input_size, 1), ("num_classes", num_classes, 0)):
        if not is_whole(v, least):  # int(32.7) would silently feed the model 32 px
            raise ValueError(f"{what}={v!r} is not a whole number >= {least} (num_classes=0: "
                             f"no classifier); e.g. {what}=32")
    for what, v in (("mean", mean), ("std", std)):  # no mean or std of [0, 1] pixels is > 1
        if max(_channel_triple(what, v, positive=what == "std")) > 1:
            raise ValueError(f"{what}={v!r} is on the 0..255 scale, but the model sees pixels "
                             "in [0, 1]; fix: divide mean and std by 255, e.g. mean=(0.485, "
                             "0.456, 0.406), std=(0.229, 0.224, 0.225)")
    spec = ModelSpec(name, family, int(input_size), _channel_triple("mean", mean),
                     _channel_triple("std", std, positive=True), interpolation,
                     int(num_classes), _default_weights(weights),
                     description or f"user model {name}")

    def deco(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if name in _REGISTRY and not _redefines(_REGISTRY[name], build):
            raise ValueError(f"model name {name!r} is taken; choose another")
        _REGISTRY[name] = Entry(spec, build, head_key)
        return build

    return deco


def _channel_triple(what: str, v: Any, positive: bool = False) -> tuple[float, float, float]:
    """``v`` as 3 finite floats (R, G, B), > 0 if ``positive``; ValueError otherwise: a wrong
    count would fail only in preprocessing, a zero std would make every input inf or NaN."""
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        out = ()
    if (isinstance(v, str) or len(out) != 3 or not all(math.isfinite(x) for x in out)
            or (positive and min(out) <= 0)):
        raise ValueError(f"{what}={v!r} is not usable; valid: three finite numbers, one per "
                         f"RGB channel{', each > 0' if positive else ''}, e.g. "
                         f"{what}={CIFAR10_NORM[what == 'std']}")
    return out


def _default_weights(weights: str | os.PathLike | None) -> str | None:
    """A relative file as ``checkpoints/<path>`` (kept whole, sub-folders too), the form of
    repsim's own models, which :func:`default_weights_file` finds in :func:`checkpoint_dir`
    and ``repsim train`` reads as "the file training writes"; other values as given."""
    if weights is None or weights in ("random", "timm", "torchvision"):
        return weights
    path = Path(weights).expanduser()
    if path.is_absolute():
        return os.fspath(path)
    parts = path.parts[1:] if path.parts[:1] == ("checkpoints",) else path.parts
    return "/".join(("checkpoints", *parts))


def _redefines(entry: Entry, build: Callable) -> bool:
    """Whether ``build`` is the entry's function defined again (the same module and name): a
    notebook cell or ``importlib.reload`` run twice, which a researcher expects to update the
    model, not to find its name taken. Lambdas have no name to tell them apart."""
    where = lambda f: (getattr(f, "__module__", None), getattr(f, "__qualname__", None))  # noqa
    name = where(build)[1]
    return where(entry.build) == where(build) and name is not None and "<lambda>" not in name


def _check_name(name: str) -> None:
    """ValueError unless ``name`` is usable wherever a model is named: ``repsim cka``
    takes a name with a path separator or a store suffix for a store file."""
    if (not isinstance(name, str) or not name or name != name.strip() or "/" in name
            or os.sep in name or name.lower().endswith((".h5", ".hdf5"))):
        raise ValueError(f"model name {name!r} is not usable as a model name; valid: a "
                         "non-empty string without '/', surrounding spaces or a store file's "
                         "suffix (.h5, .hdf5), e.g. 'my_net'")
    if name.startswith(TIMM_PREFIX):
        raise ValueError(f"model name {name!r} starts with {TIMM_PREFIX!r}, which names timm's "
                         "models; choose a name without it")


@register_model("vit_cifar", family="vit", weights="checkpoints/vit_cifar.pt",
                head_key="head.weight", description="the study's small ViT (patch 4, dim 512, "
                "depth 6, 8 heads, MLP 512, ~9.5M params) trained from scratch on CIFAR-10")
def _vit_cifar(num_classes: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    # A plain timm VisionTransformer so module names and forward_intermediates match timm.
    return VisionTransformer(img_size=32, patch_size=4, num_classes=num_classes, embed_dim=512,
                             depth=6, num_heads=8, mlp_ratio=1.0, class_token=True,
                             pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.0)


def _resnet18(num_classes: int, pretrained: bool = False) -> nn.Module:
    import torchvision
    from torch import nn

    if not pretrained:
        return torchvision.models.resnet18(num_classes=num_classes)
    model = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    if num_classes != model.fc.out_features:  # another task: a fresh (seeded) classifier
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


@register_model("resnet18_cifar", family="resnet", weights="checkpoints/resnet18_cifar.pt",
                head_key="fc.weight", description="ResNet-18 with a CIFAR stem (3x3 stride-1 "
                "conv1, no max-pool), ~11.2M params, trained from scratch on CIFAR-10")
def _resnet18_cifar(num_classes: int) -> nn.Module:
    from torch import nn

    model = _resnet18(num_classes)
    # 32 px inputs: keep full resolution into layer1 instead of the ImageNet 4x downsample.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _timm_build(arch: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)


# The ImageNet models' preprocessing, written out so their specs need neither library;
# test_models checks them against timm's pretrained config and torchvision's transforms().
_VIT_IMAGENET = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
_REGISTRY["vit_imagenet"] = Entry(
    ModelSpec("vit_imagenet", "vit", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 1000,
              "timm", "ViT-B/16 pretrained on ImageNet-21k, fine-tuned on ImageNet-1k (timm "
              f"{_VIT_IMAGENET})"),
    functools.partial(_timm_build, _VIT_IMAGENET), "head.weight",
    functools.partial(_timm_build, _VIT_IMAGENET, pretrained=True), TIMM_PREFIX + _VIT_IMAGENET)
_REGISTRY["resnet18_imagenet"] = Entry(
    ModelSpec("resnet18_imagenet", "resnet", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
              "bilinear", 1000, "torchvision",
              "torchvision ResNet-18 trained on ImageNet-1k (IMAGENET1K_V1)"),
    _resnet18, "fc.weight", functools.partial(_resnet18, pretrained=True),
    "torchvision:ResNet18_Weights.IMAGENET1K_V1")


# The small-data ViT designs (repsim.tinyvit): name -> (variant, description). Inputs are
# normalised with the CIFAR-10 statistics their sources use.
CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
TINYVIT_MODELS = {
    "vit_cifar_tiny": ("base", "Gent Wu 2025's tiny ViT (patch 4, dim 192, depth 9, 12 heads, "
                       "MLP ratio 2, qkv bias, drop path 0.1), 2.70M params"),
    "vit_cifar_tiny_mcls4": ("mcls4", "vit_cifar_tiny with four class tokens, their outputs "
                             "concatenated into the head"),
    "vit_cifar_tiny_reg3": ("reg3", "vit_cifar_tiny with three register tokens (the control "
                            "for mcls4: same prefix, first token pooled)"),
    "vit_cifar_tiny_lowrankq": ("lowrankq", "vit_cifar_tiny with rank-64 query projections"),
    "vit_cifar_tiny_lowrankk": ("lowrankk", "vit_cifar_tiny with rank-64 key projections"),
    "vit_cifar_tiny_sptlsa": ("sptlsa", "vit_cifar_tiny with shifted patch tokenisation and "
                              "locality self-attention (Lee et al. 2021)"),
}


def _tinyvit(variant: str, num_classes: int) -> nn.Module:
    from repsim.tinyvit import build  # torch and timm load only to build

    return build(variant, num_classes)


for _name, (_variant, _about) in TINYVIT_MODELS.items():
    register_model(_name, family="vit", mean=CIFAR10_NORM[0], std=CIFAR10_NORM[1],
                   weights=f"checkpoints/{_name}.pt", head_key="head.weight",
                   description=_about)(functools.partial(_tinyvit, _variant))
# Fixed by repsim's own code; any other name is the user's, whose code may change under it.
BUILT_IN = frozenset(_REGISTRY)


def family_of(model: nn.Module) -> str:
    """"vit" (a timm VisionTransformer), "resnet" (``layer1`` .. ``layer4``) or "other"."""
    vit = sys.modules.get("timm.models.vision_transformer")  # not loaded: model is no timm ViT
    if vit is not None and isinstance(model, vit.VisionTransformer) and hasattr(model, "norm_pre"):
        return "vit"
    return "resnet" if all(hasattr(model, f"layer{i}") for i in range(1, 5)) else "other"


@functools.lru_cache(maxsize=64)
def _timm_entry(name: str) -> Entry:
    """The entry of ``timm:<arch>`` or ``timm:<arch.tag>``, from timm's pretrained config."""
    import timm.data
    import torch

    arch = name[len(TIMM_PREFIX):]
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch.lower(), timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(TIMM_PREFIX + c for c in close)}; " if close else ""
        if arch in _REGISTRY:  # repsim's own name, given the prefix of timm's
            hint = f"did you mean {arch} (a repsim model: no 'timm:')? "
        raise UserError(f"unknown timm model {arch!r} in {name!r}; {hint}valid: 'timm:<name>' "
                        "for any name in timm.list_models(), e.g. timm:resnet18")
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # "arch.badtag": timm knows the architecture but not the tag
        tags = timm.list_pretrained(arch.split(".")[0] + ".*")
        raise UserError(f"unknown pretrained tag in {name!r}; valid tags: "
                        f"{', '.join(tags[:8]) or 'none'}; fix: use one or drop the '.tag'"
                        ) from None
    data = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    interp = data["interpolation"] if data["interpolation"] in _INTERPOLATIONS else "bilinear"
    try:  # the meta device allocates no memory and runs no real init: cheap even for huge models
        with torch.device("meta"):
            family = family_of(timm.create_model(arch, pretrained=False))
    except Exception:  # some constructors compute on tensors; family is only a hint then
        family = "other"
    head_key = _HEAD_KEYS.get(family) or (
        f"{cfg.classifier}.weight" if isinstance(cfg.classifier, str) else None)
    has_weights = bool(cfg.hf_hub_id or cfg.url or cfg.file)
    spec = ModelSpec(name, family, int(data["input_size"][-1]),
                     tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                     interp, 1000 if cfg.num_classes is None else int(cfg.num_classes),  # 0:
                     "timm" if has_weights else None,  # a feature model (DINOv2), no head
                     f"timm model {arch}")
    tag = f"timm:{cfg.architecture}.{cfg.tag}" if cfg.tag else f"timm:{arch}"
    return Entry(spec, functools.partial(_timm_build, arch), head_key,
                 functools.partial(_timm_build, arch, pretrained=True) if has_weights else None,
                 tag)


def canonical_name(name: str) -> str:
    """The name that fixes what ``name`` computes: ``timm:<arch>`` means timm's default
    pretrained tag of ``arch``, which a timm release may change, so it resolves (from timm's
    local config registry, no download) to ``timm:<arch>.<tag>``; a model the user registered
    (:func:`register_model`), whose code may change under the same name, is
    ``<name>@<architecture digest>`` (:func:`architecture_digest`); other names as given."""
    if name.startswith(TIMM_PREFIX):
        return get_entry(name).pretrained_tag
    arch = user_architecture(name)
    return name if arch is None else f"{name}@{arch}"


def user_architecture(name: str) -> str | None:
    """:func:`architecture_digest` of a model the user registered; None for any other name
    (repsim's own and timm's are fixed by their code and release)."""
    user = name in _REGISTRY and name not in BUILT_IN
    return architecture_digest(_REGISTRY[name]) if user else None


def architecture_digest(entry: Entry) -> str:
    """Digest of the architecture ``entry`` builds (its default class count): every module's
    name and class, every state-dict entry's name, shape and dtype, and the code (bytecode,
    constants, names: not line numbers or comments) of the builder and of the methods of
    every module class outside torch, torchvision and timm, so an edited ``forward()`` counts.
    Built on the meta device (no memory, no real init), else for real; the global RNG is left
    as it was. Not cached: a notebook may redefine a class without registering again."""
    import torch

    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                model = entry.build(entry.spec.num_classes)
        except Exception:  # some constructors compute on tensors
            model = entry.build(entry.spec.num_classes)
    parts = [[n, type(m).__qualname__] for n, m in model.named_modules()]
    parts += [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    build = entry.build.func if isinstance(entry.build, functools.partial) else entry.build
    parts.append(_code(build))
    own = {c for m in model.modules() for c in type(m).__mro__
           if c.__module__.split(".")[0] not in ("torch", "torchvision", "timm", "builtins")}
    for cls in sorted(own, key=lambda c: (c.__module__, c.__qualname__)):
        parts.append([cls.__qualname__, *(_code(f) for _, f in sorted(vars(cls).items()))])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def _code(obj: Any) -> Any:
    """A JSON-able, process-independent form of the code of a function (or of a code object
    or a constant in one); None for anything without code (a plain class attribute)."""
    obj = getattr(obj, "__func__", obj)  # staticmethod, classmethod
    obj = getattr(obj, "__code__", obj)
    if isinstance(obj, type(_code.__code__)):
        return [obj.co_code.hex(), [_code(c) for c in obj.co_consts], list(obj.co_names)]
    if isinstance(obj, (tuple, frozenset)):  # a frozenset's order varies with the hash seed
        items = [_code(c) for c in obj]
        return sorted(items, key=repr) if isinstance(obj, frozenset) else items
    return repr(obj) if isinstance(obj, (str, bytes, int, float, complex, type(None))) else None


def get_entry(name: str) -> Entry:
    """The :class:`Entry` of a registered name or ``timm:<name>``; UserError if unknown."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return _timm_entry(name)
    import timm  # only for the hint: a bare timm name whose prefix is missing

    lower = {n.lower(): n for n in list_models()}  # VIT_CIFAR means vit_cifar, surely
    text = str(name).strip().lower()
    close = [lower[c] for c in difflib.get_close_matches(text, lower, n=3, cutoff=0.5)]
    arch = text.removeprefix(TIMM_PREFIX)  # Timm:resnet18, resnet18
    if isinstance(name, str) and timm.is_model(arch):
        close.append(TIMM_PREFIX + arch)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(f"unknown model={name!r}; {hint}valid: {', '.join(list_models())} or "
                    "'timm:<any timm model>'")


def list_models() -> list[str]:
    """Registered model names (``timm:<name>`` models are accepted but not listed)."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered name or ``timm:<name>``; UserError if unknown."""
    return get_entry(name).spec


def default_weights_file(spec: ModelSpec) -> Path | None:
    """The file behind a model's default weights (a relative name lives in
    :func:`checkpoint_dir`), or None for timm/torchvision/no default weights."""
    if spec.default_weights in (None, "timm", "torchvision"):
        return None
    path = Path(spec.default_weights).expanduser()
    if path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("checkpoints",) else path.parts
    return checkpoint_dir().joinpath(*parts)


def preprocessing_info(spec: ModelSpec) -> dict[str, Any]:
    """JSON-able preprocessing description (for provenance / results files)."""
    return {"input_size": spec.input_size, "mean": list(spec.mean), "std": list(spec.std),
            "interpolation": spec.interpolation}
