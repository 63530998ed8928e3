"""Look inside ViTs: every head's attention, attention rollout and mean attention distance.

**Capture (exact, outputs untouched).** For each chosen block, a forward hook on the block's
``attn.qkv`` linear layer receives the very ``qkv`` tensor the model computed, and rebuilds
the attention weights the way timm's ``Attention.forward`` does on its non-fused path::

    q, k = q_norm(q), k_norm(k);  A = softmax(q * scale @ k^T + mask)

A forward pre-hook on ``attn`` records the call's ``attn_mask`` / ``is_causal``. The hooks return
nothing and write into no tensor the model uses, so the model's outputs are bit-identical with
and without capture, and capture works the same whether timm runs its fused
``scaled_dot_product_attention`` kernel or the explicit softmax (with the explicit path, the
captured weights equal the model's own, bit for bit). Only blocks whose ``attn`` is timm's
standard ``Attention`` (same ``forward``) are accepted; anything else raises a UserError
instead of returning weights that might not be the model's.

**Shapes.** ``B`` images, ``L`` blocks, ``H`` heads, ``T = n_prefix + P`` tokens, where the
``n_prefix`` class/register tokens come first and the ``P = gh * gw`` patch tokens follow in
row-major grid order. Attention arrays are ``(B, L, H, T, T)`` (rows: queries, each sums to 1).

**Mean attention distance** (Dosovitskiy et al. 2021, Raghu et al. 2021): for every patch query,
the attention-weighted mean distance between its patch centre and the patch centres it attends
to, averaged over queries and images; ``(L, H)`` in pixels of the model input. Prefix tokens
are left out as queries and keys; by default the remaining weights are renormalised over the
patch keys (``renormalize=True``: "where in the image does this head look"), so uniform
attention gives exactly the mean pairwise patch distance of the grid. With
``renormalize=False`` the mass on prefix tokens counts as distance 0 (the convention of some
public notebooks).

**Rollout** (Abnar & Zuidema 2020): per block, average the heads, add the identity for the
residual path, renormalise the rows, and multiply through the blocks: ``R = Â_L ... Â_1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repsim.errors import UserError
from repsim.figures import figure_kind

__all__ = [
    "AttentionConfig",
    "QKHooks",
    "ViTGeometry",
    "attention_distance",
    "attention_maps",
    "attention_modules",
    "capture_attention",
    "distance_matrix",
    "mean_attention_distance",
    "plot_attention_distance",
    "plot_attention_heads",
    "plot_rollout",
    "rollout",
    "run_attention",
    "token_maps",
    "vit_geometry",
]

FORMAT = "repsim-attention-distance/1"
UNITS = ("image", "model", "fraction")
DEFAULT_PROBE = 1000


def _timm_attention() -> type:
    try:
        from timm.layers.attention import Attention
    except ImportError:  # older timm kept it in vision_transformer.py
        from timm.models.vision_transformer import Attention
    return Attention


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ViTGeometry:
    """Token layout of a ViT: ``grid`` (patch rows, cols), ``patch_size`` (pixels of the model
    input, rows x cols), ``n_prefix`` class/register tokens, ``depth`` blocks of ``num_heads``."""

    depth: int
    num_heads: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    n_prefix: int
    class_token: bool

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    @property
    def input_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]


def _pair(v: int | float | Sequence) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``attn`` module of every block, in order; UserError unless all are timm's Attention."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not hasattr(model, "patch_embed"):
        raise UserError(
            f"attention maps need a timm Vision Transformer, but the model is a "
            f"{type(model).__name__} (no transformer blocks); valid: vit_cifar, vit_imagenet "
            "or timm:<a ViT>; fix: pass a ViT, or use `repsim featuremaps` for CNNs"
        )
    cls = _timm_attention()
    mods = []
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, cls) or type(attn).forward is not cls.forward:
            what = type(attn).__name__ if attn is not None else "no 'attn' module"
            raise UserError(
                f"block {i} of this {type(model).__name__} uses {what}, not timm's standard "
                "Attention, so its attention weights cannot be captured exactly; valid: ViTs "
                "built from timm's Attention (vit_*, deit_*); fix: choose such a model"
            )
        mods.append(attn)
    if not mods:
        raise UserError(f"this {type(model).__name__} has no transformer blocks; pass a ViT")
    return mods


def vit_geometry(model: nn.Module) -> ViTGeometry:
    """The :class:`ViTGeometry` of a timm ViT (UserError for anything else)."""
    mods = attention_modules(model)
    heads = {m.num_heads for m in mods}
    if len(heads) != 1:
        raise UserError(f"blocks have different head counts {sorted(heads)}; not supported")
    pe = model.patch_embed
    grid = tuple(int(g) for g in _pair(getattr(pe, "grid_size", None) or (0, 0)))
    patch = tuple(int(p) for p in _pair(getattr(pe, "patch_size", None) or (0, 0)))
    if min(grid + patch) < 1:
        raise UserError(f"cannot read the patch grid of this {type(model).__name__}; "
                        "attention maps need a ViT with a fixed patch grid")
    class_token = getattr(model, "cls_token", None) is not None
    n_prefix = int(getattr(model, "num_prefix_tokens", int(class_token)))
    return ViTGeometry(len(mods), heads.pop(), grid, patch, n_prefix, class_token)


def distance_matrix(grid: tuple[int, int], patch_size: int | float | Sequence = 1
                    ) -> np.ndarray:
    """``(P, P)`` float64 Euclidean distances between patch centres, ``P = gh * gw`` in
    row-major order, in pixels when ``patch_size`` (pixels per patch; rows, cols) is given."""
    gh, gw = (int(g) for g in _pair(grid))
    ph, pw = (float(p) for p in _pair(patch_size))
    r, c = np.divmod(np.arange(gh * gw), gw)
    y, x = (r + 0.5) * ph, (c + 0.5) * pw
    return np.hypot(y[:, None] - y[None, :], x[:, None] - x[None, :])


# --------------------------------------------------------------------------- capture


def _attn_bias(n: int, ref: torch.Tensor, mask: torch.Tensor | None, causal: bool
               ) -> torch.Tensor | None:
    """The additive mask timm's non-fused path adds to the scores (timm's own semantics)."""
    if causal:
        return ref.new_full((n, n), float("-inf")).triu_(1)
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        bias = torch.zeros_like(mask, dtype=ref.dtype)
        return bias.masked_fill_(~mask, float("-inf"))
    return mask


def softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q * scale @ k^T + bias)`` over keys: ``(B, H, T, d)`` -> ``(B, H, T, T)``.

    The same operations, in the same order, as timm's non-fused ``Attention.forward``.
    """
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


