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

Figures of all this, the ``repsim attention`` command and its ``repsim figures`` kind live in
:mod:`repsim.attention_figures`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from repsim.errors import UserError

__all__ = [
    "QKHooks",
    "ViTGeometry",
    "attention_distance",
    "attention_maps",
    "attention_modules",
    "capture_attention",
    "distance_matrix",
    "mean_attention_distance",
    "model_device",
    "rollout",
    "token_maps",
    "vit_geometry",
]


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


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def attention_maps(model: nn.Module, x: torch.Tensor, blocks: Sequence[int] | None = None
                   ) -> np.ndarray:
    """``(B, L, H, T, T)`` float32 attention of ``blocks`` (default all) for the preprocessed
    batch ``x`` ``(B, 3, S, S)`` (moved to the model's device). Rows sum to 1."""
    mods = attention_modules(model)
    order = list(range(len(mods))) if blocks is None else list(blocks)
    with torch.inference_mode(), capture_attention(model, order) as maps:
        model(x.to(model_device(model)))
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
    dev = model_device(model)
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
