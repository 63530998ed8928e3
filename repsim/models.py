"""Models as torch modules: built, loaded with weights, fed images, addressed by layer name.

A model is a :mod:`repsim.registry` name or ``timm:<any timm model>``; its layers are the
strings users type (``embed``, ``blocks.3``, ``stem``, ``layer2.1``, globs like ``blocks.*``).
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repsim.errors import UserError, is_whole
from repsim.layers import match_layers
from repsim.paths import offline
from repsim.registry import (
    BUILT_IN,
    NO_NORM,
    TINYVIT_MODELS,
    Entry,
    ModelSpec,
    default_weights_file,
    family_of,
    get_entry,
    list_models,
)
from repsim.weights import load_into, read_state_dict, sha256_file


def spec_for(model: nn.Module) -> ModelSpec:
    """A :class:`ModelSpec` for a module given directly (not by name), for layer naming; its
    family is inferred, so timm ViTs and ResNets get their aliases and keywords."""
    return ModelSpec(type(model).__name__, family_of(model), 0, *NO_NORM, "bilinear", 0, None,
                     "a module given directly")


def _check_num_classes(num_classes: int | None, spec: ModelSpec) -> int:
    if num_classes is None:
        return spec.num_classes
    # numpy's integers too (a count read from a labels array); 0 for a model without a head
    if not is_whole(num_classes, 0 if spec.num_classes == 0 else 1):
        raise UserError(f"num_classes={num_classes!r} for {spec.name}; valid: a positive "
                        f"integer (default {spec.num_classes})")
    return int(num_classes)


def _check_seed(seed: int) -> int:
    # torch.manual_seed would take 1.5 as 1 (recorded as 1.5) and fail on None with a TypeError
    if not is_whole(seed, 0) or seed >= 2**64:
        raise UserError(f"seed={seed!r} is not usable; valid: a whole number >= 0 (below 2**64), "
                        "e.g. seed=0")
    return int(seed)


def build_model(name: str, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """The architecture with a seeded random init, in eval mode on CPU. The same ``(name,
    num_classes, seed)`` always gives the same weights; the global RNG is left as it was."""
    entry = get_entry(name)
    n = _check_num_classes(num_classes, entry.spec)
    seed = _check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.build(n).eval()


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
    if dev.type == "cuda" and (dev.index or 0) >= (count := torch.cuda.device_count()):
        raise UserError(f"device={str(name)!r}: this machine has {count} CUDA GPU(s), cuda:0 "
                        f"to cuda:{count - 1}; use one of them")
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, ...: else model.to() fails, deep down
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:  # xpu's check is an assert
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
            raise UserError(f"device={str(name)!r} is not usable here ({why}); use "
                            "device='cpu'") from None
    return dev


def _load_file(entry: Entry, weights: str | os.PathLike | None, num_classes: int | None,
               seed: int) -> tuple[nn.Module, int, Path]:
    """``(model, class count, path)`` of the weights file ``weights`` (None: the default)."""
    spec = entry.spec
    path = default_weights_file(spec) if weights is None else Path(weights).expanduser()
    if weights is None and not path.is_file():
        raise UserError(f"no trained weights for {spec.name}: {path} does not exist (default "
                        "weights live in $REPSIM_CHECKPOINTS or <repo>/checkpoints); fix: run "
                        f"`{_train_command(entry)}`, or pass weights=PATH or weights='random'")
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"weights file {path} {what}; valid: a state dict or checkpoint file, "
                        "or 'random'")
    sd, meta = read_state_dict(path)
    head = sd.get(entry.head_key) if entry.head_key else None
    n = num_classes
    if n is None and head is not None and head.ndim == 2:  # the class count the file has
        n = int(head.shape[0])
    elif n is None:
        n = meta.get("num_classes", spec.num_classes)
    note = f" (the file says model {meta['model']!r})" if isinstance(meta.get("model"), str) else ""
    hint = " or drop num_classes=" if num_classes is not None else ""
    # A user's model registered without head_key: nothing reads the file's class count.
    if num_classes is None and entry.head_key is None and spec.name in list_models():
        hint = (", or, if it has another class count, register the model with head_key (its "
                "classifier's weight, e.g. 'fc.weight') so that the file's count is read")
    return load_into(build_model(spec.name, n, seed), sd, path, spec.name, note, hint), n, path


def _train_command(entry: Entry) -> str:
    """The ``repsim train`` line that writes ``entry``'s default weights: the command line
    knows a model the user registered only once ``--import`` runs the module that does."""
    name = entry.spec.name
    if name in BUILT_IN:
        return f"repsim train --model {name}" + (" --recipe tinyvit" if name in TINYVIT_MODELS
                                                 else "")  # not the paper's recipe
    build = getattr(entry.build, "func", entry.build)  # functools.partial
    module = getattr(build, "__module__", None)
    module = module if module and module != "__main__" else "MODULE"  # a notebook's own
    return f"repsim --import {module} train --model {name}"


def _weights_cache(tag: str) -> tuple[str | None, bool, Path]:
    """(download host, whether cached, cache folder) of pretrained weights ``tag``."""
    from urllib.parse import urlparse

    hub = Path(torch.hub.get_dir()) / "checkpoints"  # torchvision's and timm's URL downloads
    kind, name = tag.split(":", 1)
    if kind == "torchvision":
        import torchvision

        url = torchvision.models.get_weight(name).url
    else:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg.hf_hub_id:
            from huggingface_hub import constants, try_to_load_from_cache

            files = {cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"} - {None}
            cached = any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files)
            return urlparse(constants.ENDPOINT).hostname, cached, Path(constants.HF_HUB_CACHE)
        if not cfg.url:
            return None, True, hub  # a local file: nothing to download
        url = cfg.url
    return urlparse(url).hostname, (hub / Path(urlparse(url).path).name).is_file(), hub


def _reachable(host: str | None, timeout: float = 3.0) -> bool:
    """Whether a connection to ``host`` opens within ``timeout`` s (behind a proxy: assumed).
    In a thread, because name resolution has no timeout of its own."""
    import socket
    import threading
    import urllib.request

    if host is None or urllib.request.getproxies().get("https"):
        return True
    ok: list[bool] = []

    def probe() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


PRETRAINED_FIX = ("fix: run once with internet access to cache them (or copy that folder "
                  "from a machine that has them), or pass weights=PATH (a state dict or "
                  "checkpoint file) or weights='random'")


def _pretrained_problem(entry: Entry, source: str) -> tuple[str | None, bool]:
    """(why pretrained ``source`` weights cannot be had here, or None; whether they are
    cached), decided without loading them. Before the hub client decides: without network it
    retries for about a minute."""
    spec, tag = entry.spec, entry.pretrained_tag
    if entry.pretrained is None or source != spec.default_weights:
        return (f"weights={source!r} is not available for {spec.name}; valid: "
                f"{spec.default_weights or 'no default'}, 'random' or a file path"), False
    host, cached, folder = _weights_cache(tag)
    if not cached and (offline() or not _reachable(host)):
        why = ("downloads are off (REPSIM_OFFLINE or HF_HUB_OFFLINE is set)" if offline()
               else f"{host} cannot be reached")
        return (f"pretrained weights {tag} for {spec.name} are unavailable: not cached in "
                f"{folder}, and {why}; {PRETRAINED_FIX}"), False
    return None, cached


def _load_pretrained(entry: Entry, source: str, n: int, seed: int) -> nn.Module:
    spec, tag = entry.spec, entry.pretrained_tag
    problem, cached = _pretrained_problem(entry, source)
    if problem is not None:
        raise UserError(problem)
    from huggingface_hub import constants as hf  # cached weights: read them, ask nothing

    hub_offline, hf.HF_HUB_OFFLINE = hf.HF_HUB_OFFLINE, hf.HF_HUB_OFFLINE or cached
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a replaced classifier head is still reproducible
            return entry.pretrained(n)
    except Exception as e:  # HF hub / URL errors, a damaged download, ... depending on backend
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"pretrained weights {tag} for {spec.name} are unavailable "
                        f"({type(e).__name__}: {reason}); {PRETRAINED_FIX}") from None
    finally:
        hf.HF_HUB_OFFLINE = hub_offline


def load_model(name: str, weights: str | os.PathLike | None = None, *,
               num_classes: int | None = None, seed: int = 0,
               device: str | torch.device | None = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(model, provenance)``: the model in eval mode on ``device`` (None: cuda when
    available). ``weights``: None -> its default (checkpoint file, or timm / torchvision
    pretrained); ``"random"`` -> seeded random init; else a path, whose head gives the class
    count unless ``num_classes`` is passed. Provenance keys: model, weights (path, "random",
    "timm:<tag>" or "torchvision:<tag>"), weights_sha256 (of the file, else None),
    num_classes, seed."""
    entry = get_entry(name)
    spec = entry.spec
    dev, seed = resolve_device(device), _check_seed(seed)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise UserError(f"weights={weights!r} is not usable; valid: a file path, 'random', or "
                        "None for the model's default weights")
    source = spec.default_weights if weights is None else os.fspath(weights)
    if source is None:
        raise UserError(f"{spec.name} has no default weights; valid: weights=PATH or "
                        "weights='random'")
    n, sha = _check_num_classes(num_classes, spec), None
    if source == "random":
        model, label = build_model(spec.name, n, seed), "random"
    elif source in ("timm", "torchvision"):
        model, label = _load_pretrained(entry, source, n, seed), entry.pretrained_tag
    else:  # a file: its head decides the class count unless num_classes says otherwise
        model, n, path = _load_file(entry, weights, None if num_classes is None else n, seed)
        sha, label = sha256_file(path), str(path)
    prov = {"model": spec.name, "weights": label, "weights_sha256": sha, "num_classes": n,
            "seed": seed}
    return model.to(dev).eval(), prov


