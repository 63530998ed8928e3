"""Look inside ViTs: every head's attention, attention rollout and mean attention distance.

Capture is exact and leaves outputs untouched: a hook on each block's ``attn.qkv`` takes the
``qkv`` the model computed and rebuilds timm's non-fused ``softmax(q_norm(q) * scale @
k_norm(k)^T + mask)`` without writing into anything the model uses, fused kernel or not.
Blocks whose ``attn`` is not timm's ``Attention`` are refused.

Shapes: ``B`` images, ``L`` blocks, ``H`` heads, ``T = n_prefix + P`` tokens (class/register
tokens first, then the ``P = gh * gw`` patches, row-major). Attention is ``(B, L, H, T, T)``.

Mean attention distance (Dosovitskiy et al. 2021): per patch query, the attention-weighted
distance to the patch centres it attends to, averaged over queries and images; ``(L, H)`` in
pixels of the model input. Prefix tokens are neither queries nor keys: ``renormalize=True``
renormalises the weights over patch keys (uniform attention gives the grid's mean pairwise
distance), ``False`` counts prefix mass as distance 0. Rollout (Abnar & Zuidema 2020):
``R = Â_L ... Â_1`` with ``Â_l = rownorm(mean_h A_l + I)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repsim.errors import UserError, is_whole
from repsim.hooks import as_tensor, eval_mode, float_dtype


@dataclass(frozen=True)
class TokenGrid:
    """A ViT's token layout: ``grid`` (rows, cols) of patches of ``patch_size`` pixels of the
    model input (rows, cols), after ``n_prefix`` class/register tokens."""

    grid: tuple[int, int]
    patch_size: tuple[int, int]
    n_prefix: int

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]


@dataclass(frozen=True)
class ViTGeometry(TokenGrid):
    """A :class:`TokenGrid` plus ``depth`` blocks of ``num_heads`` heads; ``class_token``."""

    depth: int
    num_heads: int
    class_token: bool


def _pair(v: int | float | Sequence) -> tuple:
    # a numpy array too: a grid read back from a saved .npz is np.array([gh, gw])
    pair = isinstance(v, tuple | list) or isinstance(v, np.ndarray) and v.ndim > 0
    return tuple(v) if pair else (v, v)


def token_grid(model: nn.Module) -> TokenGrid:
    """The :class:`TokenGrid` of a ViT-like module: ``model.patch_embed.grid_size`` and
    ``.patch_size`` (timm's names; times ``.feature_ratio``, the input pixels per feature of a
    hybrid ViT's CNN backbone), ``model.num_prefix_tokens`` (default: 1 with a ``cls_token``,
    else 0). UserError for a module without a patch grid (a CNN)."""
    pe = getattr(model, "patch_embed", None)
    grid, patch = (tuple(int(v) for v in _pair(getattr(pe, k, None) or 0))
                   for k in ("grid_size", "patch_size"))
    if min(grid + patch) < 1:
        raise UserError(f"{type(model).__name__} has no patch grid (patch_embed.grid_size and "
                        ".patch_size); valid: vit_cifar, vit_imagenet or timm:<a ViT>")
    # timm's HybridEmbed cuts the backbone's feature map into patches, not the image.
    ratio = tuple(int(v) for v in _pair(getattr(pe, "feature_ratio", None) or 1))
    default = 1 if getattr(model, "cls_token", None) is not None else 0
    return TokenGrid(grid, (patch[0] * ratio[0], patch[1] * ratio[1]),
                     int(getattr(model, "num_prefix_tokens", default)))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``attn`` module of every block, in order; UserError unless all are timm's Attention."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not hasattr(model, "patch_embed"):
        raise UserError(
            f"attention maps need a timm Vision Transformer, but the model is a "
            f"{type(model).__name__} (no transformer blocks); valid: vit_cifar, vit_imagenet "
            "or timm:<a ViT>; fix: pass a ViT, or draw a CNN's feature maps with "
            "repsim.figures.featuremaps.run_featuremaps")
    from timm.models.vision_transformer import Attention  # here: timm takes seconds to load
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
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
    g = token_grid(model)
    return ViTGeometry(g.grid, g.patch_size, g.n_prefix, len(model.blocks), heads.pop(),
                       getattr(model, "cls_token", None) is not None)


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


def model_input(model: nn.Module, x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``x`` on the model's device, floating ``x`` in the model's dtype
    (:func:`repsim.hooks.float_dtype`: numpy's float64 images into a float32 ViT, as
    :func:`repsim.extract` does)."""
    t = as_tensor(x).to(model_device(model))
    want = float_dtype(model)
    return t.to(want) if want is not None and t.is_floating_point() else t


