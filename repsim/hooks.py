"""Capture what named layers of any ``nn.Module`` output: the one forward-hook mechanism.

:func:`capture` hooks layers for a ``with`` block; :func:`extract` runs a model over images
with it. Layers are named as everywhere in repsim (:func:`repsim.models.layer_names`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from repsim.errors import UserError, is_whole

REDUCTIONS = ("flatten", "mean", "cls", "prefix")


class ReductionError(ValueError):
    """A layer's output cannot be reduced the way asked (``cls`` of a feature map)."""


def _check(how: str | None) -> None:
    if how is not None and how not in REDUCTIONS:
        raise UserError(f"reduce={how!r} is unknown; valid: {', '.join(REDUCTIONS)} or None")


def reduce(x: torch.Tensor, how: str | None, n_prefix: int = 1,
           class_token: bool | None = None) -> torch.Tensor:
    """One row per sample from a layer output.

    ``(b, T, D)`` tokens: ``flatten`` -> ``(b, T*D)``, ``mean`` -> mean of the patch tokens
    (after ``n_prefix`` class/register tokens) ``(b, D)``, ``cls`` -> token 0 ``(b, D)``,
    ``prefix`` -> the class/register tokens side by side ``(b, n_prefix*D)``. ``(b, C, H, W)``
    maps (and ``(b, C, D, H, W)`` volumes): ``flatten`` -> ``(b, C*H*W)``, ``mean`` -> ``(b, C)``
    over every position. Anything else is flattened;
    ``how=None`` returns ``x`` as it is. ``class_token``: whether token 0 is a class token
    (default: whenever there is a prefix); ``cls`` is refused when it is not.
    """
    _check(how)
    if how is None:
        return x
    if x.dim() == 3:
        if how == "mean":
            if x.shape[1] <= n_prefix:  # the mean of no tokens: NaN rows
                raise ReductionError(f"reduce='mean' averages the tokens after the {n_prefix} "
                                     f"class/register tokens, and outputs {tuple(x.shape)} "
                                     "have no patch tokens; use 'flatten'")
            return x[:, n_prefix:].mean(1)
        if how in ("cls", "prefix"):
            # Without a prefix, token 0 is a patch token: returning it would pass for a class
            # token (a timm ViT with class_token=False, global_pool='avg').
            if n_prefix < 1:
                raise ReductionError(f"reduce={how!r} needs class or register tokens; these "
                                     "outputs have none; use 'flatten' or 'mean'")
            if how == "cls" and class_token is False:  # timm's *_reg4_gap: token 0 a register
                raise ReductionError(f"reduce='cls' needs a class token; this model has none, "
                                     f"only {n_prefix} register tokens; use 'prefix' or 'mean'")
            return x[:, 0] if how == "cls" else x[:, :n_prefix].flatten(1)
        return x.flatten(1)
    if x.dim() >= 4 and how == "mean":
        return x.mean(tuple(range(2, x.dim())))
    if how in ("cls", "prefix"):
        raise ReductionError(f"reduce={how!r} needs token outputs (b, T, D), got shape "
                             f"{tuple(x.shape)}; use 'flatten' or 'mean'")
    return x.flatten(1) if x.dim() > 1 else x.reshape(-1, 1)  # (b,): one value per sample


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the ``with``, so it is measured as it predicts: dropout and
    stochastic depth off, BatchNorm on its running statistics (in train mode every call drew
    other values and BatchNorm updated its statistics). Each module's own mode comes back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class capture:  # noqa: N801 -- a function-like context manager, used as `with capture(...)`
    """Forward hooks on the chosen layers of ``model``: after ``with capture(model,
    ["blocks.0", "blocks.5"], reduce="mean") as cap: model(x)``, ``cap.outputs`` is
    ``{"blocks.0": (b, D), "blocks.5": (b, D)}`` on ``x``'s device (each pass replaces it;
    :meth:`collect` takes one pass's outputs and checks that every layer ran).
    ``layers``: None for the model's default set, or names/globs/keywords; ``spec``: a
    :class:`repsim.registry.ModelSpec`, else inferred from the module."""

    def __init__(self, model: nn.Module, layers: str | Sequence[str] | None = None,
                 reduce: str | None = "flatten", spec: Any = None) -> None:
        from repsim import models

        _check(reduce)
        self.spec = spec or models.spec_for(model)
        self.layers = models.layer_names(model, self.spec, layers)
        self.modules = {name: models.module_for(model, self.spec, name) for name in self.layers}
        self.how = reduce
        default_prefix = 1 if self.spec.family == "vit" else 0
        self.n_prefix = int(getattr(model, "num_prefix_tokens", default_prefix))
        # A timm ViT says whether it has one; any other model's first prefix token is taken for it.
        self.class_token = (getattr(model, "cls_token", None) is not None
                            if hasattr(model, "cls_token") else None)
        # A ViT prepends its prefix after patch_embed: tokens out of it have none to skip.
        pe = getattr(model, "patch_embed", None)
        self.prefixless = set(pe.modules()) if isinstance(pe, nn.Module) else set()
        # timm models that say output_fmt "NHWC" (Swin) put channels last in their 4-D
        # outputs, but not in every sub-module's (patch_embed.proj is a Conv2d): which axis
        # holds channels is unknown, so 'mean' of a 4-D output is refused, never guessed.
        self.channels_last = getattr(model, "output_fmt", None) == "NHWC"
        self.outputs: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}  # per layer, since the last collect()
        self._handles: list[Any] = []

    def _hook(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        x = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(x, torch.Tensor):
            raise UserError(f"layer {name!r} outputs a {type(x).__name__}; valid: layers whose "
                            "output is a tensor (or a tuple or list starting with one); fix: "
                            "pass layers= naming a module inside it, or one that returns a tensor")
        try:
            if self.channels_last and self.how == "mean" and x.dim() == 4:
                raise ReductionError("reduce='mean' cannot tell channels from positions in "
                                     "this model's 4-D outputs (timm output_fmt 'NHWC': "
                                     "channels last); use 'flatten'")
            n = 0 if module in self.prefixless else self.n_prefix
            out = reduce(x.detach(), self.how, n, self.class_token)
            # A view of x would follow the model's later in-place ops (ReLU(inplace=True), +=).
            same = out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            self.outputs[name] = out.clone() if same else out
            self._calls[name] = self._calls.get(name, 0) + 1
        except ReductionError as exc:
            raise ReductionError(f"layer {name!r}: {exc}") from None

    def collect(self, rows: int | None = None) -> dict[str, torch.Tensor]:
        """``{layer: output}`` of the pass just run, in layer order, and a clean slate for the
        next; UserError for a layer the pass did not run exactly once (its output would be
        missing, stale or ambiguous) or, given ``rows``, whose rows are not the batch's."""
        out, calls, self.outputs, self._calls = self.outputs, self._calls, {}, {}
        again = {name: k for name, k in calls.items() if k > 1}
        if again:
            name, k = next(iter(again.items()))
            raise UserError(f"layer {name!r} ran {k} times in one forward pass (a module "
                            "reused within the model), so which output it means is ambiguous; "
                            "valid: modules called once per pass; fix: pass layers= naming "
                            "a module called once, e.g. its parent")
        missing = [name for name in self.layers if name not in out]
        if missing:
            raise UserError(f"layers {', '.join(missing)} gave no output in this forward pass "
                            "(the model did not call them, e.g. a training-only head); valid: "
                            "layers its forward pass runs; fix: pass layers= without them")
        for name in self.layers:
            shape = tuple(out[name].shape)
            if rows is not None and shape[:1] != (rows,):
                raise UserError(f"layer {name!r} gave {shape[0] if shape else 0} rows for a "
                                f"batch of {rows} inputs (output shape {shape}); valid: layers "
                                "whose outputs put the samples first; fix: pass layers= "
                                "without it (or make that module batch_first)")
        return {name: out[name] for name in self.layers}

    def __enter__(self) -> capture:
        self.outputs, self._calls, self._handles = {}, {}, []
        for name, module in self.modules.items():
            try:  # one by one, so that a refusal removes the hooks already placed
                self._handles.append(module.register_forward_hook(
                    functools.partial(self._hook, name)))
            except RuntimeError as exc:  # a TorchScript module takes none
                self.__exit__()
                raise UserError(f"layer {name!r} takes no forward hooks ({exc}); valid: layers "
                                "that are plain nn.Modules; fix: pass layers= without it") from exc
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# The keys under which loaders of dict batches (Hugging Face datasets, torchvision v2
# transforms) commonly hold the images.
IMAGE_KEYS = ("pixel_values", "image", "images", "img", "input", "inputs", "x")


def _images_of(batch: Any) -> Any:
    """A batch's images: the batch, its first element (``(x, y)``), or its one IMAGE_KEYS value."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        keys = [k for k in IMAGE_KEYS if k in batch]
        if len(keys) != 1:
            given = ", ".join(repr(k) for k in batch)
            raise UserError(f"a batch is a dict with keys {given}; valid: dicts with exactly one "
                            f"of {', '.join(repr(k) for k in IMAGE_KEYS)} for the images; fix: "
                            "pass (b['your_key'] for b in loader)")
        return batch[keys[0]]
    return batch


def _batches(images: Any, batch_size: int) -> Iterable[Any]:
    """Image batches of an array/tensor (sliced, as is any object with a ``shape`` and
    slicing: an h5py dataset), a Dataset of samples (batched by a DataLoader) or any iterable
    of batches (a DataLoader)."""
    if isinstance(images, torch.utils.data.Dataset):  # samples: iterated, each was a "batch"
        images = torch.utils.data.DataLoader(images, batch_size=int(batch_size))
    # Any array (an h5py or zarr dataset too) is sliced by rows: iterated, an h5py dataset
    # gives single images, each of which would be taken for a batch.
    if isinstance(images, (torch.Tensor, np.ndarray)) or (
            len(getattr(images, "shape", ())) > 0 and hasattr(images, "__getitem__")):
        step, n = int(batch_size), int(images.shape[0])
        return (images[a:a + step] for a in range(0, n, step))
    # A str iterates as letters, a folder's name is no images: refused before any work.
    if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Iterable):
        raise UserError(f"images={images!r} is a {type(images).__name__}; valid: a tensor, a "
                        "numpy array, a Dataset, or an iterable of batches (a DataLoader); "
                        "fix: load the images first, e.g. repsim.load_probe_set(...).images")
    return (_images_of(item) for item in images)


def as_tensor(x: Any) -> torch.Tensor:
    """``x`` (array, tensor or nested list) as a tensor, sharing memory where torch can: a copy
    only for numpy's negative strides (``images[..., ::-1]``), which torch refuses."""
    if isinstance(x, np.ndarray) and any(s < 0 for s in x.strides):
        x = np.ascontiguousarray(x)
    return torch.as_tensor(x)


def float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter or buffer (None: it has none)."""
    state = itertools.chain(model.parameters(), model.buffers())
    return next((t.dtype for t in state if t.is_floating_point()), None)


def _forward(model: nn.Module, x: torch.Tensor, want: torch.dtype | None) -> None:
    """``model(x)``, floating ``x`` in the module's dtype ``want`` (numpy's float64 images into
    a float32 module, as ``model(torch.from_numpy(a).float())`` would); integer inputs as given
    (token ids), uint8 images refused in one line when the module cannot take them: a cast
    cannot know their scale (0-255 pixels are no 0-1 inputs)."""
    if want is not None and x.is_floating_point() and x.dtype != want:
        x = x.to(want)
    try:
        model(x)
    except RuntimeError as exc:
        if want is None or x.dtype != torch.uint8:
            raise
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the module failed on {x.dtype} inputs (its parameters are {want}: "
                        f"{why}); valid: the inputs it takes, e.g. float images in [0, 1]; "
                        "fix: pass x.float() / 255 (and your normalisation), or a registry "
                        "name with (n, H, W, 3) uint8 images") from exc


@torch.inference_mode()
def extract(model: nn.Module | str, images: Any, layers: str | Sequence[str] | None = None,
            reduce: str = "flatten", batch_size: int = 128,
            device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """``{layer: (n, p) float32 array}`` of ``layers`` over ``images``, rows in their order.
    ``model``: an ``nn.Module`` (fed ``images`` as it takes them: a tensor, array, Dataset,
    or DataLoader of batches, ``(x, y)`` or dicts like ``{"image": x, "label": y}``; floating
    ones in the module's own dtype, integer ones as they are) or a
    registry name (its default weights; ``images`` ``(n, H, W, 3)`` uint8, preprocessed its
    way). Runs in eval mode on ``device``; by default a module runs where its parameters are
    (one without any: where its inputs are), a registry name on a GPU if there is one. A
    module sent to ``device`` is sent back."""
    from repsim import models
    from repsim.registry import get_spec

    if not is_whole(batch_size):
        raise UserError(f"batch_size={batch_size!r} is not valid; pass a positive integer, "
                        "e.g. 128")
    # Where a module's first parameter or buffer is (None: a name, or a module without state).
    state = (itertools.chain(model.parameters(), model.buffers())
             if isinstance(model, nn.Module) else ())
    home = next((t.device for t in state), None)
    # A module without state runs where its inputs are (None: each batch stays where it is).
    dev = (None if home is None and device is None and isinstance(model, nn.Module)
           else models.resolve_device(home if device is None else str(device)))
    spec = None
    if isinstance(model, str):
        spec = get_spec(model)
        model, _ = models.load_model(model, device=dev)
    rows: dict[str, list[np.ndarray]] = {}
    try:
        if device is not None or spec is not None:  # else it runs where it is: one split
            model.to(dev)                           # across devices stays split
        want = float_dtype(model)
        with eval_mode(model), capture(model, layers, reduce, spec) as cap:
            for x in _batches(images, batch_size):
                x = as_tensor(x) if dev is None else as_tensor(x).to(dev)
                if spec is not None:
                    model(models.preprocess(spec, x))
                else:
                    _forward(model, x, want)
                for name, out in cap.collect(len(x)).items():
                    rows.setdefault(name, []).append(out.to("cpu", torch.float32).numpy())
    finally:  # the caller's module stays where it was, also after an error
        if home is not None and home != dev:
            model.to(home)
    if not rows:
        raise ValueError("no images: give at least one batch")
    return {name: np.concatenate(parts) for name, parts in rows.items()}