def preprocess(spec: ModelSpec, images: torch.Tensor) -> torch.Tensor:
    """``(n, H, W, 3)`` uint8 -> ``(n, 3, S, S)`` float32 on the same device: scaled to
    [0, 1], resized to ``S = spec.input_size`` if needed (antialiased ``spec.interpolation``;
    non-square inputs are stretched), normalised ``(x - mean) / std``."""
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
    if (spec.mean, spec.std) != NO_NORM:
        x = (x - x.new_tensor(spec.mean).view(1, 3, 1, 1)) / x.new_tensor(spec.std).view(1, 3, 1, 1)
    return x.contiguous()


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
    seqs = (nn.Sequential, nn.ModuleList)  # a family's layout, which a user's model may lack
    if spec.family == "vit" and isinstance(getattr(model, "blocks", None), seqs):
        blocks = aliases + [f"blocks.{i}" for i in range(len(model.blocks))]
        return {"default": blocks, "blocks": blocks}
    stages = [f"layer{i}" for i in range(1, 5)]
    if spec.family == "resnet" and all(isinstance(getattr(model, s, None), seqs) for s in stages):
        return {"default": aliases + stages, "blocks": aliases + [
            f"{s}.{j}" for s in stages for j in range(len(model.get_submodule(s)))]}
    # Others (also a "vit"/"resnet" without that layout): feature-pyramid modules, else children.
    info = getattr(model, "feature_info", None)
    mods = [d.get("module") for d in info if isinstance(d, dict)] if isinstance(info, list) else []
    known = {name for name, _ in model.named_modules()}
    if not mods or not all(m in known for m in mods):
        mods = []
        for name, child in model.named_children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # never called itself
                mods += [f"{name}.{k}" for k, _ in child.named_children()]
            else:
                mods.append(name)
    return {"default": mods, "blocks": mods}


