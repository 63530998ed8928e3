"""Augmentation on the device: translate, flip, cutout, RandAugment, MixUp and CutMix."""

import numpy as np
import pytest
import torch

from repsim import augment


def test_crop_flip_and_cutout_keep_shape_dtype_and_are_seeded():
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return augment.cutout(augment.crop_flip(x, g), g, 8)

    a, b = run(0), run(0)
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert set(a.unique().tolist()) <= set(x.unique().tolist()) | {0}


def test_reflect_indices_match_numpy_pad():
    idx = augment._reflect(torch.arange(-augment.PAD, 32 + augment.PAD), 32)
    assert idx.tolist() == np.pad(np.arange(32), augment.PAD, mode="reflect").tolist()


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_translate_is_a_crop_of_the_padded_image(pad_mode):
    x = torch.randint(1, 256, (16, 32, 32, 3), dtype=torch.uint8)  # no zero pixels
    out = augment.crop_flip(x, torch.Generator().manual_seed(0), pad_mode=pad_mode)
    mode = "constant" if pad_mode == "zeros" else "reflect"
    padded = np.pad(x.numpy(), ((0, 0), (4, 4), (4, 4), (0, 0)), mode=mode)
    for i in range(len(x)):  # some shift and flip of padded image i must give output i
        crops = [padded[i, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        o = out[i].numpy()
        assert any(np.array_equal(o, c) or np.array_equal(o, c[:, ::-1]) for c in crops), i


def test_cutout_zeroes_at_most_one_square_per_image():
    x = torch.full((50, 32, 32, 3), 7, dtype=torch.uint8)
    out = augment.cutout(x, torch.Generator().manual_seed(1), 12)
    holes = (out[..., 0] == 0).sum((1, 2))
    assert holes.max() == 144 and holes.min() > 0  # whole square inside, or clipped at a border


def test_mixup_is_a_convex_combination_with_the_mirror_image():
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    out, t = augment.mix(x, y, 3, torch.Generator().manual_seed(0), mixup=0.8, cutmix=0.0)
    lam = float(t[0, 0])  # image 0 (class 0) mixed with image 5 (class 2)
    assert t[0, 2] == pytest.approx(1 - lam) and torch.allclose(t.sum(1), torch.ones(6))
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)


def test_cutmix_targets_are_the_pixel_shares():
    torch.manual_seed(3)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out, t = augment.mix(x, y, 4, torch.Generator().manual_seed(0), mixup=0.0, cutmix=1.0)
    from_mirror = (out[0] == x[3]).all(0) & (out[0] != x[0]).any(0)  # pixels pasted in
    assert t[0, 3] == pytest.approx(float(from_mirror.float().mean()), abs=1e-6)
    assert t[0, 0] == pytest.approx(1 - float(t[0, 3]))


def test_rand_augment_keeps_shape_dtype_and_follows_the_torch_seed():
    x = torch.randint(0, 256, (60, 32, 32, 3), dtype=torch.uint8)
    torch.manual_seed(5)
    a = augment.rand_augment(x, 2, 9)
    torch.manual_seed(5)
    b = augment.rand_augment(x, 2, 9)
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_augmentation_runs_on_the_gpu():
    x = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    out = augment.rand_augment(augment.cutout(augment.crop_flip(x, g, "reflect"), g, 12), 2, 9)
    assert out.device.type == "cuda" and out.shape == x.shape and out.dtype == torch.uint8
    xf = out.permute(0, 3, 1, 2).float() / 255
    y = torch.randint(0, 10, (64,), device="cuda")
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        mixed, t = augment.mix(xf, y, 10, g, mixup, cutmix)
        assert mixed.shape == xf.shape and torch.allclose(t.sum(1), torch.ones(64, device="cuda"))
