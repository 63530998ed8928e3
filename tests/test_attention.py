"""Attention capture, rollout and mean attention distance: known answers and the CLI."""

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from repsim import attention as A
from repsim.cli import main
from repsim.errors import UserError
from repsim.figures.attention import resolve_blocks
from repsim.models import build_model
from repsim.registry import get_spec


def _tiny_vit(**kw) -> VisionTransformer:
    """A small timm ViT (16 px, patch 4, 4x4 grid) with a seeded random init, in eval mode."""
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**args).eval()


def _set_fused(model, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused


def _mean_pairwise_distance(coords) -> float:
    """Brute force: mean Euclidean distance over all ordered pairs (self-pairs included)."""
    total = sum(math.dist(p, q) for p in coords for q in coords)
    return total / len(coords) ** 2


# --------------------------------------------------------------------------- distance


def test_uniform_attention_gives_the_grids_mean_distance():
    # 2x2 patches of 4 px: from each patch, distances 0, 4, 4, 4*sqrt(2) -> mean 2 + sqrt(2).
    t = 1 + 4  # class token + 4 patches; uniform over all tokens, prefix excluded
    attn = np.full((3, 2, t, t), 1.0 / t)
    d = A.mean_attention_distance(attn, grid=(2, 2), patch_size=4)
    assert d.shape == (3, 2)
    np.testing.assert_allclose(d, 2 + math.sqrt(2), rtol=0, atol=1e-12)


def test_uniform_attention_on_a_non_square_grid():
    # 1x3 patches of 5 px: distance sums per query 0+1+2, 1+0+1, 2+1+0 (patches) -> 8/9 * 5.
    attn = np.full((1, 1, 1, 3, 3), 1.0 / 3)
    d = A.mean_attention_distance(attn, grid=(1, 3), patch_size=5)
    np.testing.assert_allclose(d, [[8 / 9 * 5]], rtol=0, atol=1e-12)


def test_uniform_attention_without_renormalising_counts_prefix_mass_as_zero():
    t = 2 + 4  # two prefix tokens (class + register) hold 2/6 of every row
    attn = np.full((1, 1, t, t), 1.0 / t)
    d = A.mean_attention_distance(attn, grid=(2, 2), patch_size=4, renormalize=False)
    np.testing.assert_allclose(d, [[(2 + math.sqrt(2)) * 4 / 6]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("renormalize", [True, False])
def test_distance_of_attention_split_between_the_class_token_and_two_patches_by_hand(
        renormalize):
    # 1 + 1x3 patches of 2 px tall, 5 px wide (centres x = 2.5, 7.5, 12.5): every query puts
    # 1/2 on the class token and 1/4 on each of two patches. Patch queries: 0 -> {0, 1},
    # 1 -> {1, 2}, 2 -> {2, 0}: distances 0 + 5, 0 + 5, 0 + 10.
    attn = np.zeros((1, 1, 4, 4))
    attn[..., 0] = 0.5
    for q, keys in enumerate([(0, 1), (1, 2), (2, 0)]):
        attn[0, 0, 1 + q, [1 + k for k in keys]] = 0.25
    per_query = np.array([5, 5, 10]) * (0.5 if renormalize else 0.25)
    d = A.mean_attention_distance(attn, (1, 3), (2, 5), renormalize=renormalize)
    np.testing.assert_allclose(d, [[per_query.mean()]], rtol=0, atol=1e-12)


def test_identity_attention_has_distance_zero():
    attn = np.broadcast_to(np.eye(1 + 9), (2, 3, 4, 10, 10))
    np.testing.assert_array_equal(A.mean_attention_distance(attn, (3, 3), 16), np.zeros((3, 4)))


def test_distance_matrix_is_row_major_in_pixels():
    d = A.distance_matrix((2, 2), (2, 3))  # patches 2 px tall, 3 px wide
    # patch 0 (0,0), 1 (0,1), 2 (1,0), 3 (1,1): right = 3 px, down = 2 px.
    assert d[0, 1] == 3 and d[0, 2] == 2 and d[0, 3] == pytest.approx(math.hypot(2, 3))
    np.testing.assert_array_equal(np.diag(d), 0)


def test_attention_distance_of_an_attention_that_is_uniform_by_construction():
    # Zero q/k projections make every score 0, so every block attends uniformly: the streamed
    # distance must be the 8x8 grid's mean pairwise distance in pixels, for every head.
    model = build_model("vit_cifar")
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:2 * 512].zero_()
            blk.attn.qkv.bias[:2 * 512].zero_()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    d = A.attention_distance(model, images, get_spec("vit_cifar"), batch_size=2)
    coords = [(4 * r + 2, 4 * c + 2) for r in range(8) for c in range(8)]
    np.testing.assert_allclose(d, _mean_pairwise_distance(coords), rtol=1e-6)
    assert d.shape == (6, 8) and d.dtype == np.float64


def _zero_queries_and_keys(model) -> None:
    """Every score 0: each query attends uniformly to the keys its mask allows."""
    with torch.no_grad():
        for blk in model.blocks:
            d = blk.attn.attn_dim
            blk.attn.qkv.weight[:2 * d].zero_()
            blk.attn.qkv.bias[:2 * d].zero_()


@pytest.mark.parametrize("renormalize", [True, False])
def test_uniform_reference_of_a_locality_masked_vit(renormalize):
    # LSA masks each token's own key: a patch query spreads over the other P - 1 patches
    # (renormalised), or over the T - 1 = P other tokens (prefix mass at distance 0). The
    # reference line was the grid's mean pairwise distance, self-pairs included, P^2 terms.
    from repsim.tinyvit import LocalityViT

    torch.manual_seed(0)
    lsa = LocalityViT(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                      num_classes=0, qkv_bias=True).eval()
    x = torch.randn(1, 3, 16, 16)
    total, p = A.distance_matrix((4, 4), 4).sum(), 16
    want = total / (p * (p - 1)) if renormalize else total / (p * p)
    ref = A.attention_distance(lsa, x, renormalize=renormalize, uniform=True)
    assert ref.shape == (2, 2)
    np.testing.assert_allclose(ref, want, rtol=1e-6)
    _zero_queries_and_keys(lsa)  # the model's own attention made uniform: the same number
    np.testing.assert_allclose(A.attention_distance(lsa, x, renormalize=renormalize), want,
                               rtol=1e-6)


def test_uniform_reference_without_renormalising_discounts_the_prefix():
    model = _tiny_vit(depth=1, reg_tokens=2)  # 3 prefix + 16 patches: 16/19 of the mass
    x = torch.randn(2, 3, 16, 16)
    want = A.distance_matrix((4, 4), 4).mean() * 16 / 19
    ref = A.attention_distance(model, x, renormalize=False, uniform=True)
    np.testing.assert_allclose(ref, want, rtol=1e-6)
    _zero_queries_and_keys(model)
    np.testing.assert_allclose(A.attention_distance(model, x, renormalize=False), want,
                               rtol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_streamed_distance_equals_distance_of_captured_maps(renormalize):
    model = _tiny_vit(reg_tokens=2)  # 3 prefix tokens
    x = torch.randn(7, 3, 16, 16)
    maps = A.attention_maps(model, x)
    want = A.mean_attention_distance(maps, (4, 4), 4, renormalize=renormalize)
    got = A.attention_distance(model, x, batch_size=3, renormalize=renormalize)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_streamed_distance_on_a_non_square_grid_of_non_square_patches_with_registers():
    # 12 x 20 px in 4 x 5 px patches: a 3 x 4 grid after 3 register tokens and no class token.
    model = _tiny_vit(img_size=(12, 20), patch_size=(4, 5), class_token=False, reg_tokens=3,
                      global_pool="avg")
    geo = A.vit_geometry(model)
    assert (geo.grid, geo.patch_size, geo.n_prefix) == ((3, 4), (4, 5), 3)
    x = torch.randn(3, 3, 12, 20)
    maps = A.attention_maps(model, x)[..., 3:, 3:].astype(np.float64)
    coords = [(4 * r + 2, 5 * c + 2.5) for r in range(3) for c in range(4)]
    d = np.array([[math.dist(p, q) for q in coords] for p in coords])
    want = (maps / maps.sum(-1, keepdims=True) * d).sum(-1).mean(axis=(0, 3))
    np.testing.assert_allclose(A.attention_distance(model, x, batch_size=2), want, rtol=1e-5)


def test_streamed_distance_does_not_depend_on_batch_size(study_vit):
    model = study_vit
    _set_fused(model, True)
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    spec = get_spec("vit_cifar")
    a = A.attention_distance(model, images, spec, batch_size=6)
    b = A.attention_distance(model, images, spec, batch_size=4)
    np.testing.assert_allclose(a, b, rtol=1e-6)


# --------------------------------------------------------------------------- rollout


def test_identity_attention_rolls_out_to_the_identity():
    attn = np.broadcast_to(np.eye(5), (2, 3, 4, 5, 5))
    r = A.rollout(attn)
    assert r.shape == (2, 5, 5)
    np.testing.assert_allclose(r, np.broadcast_to(np.eye(5), (2, 5, 5)), atol=1e-15)


def test_rollout_of_a_one_block_model_is_its_residual_adjusted_mean_attention():
    model = _tiny_vit(depth=1)
    maps = A.attention_maps(model, torch.randn(2, 3, 16, 16))  # (2, 1, 4, 17, 17)
    mean = maps[:, 0].astype(np.float64).mean(1)
    want = (mean + np.eye(17)) / (mean + np.eye(17)).sum(-1, keepdims=True)
    np.testing.assert_allclose(A.rollout(maps), want, atol=1e-12)
    np.testing.assert_allclose(want, 0.5 * mean + 0.5 * np.eye(17), atol=1e-6)  # rows sum to 1


def test_rollout_multiplies_later_blocks_on_the_left():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 4, 4))
    a /= a.sum(-1, keepdims=True)  # two blocks, three heads, row-stochastic
    hat = [0.5 * a[i].mean(0) + 0.5 * np.eye(4) for i in range(2)]
    np.testing.assert_allclose(A.rollout(a), hat[1] @ hat[0], atol=1e-14)
    assert not np.allclose(hat[1] @ hat[0], hat[0] @ hat[1])  # the order is tested


def test_token_maps_take_the_class_token_row_over_the_patch_grid():
    attn = np.zeros((1 + 4, 1 + 4))
    attn[0, 1:] = [1, 2, 3, 4]
    np.testing.assert_array_equal(A.token_maps(attn, (2, 2)), [[1, 2], [3, 4]])


# --------------------------------------------------------------------------- capture


@pytest.fixture(scope="module")
def study_vit():
    """vit_cifar with random weights, built once (timm's init of 9.5M parameters is slow)."""
    return build_model("vit_cifar")


@pytest.mark.parametrize("fused", [True, False])
def test_logits_are_bit_identical_with_capture(fused, study_vit):
    model = study_vit
    _set_fused(model, fused)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        plain = model(x)
        with A.capture_attention(model) as maps:
            captured = model(x)
        after = model(x)
    assert len(maps) == 6
    assert torch.equal(plain, captured) and torch.equal(plain, after)


@pytest.mark.parametrize("fused", [True, False])
def test_captured_rows_sum_to_one(fused):
    model = _tiny_vit(reg_tokens=1)
    _set_fused(model, fused)
    maps = A.attention_maps(model, torch.randn(3, 3, 16, 16))
    assert maps.shape == (3, 2, 4, 18, 18)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-6)
    assert (maps >= 0).all()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_captured_attention_is_the_models_own_attention_bit_for_bit(qk_norm):
    # With the explicit (non-fused) path the model materialises its attention as the input of
    # attn_drop; the capture must equal it exactly, q_norm/k_norm included.
    model = _tiny_vit(qk_norm=qk_norm, reg_tokens=2)
    _set_fused(model, False)
    own = {}
    hooks = [blk.attn.attn_drop.register_forward_hook(
        lambda m, i, o, k=k: own.__setitem__(k, i[0].clone())) for k, blk in
        enumerate(model.blocks)]
    with torch.inference_mode(), A.capture_attention(model) as maps:
        model(torch.randn(2, 3, 16, 16))
    for h in hooks:
        h.remove()
    # every block ran the explicit path (an empty dict compared nothing) and was captured
    assert sorted(own) == sorted(maps) == list(range(len(model.blocks)))
    for k in own:
        assert torch.equal(maps[k], own[k])


