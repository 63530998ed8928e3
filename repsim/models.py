"""Model zoo: registered architectures, their weights, preprocessing and layer names.

Names are the API. A model is addressed by a registry name (``vit_cifar``,
``resnet18_cifar``, ``vit_imagenet``, ``resnet18_imagenet``) or by
``timm:<any timm model>``; its layers by the strings users type (``embed``,
``blocks.3``, ``stem``, ``layer2.1`` or globs such as ``blocks.*``).

Shapes: images enter :func:`preprocess` as ``(n, H, W, 3)`` uint8 and leave as
``(n, 3, S, S)`` float32 with ``S = spec.input_size``. ViT layer outputs are
``(n, 1 + tokens, d)``; ResNet layer outputs are ``(n, c, h, w)``.

Weights files are always read with ``torch.load(..., weights_only=True)``:
a checkpoint that needs arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
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

__all__ = [
    "ModelSpec",
    "build_model",
    "checkpoint_dir",
    "default_weights_file",
    "get_spec",
    "layer_names",
    "list_models",
    "load_model",
    "match_layers",
    "module_for",
    "preprocess",
    "preprocessing_info",
    "read_weights",
    "register_model",
    "sha256_file",
    "spec_for",
]

TIMM_PREFIX = "timm:"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_NO_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
_INTERPOLATIONS = ("bilinear", "bicubic")
# Keywords accepted by layer_names besides module names and globs.
_LAYER_KEYWORDS = ("default", "blocks")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, feed and describe one model (no weights)."""

    name: str  # registry name, e.g. "vit_cifar" or "timm:resnet18"
    family: str  # "vit", "resnet" or "other" (decides layer aliases and defaults)
    input_size: int  # square input side in pixels
    mean: tuple[float, float, float]  # normalisation; (0,0,0) with std (1,1,1) = none
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" | "bicubic"
    num_classes: int
    default_weights: str | None  # "checkpoints/<file>.pt", "timm", "torchvision" or None
    description: str


@dataclass(frozen=True)
class _Entry:
    """A registry row: the spec plus how to build it (random init) and fetch pretrained."""

    spec: ModelSpec
    build: Callable[[int], nn.Module]  # num_classes -> model with random init
    head_key: str | None  # classifier weight key, used to infer num_classes from a file
    pretrained: Callable[[int], nn.Module] | None = None  # num_classes -> pretrained model
    pretrained_tag: str | None = None  # provenance string, e.g. "timm:vit_base_patch16_224.x"


_REGISTRY: dict[str, _Entry] = {}