# consume(block, q, k, scale, bias): q = q_norm(q), k = k_norm(k), both (B, H, T, d) views of
# the qkv output the model computed; scale = the one the model applied (attn.scale on timm's
# explicit path, head_dim ** -0.5 in the fused kernel);
# bias = the additive mask timm's non-fused path adds to the scores (None for plain ViTs).
Consumer = Callable[[int, torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], None]


def _attn_bias(n: int, ref: torch.Tensor, mask: torch.Tensor | None, causal: bool
               ) -> torch.Tensor | None:
    if causal:
        return ref.new_full((n, n), float("-inf")).triu_(1)
    if mask is not None and mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=ref.dtype).masked_fill_(~mask, float("-inf"))
    return mask


def _softmax(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None
             ) -> torch.Tensor:
    # The same operations, in the same order, as timm's non-fused Attention.forward.
    scores = (q * scale) @ k.transpose(-2, -1)
    return (scores if bias is None else scores + bias).softmax(dim=-1)


def _block_list(blocks: Sequence[int]) -> list:
    """``blocks`` as a list, numpy integers as ints (np.int64(0) is block 0); UserError for a
    bare number or a string, which list() would fail on or read letter by letter."""
    if isinstance(blocks, str | bytes) or not isinstance(blocks, Iterable):
        raise UserError(f"blocks={blocks!r} must be a list of block numbers, e.g. "
                        "blocks=[0, 5], or None for all")
    return [int(i) if isinstance(i, np.integer) else i for i in blocks]


@contextlib.contextmanager
def _qk_hooks(model: nn.Module, consume: Consumer, blocks: Sequence[int] | None = None
              ) -> Iterator[None]:
    """Call ``consume`` with each chosen block's queries and keys during every forward pass
    inside the ``with`` (under ``torch.no_grad``); the hooks go on exit, also on errors."""
    mods = attention_modules(model)
    chosen = range(len(mods)) if blocks is None else _block_list(blocks)
    if not chosen:
        raise UserError(f"blocks={list(chosen)} names no block; pass e.g. blocks=[0], or None "
                        f"for all {len(mods)}")
    for i in chosen:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(mods):
            raise UserError(f"block {i!r} does not exist; this model has blocks "
                            f"0..{len(mods) - 1}")
    calls: dict[int, tuple[torch.Tensor | None, bool]] = {}

    def pre(i, module, args, kwargs):
        mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
        causal = kwargs.get("is_causal", args[2] if len(args) > 2 else False)
        calls[i] = (mask, bool(causal))

    def post(i, m, module, inputs, out):
        with torch.no_grad():
            b, n, _ = out.shape
            q, k, _ = out.reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
            mask, causal = calls.pop(i, (None, False))
            # timm's fused call passes no scale=: the kernel's default, not attn.scale.
            scale = m.head_dim ** -0.5 if m.fused_attn else m.scale
            consume(i, m.q_norm(q), m.k_norm(k), scale, _attn_bias(n, q, mask, causal))

    with contextlib.ExitStack() as hooks:
        for i in chosen:
            pre_hook = mods[i].register_forward_pre_hook(partial(pre, i), with_kwargs=True)
            hooks.callback(pre_hook.remove)
            hooks.callback(mods[i].qkv.register_forward_hook(partial(post, i, mods[i])).remove)
        yield


@contextlib.contextmanager
def capture_attention(model: nn.Module, blocks: Sequence[int] | None = None
                      ) -> Iterator[dict[int, torch.Tensor]]:
    """Context manager yielding ``{block: (B, H, T, T) attention}`` of the latest forward pass
    (``with capture_attention(model) as maps: logits = model(x)``; the logits are unchanged),
    on the CPU."""
    maps: dict[int, torch.Tensor] = {}

    def consume(i, q, k, scale, bias):
        maps[i] = _softmax(q, k, scale, bias).cpu()

    with _qk_hooks(model, consume, blocks):
        yield maps


