"""Small-data ViT designs as timm ``VisionTransformer`` models (the ``vit_cifar_tiny*`` names).

The tiny ViT of Gent Wu 2025 (*Powerful Design of Small Vision Transformer on CIFAR10*, code
erow/PoorViTs) and the designs it and Lee et al. 2021 (*Vision Transformer for Small-Size
Datasets*) compare. Every variant keeps timm's own ``Attention`` in its blocks (the changes
sit in ``attn.qkv``, ``attn.q_norm``, the ``attn_mask``, ``patch_embed`` and the pooling), so
layer names, :func:`repsim.capture` and exact attention capture work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from torch import nn

RANK = 64  # the study's latent dimension of a low-rank projection
VARIANTS = ("base", "mcls4", "reg3", "lowrankq", "lowrankk", "sptlsa")
# The source's parameter counts for 10 classes (its code at erow/PoorViTs, read in the fork
# chrisjmccormick/PoorViTs_subspaces at 8bb105e; SPT+LSA: aanna0701/SPT_LSA_ViT, whose tiny
# ViT has no qkv bias: 9 x 576 parameters fewer than ours).
SOURCE_PARAMS = {"base": 2_697_610, "mcls4": 2_704_522, "lowrankq": 2_587_018,
                 "lowrankk": 2_587_018, "sptlsa": 2_729_878}


class LowRankQKV(nn.Module):
    """``attn.qkv`` with the query (``low="q"``) or key (``"k"``) projection factored as
    ``Linear(D, rank, bias=False)`` then ``Linear(rank, D, bias)``: ``(B, N, D) -> (B, N, 3 D)``
    laid out ``[q | k | v]`` like timm's fused ``qkv`` Linear."""

    def __init__(self, dim: int, rank: int, low: str, bias: bool = True) -> None:
        super().__init__()
        self.low, self.rank = low, rank

        def proj(name: str) -> nn.Module:
            if name != low:
                return nn.Linear(dim, dim, bias=bias)
            return nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=bias))

        self.q, self.k, self.v = proj("q"), proj("k"), proj("v")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


class HeadTemperature(nn.Module):
    """Lee et al.'s learned per-head temperature as timm's ``q_norm``: timm scales the scores
    by ``head_dim**-0.5`` after ``q_norm``, so queries ``(B, H, N, d)`` are multiplied by
    ``temperature_h / head_dim**-0.5``; ``temperature`` starts at ``head_dim**-0.5``."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.scale = head_dim ** -0.5
        self.temperature = nn.Parameter(torch.full((num_heads,), self.scale))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        # Cast to q's dtype: under bf16 autocast a float32 factor would promote q alone.
        return q * (self.temperature / self.scale).view(-1, 1, 1).to(q.dtype)


class ShiftedPatchEmbed(nn.Module):
    """Shifted patch tokenisation (Lee et al. 2021): ``(B, C, H, W) -> (B, gh * gw, D)``. The
    image and its four diagonal half-patch shifts (zero-filled), ``5 C`` channels, cut into
    patches, layer-normalised and embedded by one Linear; with timm ``PatchEmbed``'s
    ``grid_size``, ``patch_size`` and ``num_patches``. Sizes are ints or ``(height, width)``."""

    def __init__(self, img_size: int | tuple[int, int] = 32,
                 patch_size: int | tuple[int, int] = 4, in_chans: int = 3,
                 embed_dim: int = 192, **_timm_kwargs) -> None:
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        (h, w), (ph, pw) = self.img_size, self.patch_size
        if h % ph or w % pw:  # timm would drop the remainder; the reshape cannot
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.grid_size = (h // ph, w // pw)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.shift = (ph // 2, pw // 2)  # (0, 0) for 1-pixel patches: five copies of the image
        features = 5 * in_chans * ph * pw
        self.norm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, embed_dim)

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of an ``img_size`` image, as timm's ``PatchEmbed`` gives it (timm's
        ``forward_intermediates`` asks, to return feature maps)."""
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (sy, sx), (ph, pw), (gh, gw) = self.shift, self.patch_size, self.grid_size
        h, w = x.shape[-2:]
        if (h, w) != self.img_size:
            raise ValueError(f"input is {h}x{w} pixels; this patch embedding takes "
                             f"{self.img_size[0]}x{self.img_size[1]} (img_size={self.img_size})")
        pad = F.pad(x, (sx, sx, sy, sy))
        # Windows at offsets 0 and 2*shift: content moved by +shift and -shift on each axis.
        shifted = [pad[..., r:r + h, c:c + w] for r in (0, 2 * sy) for c in (0, 2 * sx)]
        x = torch.cat([x, *shifted], dim=1)  # (B, 5C, H, W)
        b, c = x.shape[:2]
        x = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, -1)
        return self.proj(self.norm(x))


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class LocalityViT(VisionTransformer):
    """A ViT whose blocks never attend from a token to itself (locality self-attention's
    diagonal mask, every token including the prefix), given to timm's blocks as ``attn_mask``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        n = self.num_prefix_tokens + self.patch_embed.num_patches
        # True = may attend (SDPA's and timm's convention); not in the state dict.
        self.register_buffer("locality_mask", ~torch.eye(n, dtype=torch.bool), persistent=False)

    def _mask(self, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """The locality mask, and a caller's ``attn_mask`` on top: both must allow a pair."""
        mask = self.locality_mask
        if attn_mask is None:
            return mask
        return (mask & attn_mask if attn_mask.dtype == torch.bool
                else attn_mask.masked_fill(~mask, float("-inf")))

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        return super().forward_features(x, attn_mask=self._mask(attn_mask), is_causal=is_causal)

    # timm's feature API runs the blocks itself (get_intermediate_layers calls this one).
    def forward_intermediates(self, x: torch.Tensor, *args: object,
                              attn_mask: torch.Tensor | None = None,
                              **kwargs: object) -> list | tuple | dict:
        return super().forward_intermediates(x, *args, attn_mask=self._mask(attn_mask), **kwargs)