def _register(spec: ModelSpec, head_key: str):
    """Decorator (timm-style): register ``build(num_classes)`` under ``spec.name``."""

    def deco(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        _REGISTRY[spec.name] = _Entry(spec, build, head_key)
        return build

    return deco


# --------------------------------------------------------------------------- registry


@_register(
    ModelSpec(
        name="vit_cifar",
        family="vit",
        input_size=32,
        mean=_NO_NORM[0],
        std=_NO_NORM[1],
        interpolation="bilinear",
        num_classes=10,
        default_weights="checkpoints/vit_cifar.pt",
        description="the study's small ViT (patch 4, dim 512, depth 6, 8 heads, MLP 512, "
        "~9.5M params) trained from scratch on CIFAR-10",
    ),
    head_key="head.weight",
)
def _build_vit_cifar(num_classes: int) -> nn.Module:
    # A plain timm VisionTransformer so module names and forward_intermediates match timm.
    return VisionTransformer(
        img_size=32,
        patch_size=4,
        num_classes=num_classes,
        embed_dim=512,
        depth=6,
        num_heads=8,
        mlp_ratio=1.0,
        class_token=True,
        pos_drop_rate=0.1,
        proj_drop_rate=0.1,
        attn_drop_rate=0.0,
    )


@_register(
    ModelSpec(
        name="resnet18_cifar",
        family="resnet",
        input_size=32,
        mean=_NO_NORM[0],
        std=_NO_NORM[1],
        interpolation="bilinear",
        num_classes=10,
        default_weights="checkpoints/resnet18_cifar.pt",
        description="ResNet-18 with a CIFAR stem (3x3 stride-1 conv1, no max-pool), "
        "~11.2M params, trained from scratch on CIFAR-10",
    ),
    head_key="fc.weight",
)
def _build_resnet18_cifar(num_classes: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    # 32 px inputs: keep full resolution into layer1 instead of the ImageNet 4x downsample.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


_VIT_IMAGENET_TAG = "vit_base_patch16_224.augreg2_in21k_ft_in1k"


def _timm_preprocessing(arch: str) -> tuple[int, tuple, tuple, str, int]:
    """(input_size, mean, std, interpolation, num_classes) from timm's pretrained cfg."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:  # architecture without any pretrained cfg: timm's own defaults
        data = timm.data.resolve_data_config({})
        num_classes = 1000
    else:
        data = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
        num_classes = cfg.num_classes or 1000
    size = int(data["input_size"][-1])
    interp = data.get("interpolation", "bicubic")
    # interpolate() only antialiases bilinear/bicubic; map anything else to bilinear.
    interp = interp if interp in _INTERPOLATIONS else "bilinear"
    mean = tuple(float(v) for v in data["mean"])
    std = tuple(float(v) for v in data["std"])
    return size, mean, std, interp, int(num_classes)


def _register_vit_imagenet() -> None:
    size, mean, std, interp, n = _timm_preprocessing(_VIT_IMAGENET_TAG)
    spec = ModelSpec(
        name="vit_imagenet",
        family="vit",
        input_size=size,
        mean=mean,
        std=std,
        interpolation=interp,
        num_classes=n,
        default_weights="timm",
        description="ViT-B/16 pretrained on ImageNet-21k, fine-tuned on ImageNet-1k "
        f"(timm {_VIT_IMAGENET_TAG})",
    )

    def build(num_classes: int) -> nn.Module:
        return timm.create_model(_VIT_IMAGENET_TAG, pretrained=False, num_classes=num_classes)

    def pretrained(num_classes: int) -> nn.Module:
        return timm.create_model(_VIT_IMAGENET_TAG, pretrained=True, num_classes=num_classes)

    _REGISTRY[spec.name] = _Entry(
        spec, build, "head.weight", pretrained, f"timm:{_VIT_IMAGENET_TAG}"
    )


def _register_resnet18_imagenet() -> None:
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    tf = weights.transforms()
    spec = ModelSpec(
        name="resnet18_imagenet",
        family="resnet",
        input_size=int(tf.crop_size[0]),
        mean=tuple(float(v) for v in tf.mean),
        std=tuple(float(v) for v in tf.std),
        interpolation="bilinear",
        num_classes=len(weights.meta["categories"]),
        default_weights="torchvision",
        description="torchvision ResNet-18 trained on ImageNet-1k (IMAGENET1K_V1)",
    )

    def build(num_classes: int) -> nn.Module:
        return torchvision.models.resnet18(num_classes=num_classes)

    def pretrained(num_classes: int) -> nn.Module:
        model = torchvision.models.resnet18(weights=weights)
        if num_classes != model.fc.out_features:  # new task: fresh (seeded) classifier
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model

    _REGISTRY[spec.name] = _Entry(spec, build, "fc.weight", pretrained, f"torchvision:{weights}")


_register_vit_imagenet()
_register_resnet18_imagenet()


def _family(model: nn.Module) -> str:
    """'vit' for timm VisionTransformers, 'resnet' for layer1..layer4 nets, else 'other'."""
    if isinstance(model, VisionTransformer) and hasattr(model, "norm_pre"):
        return "vit"
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return "resnet"
    return "other"


def _timm_family(arch: str) -> str:
    try:
        # The meta device allocates no memory and runs no real init: cheap even for huge models.
        with torch.device("meta"):
            return _family(timm.create_model(arch, pretrained=False))
    except Exception:  # some constructors compute on tensors; family is only a hint then
        return "other"


def spec_for(model: nn.Module) -> ModelSpec:
    """A :class:`ModelSpec` for a module given directly (not by name): what layer naming
    needs. Its family is inferred, so timm ViTs and ResNets get their aliases and keywords."""
    return ModelSpec(name=type(model).__name__, family=_family(model), input_size=0,
                     mean=_NO_NORM[0], std=_NO_NORM[1], interpolation="bilinear",
                     num_classes=0, default_weights=None, description="a module given directly")


def register_model(name: str, *, family: str = "other", input_size: int = 32,
                   mean: tuple[float, float, float] = _NO_NORM[0],
                   std: tuple[float, float, float] = _NO_NORM[1],
                   interpolation: str = "bilinear", num_classes: int = 10,
                   weights: str | os.PathLike | None = None, head_key: str | None = None,
                   description: str = ""):
    """Decorator that makes ``build(num_classes) -> nn.Module`` a model name (timm-style).

    ``@register_model("my_net", input_size=32)`` over ``def my_net(num_classes): ...``; from
    then on ``"my_net"`` works wherever a model name does (``load_model``, ``extract``, the
    CLI with ``repsim --import MODULE``, ``analyses/*.toml``). Images reach the model as
    ``(n, 3, input_size, input_size)`` float in [0, 1], normalised by ``mean``/``std``.
    ``weights``: the default weights file (a state dict; a relative name is looked up in the
    checkpoint folder), else ``--weights`` must be given. ``head_key``: the classifier's
    weight in the state dict, to read the class count from a file. ``family``: "vit"
    (timm ``VisionTransformer``), "resnet" (``layer1`` .. ``layer4``) or "other".
    """
    if name in _REGISTRY or name.startswith(TIMM_PREFIX):
        raise ValueError(f"model name {name!r} is taken; choose another")
    if family not in ("vit", "resnet", "other"):
        raise ValueError(f"family {family!r} is unknown; valid: vit, resnet, other")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is unknown; valid: "
                         f"{', '.join(_INTERPOLATIONS)}")
    spec = ModelSpec(name=name, family=family, input_size=int(input_size),
                     mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                     interpolation=interpolation, num_classes=int(num_classes),
                     default_weights=None if weights is None else os.fspath(weights),
                     description=description or f"user model {name}")

    def deco(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        _REGISTRY[name] = _Entry(spec, build, head_key)
        return build

    return deco


@functools.lru_cache(maxsize=64)
def _timm_entry(name: str) -> _Entry:
    arch = name[len(TIMM_PREFIX) :]
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(TIMM_PREFIX + c for c in close)}; " if close else ""
        raise UserError(
            f"unknown timm model {arch!r} in {name!r}; {hint}valid: 'timm:<name>' for any name "
            "in timm.list_models(); fix: check the spelling, e.g. timm:resnet18"
        )
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # "arch.badtag": timm knows the arch but not the tag
        tags = timm.list_pretrained(arch.split(".")[0] + ".*")
        raise UserError(
            f"unknown pretrained tag in {name!r}; valid tags: "
            f"{', '.join(tags[:8]) or 'none'}; fix: use one of them or drop the '.tag'"
        ) from None
    size, mean, std, interp, n = _timm_preprocessing(arch)
    family = _timm_family(arch)
    has_weights = cfg is not None and bool(cfg.hf_hub_id or cfg.url or cfg.file)
    tag = f"timm:{cfg.architecture}.{cfg.tag}" if cfg is not None and cfg.tag else f"timm:{arch}"
    classifier = cfg.classifier if cfg is not None else None
    if family == "vit":
        head_key = "head.weight"
    elif family == "resnet":
        head_key = "fc.weight"
    else:
        head_key = f"{classifier}.weight" if isinstance(classifier, str) else None
    spec = ModelSpec(
        name=name,
        family=family,
        input_size=size,
        mean=mean,
        std=std,
        interpolation=interp,
        num_classes=n,
        default_weights="timm" if has_weights else None,
        description=f"timm model {arch}",
    )

    def build(num_classes: int) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)

    def pretrained(num_classes: int) -> nn.Module:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes)

    return _Entry(spec, build, head_key, pretrained if has_weights else None, tag)


def _entry(name: str) -> _Entry:
    if not isinstance(name, str):
        raise UserError(
            f"model name must be a string, got {type(name).__name__}; valid: "
            f"{', '.join(list_models())} or timm:<name>; fix: pass --model NAME"
        )
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_entry(name)
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
    if timm.is_model(name):  # a bare timm name: the user probably meant the timm: prefix
        close.append(TIMM_PREFIX + name)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(
        f"unknown model {name!r}; {hint}valid: {', '.join(list_models())} or "
        f"'timm:<any timm model>'; fix: pass one of these names"
    )


def list_models() -> list[str]:
    """Registered model names (``timm:<name>`` models are accepted but not listed)."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered name or ``timm:<name>``; UserError if unknown."""
    return _entry(name).spec


def _check_num_classes(num_classes: int | None, spec: ModelSpec) -> int:
    if num_classes is None:
        return spec.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(
            f"num_classes={num_classes!r} for {spec.name}; valid: a positive integer "
            f"(default {spec.num_classes}); fix: pass e.g. --num-classes {spec.num_classes}"
        )
    return num_classes


def build_model(name: str, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """The architecture with a seeded random init, in eval mode on CPU.

    The same ``(name, num_classes, seed)`` always gives the same weights; the global
    RNG state is left as it was.
    """
    entry = _entry(name)
    n = _check_num_classes(num_classes, entry.spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.build(n)
    return model.eval()


# --------------------------------------------------------------------------- weights


def resolve_device(name: str | None) -> torch.device:
    """``torch.device`` from ``--device`` (None: cuda when available); UserError if unusable."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name!r} is not a torch device; valid: cpu, cuda, cuda:N; "
                        "fix: pass e.g. --device cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available; "
                        "use --device cpu")
    return dev


def checkpoint_dir() -> Path:
    """Where default weights live: ``$REPSIM_CHECKPOINTS`` or ``<repo>/checkpoints``."""
    env = os.environ.get("REPSIM_CHECKPOINTS")
    return Path(env).expanduser() if env else _REPO_ROOT / "checkpoints"


def default_weights_file(spec: ModelSpec) -> Path | None:
    """The file behind a model's default weights, or None (timm/torchvision/none).

    A relative name (the registry's ``checkpoints/<file>.pt``) lives in the checkpoint
    folder (:func:`checkpoint_dir`); an absolute path is itself.
    """
    source = spec.default_weights
    if source in (None, "timm", "torchvision"):
        return None
    path = Path(source).expanduser()
    return path if path.is_absolute() else checkpoint_dir() / path.name


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _examples(keys: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(repr(x) for x in list(keys)[:k])
    return f" (e.g. {shown})" if shown else ""


# torch's weights-only unpickler names the refused class ("Unsupported global: GLOBAL m.C");
# other weights-only failures ("Unsupported operand 103") mean the bytes are not a checkpoint.
_UNSAFE_RE = re.compile(r"unsupported global|not an allowed global|unsupported class", re.I)


def read_weights(path: Path) -> Any:
    """``torch.load`` with weights_only=True, every failure turned into one UserError line."""
    fix = "fix: re-save the weights with torch.save(model.state_dict(), PATH)"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if _UNSAFE_RE.search(str(e)):
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise UserError(
                f"{path} contains arbitrary Python objects{what} and repsim refuses to unpickle "
                "them (loading could run code); valid: a file holding only tensors, e.g. a "
                f"state dict or {{'state_dict': ...}}; {fix} in a trusted environment"
            ) from None
        # torch wraps the real cause ("Unsupported operand 103") in boilerplate: dig it out.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        inner = [ln for ln in lines if ln.startswith("Unsupported") or "zip archive" in ln]
        reason = (inner or lines or [type(e).__name__])[0][:120]
        raise UserError(
            f"{path} is corrupt or not a PyTorch weights file ({reason}); valid: a file "
            f"written by torch.save; {fix}, or download it again"
        ) from None
    except Exception as e:  # EOFError, zip/OS errors, ...: all mean unreadable bytes
        raise UserError(
            f"{path} is corrupt or not a PyTorch weights file ({type(e).__name__}: "
            f"{str(e)[:120]}); valid: a file written by torch.save; {fix}, or download it again"
        ) from None


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict with any 'module.' prefix stripped, checkpoint metadata) from a file."""
    obj = read_weights(path)
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        sd = obj["state_dict"]
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd = obj["model"]  # DeiT / MAE style {"model": state_dict, ...}
        meta = {k: v for k, v in obj.items() if k != "model"}
    elif isinstance(obj, Mapping):
        sd = obj
    else:
        raise UserError(
            f"{path} holds a {type(obj).__name__}, not a state dict; valid: a state dict or a "
            "checkpoint dict with a 'state_dict' key; fix: save model.state_dict() instead"
        )
    bad = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad or not sd:
        raise UserError(
            f"{path} is not a state dict: {len(bad)} of {len(sd)} entries are not tensors"
            f"{_examples(bad)}; valid: a name -> tensor mapping or {{'state_dict': ...}}; "
            "fix: save model.state_dict()"
        )
    # DistributedDataParallel saves parameters as "module.<name>".
    out = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}
    return out, meta


def _infer_num_classes(
    sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any], entry: _Entry
) -> int:
    head = sd.get(entry.head_key) if entry.head_key else None
    if isinstance(head, torch.Tensor) and head.ndim == 2:
        return int(head.shape[0])
    n = meta.get("num_classes")
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    return entry.spec.num_classes


def _load_file(
    entry: _Entry, path: Path, num_classes: int | None, seed: int
) -> tuple[nn.Module, int]:
    spec = entry.spec
    sd, meta = _read_state_dict(path)
    n = _check_num_classes(num_classes, spec) if num_classes is not None else None
    n = n if n is not None else _infer_num_classes(sd, meta, entry)
    model = build_model(spec.name, n, seed)
    target = model.state_dict()
    saved_as = meta.get("model")
    note = f" (the file says model {saved_as!r})" if isinstance(saved_as, str) else ""
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit {spec.name}{note}: {len(missing)} missing keys"
            f"{_examples(missing)} and {len(unexpected)} unexpected keys{_examples(unexpected)}; "
            f"valid: weights saved from {spec.name}; fix: pass the --model the file was trained "
            "as, or other --weights"
        )
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if sd[k].shape != v.shape
    ]
    if wrong:
        hint = " or drop --num-classes" if num_classes is not None else ""
        raise UserError(
            f"{path} has {len(wrong)} tensors whose shape (file vs {spec.name}) differs: "
            f"{'; '.join(wrong[:3])}; valid: weights saved from {spec.name} with the same "
            f"configuration; fix: use matching --weights{hint}"
        )
    # Checkpoints may be stored in float16: cast to each parameter's own dtype first.
    model.load_state_dict({k: v.to(dtype=target[k].dtype) for k, v in sd.items()}, strict=True)
    return model.eval(), n


def _load_pretrained(entry: _Entry, num_classes: int | None, seed: int) -> nn.Module:
    spec = entry.spec
    n = _check_num_classes(num_classes, spec)
    assert entry.pretrained is not None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a replaced classifier head is still reproducible
            model = entry.pretrained(n)
    except Exception as e:  # offline: OSError, HF hub / URL errors, ... depending on backend
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(
            f"pretrained weights {entry.pretrained_tag} for {spec.name} are unavailable "
            f"(offline? {type(e).__name__}: {reason}); valid: a cached download, a weights file "
            "or 'random'; fix: run once with internet access to cache them, or pass "
            "--weights PATH (a state dict or checkpoint file) or --weights random"
        ) from None
    return model.eval()


def load_model(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """A model with weights, in eval mode on ``device``, plus its provenance.

    ``weights``: None -> the model's default weights (its checkpoint file, or timm /
    torchvision pretrained); ``"random"`` -> seeded random init; anything else -> a path.
    With a file and no ``num_classes``, the class count is read from the file's head.

    Provenance keys: model, weights (path, "random", "timm:<tag>" or "torchvision:<tag>"),
    weights_sha256 (of the file, else None), num_classes, seed.
    """
    entry = _entry(name)
    spec = entry.spec
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(
            f"device {device!r} is not a torch device; valid: cpu, cuda, cuda:N, mps; "
            "fix: pass e.g. --device cpu"
        ) from None
    source = spec.default_weights if weights is None else os.fspath(weights)
    if source is None:
        raise UserError(
            f"{spec.name} has no default weights; valid: --weights PATH or --weights random; "
            "fix: pass one of them"
        )
    sha: str | None = None
    if source == "random":
        n = _check_num_classes(num_classes, spec)
        model = build_model(spec.name, n, seed)
        label = "random"
    elif source in ("timm", "torchvision"):
        if entry.pretrained is None or source != spec.default_weights:
            raise UserError(
                f"weights={source!r} is not available for {spec.name}; valid: "
                f"{spec.default_weights or 'no default'}, 'random' or a file path; "
                "fix: pass --weights PATH or --weights random"
            )
        model = _load_pretrained(entry, num_classes, seed)
        n = _check_num_classes(num_classes, spec)
        label = entry.pretrained_tag or source
    else:
        if weights is None:
            path = default_weights_file(spec)
            if not path.is_file():
                raise UserError(
                    f"no trained weights for {spec.name}: {path} does not exist (default "
                    "weights live in $REPSIM_CHECKPOINTS or <repo>/checkpoints); valid: a "
                    f"trained checkpoint, a file, or random; fix: run `repsim train --model "
                    f"{spec.name}`, or pass --weights PATH or --weights random"
                )
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                what = "is a directory" if path.is_dir() else "does not exist"
                raise UserError(
                    f"weights file {path} {what}; valid: an existing state dict / checkpoint "
                    "file, or 'random'; fix: check the path passed to --weights"
                )
        model, n = _load_file(entry, path, num_classes, seed)
        sha = sha256_file(path)
        label = str(path)
    provenance = {
        "model": spec.name,
        "weights": label,
        "weights_sha256": sha,
        "num_classes": n,
        "seed": seed,
    }
    return model.to(dev).eval(), provenance


# --------------------------------------------------------------------------- preprocessing


def preprocess(spec: ModelSpec, images: torch.Tensor) -> torch.Tensor:
    """``(n, H, W, 3)`` uint8 on any device -> ``(n, 3, S, S)`` float32 on the same device.

    Scales to [0, 1], resizes to ``S = spec.input_size`` only when ``(H, W) != (S, S)``
    (antialiased ``spec.interpolation``; non-square inputs are stretched), then
    normalises ``(x - mean) / std``.
    """
    if not isinstance(images, torch.Tensor):
        raise UserError(
            f"images must be a torch.Tensor, got {type(images).__name__}; valid: (n, H, W, 3) "
            "uint8 tensor; fix: torch.from_numpy(array)"
        )
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise UserError(
            f"images have shape {tuple(images.shape)} and dtype {images.dtype}; valid: "
            "(n, H, W, 3) uint8 (channels last, RGB); fix: convert e.g. with "
            "x.permute(0, 2, 3, 1) or x.to(torch.uint8)"
        )
    s = spec.input_size
    x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    if tuple(x.shape[-2:]) != (s, s) and x.shape[0] > 0:
        x = F.interpolate(
            x, size=(s, s), mode=spec.interpolation, align_corners=False, antialias=True
        )
        # Bicubic overshoots; PIL pipelines clip at uint8, so clip to the same range.
        x = x.clamp_(0.0, 1.0)
    elif x.shape[0] == 0:
        x = x.new_empty((0, 3, s, s))
    if (spec.mean, spec.std) != _NO_NORM:
        mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def preprocessing_info(spec: ModelSpec) -> dict[str, Any]:
    """JSON-able preprocessing description (for provenance / results files)."""
    return {
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": spec.interpolation,
    }


# --------------------------------------------------------------------------- layers


def _aliases(model: nn.Module, spec: ModelSpec) -> dict[str, str]:
    """alias -> module name. 'embed' = norm_pre's output = the input of blocks.0 (tokens
    incl. class token and position embedding); 'stem' = the output of conv1/bn1/relu/maxpool."""
    names = dict(model.named_modules())
    if spec.family == "vit" and "norm_pre" in names:
        return {"embed": "norm_pre"}
    if spec.family == "resnet" and "maxpool" in names:
        return {"stem": "maxpool"}
    return {}


def _candidates(model: nn.Module, spec: ModelSpec) -> list[str]:
    """Every addressable layer in model order; an alias sits just before its module."""
    alias_of = {module: alias for alias, module in _aliases(model, spec).items()}
    out: list[str] = []
    for name, _ in model.named_modules():
        if not name:
            continue
        if name in alias_of:
            out.append(alias_of[name])
        out.append(name)
    return out


def _keyword_layers(model: nn.Module, spec: ModelSpec, keyword: str) -> list[str]:
    aliases = list(_aliases(model, spec))
    if spec.family == "vit":
        return aliases + [f"blocks.{i}" for i in range(len(model.blocks))]
    if spec.family == "resnet":
        stages = [f"layer{i}" for i in range(1, 5)]
        if keyword == "default":
            return aliases + stages
        return aliases + [
            f"{stage}.{j}" for stage in stages for j in range(len(model.get_submodule(stage)))
        ]
    # Other timm models: their feature-pyramid modules when declared, else top-level children.
    info = getattr(model, "feature_info", None)
    known = dict(model.named_modules())
    if isinstance(info, list) and info:
        mods = [d.get("module") for d in info if isinstance(d, dict)]
        if mods and all(m in known for m in mods):
            return mods
    return [name for name, _ in model.named_children()]


def _unknown_layer(layer: str, candidates: list[str], spec: ModelSpec) -> UserError:
    close = difflib.get_close_matches(layer, candidates, n=4, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}; " if close else ""
    shown = ", ".join(candidates[:6])
    return UserError(
        f"layer {layer!r} matches nothing in {spec.name}; {hint}valid: 'default', 'blocks', "
        f"module names ({shown}, ...) or globs like 'blocks.*'; fix: correct the name in --layers"
    )


def layer_names(
    model: nn.Module, spec: ModelSpec, request: str | Sequence[str] | None = None
) -> list[str]:
    """Resolve a layer request to layer names, in model order and without duplicates.

    ``request``: None / ``"default"`` -> ViT ``["embed", "blocks.0", ...]``, ResNet
    ``["stem", "layer1", ..., "layer4"]``; ``"blocks"`` -> every transformer block /
    every residual block (``"layer1.0"``, ...); otherwise names and globs over module names
    plus aliases (:func:`match_layers`).
    """
    candidates = _candidates(model, spec)
    keywords = {k: _keyword_layers(model, spec, k) for k in _LAYER_KEYWORDS}
    return match_layers(candidates, "default" if request is None else request, keywords,
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
