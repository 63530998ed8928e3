"""Weights files: where default checkpoints live, reading one safely, fitting it to a model.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint that needs
arbitrary unpickling is refused, never executed. Every failure is one :class:`UserError` line.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repsim.errors import UserError

if TYPE_CHECKING:  # torch loads only to read a file: sha256_file and checkpoint_dir need none
    import torch
    from torch import nn

# torch's weights-only unpickler names the refused class ("Unsupported global: GLOBAL m.C");
# other weights-only failures ("Unsupported operand 103") mean the bytes are not a checkpoint.
_UNSAFE_RE = re.compile(r"unsupported global|not an allowed global|unsupported class", re.I)
_FIX = "fix: re-save the weights with torch.save(model.state_dict(), PATH)"


def checkpoint_dir() -> Path:
    """Where default weights live: ``$REPSIM_CHECKPOINTS`` or ``<repo>/checkpoints``."""
    env = os.environ.get("REPSIM_CHECKPOINTS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "checkpoints"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _examples(keys: Sequence[Any], k: int = 3) -> str:
    return f" (e.g. {', '.join(repr(x) for x in keys[:k])})" if keys else ""


def read_weights(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError, zip/OS errors, unpickling errors: unreadable bytes
        text = str(e)
        if _UNSAFE_RE.search(text):
            found = re.search(r"GLOBAL (\S+)", text)
            raise UserError(
                f"{path} contains arbitrary Python objects{f' ({found[1]})' if found else ''} "
                "and repsim refuses to unpickle them (loading could run code); valid: a file "
                f"holding only tensors, e.g. a state dict; {_FIX} in a trusted environment"
            ) from None
        # torch wraps the real cause ("Unsupported operand 103") in boilerplate: dig it out.
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        inner = [ln for ln in lines if ln.startswith("Unsupported") or "zip archive" in ln]
        reason = (inner or lines or [""])[0][:120]
        raise UserError(f"{path} is corrupt or not a PyTorch weights file ({type(e).__name__}: "
                        f"{reason}); valid: a file written by torch.save; {_FIX}, or download "
                        "it again") from None


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, metadata)`` of a weights file: a bare state dict, or a checkpoint dict
    holding it under "state_dict" (or "model", DeiT/MAE style) next to metadata. A
    torch.compile "_orig_mod." and a DistributedDataParallel "module." prefix (on every key)
    are stripped; :func:`load_into` puts "module." back for a model whose own keys carry it."""
    import torch

    sd = obj = read_weights(path)
    meta: dict[str, Any] = {}
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            sd, meta = obj[key], {k: v for k, v in obj.items() if k != key}
            break
    if not isinstance(sd, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict; valid: a state "
                        "dict or {'state_dict': ...}; fix: save model.state_dict() instead")
    bad = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad or not sd:
        raise UserError(f"{path} is not a state dict: {len(bad)} of {len(sd)} entries are not "
                        f"tensors{_examples(bad)}; valid: a name -> tensor mapping or "
                        "{'state_dict': ...}; fix: save model.state_dict()")
    odd = [k for k in sd if not isinstance(k, str)]
    if odd:
        raise UserError(f"{path} is not a state dict: {len(odd)} of {len(sd)} keys are not "
                        f"parameter names{_examples(odd)}; valid: a name -> tensor mapping; "
                        "fix: save model.state_dict()")
    for prefix in ("_orig_mod.", "module."):  # torch.compile's, then DistributedDataParallel's
        if all(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return dict(sd), meta


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | os.PathLike,
              name: str, note: str = "", hint: str = "") -> nn.Module:
    """Load ``sd`` (read from ``path``) into ``model`` (called ``name`` in messages), strictly:
    every key present, none extra, every shape equal. Tensors are cast to each parameter's own
    dtype (checkpoints may be stored in float16). ``note``/``hint`` extend the messages."""
    target = model.state_dict()
    if set(sd) != set(target) and {f"module.{k}" for k in sd} == set(target):
        sd = {f"module.{k}": v for k, v in sd.items()}  # the model's own "module." (a wrapper)
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        raise UserError(f"{path} does not fit {name}{note}: {len(missing)} missing keys"
                        f"{_examples(missing)} and {len(unexpected)} unexpected keys"
                        f"{_examples(unexpected)}; valid: weights saved from {name}; fix: pass "
                        "the model= the file was trained as, or other weights=")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if sd[k].shape != v.shape]
    if wrong:
        raise UserError(f"{path} has {len(wrong)} tensors whose shape (file vs {name}) differs: "
                        f"{'; '.join(wrong[:3])}; valid: weights saved from {name} with the "
                        f"same configuration; fix: use matching weights={hint}")
    model.load_state_dict({k: v.to(dtype=target[k].dtype) for k, v in sd.items()}, strict=True)
    return model


def replace_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """``model`` with a fresh classifier for ``num_classes``, drawn with ``seed``: a pretrained
    start fine-tuned on a task of another class count."""
    import torch
    from torch import nn as torch_nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(model, "reset_classifier"):  # every timm model
            model.reset_classifier(num_classes)
        elif isinstance(getattr(model, "fc", None), torch_nn.Linear):  # torchvision ResNets
            model.fc = torch_nn.Linear(model.fc.in_features, num_classes)
        else:
            raise UserError(f"cannot find the classifier of {type(model).__name__} to replace; "
                            "fix: fine-tune a timm model or a torchvision ResNet")
    return model


def check_weights_seeds(settings: Mapping[str, Any]) -> None:
    """UserError for a ``weights_seed`` (or ``weights_seed_a``, ``_b``) in ``settings`` given (not
    0 or None) where none of its ``weights`` (``weights_a``, ``_b``: one value, a comma-separated
    list of seeds' files, or a list) is ``'random'``: a weights file or pretrained weights set
    every parameter, so the seed would change nothing. (Training, where it also seeds a new
    head, checks its own: :func:`repsim.train.train`.)"""
    for side in ("", "_a", "_b"):
        seed, weights = settings.get(f"weights_seed{side}"), settings.get(f"weights{side}")
        given = weights if isinstance(weights, (list, tuple)) else str(weights or "").split(",")
        if not seed or "random" in given:
            continue
        what = (f"weights{side}={','.join(map(str, given))} sets" if weights else
                f"the model's own weights (no weights{side}=) set")
        raise UserError(f"weights_seed{side}={seed} has no effect: it seeds random weights "
                        f"only, and {what} every parameter; fix: drop weights_seed{side}=, or "
                        f"pass weights{side}='random' for seeded random weights")
