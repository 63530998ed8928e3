"""Spatial locality: (image, cell) rows, locality maps with known answers, the figure kind."""

import json

import numpy as np
import pytest
import reference
import torch
from torch import nn

from repsim import locality as L
from repsim.errors import UserError

PATCH, SIDE = 4, 16  # 16 px images, a 4x4 grid of 4x4 patches
GRID = (SIDE // PATCH, SIDE // PATCH)
G = GRID[0] * GRID[1]


def _orthogonal_conv(c_in: int, k: int, seed: int) -> nn.Conv2d:
    """A patchify conv (kernel = stride = k) whose weight is a square orthogonal matrix: it
    maps each patch vector to Q @ patch, which linear CKA cannot tell from the patch."""
    d = c_in * k * k
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    conv = nn.Conv2d(c_in, d, k, stride=k, bias=False)
    conv.weight.data = q.reshape(d, c_in, k, k)
    return conv


class Mix(nn.Module):
    """Every patch token becomes the mean of all patch tokens (the class token is kept)."""

    def forward(self, t):
        patches = t[:, 1:].mean(1, keepdim=True).expand_as(t[:, 1:])
        return torch.cat([t[:, :1], patches], 1)


class CopyViT(nn.Module):
    """ViT-shaped (a class token, then the patch tokens row-major): ``blocks.0`` returns its
    input, so token t is (an orthogonal map of) its own input patch; ``blocks.1`` mixes all
    tokens into one, so no token is local any more."""

    num_prefix_tokens = 1

    def __init__(self):
        super().__init__()
        self.patch_embed = _orthogonal_conv(3, PATCH, seed=0)
        self.patch_embed.grid_size, self.patch_embed.patch_size = GRID, (PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.ones(1, 1, 3 * PATCH * PATCH))
        self.blocks = nn.Sequential(nn.Identity(), Mix())

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.blocks(torch.cat([self.cls_token.expand(len(x), -1, -1), t], 1))


class PatchCNN(nn.Module):
    """Feature maps at three resolutions: ``native`` on the 4x4 grid (another orthogonal map
    of each patch), ``fine`` 8x8 (pooled onto the grid), ``coarse`` 2x2 (repeated onto it)."""

    def __init__(self):
        super().__init__()
        self.native = _orthogonal_conv(3, PATCH, seed=1)
        self.fine = nn.Conv2d(3, 5, 2, stride=2)
        self.coarse = nn.AvgPool2d(2)

    def forward(self, x):
        self.fine(x)
        return self.coarse(self.native(x))


@pytest.fixture(scope="module")
def images():
    return torch.rand(40, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def test_token_grid_and_input_patches_follow_the_patch_embedding(images):
    vit = CopyViT()
    assert L.token_grid(vit) == L.TokenGrid(GRID, (PATCH, PATCH), 1)
    p = L.input_patches(images, GRID)
    assert p.shape == (40, G, 3 * PATCH * PATCH)
    for g in (0, 6, G - 1):
        r, c = divmod(g, GRID[1])
        want = images[:, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].reshape(40, -1)
        torch.testing.assert_close(p[:, g], want, rtol=0, atol=0)
    # the patch embedding reads exactly these vectors: its tokens are W @ patch
    w = vit.patch_embed.weight.reshape(48, 48)
    tokens = L.grid_features(vit, images, GRID, "blocks.0")["blocks.0"]
    torch.testing.assert_close(tokens, p @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="has no patch grid"):
        L.token_grid(PatchCNN())


def test_measuring_gives_every_module_its_own_mode_back(images):
    # A model in train mode with a frozen part (BatchNorm kept in eval while fine-tuning):
    # grid_features and repsim.extract ran it in eval mode, then model.train(True) switched
    # the frozen part to train mode as well.
    import repsim

    vit = CopyViT().train()
    vit.patch_embed.eval()
    L.grid_features(vit, images[:2], GRID, "blocks.0")
    assert vit.training and not vit.patch_embed.training
    repsim.extract(vit, images[:2], layers="blocks.0", device="cpu")
    assert vit.training and not vit.patch_embed.training and vit.blocks.training


def test_feature_maps_land_on_the_grid_row_major_pooled_or_repeated():
    x = torch.randn(2, 5, 8, 8)
    fine = L.to_grid(x, GRID)  # 8x8 -> 4x4: the mean of each 2x2 window
    coarse = L.to_grid(x[:, :, :2, :2], GRID)  # 2x2 -> 4x4: each cell repeated over 2x2
    native = L.to_grid(x[:, :, :4, :4], GRID)
    for g in range(G):
        r, c = divmod(g, GRID[1])
        window = x[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2]
        torch.testing.assert_close(fine[:, g], window.mean((2, 3)))
        torch.testing.assert_close(coarse[:, g], x[:, :, r // 2, c // 2])
        torch.testing.assert_close(native[:, g], x[:, :, r, c])
    tokens = torch.randn(2, 1 + G, 7)
    torch.testing.assert_close(L.to_grid(tokens, GRID, n_prefix=1), tokens[:, 1:])
    with pytest.raises(UserError, match="has 17 tokens, not 2 prefix"):
        L.to_grid(tokens, GRID, n_prefix=2, layer="blocks.0")
    with pytest.raises(UserError, match="neither tokens"):
        L.to_grid(torch.randn(2, 7), GRID, layer="head")


def test_patch_embedding_tokens_have_no_prefix_to_drop(images):
    # timm's patch_embed gives the G patch tokens before the class token is prepended: the
    # model's prefix count applied to every layer refused it ("16 tokens, not 1 prefix + 4x4")
    # although it is the most local layer there is.
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=SIDE, patch_size=PATCH, embed_dim=8, depth=1,
                            num_heads=2, num_classes=0, reg_tokens=1).eval()
    x = images[:3]
    feats = L.grid_features(vit, x, GRID, ["patch_embed", "blocks.0"])
    with torch.no_grad():
        torch.testing.assert_close(feats["patch_embed"], vit.patch_embed(x))
        want = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))[:, 2:]
    torch.testing.assert_close(feats["blocks.0"], want)


def test_maps_of_a_channels_last_model_are_refused_not_pooled_over_channels(images):
    # timm models with output_fmt "NHWC" (Swin) give (b, H, W, C) maps: pooled as (b, C, H, W)
    # their width became the grid's channels and their channels a grid axis, without a word.
    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, PATCH, stride=PATCH)

        def forward(self, x):
            return self.conv(x).permute(0, 2, 3, 1)  # (b, 4, 4, 6)

    model = nn.Sequential()
    model.add_module("stage", Stage())
    model.output_fmt = "NHWC"
    with pytest.raises(UserError, match="channels last"):
        L.grid_features(model, images[:2], GRID, "stage")