class PrefixPoolViT(VisionTransformer):
    """Pools the final outputs of the first ``pooled_tokens`` prefix tokens, concatenated:
    ``(B, T, D) -> (B, pooled_tokens * D)``, then ``Linear(pooled_tokens * D, classes)``."""

    def __init__(self, pooled_tokens: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pooled_tokens = pooled_tokens
        self.reset_classifier(self.num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        k = getattr(self, "pooled_tokens", 1)  # timm may call this before __init__ sets it
        if num_classes > 0 and k > 1:
            self.head = nn.Linear(k * self.embed_dim, num_classes)
            trunc_normal_(self.head.weight, std=0.02)  # timm's init of its own head
            nn.init.zeros_(self.head.bias)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        return x[:, :self.pooled_tokens].flatten(1)


def build(variant: str, num_classes: int = 10) -> VisionTransformer:
    """The ``vit_cifar_tiny`` variant ``variant`` (one of :data:`VARIANTS`), randomly
    initialised as timm initialises its ViTs (seed the global RNG first for repeatability)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; valid: {', '.join(VARIANTS)}")
    kw = dict(img_size=32, patch_size=4, num_classes=num_classes, embed_dim=192, depth=9,
              num_heads=12, mlp_ratio=2.0, qkv_bias=True, drop_path_rate=0.1,
              class_token=True, global_pool="token")
    if variant == "mcls4":
        model = PrefixPoolViT(pooled_tokens=4, reg_tokens=3, **kw)
    elif variant == "reg3":
        model = VisionTransformer(reg_tokens=3, **kw)
    elif variant == "sptlsa":
        model = LocalityViT(embed_layer=ShiftedPatchEmbed, **kw)
        for blk in model.blocks:
            blk.attn.q_norm = HeadTemperature(blk.attn.num_heads, blk.attn.head_dim)
    else:
        model = VisionTransformer(**kw)
    if variant in ("lowrankq", "lowrankk"):
        for blk in model.blocks:
            blk.attn.qkv = LowRankQKV(kw["embed_dim"], RANK, variant[-1], bias=True)
            blk.attn.qkv.apply(init_weights_vit_timm)  # as timm initialises its own qkv
    return model


def query_key_weights(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(D, D)`` query and key projection matrices of a timm ``Attention`` (rows: output
    features), from a fused ``qkv`` Linear or a :class:`LowRankQKV` (then ``up @ down`` for
    the factored one, of rank at most ``rank``)."""
    qkv = attn.qkv
    if isinstance(qkv, nn.Linear):
        d = qkv.weight.shape[0] // 3
        return qkv.weight[:d], qkv.weight[d:2 * d]

    def matrix(proj: nn.Module) -> torch.Tensor:
        return proj.weight if isinstance(proj, nn.Linear) else proj[1].weight @ proj[0].weight

    return matrix(qkv.q), matrix(qkv.k)