def attention_maps(model: nn.Module, x: torch.Tensor | np.ndarray,
                   blocks: Sequence[int] | None = None) -> np.ndarray:
    """``(B, L, H, T, T)`` float32 attention of ``blocks`` (default all) for the preprocessed
    batch ``x`` ``(B, 3, S, S)``, a tensor or array (:func:`model_input`: on the model's
    device, in its dtype), in eval mode. Rows sum to 1. UserError for uint8 pixels."""
    order = (list(range(len(attention_modules(model)))) if blocks is None
             else _block_list(blocks))
    x = as_tensor(x)
    if x.dtype == torch.uint8:  # a timm ViT refuses them, in an assertion on the shape
        raise UserError(f"images are uint8 pixels of shape {tuple(x.shape)}; pass preprocessed "
                        "float images (n, 3, S, S): repsim.models.preprocess(spec, images)")
    with torch.inference_mode(), eval_mode(model), capture_attention(model, order) as maps:
        model(model_input(model, x))
    return np.stack([maps[i].float().numpy() for i in order], axis=1)


def _feed(model: nn.Module, images: np.ndarray | torch.Tensor, consume: Consumer, spec: object,
          batch_size: int, progress: bool = False) -> None:
    """Run ``images`` through ``model`` (in eval mode) in batches, ``consume`` on every block:
    uint8 ``(n, H, W, 3)`` preprocessed as ``spec`` says, or float ``(n, 3, S, S)`` as given."""
    from tqdm.auto import tqdm

    from repsim.models import preprocess

    src = as_tensor(images)
    is_uint8 = src.dtype == torch.uint8
    if is_uint8 and spec is None:
        raise UserError(f"images are uint8 pixels of shape {tuple(src.shape)}; pass "
                        "preprocessed float images (n, 3, S, S) (repsim.models.preprocess), or "
                        "to attention_distance spec=, the model's repsim.registry.ModelSpec")
    if not is_whole(batch_size):  # 2.0 failed in range(), True ran one image at a time
        raise UserError(f"batch_size={batch_size!r} must be a positive integer, e.g. 64")
    if len(src) == 0:
        raise UserError("no images given; pass at least one")
    bar = tqdm(total=len(src), desc="attention distance", unit="img", disable=not progress)
    with bar, torch.inference_mode(), eval_mode(model), _qk_hooks(model, consume):
        for a in range(0, len(src), batch_size):
            xb = src[a:a + batch_size].to(model_device(model), non_blocking=True)
            model(model_input(model, preprocess(spec, xb) if is_uint8 else xb))
            bar.update(len(xb))


def _n_prefix(tokens: int, grid: tuple[int, int]) -> int:
    """The prefix tokens before a ``grid`` of patches among ``tokens``; ValueError if too few."""
    gh, gw = _pair(grid)
    p = int(gh) * int(gw)
    if tokens < p:
        raise ValueError(f"{tokens} tokens cannot hold a {gh}x{gw} patch grid")
    return tokens - p