def _unknown_layer(layer: str, candidates: list[str], spec: ModelSpec,
                   name: str = "layers") -> UserError:
    close = difflib.get_close_matches(layer, candidates, n=4, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}; " if close else ""
    glob = {"vit": "blocks.*", "resnet": "layer1.*"}.get(
        spec.family, f"{candidates[-1].split('.')[0]}.*" if candidates else "*")
    return UserError(f"{name}={layer!r} matches nothing in {spec.name}; {hint}valid: "
                     f"'default', 'blocks', module names ({', '.join(candidates[:6])}, ...) "
                     f"or globs like {glob!r}")


def layer_names(model: nn.Module, spec: ModelSpec, request: str | Sequence[str] | None = None,
                name: str = "layers") -> list[str]:
    """The layer names a request means, in model order, without duplicates. ``request``:
    None / ``"default"`` -> ViT ``["embed", "blocks.0", ...]``, ResNet ``["stem", "layer1",
    ..., "layer4"]``; ``"blocks"`` -> every transformer / residual block (``"layer1.0"``, ...);
    else names and globs (:func:`repsim.layers.match_layers`). ``name``: the parameter that
    gave ``request``, named in errors."""
    candidates = _candidates(model, spec)
    return match_layers(candidates, "default" if request is None else request,
                        _keywords(model, spec),
                        lambda part: _unknown_layer(part, candidates, spec, name), name)


def module_for(model: nn.Module, spec: ModelSpec, layer: str) -> nn.Module:
    """The module whose forward output is ``layer`` (aliases resolved)."""
    name = _aliases(model, spec).get(layer, layer) if isinstance(layer, str) else ""
    if name:  # get_submodule("") would return the whole model
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    raise _unknown_layer(str(layer), _candidates(model, spec), spec)


def weights_problem(model: str, weights: str | None) -> str | None:
    """Why ``model``'s weights cannot be had here (one line), or None when they can; cheap:
    pretrained weights are looked for in their cache, not loaded."""
    entry = get_entry(model)
    source = entry.spec.default_weights if weights is None else weights
    if source in ("timm", "torchvision"):  # as load_model reads them, default or not
        return _pretrained_problem(entry, source)[0]
    file = default_weights_file(entry.spec) if weights is None else Path(weights).expanduser()
    if weights == "random" or (file is not None and file.is_file()):
        return None
    try:  # a missing file, or no default weights
        load_model(model, weights)
    except UserError as exc:
        return str(exc)
    return None