def test_a_token_that_copies_its_patch_peaks_at_its_own_position(images):
    res = L.measure(CopyViT(), images, vit_layers="blocks.*", estimator="debiased")
    assert res.map_layers == ["input", "blocks.0", "blocks.1"]
    copy, mixed = res.maps[1], res.maps[2]
    np.testing.assert_allclose(np.diag(copy), 1.0, atol=1e-6)  # own patch (float32 tokens)
    assert (copy.argmax(1) == np.arange(G)).all()
    assert np.abs(copy - np.eye(G)).max() < 0.15  # independent pixels elsewhere: about 0
    np.testing.assert_allclose(res.maps[0], copy, atol=1e-6)  # = the patches themselves
    s = res.summary
    assert s["peak_at_own"][1] == 1.0 and s["contrast"][1] > 0.9
    # every token of the mixing block is the same vector: all maps are one map, so "own" and
    # "elsewhere" average the same numbers (contrast 0) and one token in G peaks at its own
    assert np.allclose(mixed, mixed[0], atol=1e-10)
    assert abs(s["contrast"][2]) < 1e-10 and s["peak_at_own"][2] == 1 / G


def test_locality_maps_match_the_reference_cka(images):
    vit = CopyViT()
    vit.blocks[1] = nn.Sequential(nn.Linear(48, 48), nn.Tanh())  # a non-trivial token map
    feats = L.grid_features(vit, images, GRID, "blocks.*")
    patches = L.input_patches(images, GRID)
    maps = L.locality_maps(feats, patches, estimator="debiased")
    for layer, t, s in [(0, 0, 0), (0, 3, 9), (1, 5, 5), (1, 12, 2)]:
        x = next(v for k, v in enumerate(feats.values()) if k == layer)[:, t].numpy()
        want = reference.cka(x, patches[:, s].numpy(), debiased=True)
        assert maps[layer, t, s] == pytest.approx(want, abs=1e-10)