def _batched(attn: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``attn`` as float64 ``(B, L, H, T, T)`` on the CPU; True if it came as ``(L, H, T, T)``."""
    if isinstance(attn, torch.Tensor):
        a = attn.detach().to("cpu", torch.float64)
    else:
        a = torch.from_numpy(np.array(attn, dtype=np.float64))  # a copy: may be read-only
    if a.ndim not in (4, 5) or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attention of shape {tuple(a.shape)}; expected (B, L, H, T, T) "
                         "or (L, H, T, T)")
    return (a[None], True) if a.ndim == 4 else (a, False)


def mean_attention_distance(attn: np.ndarray | torch.Tensor, grid: tuple[int, int],
                            patch_size: int | float | Sequence = 1,
                            renormalize: bool = True) -> np.ndarray:
    """``(L, H)`` float64 mean attention distance (pixels) of ``(B, L, H, T, T)`` or
    ``(L, H, T, T)`` attention over a ``grid`` of patches of ``patch_size`` pixels; the first
    ``T - gh*gw`` tokens are the prefix (see the module docstring for ``renormalize``)."""
    a, _ = _batched(attn)
    n = _n_prefix(a.shape[-1], grid)
    a = a[..., n:, n:]
    if renormalize:
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    d = torch.from_numpy(distance_matrix(grid, patch_size))
    return (a * d).sum(-1).mean(dim=(0, 3)).numpy()


def rollout(attn: np.ndarray | torch.Tensor, residual: bool = True) -> np.ndarray:
    """Attention rollout, float64: ``(B, L, H, T, T) -> (B, T, T)`` or ``(L, H, T, T) -> (T, T)``;
    row ``t`` is how token ``t`` of the last block draws on the input tokens.
    ``residual=False`` drops the ``+ I``."""
    a, single = _batched(attn)
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
    n = _n_prefix(a.shape[-1], grid)
    if query not in ("cls", "mean"):
        raise ValueError(f"query={query!r}; valid: 'cls' or 'mean'")
    if query == "cls" and n < 1:
        raise ValueError("this model has no class token; use query='mean'")
    rows = a[..., 0, n:] if query == "cls" else a[..., n:, n:].mean(-2)
    return rows.reshape(*rows.shape[:-1], gh, gw)


def attention_distance(model: nn.Module, images: np.ndarray | torch.Tensor, spec=None, *,
                       batch_size: int = 64, renormalize: bool = True,
                       progress: bool = False, uniform: bool = False) -> np.ndarray:
    """``(L, H)`` float64 mean attention distance, in pixels of the model input, over ``images``:
    ``(n, H, W, 3)`` uint8 (preprocessed as ``spec``, a :class:`repsim.registry.ModelSpec`,
    says) or preprocessed float ``(n, 3, S, S)``. No attention map outlives its block, so
    memory does not grow with ``n``. ``uniform=True``: every score set to 0, so each query
    spreads its weight evenly over the keys the model's mask allows: the reference for uniform
    attention (an LSA model's masked diagonal and ``renormalize=False`` included)."""
    geo = vit_geometry(model)
    n, p = geo.n_prefix, geo.cells
    d = torch.as_tensor(distance_matrix(geo.grid, geo.patch_size), dtype=torch.float32,
                        device=model_device(model))
    if not renormalize:  # scores over all tokens; prefix rows and columns weigh 0
        d = F.pad(d, (n, 0, n, 0))
    d_flat = d.reshape(-1).contiguous()
    sums = torch.zeros(geo.depth, geo.num_heads, dtype=torch.float64, device=d.device)
    beta0 = d.new_empty((1, 1, 1))  # ignored input of baddbmm(beta=0)

    def consume(i, q, k, scale, bias):
        b, h, t, dh = q.shape
        if t != n + p:
            raise UserError(f"block {i} sees {t} tokens, but the patch grid has {p} + {n} "
                            "prefix; feed images of the model's input size (dynamic image "
                            "sizes are not supported)")
        if renormalize:
            # softmax over patch keys only == full softmax renormalised over patch keys, and
            # only patch queries are needed: a (T-n)^2 instead of T^2 score block.
            q, k = q[:, :, n:], k[:, :, n:]
            bias = None if bias is None else bias[..., n:, n:]
        m = q.shape[2]
        qf, kf = q.reshape(b * h, m, dh).float(), k.reshape(b * h, m, dh).float()
        scores = (qf.new_zeros(b * h, m, m) if uniform else
                  torch.baddbmm(beta0, qf, kf.transpose(1, 2), beta=0.0, alpha=scale))
        scores = scores.view(b, h, m, m)
        a = (scores if bias is None else scores + bias).softmax(dim=-1)
        # (B, H) sums over queries and keys in float32 per image; float64 across images.
        sums[i] += (a.view(b, h, m * m) @ d_flat).to(torch.float64).sum(0)

    _feed(model, images, consume, spec, batch_size, progress)
    return sums.cpu().numpy() / (len(images) * p)


def prefix_attention_mass(model: nn.Module, x: torch.Tensor, batch_size: int = 64,
                          uniform: bool = False) -> np.ndarray:
    """``(L, n_prefix)`` float64: the attention weight that patch queries give each class or
    register token, averaged over patch queries, heads and images, per block. ``x``:
    preprocessed ``(n, 3, S, S)`` float images, run in batches of ``batch_size`` on the
    model's device. ``uniform=True``: every score set to 0 under the model's own attention
    mask, the reference for uniform attention: ``1 / T`` per token without a mask, ``1 / (T -
    1)`` for an LSA model, whose patch queries may not attend to themselves."""
    geo = vit_geometry(model)
    n = geo.n_prefix
    if n < 1:
        raise UserError("this ViT has no class or register tokens to measure attention on")
    sums = torch.zeros(geo.depth, n, dtype=torch.float64)

    def consume(i, q, k, scale, bias):
        if uniform:  # float64: 1 / T exactly where no mask applies
            b, h, t, _ = q.shape
            zero = torch.zeros(b, h, t, t, dtype=torch.float64, device=q.device)
            a = (zero if bias is None else zero + bias.to(torch.float64)).softmax(dim=-1)
        else:
            a = _softmax(q, k, scale, bias)
        sums[i] += a[:, :, n:, :n].to(torch.float64).sum(dim=(0, 1, 2)).cpu()

    _feed(model, x, consume, None, batch_size)
    return (sums / (len(x) * geo.num_heads * geo.cells)).numpy()