Consumer = Callable[[int, torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], None]


class QKHooks:
    """Hooks handing ``consume(block, q, k, scale, bias)`` each chosen block's queries and keys.

    ``q`` is ``q_norm(q)`` and ``k`` is ``k_norm(k)``, both ``(B, H, T, d)`` views of the
    ``qkv`` output the model itself computed; ``scale`` is the block's ``head_dim ** -0.5``
    (timm multiplies ``q`` by it before the product); ``bias`` is the additive mask
    (None for ordinary ViT inference). The consumer runs under ``torch.no_grad``. Use as a
    context manager (hooks are removed on exit, also on errors).
    """

    def __init__(self, model: nn.Module, consume: Consumer, blocks: Sequence[int] | None = None
                 ) -> None:
        mods = attention_modules(model)
        chosen = range(len(mods)) if blocks is None else list(blocks)
        for i in chosen:
            if not isinstance(i, int) or not 0 <= i < len(mods):
                raise UserError(f"block {i!r} does not exist; this model has blocks "
                                f"0..{len(mods) - 1}")
        self.consume = consume
        self._calls: dict[int, tuple[torch.Tensor | None, bool]] = {}
        self.handles = []
        try:
            for i in chosen:
                m = mods[i]
                self.handles.append(m.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self.handles.append(m.qkv.register_forward_hook(self._qkv(i, m)))
        except BaseException:
            self.remove()
            raise

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            causal = kwargs.get("is_causal", args[2] if len(args) > 2 else False)
            self._calls[i] = (mask, bool(causal))

        return hook

    def _qkv(self, i: int, m: nn.Module):
        def hook(module, inputs, out):
            with torch.no_grad():
                b, n, _ = out.shape
                qkv = out.reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
                q, k, _ = qkv.unbind(0)
                q, k = m.q_norm(q), m.k_norm(k)
                mask, causal = self._calls.pop(i, (None, False))
                self.consume(i, q, k, m.scale, _attn_bias(n, q, mask, causal))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> QKHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextlib.contextmanager
def capture_attention(model: nn.Module, blocks: Sequence[int] | None = None,
                      to_cpu: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Context manager yielding ``{block: (B, H, T, T) attention}`` of the latest forward pass.

    Example::

        with capture_attention(model) as maps:
            logits = model(x)          # unchanged logits
        maps[0].sum(-1)                # all ones
    """
    maps: dict[int, torch.Tensor] = {}

    def consume(i, q, k, scale, bias):
        a = softmax_attention(q, k, scale, bias)
        maps[i] = a.cpu() if to_cpu else a

    with QKHooks(model, consume, blocks):
        yield maps


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def attention_maps(model: nn.Module, x: torch.Tensor, blocks: Sequence[int] | None = None
                   ) -> np.ndarray:
    """``(B, L, H, T, T)`` float32 attention of ``blocks`` (default all) for the preprocessed
    batch ``x`` ``(B, 3, S, S)`` (moved to the model's device). Rows sum to 1."""
    mods = attention_modules(model)
    order = list(range(len(mods))) if blocks is None else list(blocks)
    with torch.inference_mode(), capture_attention(model, order) as maps:
        model(x.to(_model_device(model)))
    return np.stack([maps[i].float().numpy() for i in order], axis=1)


# --------------------------------------------------------------------------- analyses on arrays


def _as_float64(attn: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(attn, torch.Tensor):
        return attn.detach().to("cpu", torch.float64)
    return torch.from_numpy(np.array(attn, dtype=np.float64))  # a copy: input may be read-only


def mean_attention_distance(attn: np.ndarray | torch.Tensor, grid: tuple[int, int],
                            patch_size: int | float | Sequence = 1,
                            renormalize: bool = True) -> np.ndarray:
    """``(L, H)`` float64 mean attention distance (pixels) of ``(B, L, H, T, T)`` or
    ``(L, H, T, T)`` attention over a ``grid`` of patches of ``patch_size`` pixels.

    The first ``T - gh*gw`` tokens are prefix tokens and are excluded as queries and keys;
    averaged over patch queries and images. See the module docstring for ``renormalize``.
    """
    a = _as_float64(attn)
    if a.ndim == 4:
        a = a[None]
    gh, gw = _pair(grid)
    p = int(gh) * int(gw)
    if a.ndim != 5 or a.shape[-1] != a.shape[-2] or a.shape[-1] < p:
        raise ValueError(f"attention of shape {tuple(a.shape)} does not fit a {gh}x{gw} grid; "
                         "expected (B, L, H, T, T) or (L, H, T, T) with T >= gh*gw")
    n = a.shape[-1] - p
    a = a[..., n:, n:]
    if renormalize:
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    d = torch.from_numpy(distance_matrix((gh, gw), patch_size))
    return (a * d).sum(-1).mean(dim=(0, 3)).numpy()


def rollout(attn: np.ndarray | torch.Tensor, residual: bool = True) -> np.ndarray:
    """Attention rollout, float64: ``(B, L, H, T, T) -> (B, T, T)`` or ``(L, H, T, T) -> (T, T)``.

    ``Â_l = rownorm(mean_h A_l + I)`` (``residual=False`` drops the ``+ I``), and
    ``R = Â_L @ ... @ Â_1``: row ``t`` of ``R`` is how token ``t`` of the last block draws on
    the input tokens.
    """
    a = _as_float64(attn)
    single = a.ndim == 4
    if single:
        a = a[None]
    if a.ndim != 5 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attention of shape {tuple(a.shape)}; expected (B, L, H, T, T) "
                         "or (L, H, T, T)")
    m = a.mean(2)
    if residual:
        m = m + torch.eye(m.shape[-1], dtype=m.dtype)
        m = m / m.sum(-1, keepdim=True)
    r = m[:, 0]
    for layer in range(1, m.shape[1]):
        r = m[:, layer] @ r
    return (r[0] if single else r).numpy()


def token_maps(attn: np.ndarray, grid: tuple[int, int], query: str = "cls") -> np.ndarray:
    """Attention over the patch grid: ``(..., T, T) -> (..., gh, gw)``.

    ``query="cls"``: the class token's row (token 0); ``"mean"``: the mean over patch queries
    (for ViTs without a class token). Prefix-token columns are dropped.
    """
    a = np.asarray(attn)
    gh, gw = _pair(grid)
    n = a.shape[-1] - gh * gw
    if n < 0:
        raise ValueError(f"{a.shape[-1]} tokens cannot hold a {gh}x{gw} patch grid")
    if query == "cls":
        if n < 1:
            raise ValueError("this model has no class token; use query='mean'")
        rows = a[..., 0, n:]
    elif query == "mean":
        rows = a[..., n:, n:].mean(-2)
    else:
        raise ValueError(f"query {query!r}; valid: 'cls' or 'mean'")
    return rows.reshape(*rows.shape[:-1], gh, gw)


# --------------------------------------------------------------------------- streaming distance


class _DistanceSums:
    """Consumer accumulating per-(block, head) float64 sums of per-query expected distances.

    Per block and batch: one batched product for the scores (scale folded into the GEMM), one
    softmax, and one matrix-vector product of the ``(B, H, Q*K)`` weights with the flattened
    distance matrix. Each image's per-head sum over its ``Q*K`` weights is a float32 dot
    product; sums over images and batches are float64.
    """

    def __init__(self, geo: ViTGeometry, d: torch.Tensor, renormalize: bool) -> None:
        self.n = geo.n_prefix
        self.p = geo.n_patches
        self.renormalize = renormalize
        if renormalize:  # scores over patch tokens only
            self.d_flat = d.reshape(-1).contiguous()
        else:  # all tokens; prefix rows and columns weigh 0 (prefix queries are not counted)
            t = geo.n_tokens
            full = d.new_zeros((t, t))
            full[self.n:, self.n:] = d
            self.d_flat = full.reshape(-1)
        self.sums = torch.zeros(geo.depth, geo.num_heads, dtype=torch.float64, device=d.device)
        self.counts = np.zeros(geo.depth, dtype=np.int64)
        self._beta0 = d.new_empty((1, 1, 1))  # ignored input of baddbmm(beta=0)

    def __call__(self, i: int, q: torch.Tensor, k: torch.Tensor, scale: float, bias) -> None:
        b, h, t, dh = q.shape
        if t != self.n + self.p:
            raise UserError(f"block {i} sees {t} tokens, but the patch grid has {self.p} + "
                            f"{self.n} prefix; feed images of the model's input size (dynamic "
                            "image sizes are not supported)")
        if self.renormalize:
            # softmax over patch keys only == full softmax renormalised over patch keys, and
            # only patch queries are needed: a (T-n)^2 instead of T^2 score block.
            q, k = q[:, :, self.n:], k[:, :, self.n:]
            bias = None if bias is None else bias[..., self.n:, self.n:]
        m = q.shape[2]
        qf = q.reshape(b * h, m, dh).float()
        kf = k.reshape(b * h, m, dh).float()
        scores = torch.baddbmm(self._beta0, qf, kf.transpose(1, 2), beta=0.0, alpha=scale)
        scores = scores.view(b, h, m, m)
        if bias is not None:
            scores = scores + bias
        a = scores.softmax(dim=-1)
        per_image = a.view(b, h, m * m) @ self.d_flat  # (B, H): sum over queries and keys
        self.sums[i] += per_image.to(torch.float64).sum(0)
        self.counts[i] += b * self.p

    def result(self) -> np.ndarray:
        if (self.counts == 0).any():
            raise RuntimeError("some blocks saw no images")
        return self.sums.cpu().numpy() / self.counts[:, None]


def attention_distance(model: nn.Module, images: np.ndarray | torch.Tensor, spec=None, *,
                       batch_size: int = 64, renormalize: bool = True,
                       progress: bool = False) -> np.ndarray:
    """``(L, H)`` float64 mean attention distance, in pixels of the model input, over ``images``.

    ``images``: ``(n, H, W, 3)`` uint8 (then ``spec``, a :class:`repsim.models.ModelSpec`, says
    how to preprocess) or an already preprocessed float ``(n, 3, S, S)`` tensor. Runs batches
    of ``batch_size`` on the model's device; no attention map outlives its block, so memory
    does not grow with ``n``. Each image's per-head sum over its patch queries and keys is a
    float32 dot product; the sums over images and batches are float64.
    """
    from tqdm.auto import tqdm

    from repsim.models import preprocess

    geo = vit_geometry(model)
    dev = _model_device(model)
    is_uint8 = (images.dtype == np.uint8) if isinstance(images, np.ndarray) \
        else images.dtype == torch.uint8
    if is_uint8 and spec is None:
        raise ValueError("uint8 images need the model's spec to be preprocessed")
    if batch_size < 1 or len(images) == 0:
        raise UserError(f"need images and a positive batch size (got {len(images)} images, "
                        f"batch size {batch_size})")
    d = torch.as_tensor(distance_matrix(geo.grid, geo.patch_size), dtype=torch.float32,
                        device=dev)
    acc = _DistanceSums(geo, d, renormalize)
    src = torch.as_tensor(images) if isinstance(images, np.ndarray) else images
    bar = tqdm(total=len(src), desc="attention distance", unit="img", disable=not progress)
    try:
        with torch.inference_mode(), QKHooks(model, acc):
            for a in range(0, len(src), batch_size):
                xb = src[a:a + batch_size].to(dev, non_blocking=True)
                model(preprocess(spec, xb) if is_uint8 else xb)
                bar.update(len(xb))
    finally:
        bar.close()
    return acc.result()  # pixels of the model input (the grid's patch_size units)


# --------------------------------------------------------------------------- plots


def plot_attention_heads(images: np.ndarray, maps: np.ndarray, blocks: Sequence[int],
                         title: str = "", ids: Sequence[int] | None = None):
    """Figure: one row per (image, block), the image then one overlay per head.

    ``images`` ``(N, H, W, 3)`` uint8, ``maps`` ``(N, len(blocks), heads, gh, gw)``; every
    panel is min-max normalised (the colour shows where a head looks, not how much).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from repsim.viz import bare, overlay

    n, nb, nh = maps.shape[:3]
    fig, axes = plt.subplots(n * nb, nh + 1, figsize=(1.25 * (nh + 1), 1.3 * n * nb + 0.6),
                             squeeze=False)
    for i in range(n):
        for j, blk in enumerate(blocks):
            row = axes[i * nb + j]
            row[0].imshow(images[i], interpolation="nearest")
            bare(row[0])
            name = f"id {ids[i]}" if ids is not None else f"image {i}"
            row[0].set_ylabel(f"{name}\nblock {blk}", fontsize=7)
            for h in range(nh):
                overlay(row[h + 1], images[i], maps[i, j, h])
                if i == 0 and j == 0:
                    row[h + 1].set_title(f"head {h}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_rollout(images: np.ndarray, maps: dict[str, np.ndarray],
                 ids: Sequence[int] | None = None):
    """Figure: one row per image, the image then one rollout overlay per model.

    ``maps`` is ``{label: (N, gh, gw)}``; each panel is min-max normalised.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from repsim.viz import bare, overlay

    n = len(images)
    labels = list(maps)
    fig, axes = plt.subplots(n, len(labels) + 1, figsize=(1.9 * (len(labels) + 1), 1.9 * n + 0.5),
                             squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i], interpolation="nearest")
        bare(axes[i, 0])
        axes[i, 0].set_ylabel(f"id {ids[i]}" if ids is not None else f"image {i}", fontsize=8)
        for j, label in enumerate(labels):
            overlay(axes[i, j + 1], images[i], maps[label][i])
            if i == 0:
                axes[i, j + 1].set_title(label, fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    fig.suptitle("attention rollout (class token, Abnar & Zuidema 2020)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_attention_distance(distances: dict[str, np.ndarray], unit: str = "pixels",
                            uniform: dict[str, float] | None = None, title: str = ""):
    """Figure: mean attention distance of every head (points) against block (1-based), one
    colour per model, with the mean over heads as a line. ``distances`` is ``{label: (L, H)}``;
    ``uniform`` (same unit) draws each model's uniform-attention distance as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    k = len(distances)
    for j, (label, d) in enumerate(distances.items()):
        d = np.asarray(d)
        depth, heads = d.shape
        x = np.arange(1, depth + 1) + (j - (k - 1) / 2) * 0.12  # side by side, not on top
        color = f"C{j}"
        ax.scatter(np.repeat(x, heads), d.ravel(), s=14, alpha=0.75, color=color,
                   label=f"{label} (heads)")
        ax.plot(x, d.mean(1), color=color, alpha=0.5, lw=1)
        if uniform and label in uniform:
            ax.hlines(uniform[label], 0.7, depth + 0.3, colors=color, linestyles="dashed",
                      lw=0.8, alpha=0.7, label=f"{label}: uniform attention")
    ax.set_xlabel("block")
    ax.set_ylabel(f"mean attention distance\n({unit})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    top = max([float(np.max(d)) for d in distances.values()] + list((uniform or {}).values()))
    ax.set_ylim(0, 1.1 * top if top > 0 else 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the command


@dataclass
class AttentionConfig:
    """What ``repsim attention`` computes. ``weights`` is empty (defaults), one entry for all
    models, or one per model; ``ids`` overrides ``images``."""

    models: list[str]
    weights: list[str | None] = field(default_factory=list)
    dataset: str = "cifar10-probe"
    split: str = "test"
    data_root: str | None = None
    images: int = 4
    ids: list[int] | None = None
    layers: str | None = None  # blocks for the per-head maps; default first, middle, last
    probe: int = DEFAULT_PROBE  # images for the mean attention distance
    seed: int = 0
    batch_size: int = 64
    device: str | None = None
    unit: str = "image"
    renormalize: bool = True
    title: str | None = None  # of the distance plot
    out: str | None = None
    cache: bool = True
    progress: bool = True


def resolve_blocks(request: str | Sequence | None, depth: int, model=None, spec=None
                   ) -> list[int]:
    """Block indices from ``'0,5'``, ``'blocks.0,blocks.5'``, ``'blocks'``, globs; None ->
    first, middle and last block."""
    if request is None:
        return sorted({0, depth // 2, depth - 1})
    items = [request] if isinstance(request, str) else list(request)
    parts = [p.strip() for it in items for p in str(it).split(",") if p.strip()]
    out: set[int] = set()
    for part in parts:
        if re.fullmatch(r"-?\d+", part):
            i = int(part)
            if not 0 <= i < depth:
                raise UserError(f"block {i} does not exist; valid: 0..{depth - 1} (or names "
                                "like blocks.0, 'blocks' for all); fix: correct --layers")
            out.add(i)
            continue
        if model is None or spec is None:
            raise UserError(f"--layers item {part!r} is not a block number; pass e.g. 0,5")
        from repsim.models import layer_names

        names = layer_names(model, spec, part)
        idx = [int(m.group(1)) for n in names if (m := re.fullmatch(r"blocks\.(\d+)", n))]
        if not idx:
            raise UserError(f"--layers {part!r} names no transformer block (attention lives in "
                            f"blocks.0..blocks.{depth - 1}); fix: pass e.g. --layers 0,{depth - 1}")
        out.update(idx)
    return sorted(out)


def _weights_for(models: list[str], weights: list[str | None]) -> list[str | None]:
    if not weights:
        return [None] * len(models)
    if len(weights) == 1:
        return list(weights) * len(models)
    if len(weights) != len(models):
        raise UserError(f"{len(weights)} --weights for {len(models)} --model; valid: none, one "
                        "for all models, or one per --model in the same order")
    return list(weights)


def model_labels(models: list[str], weights: list[str | None]) -> list[str]:
    """Unique display labels: the model name, plus the weights' stem when needed."""
    if len(set(models)) == len(models):
        return list(models)
    out = []
    for m, w in zip(models, weights):
        out.append(m if w is None else f"{m} ({'random' if w == 'random' else Path(w).stem})")
    if len(set(out)) != len(out):
        raise UserError("the same --model and --weights are given twice; drop the duplicate")
    return out


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", key["model"])
    return Path(os.environ.get("REPSIM_CACHE", "cache")) / "attention" / f"{name}-{digest}.json"


def _distance_cached(model, spec, wprov: dict, probe, cfg: AttentionConfig
                     ) -> tuple[np.ndarray, bool, float]:
    """(distance (L, H) in model pixels, reused?, seconds): computed once per provenance."""
    from repsim import __version__
    from repsim.models import preprocessing_info
    from repsim.viz import write_json

    key = {"format": FORMAT, "model": spec.name, "weights": wprov, "data": probe.provenance(),
           "preprocessing": preprocessing_info(spec), "renormalize": cfg.renormalize,
           "repsim": __version__}
    path = _cache_path(key)
    if cfg.cache and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return np.asarray(saved["distance_model_px"], dtype=np.float64), True, 0.0
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: recompute and overwrite it
    t0 = time.perf_counter()
    dist = attention_distance(model, probe.images, spec, batch_size=cfg.batch_size,
                              renormalize=cfg.renormalize, progress=cfg.progress)
    seconds = time.perf_counter() - t0
    if cfg.cache:
        write_json(path, {"key": key, "distance_model_px": dist.tolist(), "seconds": seconds,
                          "torch": torch.__version__})
    return dist, False, seconds


def unit_label(unit: str, image_hw: tuple[int, int]) -> str:
    """Axis label for a distance unit; UserError for 'image' with non-square probe images."""
    h, w = image_hw
    if unit == "model":
        return "pixels of the model input"
    if unit == "fraction":
        return "fraction of the image side"
    if unit == "image":
        if h != w:
            raise UserError(f"--unit image needs square probe images, these are {h}x{w}; "
                            "fix: pass --unit model or --unit fraction")
        return f"pixels of the {h}x{w} probe image"
    raise UserError(f"--unit {unit!r}; valid: {', '.join(UNITS)}")


Saver = Callable[[Any, Path, dict], list[Path]]


def _png(fig, stem: Path, provenance: dict) -> list[Path]:
    """The command's figure writer: ``stem.png`` with provenance in its text chunk."""
    from repsim.viz import save_figure

    return [save_figure(fig, stem.with_name(stem.name + ".png"), provenance)]


def _check_vit(name: str) -> None:
    from repsim.models import get_spec

    spec = get_spec(name)
    if spec.family != "vit":
        raise UserError(
            f"{spec.name} is a {spec.family} model, and attention maps need a Vision "
            "Transformer; valid: vit_cifar, vit_imagenet or timm:<a ViT>; fix: pass a ViT, "
            f"or run `repsim featuremaps --model {spec.name}` for CNN feature maps")


def run_attention(cfg: AttentionConfig) -> dict[str, Any]:
    """Per-head class-token maps, rollout maps and mean attention distance for ``cfg.models``.

    Writes into ``cfg.out`` (default ``$REPSIM_FIGURES/attention``): ``attention_heads_<label>
    .png``, ``attention_maps_<label>.npz``, ``attention_rollout.png``, ``attention_distance
    .png/.csv/.json``. Distances are cached per (model, weights, probe set, preprocessing) in
    ``$REPSIM_CACHE/attention``. Returns a summary dict (outputs, models, seconds).
    """
    from repsim import models as zoo
    from repsim.data import load_probe_set
    from repsim.models import resolve_device
    from repsim.viz import default_out, pick_images

    t0 = time.perf_counter()
    if not cfg.models:
        raise UserError("no --model given; pass e.g. --model vit_cifar --model vit_imagenet")
    weights = _weights_for(cfg.models, cfg.weights)
    labels = model_labels(cfg.models, weights)
    for name in cfg.models:
        _check_vit(name)
    device = resolve_device(cfg.device)
    probe = load_probe_set(cfg.dataset, cfg.split, n=cfg.probe, seed=cfg.seed,
                           data_root=cfg.data_root, progress=cfg.progress)
    images, ids = pick_images(probe, cfg.images, cfg.ids, cfg.data_root, cfg.progress)
    unit_label(cfg.unit, tuple(images.shape[1:3]))  # fails before the slow part
    loaded = []
    for name, w, label in zip(cfg.models, weights, labels):
        model, wprov = zoo.load_model(name, w, seed=cfg.seed, device=device)
        loaded.append((label, name, model, wprov))
    out = Path(cfg.out) if cfg.out else default_out("attention")
    res = attention_views(loaded, probe, images, ids, cfg, out, "attention", _png)
    res.pop("entries")  # in attention_distance.json; the summary stays short
    return {**res, "out": str(out), "seconds": time.perf_counter() - t0}


def attention_views(loaded: list[tuple[str, str, nn.Module, dict]], probe, images: np.ndarray,
                    ids: np.ndarray, cfg: AttentionConfig, out: Path, prefix: str,
                    save: Saver) -> dict[str, Any]:
    """Draw and save every view for ``loaded`` = ``[(label, model name, model, weights
    provenance)]``: ``<prefix>_heads_<label>``, ``<prefix>_rollout``, ``<prefix>_distance``
    figures (written by ``save(fig, stem, provenance)``), ``<prefix>_maps_<label>.npz`` and
    ``<prefix>_distance.csv/.json``. ``probe`` is the distance probe set, ``images``/``ids``
    the drawn images. Returns a summary (outputs, models, distances, reused flags)."""
    if cfg.unit not in UNITS:
        raise UserError(f"unit {cfg.unit!r}; valid: {', '.join(UNITS)}")
    axis = unit_label(cfg.unit, tuple(images.shape[1:3]))
    outputs: list[str] = []
    entries = []
    rollouts: dict[str, np.ndarray] = {}
    for label, name, model, wprov in loaded:
        entry, roll, files = _one_model(label, name, model, wprov, cfg, probe, images, ids,
                                        out, prefix, save)
        entries.append(entry)
        rollouts[label] = roll
        outputs += files

    base = _base_provenance(cfg, probe, ids)
    labels = [e["label"] for e in entries]
    fig = plot_rollout(images, rollouts, ids=ids)
    outputs += map(str, save(fig, out / f"{prefix}_rollout", {**base, "models": labels}))
    key = {"image": "distance_image_px", "model": "distance_model_px",
           "fraction": "distance_fraction"}[cfg.unit]
    plotted = {e["label"]: np.asarray(e[key]) for e in entries}
    uniform = {e["label"]: e["uniform_attention_distance_model_px"] * e["unit_factor"][cfg.unit]
               for e in entries}
    fig = plot_attention_distance(plotted, axis, uniform, cfg.title or "")
    outputs += map(str, save(fig, out / f"{prefix}_distance", {**base, "unit": cfg.unit}))
    outputs += _write_distance_tables(out / f"{prefix}_distance", entries, base, cfg,
                                      len(probe))
    return {"outputs": outputs, "models": labels, "n_images": len(ids), "n_probe": len(probe),
            "reused": [e["reused"] for e in entries], "unit": cfg.unit,
            "distance_mean_per_block": {lab: d.mean(1).round(4).tolist()
                                        for lab, d in plotted.items()},
            "entries": entries}


def _base_provenance(cfg: AttentionConfig, probe, ids: np.ndarray) -> dict[str, Any]:
    from repsim import __version__

    return {"data": probe.provenance(), "image_ids": ids.tolist(), "seed": cfg.seed,
            "renormalize": cfg.renormalize,
            "versions": {"repsim": __version__, "torch": torch.__version__}}


def _one_model(label: str, name: str, model: nn.Module, wprov: dict, cfg: AttentionConfig,
               probe, images: np.ndarray, ids: np.ndarray, out: Path, prefix: str,
               save: Saver) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """One model's maps (figure + npz) and distances: (entry for the tables, rollout maps
    ``(N, gh, gw)``, files written)."""
    from dataclasses import asdict

    from repsim import models as zoo
    from repsim.viz import safe_name, save_npz

    spec = zoo.get_spec(name)
    geo = vit_geometry(model)
    blocks = resolve_blocks(cfg.layers, geo.depth, model, spec)
    query = "cls" if geo.class_token else "mean"
    x = zoo.preprocess(spec, torch.from_numpy(images).to(_model_device(model)))
    attn = attention_maps(model, x)  # (N, L, H, T, T): all blocks, rollout needs them
    heads = token_maps(attn[:, blocks], geo.grid, query)
    roll = token_maps(rollout(attn), geo.grid, query)
    del attn
    dist, reused, seconds = _distance_cached(model, spec, wprov, probe, cfg)

    s = spec.input_size
    h, w = images.shape[1:3]
    factor = {"model": 1.0, "fraction": 1.0 / s, "image": h / s if h == w else None}
    prov = {"model": name, "label": label, "weights": wprov, "geometry": asdict(geo),
            "blocks": blocks, "query": query, **_base_provenance(cfg, probe, ids),
            "preprocessing": zoo.preprocessing_info(spec)}
    npz = save_npz(out / f"{prefix}_maps_{safe_name(label)}.npz",
                   heads=heads.astype(np.float32), rollout=roll.astype(np.float32), ids=ids,
                   blocks=np.asarray(blocks), images=images,
                   provenance=np.asarray(json.dumps(prov, default=str)))
    kind = "class-token" if query == "cls" else "mean-query"
    fig = plot_attention_heads(images, heads, blocks, ids=ids, title=f"{label}: {kind} "
                               "attention per head (each panel min-max scaled)")
    files = save(fig, out / f"{prefix}_heads_{safe_name(label)}", prov)
    entry = {
        "label": label, "model": name, "weights": wprov, "geometry": asdict(geo),
        "input_size": s, "unit_factor": factor,
        "distance_model_px": dist.tolist(),
        "distance_fraction": (dist * factor["fraction"]).tolist(),
        "distance_image_px": None if factor["image"] is None
        else (dist * factor["image"]).tolist(),
        # What uniform attention would give: the grid's mean pairwise patch distance.
        "uniform_attention_distance_model_px":
            float(distance_matrix(geo.grid, geo.patch_size).mean()),
        "reused": reused, "seconds": seconds,
    }
    return entry, roll, [str(f) for f in files] + [str(npz)]


def _write_distance_tables(stem: Path, entries: list[dict], base: dict, cfg: AttentionConfig,
                           n_probe: int) -> list[str]:
    """``<stem>.csv`` (one row per model, block, head) and ``<stem>.json``."""
    from repsim.viz import write_json, write_text

    rows = ["label,model,weights,block,head,distance_image_px,distance_model_px,"
            "distance_fraction,n_images,renormalized"]
    for e in entries:
        dm = np.asarray(e["distance_model_px"])
        di = None if e["distance_image_px"] is None else np.asarray(e["distance_image_px"])
        df = np.asarray(e["distance_fraction"])
        for b, h in np.ndindex(*dm.shape):
            rows.append(",".join([
                _csv(e["label"]), _csv(e["model"]), _csv(str(e["weights"]["weights"])),
                str(b), str(h), "" if di is None else f"{di[b, h]:.6f}", f"{dm[b, h]:.6f}",
                f"{df[b, h]:.8f}", str(n_probe), str(cfg.renormalize).lower()]))
    csv = write_text(stem.with_name(stem.name + ".csv"), "\n".join(rows) + "\n")
    js = write_json(stem.with_name(stem.name + ".json"),
                    {"format": FORMAT, **base, "unit_plotted": cfg.unit, "models": entries})
    return [str(csv), str(js)]


def _csv(text: str) -> str:
    """One CSV field (RFC 4180 quoting)."""
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


# --------------------------------------------------------------------------- repsim figures


@figure_kind("attention", fields=("models", "images", "ids", "blocks", "unit", "batch_size",
                                  "renormalize"), required=("models",))
def build_attention_figure(spec: dict, ctx) -> list[Path]:
    """ViT attention per head, attention rollout and mean attention distance, side by side.

    Spec keys: ``models`` (ViTs), ``images`` (first N probe images drawn, default 4) or
    ``ids``, ``blocks`` (per-head maps; default first, middle, last), ``unit`` (image, model
    or fraction), ``batch_size``, ``renormalize``; ``[probe]`` is the distance probe set.
    Writes ``<name>_heads_<label>``, ``<name>_rollout``, ``<name>_distance`` (.png, .pdf),
    ``<name>_maps_<label>.npz`` and ``<name>_distance.csv/.json``.
    """
    from repsim import plots
    from repsim.models import resolve_device
    from repsim.viz import pick_images

    refs = [ctx.model_ref(m, spec) for m in spec["models"]]
    for r in refs:
        _check_vit(r.model)
    pspec = ctx.probe_spec(spec)
    probe = ctx.images(pspec)
    models = [ctx.model(r) for r in refs]  # a model without weights skips the figure here
    cfg = AttentionConfig(models=[r.model for r in refs], layers=spec.get("blocks"),
                          unit=spec.get("unit", "image"), seed=pspec.seed,
                          batch_size=int(spec.get("batch_size", 64)),
                          renormalize=bool(spec.get("renormalize", True)),
                          title=spec.get("title"), progress=ctx.progress)
    images, ids = pick_images(probe, spec.get("images", 4), spec.get("ids"), pspec.data_root,
                              ctx.progress)
    device = resolve_device(ctx.device)
    loaded = [(r.display(), r.model, m.to(device), prov) for r, (m, prov) in zip(refs, models)]
    try:
        res = attention_views(loaded, probe, images, ids, cfg, ctx.out_dir, ctx.name,
                              lambda fig, stem, prov: plots.save(fig, stem))
    finally:
        for _, _, m, _ in loaded:
            m.to("cpu")  # the context shares loaded models between figures
    ctx.data.update({"image_ids": ids.tolist(), "unit": cfg.unit,
                     "models": [{k: e[k] for k in ("label", "model", "geometry",
                                                   "distance_model_px", "distance_image_px",
                                                   "uniform_attention_distance_model_px")}
                                for e in res["entries"]]})
    return [Path(p) for p in res["outputs"]]