def test_with_the_fused_kernel_capture_uses_the_kernels_own_queries_and_keys(monkeypatch):
    # Spy on the fused kernel: the capture must be softmax(q k^T * scale) of exactly the q, k
    # timm handed to scaled_dot_product_attention.
    import torch.nn.functional as F

    model = _tiny_vit(qk_norm=True)
    _set_fused(model, True)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.clone(), k.clone()))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.inference_mode(), A.capture_attention(model) as maps:
        model(torch.randn(2, 3, 16, 16))
    assert len(seen) == 2
    for i, (q, k) in enumerate(seen):
        scale = model.blocks[i].attn.scale
        assert torch.equal(maps[i], ((q * scale) @ k.transpose(-2, -1)).softmax(-1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_capture_and_distance_give_the_cpu_results(fused):
    # Both devices compute in float32; the tolerances also allow TF32 matmuls (should a
    # caller enable them), and a wrong device, head or token order is off by far more.
    cpu = _tiny_vit(reg_tokens=1)
    _set_fused(cpu, fused)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = A.attention_maps(gpu, x)
    assert maps.shape == (3, 2, 4, 18, 18)
    np.testing.assert_allclose(maps, A.attention_maps(cpu, x), rtol=0, atol=2e-3)
    np.testing.assert_allclose(A.attention_distance(gpu, x, batch_size=2),
                               A.attention_distance(cpu, x, batch_size=2), rtol=2e-3)


def test_maps_and_distances_are_measured_in_eval_mode_and_the_mode_is_restored():
    # A model fresh from training (train mode, stochastic depth on) gave different maps and
    # distances on every call: drop_path randomly skipped residual branches, while
    # repsim.extract and the locality features measure in eval mode.
    model = _tiny_vit(depth=3, drop_path_rate=0.5)
    x = torch.randn(2, 3, 16, 16)
    want_maps, want_dist = A.attention_maps(model, x), A.attention_distance(model, x)
    model.train()
    torch.manual_seed(1)
    np.testing.assert_array_equal(A.attention_maps(model, x), want_maps)
    np.testing.assert_array_equal(A.attention_distance(model, x), want_dist)  # as all of _feed
    assert model.training and all(m.training for m in model.modules())


def test_with_the_fused_kernel_a_changed_scale_is_not_what_the_model_used(monkeypatch):
    # timm's fused path calls scaled_dot_product_attention without scale=, so the kernel
    # scales by head_dim ** -0.5 whatever attn.scale says (only the explicit path reads it);
    # the capture used attn.scale, weights the model never computed (maps @ v != its output).
    import torch.nn.functional as F

    model = _tiny_vit(depth=1)
    _set_fused(model, True)
    model.blocks[0].attn.scale = 0.05  # a temperature experiment; head_dim ** -0.5 = 0.354
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        out = real(q, k, v, *args, **kwargs)
        seen.append((v.clone(), out.clone()))
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.inference_mode(), A.capture_attention(model) as maps:
        model(torch.randn(2, 3, 16, 16))
    (v, out), = seen
    torch.testing.assert_close(maps[0] @ v, out, rtol=0, atol=1e-5)
    _set_fused(model, False)  # the explicit path does read attn.scale: so does the capture
    own = {}
    model.blocks[0].attn.attn_drop.register_forward_hook(lambda m, i, o: own.update(a=i[0]))
    with torch.inference_mode(), A.capture_attention(model) as maps:
        model(torch.randn(2, 3, 16, 16))
    assert torch.equal(maps[0], own["a"])


def test_only_chosen_blocks_are_captured_and_hooks_are_removed():
    model = _tiny_vit(depth=3)
    maps = A.attention_maps(model, torch.randn(1, 3, 16, 16), blocks=[2, 0])
    assert maps.shape == (1, 2, 4, 17, 17)
    assert all(not blk.attn._forward_pre_hooks and not blk.attn.qkv._forward_hooks
               for blk in model.blocks)


def test_hooks_are_removed_when_the_forward_pass_fails():
    model = _tiny_vit(depth=2)
    with pytest.raises(RuntimeError, match="boom"), A.capture_attention(model):
        model(torch.randn(1, 3, 16, 16))
        raise RuntimeError("boom")
    assert all(not blk.attn._forward_pre_hooks and not blk.attn.qkv._forward_hooks
               for blk in model.blocks)


def test_numpy_integer_blocks_are_blocks():
    """np.int64(0) is block 0 (it was refused as "block 0 does not exist"), same maps as 0."""
    model, x = _tiny_vit(depth=3), torch.randn(1, 3, 16, 16)
    want = A.attention_maps(model, x, blocks=[2, 0])
    got = A.attention_maps(model, x, blocks=np.array([2, 0]))
    np.testing.assert_array_equal(got, want)
    with torch.inference_mode(), A.capture_attention(model, [np.int32(1)]) as maps:
        model(x)
    assert list(maps) == [1] and type(next(iter(maps))) is int
    with pytest.raises(UserError, match="block 3 does not exist"):
        A.attention_maps(model, x, blocks=[np.int64(3)])


def test_cls_of_a_vit_with_registers_but_no_class_token_is_refused_not_a_register():
    # timm's *_reg4_gap models: 4 register tokens, no class token, global_pool='avg'. Token 0
    # is a register, which reduce='cls' returned as the class token; 'prefix' keeps them all.
    import repsim
    from repsim.hooks import ReductionError

    model, x = _tiny_vit(depth=1, class_token=False, reg_tokens=2, global_pool="avg"), \
        torch.randn(2, 3, 16, 16)
    with pytest.raises(ReductionError, match="reduce='cls' needs a class token; this model "
                                             "has none, only 2 register tokens"):
        repsim.extract(model, x, layers="blocks.0", reduce="cls", device="cpu")
    tokens = repsim.extract(model, x, layers="blocks.0", reduce=None, device="cpu")["blocks.0"]
    prefix = repsim.extract(model, x, layers="blocks.0", reduce="prefix", device="cpu")
    np.testing.assert_array_equal(prefix["blocks.0"], tokens[:, :2].reshape(2, -1))
    cls = repsim.extract(_tiny_vit(depth=1, reg_tokens=2), x, layers="blocks.0", reduce="cls",
                         device="cpu")["blocks.0"]  # class token + registers: token 0
    assert cls.shape == (2, 32)


def test_an_empty_or_boolean_block_list_is_a_user_error():
    # blocks=[] died in np.stack ("need at least one array to stack"); blocks=[True] drew
    # block 1, as bool is an int.
    model, x = _tiny_vit(), torch.randn(1, 3, 16, 16)
    with pytest.raises(UserError, match=r"blocks=\[\] names no block; pass e.g. blocks=\[0\]"):
        A.attention_maps(model, x, blocks=[])
    with pytest.raises(UserError, match="block True does not exist"):
        A.attention_maps(model, x, blocks=[True])


def test_patch_embed_tokens_have_no_prefix_to_skip():
    # patch_embed outputs the P patch tokens before the class token is prepended; reduce='mean'
    # skipped the model's prefix count anyway (the mean of patches 1..P-1, patch 0 lost) and
    # 'cls' returned patch 0 as the class token.
    import repsim
    from repsim.hooks import ReductionError

    model, x = _tiny_vit(depth=1, reg_tokens=1), torch.randn(2, 3, 16, 16)
    tokens = repsim.extract(model, x, layers="patch_embed", reduce=None, device="cpu")
    tokens = tokens["patch_embed"]
    assert tokens.shape == (2, 16, 32)
    mean = repsim.extract(model, x, layers="patch_embed", reduce="mean", device="cpu")
    np.testing.assert_allclose(mean["patch_embed"], tokens.mean(1), rtol=1e-6, atol=1e-7)
    with pytest.raises(ReductionError, match="layer 'patch_embed': reduce='cls' needs class"):
        repsim.extract(model, x, layers="patch_embed", reduce="cls", device="cpu")
    blocks = repsim.extract(model, x, layers="blocks.0", reduce=None, device="cpu")["blocks.0"]
    mean = repsim.extract(model, x, layers="blocks.0", reduce="mean", device="cpu")["blocks.0"]
    np.testing.assert_allclose(mean, blocks[:, 2:].mean(1), rtol=1e-6, atol=1e-7)


def test_a_cnn_asked_for_attention_is_a_clear_error():
    with pytest.raises(UserError, match="need a timm Vision Transformer.*ResNet"):
        A.attention_maps(build_model("resnet18_cifar"), torch.randn(1, 3, 32, 32))


def test_the_library_error_for_a_cnn_names_the_python_function_not_a_command():
    # attention_maps is called from Python: "use `repsim featuremaps`" named a CLI command.
    with pytest.raises(UserError, match=r"repsim\.figures\.featuremaps\.run_featuremaps") as err:
        A.attention_modules(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert "`repsim featuremaps`" not in str(err.value)


def test_a_non_standard_attention_module_is_refused():
    model = _tiny_vit()
    base = type(model.blocks[0].attn)

    class Custom(base):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x, attn_mask, is_causal)

    model.blocks[1].attn.__class__ = Custom
    with pytest.raises(UserError, match="block 1 .* uses Custom, not timm's standard Attention"):
        A.vit_geometry(model)


def test_hybrid_vit_patches_are_measured_in_input_pixels():
    # A hybrid ViT (timm's HybridEmbed, e.g. vit_small_r26_s32_224) cuts the CNN backbone's
    # feature map, not the image, into patches: patch_size (1, 1) there is 32 input pixels.
    # The geometry said 1 px, so distances came out 32x too small (7 px "input" for 224 px).
    from functools import partial

    from timm.layers import HybridEmbed

    torch.manual_seed(0)
    backbone = nn.Conv2d(3, 8, 4, stride=4)  # feature ratio 4: 16 px -> 4x4 features
    model = _tiny_vit(patch_size=1, embed_layer=partial(HybridEmbed, backbone=backbone))
    geo = A.vit_geometry(model)
    assert (geo.grid, geo.patch_size, geo.input_size) == ((4, 4), (4, 4), (16, 16))
    coords = [(4 * r + 2, 4 * c + 2) for r in range(4) for c in range(4)]
    got = A.attention_distance(model, torch.randn(1, 3, 16, 16), uniform=True)
    np.testing.assert_allclose(got, _mean_pairwise_distance(coords), rtol=1e-6)


def test_geometry_of_the_study_vit(study_vit):
    geo = A.vit_geometry(study_vit)
    assert (geo.depth, geo.num_heads, geo.grid, geo.patch_size, geo.n_prefix) == (
        6, 8, (8, 8), (4, 4), 1)
    assert geo.input_size == (32, 32) and geo.class_token


def test_block_requests(study_vit):
    model = study_vit
    spec = get_spec("vit_cifar")
    assert resolve_blocks(None, 6) == [0, 3, 5]
    assert resolve_blocks("5,blocks.1", 6, model, spec) == [1, 5]
    assert resolve_blocks("blocks", 6, model, spec) == list(range(6))
    with pytest.raises(UserError, match="block 9 does not exist"):
        resolve_blocks("9", 6, model, spec)
    with pytest.raises(UserError, match="names no transformer block"):
        resolve_blocks("embed", 6, model, spec)


@pytest.mark.parametrize("request_", ["", " , ", []])
def test_a_block_request_that_names_nothing_is_refused_before_the_slow_part(request_):
    # `--layers ""` ran the whole distance pass, then matplotlib failed: "Number of rows
    # must be a positive integer, not 0".
    with pytest.raises(UserError, match="names no block.*layers='0,5'"):
        resolve_blocks(request_, 6)


# --------------------------------------------------------------------------- command line


@pytest.fixture
def vit_weights(tmp_path):
    path = tmp_path / "vit_cifar_w.pt"
    torch.save(build_model("vit_cifar", seed=3).state_dict(), path)
    return path


def test_cli_attention_writes_maps_rollout_and_distance(cifar_root, vit_weights, tmp_path,
                                                        monkeypatch, capsys):
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fig"
    argv = ["attention", "--model", "vit_cifar", "--weights", str(vit_weights),
            "--data-root", str(cifar_root), "--probe", "20", "--images", "2",
            "--layers", "0,5", "--out", str(out), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    for name in ["attention_heads_vit_cifar.png", "attention_maps_vit_cifar.npz",
                 "attention_rollout.png", "attention_distance.png", "attention_distance.csv",
                 "attention_distance.json"]:
        assert str(out / name) in res["outputs"] and (out / name).is_file()
    assert res["reused"] == [False] and res["n_probe"] == 20
    with np.load(out / "attention_maps_vit_cifar.npz") as z:
        assert z["heads"].shape == (2, 2, 8, 8, 8) and z["rollout"].shape == (2, 8, 8)
        np.testing.assert_array_equal(z["blocks"], [0, 5])
    rows = list(csv.DictReader(open(out / "attention_distance.csv")))
    assert len(rows) == 6 * 8
    # vit_cifar sees the 32 px probe image itself: image pixels == model-input pixels.
    assert all(r["distance_image_px"] == r["distance_model_px"] for r in rows)
    saved = json.loads((out / "attention_distance.json").read_text())
    assert saved["models"][0]["weights"]["weights_sha256"]
    assert saved["data"]["n"] == 20
    # Same inputs again: the distances come from the cache.
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["reused"] == [True]


def test_cli_attention_compares_two_models_with_different_input_sizes(cifar_root, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fig"
    assert main(["attention", "--model", "vit_cifar", "--model", "timm:vit_tiny_patch16_224",
                 "--weights", "random", "--dataset", "cifar10", "--data-root", str(cifar_root),
                 "--probe", "6", "--ids", "3,1", "--out", str(out), "--json", "--no-cache"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["models"] == ["vit_cifar", "timm:vit_tiny_patch16_224"] and res["n_images"] == 2
    saved = json.loads((out / "attention_distance.json").read_text())
    tiny = saved["models"][1]
    # 224 px model input of a 32 px image: image px = model px * 32 / 224.
    np.testing.assert_allclose(np.asarray(tiny["distance_image_px"]),
                               np.asarray(tiny["distance_model_px"]) * 32 / 224)
    assert len(tiny["distance_model_px"]) == 12 and saved["image_ids"] == [3, 1]


def test_cli_attention_on_a_cnn_is_one_line_error(capsys):
    assert main(["attention", "--model", "resnet18_cifar", "--weights", "random"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("repsim attention: error: resnet18_cifar is a resnet model")
    assert "repsim featuremaps" in err and "\n" not in err
    assert "vit_cifar_tiny_sptlsa" in err  # every registered ViT is named valid


def test_cli_attention_rejects_mismatched_weights(capsys):
    assert main(["attention", "--model", "vit_cifar", "--model", "vit_imagenet", "--weights",
                 "random", "--weights", "random", "--weights", "random"]) == 1
    err = capsys.readouterr().err
    assert "3 weights for 2 models (--weights ['random', 'random', 'random'])" in err


# --------------------------------------------------------------------------- repsim figures


def test_figure_kind_attention_builds_then_caches_then_skips_missing_weights(tmp_path,
                                                                               monkeypatch):
    from repsim.figures.runner import build_all

    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(tmp_path / "no-checkpoints"))
    ana = tmp_path / "analyses"
    ana.mkdir()
    (ana / "att.toml").write_text(
        'kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\n'
        'images = 2\nblocks = "0"\n[probe]\ndataset = "cifar10-probe"\nn = 12\n')
    (ana / "att_trained.toml").write_text(  # default weights: checkpoints/vit_cifar.pt
        'kind = "attention"\nmodels = ["vit_cifar"]\n[probe]\ndataset = "cifar10-probe"\n'
        'n = 12\n')
    out = tmp_path / "figures"
    first = build_all(ana, out, progress=False)
    assert [b["name"] for b in first["built"]] == ["att"] and not first["failed"]
    for name in ["att_heads_vit_cifar-random.png", "att_rollout.pdf", "att_distance.png",
                 "att_distance.csv", "att_maps_vit_cifar-random.npz"]:
        assert (out / name).is_file(), name
    record = json.loads((out / "att.json").read_text())
    assert len(record["data"]["models"][0]["distance_model_px"]) == 6
    (skip,) = first["skipped"]
    assert skip["name"] == "att_trained" and "vit_cifar" in skip["reason"]
    again = build_all(ana, out, progress=False)
    assert [c["name"] for c in again["cached"]] == ["att"] and not again["built"]


def test_figure_kind_attention_loads_no_model_when_a_later_ones_weights_are_missing(
        tmp_path, monkeypatch):
    # A skipped figure costs nothing: the first model is not built and loaded only to find
    # that the second has no weights here.
    from repsim.figures import context
    from repsim.figures.runner import build_all

    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(tmp_path / "no-checkpoints"))
    monkeypatch.setattr(context.FigureContext, "model", lambda self, ref: pytest.fail(
        f"{ref.model} was loaded for a figure that is skipped"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "att.toml").write_text(
        'kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}, '
        '"vit_cifar_tiny"]\n[probe]\ndataset = "cifar10-probe"\nn = 4\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [s["name"] for s in res["skipped"]] == ["att"] and not res["failed"], res


@pytest.mark.parametrize("unit", [["image"], {"px": 1}])
def test_a_unit_that_is_not_a_name_is_a_user_error(unit):
    """unit = ["image"] in a figure spec raised TypeError (unhashable) from `unit in UNITS`,
    which the figure runner does not catch: the whole build stopped, not that figure."""
    from repsim.figures.attention import unit_label

    assert unit_label("model", (32, 32)) == "pixels of the model input"
    with pytest.raises(UserError, match="is unknown; valid: image, model, fraction"):
        unit_label(unit, (32, 32))


@pytest.mark.parametrize("lsa,keys", [(False, 18), (True, 17)])
def test_uniform_prefix_mass_is_measured_under_the_models_own_mask(lsa, keys):
    # 2 prefix + 16 patch tokens: a patch query spreads evenly over the 18 keys, or over the
    # 17 others when LSA masks its own key (the prefix figure's line said 1/18 for both).
    from repsim.tinyvit import LocalityViT

    torch.manual_seed(0)
    cls = LocalityViT if lsa else VisionTransformer
    model = cls(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0,
                reg_tokens=1).eval()
    mass = A.prefix_attention_mass(model, torch.randn(2, 3, 16, 16), uniform=True)
    assert mass.shape == (2, 2)
    np.testing.assert_allclose(mass, 1 / keys, rtol=1e-12)


def test_uint8_images_with_negative_strides_are_measured_as_their_copy():
    # images[..., ::-1] (BGR -> RGB) raised torch's "negative strides are not supported".
    model = _tiny_vit(img_size=32, depth=1)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    flipped = images[..., ::-1]
    spec = get_spec("vit_cifar")
    np.testing.assert_array_equal(A.attention_distance(model, flipped, spec),
                                  A.attention_distance(model, flipped.copy(), spec))


@pytest.mark.parametrize("batch_size", [2.0, True, "8"])
def test_a_batch_size_that_is_not_a_count_is_a_user_error(batch_size):
    # 2.0 raised TypeError from range(); True ran batches of one image.
    model = _tiny_vit(depth=1)
    with pytest.raises(UserError, match=r"batch_size=.* must be a positive integer"):
        A.attention_distance(model, torch.randn(2, 3, 16, 16), batch_size=batch_size)


def test_attention_maps_take_a_numpy_batch_as_attention_distance_does():
    # attention_maps(model, array) raised AttributeError: 'numpy.ndarray' has no 'to'.
    model = _tiny_vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(A.attention_maps(model, x.numpy()), A.attention_maps(model, x))


def test_uint8_images_without_a_spec_are_a_user_error_saying_what_to_pass():
    # Raised ValueError("uint8 images need the model's spec..."): not a UserError, and it
    # named neither spec= nor the other way, preprocessed float images.
    model = _tiny_vit()
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(UserError, match=r"uint8 .*preprocessed float .*attention_distance spec="):
        A.attention_distance(model, images)
    with pytest.raises(UserError, match=r"uint8 .*pass preprocessed float images"):
        A.prefix_attention_mass(model, images)


@pytest.mark.parametrize("blocks", [1, "0,1", 1.0])
def test_blocks_that_is_not_a_list_of_numbers_is_refused_naming_blocks(blocks):
    # blocks=1 raised TypeError ('int' object is not iterable); "0,1" said "block '0' does
    # not exist" (its letters were read as blocks); 1.0 the TypeError again.
    model = _tiny_vit()
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(UserError, match=r"blocks=.* must be a list of block numbers"):
        A.attention_maps(model, x, blocks=blocks)
    with pytest.raises(UserError, match=r"blocks=.* must be a list of block numbers"):
        with A.capture_attention(model, blocks):
            model(x)


def test_float64_inputs_are_measured_in_the_models_own_dtype():
    # numpy's default float64 images raised RuntimeError "Input type (double) and bias type
    # (float) should be the same" from every measurement; extract casts them, and so do these.
    model = _tiny_vit()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x64 = x.double().numpy()
    np.testing.assert_array_equal(A.attention_maps(model, x64), A.attention_maps(model, x))
    np.testing.assert_array_equal(A.attention_distance(model, x64, batch_size=2),
                                  A.attention_distance(model, x, batch_size=2))
    np.testing.assert_array_equal(A.prefix_attention_mass(model, x.double()),
                                  A.prefix_attention_mass(model, x))


def test_a_grid_and_patch_size_given_as_numpy_arrays_are_read_as_pairs():
    # np.array([2, 2]) (a grid read back from a saved .npz) raised TypeError "only
    # 0-dimensional arrays can be converted to Python scalars" in every grid function.
    attn = np.full((1, 1, 5, 5), 0.2)
    want = A.mean_attention_distance(attn, (2, 2), (4, 4))
    np.testing.assert_array_equal(
        A.mean_attention_distance(attn, np.array([2, 2]), np.array([4, 4])), want)
    np.testing.assert_array_equal(A.token_maps(attn, np.array([2, 2])),
                                  A.token_maps(attn, (2, 2)))
    np.testing.assert_array_equal(A.distance_matrix(np.array([2, 2]), np.int64(4)),
                                  A.distance_matrix((2, 2), 4))


def test_attention_maps_of_uint8_pixels_is_a_user_error_saying_what_to_pass():
    # The probe set's (n, H, W, 3) uint8 images raised timm's AssertionError "Input width (3)
    # doesn't match model (16)"; (n, 3, H, W) uint8 a RuntimeError on the input type.
    model = _tiny_vit()
    nchw = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    for images in (np.zeros((2, 16, 16, 3), np.uint8), nchw):
        with pytest.raises(UserError, match=r"uint8 .*pass preprocessed float images"):
            A.attention_maps(model, images)
