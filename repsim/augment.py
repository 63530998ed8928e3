"""Training-time augmentation of a whole ``(B, H, W, 3)`` uint8 batch on its device.

Draws come from the run's generator ``gen`` or torch's global RNG (RandAugment's and
AutoAugment's ops, the mixing weight); a run saves and restores both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 4  # translate range in pixels (every recipe)
RANDAUGMENT_GROUP = 50  # images that share one RandAugment draw (per-image variety, few calls)
AUTOAUGMENT_GROUP = 64  # images that share one AutoAugment sub-policy draw (4 calls per 256)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror indices in [-n+1, 2n-2] into [0, n-1] without repeating the edge."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad_mode: str = "zeros") -> torch.Tensor:
    """Random 4-px translate and horizontal flip of ``(B, H, W, 3)`` uint8 (same shape back);
    ``pad_mode`` "zeros" fills the uncovered border with black, "reflect" mirrors the image."""
    b, h, w, _ = x.shape
    dev = x.device
    oy = torch.randint(0, 2 * PAD + 1, (b,), generator=gen, device=dev) - PAD
    ox = torch.randint(0, 2 * PAD + 1, (b,), generator=gen, device=dev) - PAD
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H) source rows, may leave the image
    cols = ox[:, None] + torch.arange(w, device=dev)  # (B, W)
    if pad_mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    inside = (((rows >= 0) & (rows < h))[:, :, None]
              & ((cols >= 0) & (cols < w))[:, None, :])  # (B, H, W)
    out = x[torch.arange(b, device=dev)[:, None, None], rows.clamp(0, h - 1)[:, :, None],
            cols.clamp(0, w - 1)[:, None, :]]  # (B, H, W, 3)
    out = out.masked_fill(~inside[..., None], 0)
    flip = torch.rand(b, generator=gen, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(2), out)


def _boxes(x: torch.Tensor, y0, x0, bh, bw) -> torch.Tensor:
    """``(B, H, W)`` bool: per image of ``x``, rows [y0, y0 + bh) and columns [x0, x0 + bw)
    (each a ``(B,)`` tensor or an int; the box may reach outside the image)."""
    yy = torch.arange(x.shape[1], device=x.device)[:, None]
    xx = torch.arange(x.shape[2], device=x.device)[None, :]
    y0, x0, bh, bw = (torch.as_tensor(v, device=x.device).reshape(-1, 1, 1)
                      for v in (y0, x0, bh, bw))
    return (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)


def cutout(x: torch.Tensor, gen: torch.Generator, size: int) -> torch.Tensor:
    """Zero one ``size x size`` square per image of ``(B, H, W, 3)``, centred anywhere."""
    b, h, w, _ = x.shape
    cy = torch.randint(0, h, (b,), generator=gen, device=x.device)
    cx = torch.randint(0, w, (b,), generator=gen, device=x.device)
    return x.masked_fill(_boxes(x, cy - size // 2, cx - size // 2, size, size)[..., None], 0)


def _grouped(op, x: torch.Tensor, group: int) -> torch.Tensor:
    """Torchvision's ``op`` over ``(B, H, W, 3)`` uint8, one call (one draw) per ``group``."""
    out = torch.cat([op(g) for g in x.permute(0, 3, 1, 2).split(group)])
    return out.permute(0, 2, 3, 1)


def rand_augment(x: torch.Tensor, num_ops: int, magnitude: int) -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020, torchvision's) of ``(B, H, W, 3)`` uint8; each group
    of :data:`RANDAUGMENT_GROUP` images gets its own draw of ops."""
    from torchvision.transforms import v2

    return _grouped(v2.RandAugment(num_ops=num_ops, magnitude=magnitude), x, RANDAUGMENT_GROUP)


def auto_augment(x: torch.Tensor, fill: int = 128) -> torch.Tensor:
    """AutoAugment, CIFAR-10 policy (Cubuk et al. 2019; torchvision's, as in the DeepVoltaire
    code the small-ViT studies use, grey ``fill`` as there) of ``(B, H, W, 3)`` uint8; each
    group of :data:`AUTOAUGMENT_GROUP` images draws its own sub-policy."""
    from torchvision.transforms import v2

    return _grouped(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=fill), x,
                    AUTOAUGMENT_GROUP)


def random_erase(x: torch.Tensor, gen: torch.Generator, prob: float,
                 fill: tuple[int, int, int], area: tuple[float, float] = (0.02, 0.4),
                 aspect: float = 0.3) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) of ``(B, H, W, 3)`` uint8: with probability ``prob``
    an image gets one rectangle of ``area`` (fractions of the image, uniform) and aspect ratio
    uniform in ``[aspect, 1/aspect]``, filled with ``fill``; clipped to ``H - 1`` by ``W - 1``
    where it would not fit (the reference code redraws up to 100 times instead)."""
    b, h, w, _ = x.shape
    u = torch.rand(b, 5, generator=gen, device=x.device)
    target = (area[0] + (area[1] - area[0]) * u[:, 0]) * h * w
    ratio = aspect + (1 / aspect - aspect) * u[:, 1]
    eh = (target * ratio).sqrt().round().clamp(1, h - 1).long()
    ew = (target / ratio).sqrt().round().clamp(1, w - 1).long()
    y0 = (u[:, 2] * (h - eh + 1)).long()  # uniform in [0, h - eh]
    x0 = (u[:, 3] * (w - ew + 1)).long()
    hole = _boxes(x, y0, x0, eh, ew) & (u[:, 4] < prob)[:, None, None]
    colour = torch.tensor(fill, dtype=x.dtype, device=x.device)
    return torch.where(hole[..., None], colour, x)


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator,
        mixup: float, cutmix: float, switch: float = 0.5, prob: float = 1.0
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a preprocessed batch.

    ``x`` ``(B, C, H, W)`` float, ``y`` ``(B,)`` int64. Each image is mixed with its mirror
    in the batch (image ``B - 1 - i``, as timm does); CutMix is chosen with probability
    ``switch`` when both are on. The weight ``lam ~ Beta(alpha, alpha)``; for CutMix it is
    the share of the image left uncut. With ``prob < 1`` the batch is mixed with probability
    ``prob``, else left as it is. Returns ``(x, targets (B, num_classes) float)``.
    """
    target = F.one_hot(y, num_classes).to(x.dtype)
    # Drawn only when asked for, so recipes that always mix keep their random stream.
    if prob < 1 and not bool(torch.rand((), generator=gen, device=x.device) < prob):
        return x, target
    use_cut = cutmix > 0 and (mixup <= 0 or
                              bool(torch.rand((), generator=gen, device=x.device) < switch))
    alpha = cutmix if use_cut else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if use_cut:
        h, w = x.shape[-2:]
        ch, cw = round(h * (1 - lam) ** 0.5), round(w * (1 - lam) ** 0.5)
        cy = int(torch.randint(0, h, (), generator=gen, device=x.device))
        cx = int(torch.randint(0, w, (), generator=gen, device=x.device))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1.0 - lam) * x.flip(0)
    return x, lam * target + (1.0 - lam) * target.flip(0)