def test_cka_settings_reach_the_engine_not_the_forward_batch(images):
    # What the figure kind passes: batch_size is the CKA estimator's (None unless minibatch).
    vit, cnn = CopyViT(), PatchCNN()
    res = L.measure(vit, images, cnn, images, vit_layers="blocks.0", cnn_layers="fine",
                    estimator="minibatch", batch_size=160, batch_seed=3, forward_batch=7)
    assert (res.position.batch_size, res.position.n_batches) == (160, 40 * G // 160)
    assert res.position.batch_seed == 3
    tok = L.grid_features(vit, images, GRID, "blocks.0")
    patches = L.input_patches(images, GRID)
    want = L.locality_maps(tok, patches, estimator="minibatch", batch_size=16, batch_seed=3)
    got = L.measure(vit, images, vit_layers="blocks.0", estimator="minibatch", batch_size=16,
                    batch_seed=3).maps[1]
    np.testing.assert_allclose(got, want[0], atol=1e-12)
    debiased = L.measure(vit, images, cnn, images, vit_layers="blocks.0", cnn_layers="fine",
                         estimator="debiased", batch_size=None)
    assert debiased.position.estimator == "debiased"


def test_every_compare_setting_reaches_both_cka_calls(images, monkeypatch):
    # measure's settings go to repsim.cka.compare; the locality maps went to cka_matrix, which
    # has no memory_budget (or device, progress): a TypeError after the forward passes. A
    # setting dropped on the way would pass silently, so each call's settings are recorded.
    vit, cnn = CopyViT(), PatchCNN()
    plain = L.measure(vit, images, vit_layers="blocks.0", estimator="debiased")
    seen, compare = [], L.cka.compare

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return compare(*args, **kwargs)

    monkeypatch.setattr(L.cka, "compare", recording)
    given = dict(memory_budget=1 << 20, device="cpu", progress=False)
    small = L.measure(vit, images, cnn, images, vit_layers="blocks.0", cnn_layers="native",
                      estimator="debiased", **given)
    np.testing.assert_allclose(small.maps, plain.maps, atol=1e-12)
    assert len(seen) == 3  # the input's and blocks.0's locality maps, then the position CKA
    assert all({k: kw.get(k) for k in given} == given for kw in seen), seen


def test_summary_and_offset_map_against_explicit_loops():
    rng = np.random.default_rng(0)
    gh, gw = 3, 4
    maps = rng.standard_normal((2, gh * gw, gh * gw))
    s = L.locality_summary(maps)
    for k in range(2):
        own = [maps[k, t, t] for t in range(gh * gw)]
        rest = [maps[k, t, u] for t in range(gh * gw) for u in range(gh * gw) if u != t]
        assert s["own"][k] == pytest.approx(np.mean(own))
        assert s["elsewhere"][k] == pytest.approx(np.mean(rest))
        assert s["contrast"][k] == pytest.approx(np.mean(own) - np.mean(rest))
    rel = L.relative_map(maps, (gh, gw))
    assert rel.shape == (2, 2 * gh - 1, 2 * gw - 1)
    for dr, dc in [(0, 0), (1, -2), (-2, 3), (2, -3)]:
        vals = [maps[1, r * gw + c, (r + dr) * gw + c + dc] for r in range(gh) for c in range(gw)
                if 0 <= r + dr < gh and 0 <= c + dc < gw]
        assert rel[1, gh - 1 + dr, gw - 1 + dc] == pytest.approx(np.mean(vals))


def test_matching_positions_give_cka_1_and_a_misaligned_grid_does_not(images):
    vit, cnn = CopyViT(), PatchCNN()
    res = L.measure(vit, images, cnn, images, vit_layers="blocks.0",
                    cnn_layers="native,fine,coarse", estimator="debiased")
    pos = res.position
    assert pos.layers_b == ["native", "fine", "coarse"] and pos.n == 40 * G
    # the same patch vectors under two orthogonal maps, row for row: CKA 1
    assert pos.matrix[0, 0] == pytest.approx(1.0, abs=1e-6)
    tok = L.grid_features(vit, images, GRID, "blocks.0")
    cells = L.grid_features(cnn, images, GRID, "native,fine,coarse")
    want = reference.cka(tok["blocks.0"].reshape(-1, 48).numpy(),
                         cells["fine"].reshape(-1, 5).numpy(), debiased=True)
    assert pos.matrix[0, 1] == pytest.approx(want, abs=1e-10)
    # the CNN's cells transposed (row g of an image paired with another place): not 1
    flipped = {"native": cells["native"].reshape(40, *GRID, 48).transpose(1, 2).reshape(40, G, 48)}
    assert L.position_cka(tok, flipped, estimator="debiased").matrix[0, 0] < 0.5
    with pytest.raises(UserError, match="same images on the same grid"):
        L.position_cka(tok, {"x": cells["native"][:10]})


# ------------------------------------------------------------------ the figure kind


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    from repsim.models import build_model

    ck = tmp_path / "ckpt"
    ck.mkdir()
    for name in ("vit_cifar", "resnet18_cifar"):
        torch.save(build_model(name, seed=0).state_dict(), ck / f"{name}.pt")
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    return ck


SPEC = ('kind = "locality"\nvit = {model = "vit_cifar", layers = "embed,blocks.5"}\n'
        'cnn = {model = "resnet18_cifar", layers = "stem,layer3,layer4"}\nmax_images = 6\n'
        'tokens = [[0, 0], [4, 4]]\n[probe]\ndataset = "cifar10-probe"\nn = 20\n')


def test_figure_kind_builds_both_figures_then_keeps_or_skips_without_weights(tmp_path, checkpoints):
    from repsim.figures.runner import build_all

    ana, out = tmp_path / "analyses", tmp_path / "figures"
    ana.mkdir()
    (ana / "loc.toml").write_text(SPEC)
    (ana / "bad.toml").write_text(SPEC.replace("[[0, 0], [4, 4]]", "[[0, 9]]"))
    res = build_all(ana, out, progress=False)
    assert [e["name"] for e in res["built"]] == ["loc"]
    assert "tokens=[[0, 9]]" in res["failed"][0]["reason"]
    names = sorted(p.name for p in out.iterdir())
    assert {"loc.png", "loc.pdf", "loc_maps.png", "loc_maps.pdf", "loc.npz"} <= set(names)
    data = json.loads((out / "loc.json").read_text())["data"]
    assert data["n_images"] == 6 and data["grid"] == [8, 8]
    assert data["layers"] == ["input", "embed", "blocks.5"]
    assert data["position_cka"]["layers_b"] == ["stem", "layer3", "layer4"]
    assert data["position_cka"]["n"] == 6 * 64
    assert np.array(data["token_maps"]["4,4"]).shape == (3, 64)
    assert data["summary"]["own"][0] == pytest.approx(1.0)  # input patches vs themselves
    with np.load(out / "loc.npz") as z:
        assert z["maps"].shape == (3, 64, 64) and len(z["ids"]) == 6
    assert [e["name"] for e in build_all(ana, out, only=["loc"], progress=False)["cached"]] == [
        "loc"]
    (checkpoints / "resnet18_cifar.pt").unlink()  # the built figure is kept, the reason given
    kept = build_all(ana, out, only=["loc"], progress=False)["kept"]
    assert [e["name"] for e in kept] == ["loc"] and "resnet18_cifar" in kept[0]["reason"]
    skipped = build_all(ana, tmp_path / "fresh", only=["loc"], progress=False)["skipped"]
    assert [e["name"] for e in skipped] == ["loc"] and "resnet18_cifar" in skipped[0]["reason"]


def test_the_maps_colour_bar_shows_values_below_zero():
    """CKA is never clamped: a locality map a little below 0 gets an arrow at the foot of
    its 0..1 colour bar, so the clipped colour is not read as 0."""
    from repsim.figures.locality import maps_figure

    maps = np.full((2, 4, 4), 0.5)
    maps[1, 0, 3] = -0.004
    loc = L.Locality(grid=L.TokenGrid((2, 2), (4, 4), 1), n=8, map_layers=["input", "b0"],
                     maps=maps, summary={"contrast": np.zeros(2)})
    fig = maps_figure(loc, [(0, 0)], "")
    (bar,) = {a.images[0].colorbar for a in fig.axes if a.images and a.images[0].colorbar}
    assert bar.extend == "min"
    maps[1, 0, 3] = 0.0
    fig = maps_figure(loc, [(0, 0)], "")
    (bar,) = {a.images[0].colorbar for a in fig.axes if a.images and a.images[0].colorbar}
    assert bar.extend == "neither"


def test_a_boolean_token_cell_is_refused():
    """tokens = [[true, 0]] was drawn as cell (1, 0): a bool passed the integer check."""
    from repsim.figures.locality import _tokens

    assert _tokens({"tokens": [[1, 0]]}, (8, 8)) == [(1, 0)]
    with pytest.raises(UserError, match=r"tokens=\[\[True, 0\]\]"):
        _tokens({"tokens": [[True, 0]]}, (8, 8))


@pytest.mark.parametrize("batch", [8.0, True, 0])
def test_a_forward_batch_that_is_not_a_count_is_a_user_error_naming_it(images, batch):
    # 8.0 raised TypeError from range(); True ran one image per pass; 0 raised ValueError.
    with pytest.raises(UserError, match=r"forward_batch=.* must be a positive integer"):
        L.measure(CopyViT(), images[:4], vit_layers="blocks.0", forward_batch=batch)
    with pytest.raises(UserError, match=r"batch_size=.* must be a positive integer"):
        L.grid_features(CopyViT(), images[:4], GRID, "blocks.0", batch_size=batch)


def test_numpy_images_measure_as_their_tensor(images):
    # grid_features and measure raised AttributeError: 'numpy.ndarray' has no 'to'.
    vit, cnn, x = CopyViT(), PatchCNN(), images[:8]
    kw = dict(vit_layers="blocks.0", cnn_layers="native", estimator="biased")
    got = L.measure(vit, x.numpy(), cnn, x.numpy(), **kw)
    want = L.measure(vit, x, cnn, x, **kw)
    np.testing.assert_array_equal(got.maps, want.maps)
    np.testing.assert_array_equal(got.position.matrix, want.position.matrix)


def test_float64_images_measure_as_their_float32_copy(images):
    # numpy's default float64 raised RuntimeError "Input type (double) and bias type (float)
    # should be the same" from the forward pass; repsim.extract casts them, and so does this.
    vit, cnn, x = CopyViT(), PatchCNN(), images[:8]
    kw = dict(vit_layers="blocks.0", cnn_layers="native", estimator="biased")
    got = L.measure(vit, x.double().numpy(), cnn, x.double().numpy(), **kw)
    want = L.measure(vit, x, cnn, x, **kw)
    np.testing.assert_allclose(got.maps, want.maps, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.position.matrix, want.position.matrix, rtol=0, atol=1e-6)
