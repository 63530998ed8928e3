"""Spatial locality: CKA over (image, grid position) samples, and how local a ViT token stays.

A ViT patch token and a CNN feature-map cell both describe one place in the image. Here a
*sample* is a pair (image i, cell g) of a ViT's ``gh x gw`` patch grid, so a layer becomes an
``(n * G, D)`` matrix, ``G = gh * gw``, row ``i * G + g`` (cells row-major). ViT tokens lose
their class/register tokens; CNN maps ``(b, C, H, W)`` are adaptive-average-pooled onto the
grid (a finer map is averaged over each cell's window, a coarser one repeated over the cells
inside each of its own). :func:`position_cka` is then ordinary CKA on those rows.

**Locality maps** (Raghu et al. 2021, Section 7): ``maps[l, t, s]`` is the CKA across images
between block ``l``'s token ``t`` and the raw input patch at cell ``s``. A token that still
holds its own patch peaks at ``s = t``; one that has mixed in the whole image is flat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repsim import cka
from repsim.attention import TokenGrid, model_input, token_grid
from repsim.errors import UserError, is_whole
from repsim.hooks import as_tensor


def to_grid(x: torch.Tensor, grid: tuple[int, int], n_prefix: int = 0,
            layer: str = "") -> torch.Tensor:
    """One layer's batch output as ``(b, G, D)``, cells row-major: tokens ``(b, n_prefix + G,
    D)`` without their prefix, or maps ``(b, C, H, W)`` pooled to ``grid``."""
    gh, gw = grid
    if x.dim() == 3:
        if x.shape[1] != n_prefix + gh * gw:
            raise UserError(f"layer {layer!r} has {x.shape[1]} tokens, not {n_prefix} prefix "
                            f"+ {gh}x{gw} patch tokens; pick layers that keep the patch grid")
        return x[:, n_prefix:]
    if x.dim() == 4:
        if tuple(x.shape[-2:]) != (gh, gw):
            x = F.adaptive_avg_pool2d(x, (gh, gw))
        return x.flatten(2).transpose(1, 2)
    raise UserError(f"layer {layer!r} gives outputs of shape {tuple(x.shape)}, neither tokens "
                    "(b, T, D) nor feature maps (b, C, H, W); pick spatial layers")


def _check_batch(value: Any, name: str) -> None:
    if not is_whole(value):  # 8.0 failed in range(), True ran one image per forward pass
        raise UserError(f"{name}={value!r} must be a positive integer (images per forward "
                        "pass), e.g. 64")


@torch.inference_mode()
def grid_features(model: nn.Module, x: torch.Tensor | np.ndarray, grid: tuple[int, int],
                  layers: str | Sequence[str] | None = None, n_prefix: int | None = None,
                  spec: Any = None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``{layer: (n, G, D) float32}`` on the model's device for the preprocessed input ``x``
    ``(n, 3, S, S)`` (a tensor or array), by :func:`to_grid`. ``layers``/``spec`` as in
    :func:`repsim.hooks.capture`; ``n_prefix`` defaults to the model's prefix token count
    (none is dropped from ``patch_embed``'s tokens, which come before the prefix)."""
    from repsim.hooks import capture, eval_mode

    _check_batch(batch_size, "batch_size")
    x = as_tensor(x)
    parts: dict[str, list[torch.Tensor]] = {}
    with eval_mode(model), capture(model, layers, reduce=None, spec=spec) as cap:
        k = cap.n_prefix if n_prefix is None else n_prefix
        ks = {name: 0 if m in cap.prefixless else k for name, m in cap.modules.items()}
        for a in range(0, len(x), batch_size):
            model(model_input(model, x[a:a + batch_size]))
            for name, out in cap.collect().items():
                if cap.channels_last and out.dim() == 4:  # as capture refuses reduce='mean'
                    raise UserError(f"layer {name!r}: this model says its maps are channels "
                                    "last (timm output_fmt 'NHWC'), so which axis holds "
                                    "channels is unknown; pick token layers, or a CNN")
                parts.setdefault(name, []).append(to_grid(out, grid, ks[name], name).float())
    return {name: torch.cat(v) for name, v in parts.items()}


