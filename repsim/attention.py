"""Look inside ViTs: every head's attention, attention rollout and mean attention distance.

Capture is exact and leaves outputs untouched: a hook on each block's ``attn.qkv`` takes the
very ``qkv`` the model computed and rebuilds timm's non-fused ``softmax(q_norm(q) * scale @
k_norm(k)^T + mask)``; it writes into nothing the model uses, so outputs are bit-identical with
and without capture, fused kernel or not (on the explicit path the captured weights are the
model's own, bit for bit). Blocks whose ``attn`` is not timm's ``Attention`` are refused.

Shapes: ``B`` images, ``L`` blocks, ``H`` heads, ``T = n_prefix + P`` tokens (class/register
tokens first, then the ``P = gh * gw`` patches, row-major). Attention is ``(B, L, H, T, T)``.

Mean attention distance (Dosovitskiy et al. 2021): per patch query, the attention-weighted
distance to the patch centres it attends to, averaged over queries and images; ``(L, H)`` in
pixels of the model input. Prefix tokens are neither queries nor keys: ``renormalize=True``
renormalises the weights over patch keys (uniform attention gives the grid's mean pairwise
distance), ``False`` counts prefix mass as distance 0. Rollout (Abnar & Zuidema 2020):
``R = Â_L ... Â_1`` with ``Â_l = rownorm(mean_h A_l + I)``. Figures and the ``repsim
attention`` command live in :mod:`repsim.figures.attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from repsim.errors import UserError


def _timm_attention() -> type:
    try:  # imported here: timm takes seconds to import and only ViT callers need it
        from timm.layers.attention import Attention
    except ImportError:  # older timm kept it in vision_transformer.py
        from timm.models.vision_transformer import Attention
    return Attention


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
            "or timm:<a ViT>; fix: pass a ViT, or use `repsim featuremaps` for CNNs")
    cls = _timm_attention()
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, cls) or type(attn).forward is not cls.forward:
            what = type(attn).__name__ if attn is not None else "no 'attn' module"
            raise UserError(
                f"block {i} of this {type(model).__name__} uses {what}, not timm's standard "
                "Attention, so its attention weights cannot be captured exactly; valid: ViTs "
                "built from timm's Attention (vit_*, deit_*); fix: choose such a model")
    if len(blocks) == 0:
        raise UserError(f"this {type(model).__name__} has no transformer blocks; pass a ViT")
    return [block.attn for block in blocks]


def vit_geometry(model: nn.Module) -> ViTGeometry:
    """The :class:`ViTGeometry` of a timm ViT (UserError for anything else)."""
    heads = {m.num_heads for m in attention_modules(model)}
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
    return ViTGeometry(len(model.blocks), heads.pop(), grid, patch, n_prefix, class_token)


def distance_matrix(grid: tuple[int, int], patch_size: int | float | Sequence = 1
                    ) -> np.ndarray:
    """``(P, P)`` float64 Euclidean distances between patch centres, ``P = gh * gw`` in
    row-major order, in pixels when ``patch_size`` (pixels per patch; rows, cols) is given."""
    gh, gw = (int(g) for g in _pair(grid))
    ph, pw = (float(p) for p in _pair(patch_size))
    r, c = np.divmod(np.arange(gh * gw), gw)
    y, x = (r + 0.5) * ph, (c + 0.5) * pw
    return np.hypot(y[:, None] - y[None, :], x[:, None] - x[None, :])


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------- capture

# consume(block, q, k, scale, bias): q = q_norm(q), k = k_norm(k), both (B, H, T, d) views of
# the qkv output the model computed; scale = head_dim ** -0.5 (timm multiplies q by it);
# bias = the additive mask timm's non-fused path adds to the scores (None for plain ViTs).
Consumer = Callable[[int, torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], None]


def _attn_bias(n: int, ref: torch.Tensor, mask: torch.Tensor | None, causal: bool
               ) -> torch.Tensor | None:
    if causal:
        return ref.new_full((n, n), float("-inf")).triu_(1)
    if mask is not None and mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=ref.dtype).masked_fill_(~mask, float("-inf"))
    return mask


@contextlib.contextmanager
def _qk_hooks(model: nn.Module, consume: Consumer, blocks: Sequence[int] | None = None
              ) -> Iterator[None]:
    """Call ``consume`` with each chosen block's queries and keys during every forward pass
    inside the ``with`` (under ``torch.no_grad``); the hooks go on exit, also on errors."""
    mods = attention_modules(model)
    chosen = range(len(mods)) if blocks is None else list(blocks)
    for i in chosen:
        if not isinstance(i, int) or not 0 <= i < len(mods):
            raise UserError(f"block {i!r} does not exist; this model has blocks "
                            f"0..{len(mods) - 1}")
    calls: dict[int, tuple[torch.Tensor | None, bool]] = {}

    def hooks(i: int, m: nn.Module):
        def pre(module, args, kwargs):
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            causal = kwargs.get("is_causal", args[2] if len(args) > 2 else False)
            calls[i] = (mask, bool(causal))

        def post(module, inputs, out):
            with torch.no_grad():
                b, n, _ = out.shape
                q, k, _ = out.reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
                mask, causal = calls.pop(i, (None, False))
                consume(i, m.q_norm(q), m.k_norm(k), m.scale, _attn_bias(n, q, mask, causal))

        return pre, post

    handles = []
    try:
        for i in chosen:
            pre, post = hooks(i, mods[i])
            handles.append(mods[i].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mods[i].qkv.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


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
        # The same operations, in the same order, as timm's non-fused Attention.forward.
        scores = (q * scale) @ k.transpose(-2, -1)
        a = (scores if bias is None else scores + bias).softmax(dim=-1)
        maps[i] = a.cpu() if to_cpu else a

    with _qk_hooks(model, consume, blocks):
        yield maps


def attention_maps(model: nn.Module, x: torch.Tensor, blocks: Sequence[int] | None = None
                   ) -> np.ndarray:
    """``(B, L, H, T, T)`` float32 attention of ``blocks`` (default all) for the preprocessed
    batch ``x`` ``(B, 3, S, S)`` (moved to the model's device). Rows sum to 1."""
    order = list(range(len(attention_modules(model)))) if blocks is None else list(blocks)
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
    ``(L, H, T, T)`` attention over a ``grid`` of patches of ``patch_size`` pixels; the first
    ``T - gh*gw`` tokens are the prefix (see the module docstring for ``renormalize``)."""
    a = _as_float64(attn)
    a = a[None] if a.ndim == 4 else a
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
    """Attention rollout, float64: ``(B, L, H, T, T) -> (B, T, T)`` or ``(L, H, T, T) -> (T, T)``;
    row ``t`` is how token ``t`` of the last block draws on the input tokens.
    ``residual=False`` drops the ``+ I``."""
    a = _as_float64(attn)
    single = a.ndim == 4
    a = a[None] if single else a
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
    """Attention over the patch grid, ``(..., T, T) -> (..., gh, gw)``, prefix keys dropped:
    the class token's row (``query="cls"``) or the mean over patch queries (``"mean"``, for
    ViTs without a class token)."""
    a = np.asarray(attn)
    gh, gw = _pair(grid)
    n = a.shape[-1] - gh * gw
    if n < 0:
        raise ValueError(f"{a.shape[-1]} tokens cannot hold a {gh}x{gw} patch grid")
    if query not in ("cls", "mean"):
        raise ValueError(f"query={query!r}; valid: 'cls' or 'mean'")
    if query == "cls" and n < 1:
        raise ValueError("this model has no class token; use query='mean'")
    rows = a[..., 0, n:] if query == "cls" else a[..., n:, n:].mean(-2)
    return rows.reshape(*rows.shape[:-1], gh, gw)


# --------------------------------------------------------------------------- streaming distance


class _DistanceSums:
    """Per-(block, head) float64 sums of per-query expected patch distances.

    Per block and batch: one batched product for the scores (scale folded into the GEMM), one
    softmax, and one matrix-vector product of the ``(B, H, Q*K)`` weights with the flattened
    distance matrix; each image's per-head sum is a float32 dot product, the sums over images
    and batches are float64.
    """

    def __init__(self, geo: ViTGeometry, d: torch.Tensor, renormalize: bool) -> None:
        self.n, self.p, self.renormalize = geo.n_prefix, geo.n_patches, renormalize
        if not renormalize:  # scores over all tokens; prefix rows and columns weigh 0
            full = d.new_zeros((self.n + self.p,) * 2)
            full[self.n:, self.n:] = d
            d = full
        self.d_flat = d.reshape(-1).contiguous()
        self.sums = torch.zeros(geo.depth, geo.num_heads, dtype=torch.float64, device=d.device)
        self.counts = np.zeros(geo.depth, dtype=np.int64)
        self._beta0 = d.new_empty((1, 1, 1))  # ignored input of baddbmm(beta=0)

    def update(self, i: int, q: torch.Tensor, k: torch.Tensor, scale: float, bias
               ) -> _DistanceSums:
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
        qf, kf = q.reshape(b * h, m, dh).float(), k.reshape(b * h, m, dh).float()
        scores = torch.baddbmm(self._beta0, qf, kf.transpose(1, 2), beta=0.0, alpha=scale)
        scores = scores.view(b, h, m, m)
        a = (scores if bias is None else scores + bias).softmax(dim=-1)
        per_image = a.view(b, h, m * m) @ self.d_flat  # (B, H): sum over queries and keys
        self.sums[i] += per_image.to(torch.float64).sum(0)
        self.counts[i] += b * self.p
        return self

    def compute(self) -> np.ndarray:
        """``(L, H)`` float64 mean distances."""
        return self.sums.cpu().numpy() / self.counts[:, None]


def attention_distance(model: nn.Module, images: np.ndarray | torch.Tensor, spec=None, *,
                       batch_size: int = 64, renormalize: bool = True,
                       progress: bool = False) -> np.ndarray:
    """``(L, H)`` float64 mean attention distance, in pixels of the model input, over ``images``.

    ``images``: ``(n, H, W, 3)`` uint8 (then ``spec``, a :class:`repsim.registry.ModelSpec`, says
    how to preprocess) or an already preprocessed float ``(n, 3, S, S)`` tensor. Runs batches
    of ``batch_size`` on the model's device; no attention map outlives its block, so memory
    does not grow with ``n``.
    """
    from tqdm.auto import tqdm

    from repsim.models import preprocess

    geo = vit_geometry(model)
    dev = model_device(model)
    src = torch.as_tensor(images) if isinstance(images, np.ndarray) else images
    is_uint8 = src.dtype == torch.uint8
    if is_uint8 and spec is None:
        raise ValueError("uint8 images need the model's spec to be preprocessed")
    if batch_size < 1 or len(src) == 0:
        raise UserError(f"need images and a positive batch size (got {len(src)} images, "
                        f"batch_size={batch_size})")
    d = torch.as_tensor(distance_matrix(geo.grid, geo.patch_size), dtype=torch.float32,
                        device=dev)
    acc = _DistanceSums(geo, d, renormalize)
    bar = tqdm(total=len(src), desc="attention distance", unit="img", disable=not progress)
    with bar, torch.inference_mode(), _qk_hooks(model, acc.update):
        for a in range(0, len(src), batch_size):
            xb = src[a:a + batch_size].to(dev, non_blocking=True)
            model(preprocess(spec, xb) if is_uint8 else xb)
            bar.update(len(xb))
    return acc.compute()


def prefix_attention_mass(model: nn.Module, x: torch.Tensor, batch_size: int = 64
                          ) -> np.ndarray:
    """``(L, n_prefix)`` float64: the attention weight that patch queries give each class or
    register token, averaged over patch queries, heads and images, per block. Uniform
    attention gives ``1 / T`` per token. ``x``: preprocessed ``(n, 3, S, S)`` float images,
    run in batches of ``batch_size`` on the model's device."""
    geo = vit_geometry(model)
    n = geo.n_prefix
    if n < 1:
        raise UserError("this ViT has no class or register tokens to measure attention on")
    sums = torch.zeros(geo.depth, n, dtype=torch.float64)
    count = 0

    def consume(i, q, k, scale, bias):
        scores = (q * scale) @ k.transpose(-2, -1)
        a = (scores if bias is None else scores + bias).softmax(dim=-1)
        sums[i] += a[:, :, n:, :n].to(torch.float64).sum(dim=(0, 1, 2)).cpu()

    dev = model_device(model)
    with torch.inference_mode(), _qk_hooks(model, consume):
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size].to(dev)
            model(xb)
            count += len(xb)
    return (sums / (count * geo.num_heads * geo.n_patches)).numpy()