def input_patches(x: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """The raw input patches ``(n, G, 3 * ph * pw)`` of ``x`` ``(n, 3, S, S)`` on ``grid``,
    cells row-major, each flattened channel-major as a ViT's patch embedding reads it."""
    gh, gw = grid
    x = as_tensor(x)
    h, w = x.shape[-2:]
    if h % gh or w % gw:
        raise UserError(f"an input of {h}x{w} pixels does not split into a {gh}x{gw} grid of "
                        "equal patches")
    return F.unfold(x, (h // gh, w // gw), stride=(h // gh, w // gw)).transpose(1, 2)


def position_cka(feats_a: Mapping[str, torch.Tensor], feats_b: Mapping[str, torch.Tensor],
                 **settings: Any) -> cka.CKAResult:
    """CKA of every layer of A with every layer of B over (image, cell) rows: ``feats_*`` map
    layers to ``(n, G, D)`` (:func:`grid_features`); ``settings`` go to
    :func:`repsim.cka.compare`; the result's ``n`` counts rows."""
    shapes = {tuple(f.shape[:2]) for f in [*feats_a.values(), *feats_b.values()]}
    if len(shapes) != 1:
        raise UserError(f"feature sets hold (images, cells) {sorted(shapes)}; give both models "
                        "the same images on the same grid")
    a, b = ({name: f.reshape(-1, f.shape[-1]) for name, f in feats.items()}
            for feats in (feats_a, feats_b))
    return cka.compare(a, b, **settings)


def locality_maps(tokens: Mapping[str, torch.Tensor], patches: torch.Tensor,
                  **settings: Any) -> np.ndarray:
    """``(L, G, G)`` float64: ``[l, t, s]`` is the CKA across the ``n`` images between layer
    ``l``'s token ``t`` (``tokens``: layer -> ``(n, G, D)``) and the input patch at cell ``s``
    (``patches`` ``(n, G, P)``); ``settings`` go to :func:`repsim.cka.compare`."""
    n, g = patches.shape[:2]
    cols = [patches[:, s] for s in range(g)]
    out = np.empty((len(tokens), g, g))
    for k, (name, f) in enumerate(tokens.items()):
        if tuple(f.shape[:2]) != (n, g):
            raise UserError(f"layer {name!r} holds {tuple(f.shape[:2])} (images, cells), the "
                            f"patches {(n, g)}; give both the same images and grid")
        # compare, not cka_matrix: measure() hands both calls compare's settings
        # (device, memory_budget, progress), which cka_matrix does not take.
        out[k] = cka.compare([f[:, t] for t in range(g)], cols, **settings).matrix
    return out


def locality_summary(maps: np.ndarray) -> dict[str, np.ndarray]:
    """``(L,)`` float64 each, per layer of ``maps`` ``(L, G, G)``: ``own`` (mean CKA of a
    token with its own patch), ``elsewhere`` (mean off-diagonal), ``contrast = own -
    elsewhere`` and ``peak_at_own`` (fraction of tokens whose map peaks at their own cell)."""
    m = np.asarray(maps, dtype=np.float64)
    g = m.shape[-1]
    own = np.einsum("ltt->lt", m)
    elsewhere = (m.sum(-1) - own) / (g - 1)
    return {"own": own.mean(1), "elsewhere": elsewhere.mean(1),
            "contrast": (own - elsewhere).mean(1),
            "peak_at_own": (m.argmax(-1) == np.arange(g)).mean(1)}


def relative_map(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(L, 2gh-1, 2gw-1)`` float64: the maps ``(L, G, G)`` indexed by the offset of cell
    ``s`` from token ``t``, averaged over tokens; the centre ``[gh-1, gw-1]`` is own-patch."""
    gh, gw = grid
    r, c = np.divmod(np.arange(gh * gw), gw)
    dr = (r[None, :] - r[:, None] + gh - 1).ravel()  # (t, s) -> offset row, col
    dc = (c[None, :] - c[:, None] + gw - 1).ravel()
    flat = dr * (2 * gw - 1) + dc
    size = (2 * gh - 1) * (2 * gw - 1)
    count = np.bincount(flat, minlength=size)
    m = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    sums = np.stack([np.bincount(flat, weights=row, minlength=size) for row in m])
    return (sums / count).reshape(len(maps), 2 * gh - 1, 2 * gw - 1)


@dataclass
class Locality:
    """What :func:`measure` found on ``n`` images: the ViT's ``grid``; ``maps`` ``(L, G, G)``
    for ``map_layers`` (``"input"``, the raw patches against themselves, then the ViT's
    layers); ``summary`` (:func:`locality_summary` of ``maps``); ``position`` (the ViT's
    layers against the CNN's over (image, cell) samples), None without a CNN."""

    grid: TokenGrid
    n: int
    map_layers: list[str]
    maps: np.ndarray
    summary: dict[str, np.ndarray]
    position: cka.CKAResult | None = None


def measure(vit: nn.Module, x_vit: torch.Tensor | np.ndarray, cnn: nn.Module | None = None,
            x_cnn: torch.Tensor | np.ndarray | None = None, *,
            vit_layers: str | Sequence[str] | None = None,
            cnn_layers: str | Sequence[str] | None = None, vit_spec: Any = None,
            cnn_spec: Any = None, forward_batch: int = 64, **settings: Any) -> Locality:
    """Locality maps of ``vit`` and, with ``cnn``, its CKA with the CNN per (image, cell), on
    the same ``n`` images preprocessed for each (``x_vit``, ``x_cnn``: ``(n, 3, S, S)``
    tensors or arrays).
    Layers and specs as in :func:`repsim.hooks.capture`; ``settings`` go to
    :func:`repsim.cka.compare` (``batch_size`` there is the CKA estimator's; ``forward_batch``
    is images per forward pass)."""
    _check_batch(forward_batch, "forward_batch")
    x_vit = as_tensor(x_vit)
    geo = token_grid(vit)
    tokens = grid_features(vit, x_vit, geo.grid, vit_layers, geo.n_prefix, vit_spec, forward_batch)
    dev = next(iter(tokens.values())).device
    patches = input_patches(x_vit.to(dev), geo.grid)
    maps = locality_maps({"input": patches, **tokens}, patches, **settings)
    position = None
    if cnn is not None:
        if x_cnn is None or len(x_cnn) != len(x_vit):
            raise UserError("x_cnn must hold the CNN's view of the same images as x_vit")
        # The CNN's maps land on the ViT's grid; n_prefix=0: a CNN has no prefix tokens.
        cells = grid_features(cnn, x_cnn, geo.grid, cnn_layers, 0, cnn_spec, forward_batch)
        position = position_cka(tokens, cells, **settings)
    return Locality(geo, len(x_vit), ["input", *tokens], maps, locality_summary(maps),
                    position)
