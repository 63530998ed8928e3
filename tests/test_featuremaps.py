"""CNN feature maps: strongest channels, mean maps, errors and the CLI."""

import json

import numpy as np
import pytest
import torch

from repsim.cli import main
from repsim.errors import UserError
from repsim.figures import draw
from repsim.figures import featuremaps as FM
from repsim.models import build_model
from repsim.registry import get_spec


@pytest.fixture(scope="module")
def resnet():
    return build_model("resnet18_cifar", seed=1)


def _manual_stages(model, x):
    """Each stage's output by calling the torchvision ResNet's modules one after another."""
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        h = getattr(model, name)(h)
        out[name] = h
    return out


def test_top_channels_rank_by_mean_activation():
    act = np.zeros((2, 4, 2, 2), dtype=np.float32)
    act[0, :, 0, 0] = [1, 8, 4, 0]  # means 0.25, 2, 1, 0
    act[1, :, :, :] = np.array([3, 0, 1, 2], dtype=np.float32)[:, None, None]
    channels, scores = FM.top_channels(act, 2)
    np.testing.assert_array_equal(channels, [[1, 2], [0, 3]])
    np.testing.assert_allclose(scores, [[2, 1], [3, 2]])



@pytest.mark.parametrize("top", [2.5, True, 0.5, 0, "8"])
def test_a_top_that_is_not_a_positive_whole_number_is_refused_naming_it(top):
    # 2.5 drew 2 channels and True 1, silently; 0.5 was refused as "top=0", a value never
    # given; "8" drew 8.
    act = np.ones((1, 4, 2, 2), dtype=np.float32)
    with pytest.raises(UserError, match=f"top={top!r} must be a positive whole number"):
        FM.top_channels(act, top)

def test_stage_maps_are_the_stage_outputs(resnet):
    x = torch.randn(2, 3, 32, 32)
    views = FM.feature_maps(resnet, x, ["layer1", "layer2", "layer3", "layer4"], top=5)
    with torch.inference_mode():
        want = _manual_stages(resnet, x)
    sizes = {"layer1": (64, 32), "layer2": (128, 16), "layer3": (256, 8), "layer4": (512, 4)}
    for name, v in views.items():
        c, s = sizes[name]
        ref = want[name].numpy()
        assert v.num_channels == c and v.maps.shape == (2, 5, s, s)
        np.testing.assert_allclose(v.mean_map, ref.mean(1), rtol=1e-5, atol=1e-6)
        for i in range(2):
            np.testing.assert_allclose(v.maps[i], ref[i, v.channels[i]], rtol=1e-5, atol=1e-6)
            # they are the strongest: no other channel has a larger mean activation
            means = ref[i].mean((1, 2))
            assert means[v.channels[i]].min() >= np.delete(means, v.channels[i]).max() - 1e-6



def test_a_numpy_batch_gives_the_maps_of_its_tensor():
    # feature_maps(model, array, ...) raised AttributeError: 'numpy.ndarray' has no 'to'.
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    got = FM.feature_maps(cnn, x.numpy(), ["1"], top=3)["1"]
    want = FM.feature_maps(cnn, x, ["1"], top=3)["1"]
    np.testing.assert_array_equal(got.maps, want.maps)
    np.testing.assert_array_equal(got.channels, want.channels)


def test_float64_images_give_the_maps_of_their_float32_copy():
    # numpy's default float64 raised RuntimeError "Input type (double) and bias type (float)
    # should be the same"; repsim.extract casts them to the module's dtype, and so does this.
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    got = FM.feature_maps(cnn, x.double().numpy(), ["1"], top=3)["1"]
    want = FM.feature_maps(cnn, x, ["1"], top=3)["1"]
    np.testing.assert_array_equal(got.maps, want.maps)
    np.testing.assert_array_equal(got.channels, want.channels)


def test_stages_given_as_one_string_are_layer_names_not_letters():
    # feature_maps(cnn, x, "1") worked by luck; "conv" was read letter by letter and refused
    # as "layers='c' matches nothing", and "conv,act" the same.
    torch.manual_seed(0)
    cnn = torch.nn.Sequential()
    cnn.add_module("conv", torch.nn.Conv2d(3, 6, 3, padding=1))
    cnn.add_module("act", torch.nn.ReLU())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert list(FM.feature_maps(cnn, x, "conv", top=2)) == ["conv"]
    assert list(FM.feature_maps(cnn, x, "conv,act", top=2)) == ["conv", "act"]
    np.testing.assert_array_equal(FM.feature_maps(cnn, x, "act", top=2)["act"].maps,
                                  FM.feature_maps(cnn, x, ["act"], top=2)["act"].maps)

def test_feature_maps_leave_outputs_unchanged_and_remove_hooks(resnet):
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before = resnet(x)
    FM.feature_maps(resnet, x, ["layer2"], top=3)
    with torch.inference_mode():
        after = resnet(x)
    assert torch.equal(before, after)
    assert not resnet.layer2._forward_hooks


def test_a_vit_asked_for_feature_maps_is_a_clear_error():
    with pytest.raises(UserError, match="vit_cifar is a Vision Transformer.*repsim attention"):
        FM.resolve_stages(None, get_spec("vit_cifar"), None)


def test_a_layer_without_feature_maps_is_a_clear_error(resnet):
    with pytest.raises(UserError, match=r"layer 'fc' gives outputs of shape \(1, 10\)"):
        FM.stage_activations(resnet, torch.randn(1, 3, 32, 32), ["fc"])


def test_a_stage_that_runs_twice_in_one_pass_is_refused_not_drawn_from_its_last_call(resnet):
    # torchvision's BasicBlock calls its one `relu` twice: the maps were the second call's.
    with pytest.raises(UserError, match=r"'layer1\.0\.relu' ran 2 times"):
        FM.stage_activations(resnet, torch.randn(2, 3, 32, 32), ["layer1.0.relu"])


class _ChannelsLast(torch.nn.Module):
    """A CNN whose stage gives (B, H, W, C) maps and says so as timm does (Swin, MambaOut)."""

    output_fmt = "NHWC"

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.stage = torch.nn.Identity()

    def forward(self, x):
        return self.stage(self.conv(x).permute(0, 2, 3, 1))


def test_channels_last_maps_are_refused_not_read_as_channels_first():
    # (1, 8, 8, 5) maps were drawn as 8 "channels" of 8x5 pixels, silently.
    with pytest.raises(UserError, match=r"layer 'stage'.*channels last"):
        FM.stage_activations(_ChannelsLast(), torch.randn(1, 3, 8, 8), ["stage"])


def test_cli_featuremaps_writes_one_figure_per_stage(cifar_root, tmp_path, capsys):
    weights = tmp_path / "r18.pt"
    torch.save(build_model("resnet18_cifar", seed=2).state_dict(), weights)
    out = tmp_path / "fig"
    assert main(["featuremaps", "--model", "resnet18_cifar", "--weights", str(weights),
                 "--dataset", "cifar10", "--data-root", str(cifar_root), "--probe", "20",
                 "--ids", "4", "9",
                 "--stages", "stem,layer3", "--top", "4", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["stages"] == ["stem", "layer3"] and res["n_images"] == 2
    for name in ["featuremaps_resnet18_cifar-r18_stem.png",
                 "featuremaps_resnet18_cifar-r18_layer3.png", "featuremaps_resnet18_cifar-r18.npz"]:
        assert (out / name).is_file() and str(out / name) in res["outputs"]
    with np.load(out / "featuremaps_resnet18_cifar-r18.npz") as z:
        assert z["layer3/maps"].shape == (2, 4, 8, 8) and z["stem/mean_map"].shape == (2, 32, 32)
        np.testing.assert_array_equal(z["ids"], [4, 9])
        assert json.loads(str(z["provenance"]))["weights"]["weights_sha256"]


def test_weights_seed_draws_another_random_model_on_the_same_images(tmp_path, capsys):
    maps = []
    for seed in ("0", "2"):
        assert main(["featuremaps", "--model", "resnet18_cifar", "--weights", "random",
                     "--weights-seed", seed, "--probe", "20", "--images", "2", "--stages",
                     "layer1", "--top", "2", "--out", str(tmp_path), "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        with np.load([p for p in res["outputs"] if p.endswith(".npz")][0]) as z:
            maps.append((res["label"], z["ids"].tolist(), z["layer1/mean_map"]))
    assert [m[0] for m in maps] == ["resnet18_cifar (random)", "resnet18_cifar (random-seed2)"]
    assert maps[0][1] == maps[1][1]
    assert not np.allclose(maps[0][2], maps[1][2])


def test_cli_featuremaps_draws_the_first_image_of_each_class_by_default(cifar_root, tmp_path,
                                                                        capsys):
    # The tree's canonical order is sorted by class, 2 images each: class c holds ids 2c, 2c+1.
    assert main(["featuremaps", "--model", "resnet18_cifar", "--weights", "random",
                 "--dataset", "cifar10", "--data-root", str(cifar_root), "--probe", "20",
                 "--stages", "layer4", "--top", "1", "--out", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 10
    with np.load(tmp_path / "featuremaps_resnet18_cifar-random.npz") as z:
        np.testing.assert_array_equal(z["ids"], np.arange(0, 20, 2))


def test_each_row_has_colour_bars_for_its_mean_map_and_its_channels():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 3, 4, 4)).astype(np.float32)
    maps[1] *= 5  # the second image fires five times as strongly
    stage = FM.StageMaps(maps=maps, channels=np.tile(np.arange(3), (2, 1)),
                         scores=maps.mean((2, 3)), mean_map=maps.mean(1) / 10, num_channels=3)
    fig = draw.feature_maps(rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), stage)
    rows = np.reshape(fig.axes, (2, 5))  # input, mean map, 3 channels
    for i, row in enumerate(rows):
        # The bars are insets beside the mean map and beside the last channel map.
        mean_bar, channel_bar = (row[j].images[0].colorbar for j in (1, -1))
        assert mean_bar.ax in row[1].child_axes and channel_bar.ax in row[-1].child_axes
        np.testing.assert_allclose(mean_bar.ax.get_ylim(), [stage.mean_map[i].min(),
                                                            stage.mean_map[i].max()], rtol=1e-6)
        np.testing.assert_allclose(channel_bar.ax.get_ylim(), [0, maps[i].max()], rtol=1e-6)


def test_channel_maps_with_negative_values_are_drawn_on_a_scale_that_holds_them():
    """A stage before its ReLU (stages = "layer1.0.bn1") has negative values: the 0-to-max
    scale showed them all as 0, and a row of negatives only got an inverted scale."""
    maps = np.array([[[[-2.0, 1.0], [0.5, 0.0]]], [[[-3.0, -1.0], [-2.0, -1.5]]]],
                    dtype=np.float32)  # (2 images, 1 channel, 2, 2)
    stage = FM.StageMaps(maps=maps, channels=np.zeros((2, 1), np.int64),
                         scores=maps.mean((2, 3)), mean_map=maps.mean(1), num_channels=1)
    fig = draw.feature_maps(np.zeros((2, 8, 8, 3), dtype=np.uint8), stage)
    rows = np.reshape(fig.axes, (2, 3))  # input, mean map, 1 channel
    assert rows[0][-1].images[0].get_clim() == (-2.0, 1.0)
    assert rows[1][-1].images[0].get_clim() == (-3.0, 0.0)


def test_cli_featuremaps_on_a_vit_is_one_line_error(capsys):
    assert main(["featuremaps", "--model", "vit_cifar", "--weights", "random"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("repsim featuremaps: error: vit_cifar is a Vision Transformer")
    assert "\n" not in err


def test_cli_featuremaps_names_the_stages_flag_for_an_unknown_stage(capsys):
    assert main(["featuremaps", "--model", "resnet18_cifar", "--weights", "random",
                 "--stages", "nope", "--probe", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("repsim featuremaps: error: --stages 'nope' matches nothing")
    assert "--layers" not in err and "\n" not in err


def test_cli_featuremaps_names_the_stages_flag_for_an_empty_request(capsys):
    assert main(["featuremaps", "--model", "resnet18_cifar", "--weights", "random",
                 "--stages", "", "--probe", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--stages '' is not a layer request" in err and "--layers" not in err, err


def test_figure_kind_featuremaps_builds_one_figure_per_stage_one_image_per_class(tmp_path):
    from repsim.data import load_probe_set
    from repsim.figures.runner import build_all

    ana, figs = tmp_path / "analyses", tmp_path / "figures"
    ana.mkdir()
    model = 'kind = "featuremaps"\nmodel = {model = "resnet18_cifar", weights = "random"}\n'
    (ana / "fm.toml").write_text(model + 'images = 2\nstages = "layer1,layer4"\ntop = 3\n'
                                 '[probe]\ndataset = "cifar10-probe"\nn = 10\n')
    (ana / "per_class.toml").write_text(model + 'stages = "layer4"\ntop = 1\n[probe]\n'
                                        'dataset = "cifar10-probe"\nn = 30\n')
    res = build_all(ana, figs, progress=False)
    assert [b["name"] for b in res["built"]] == ["fm", "per_class"] and not res["failed"]
    for name in ["fm_layer1.png", "fm_layer4.pdf", "fm.npz"]:
        assert (figs / name).is_file()
    data = json.loads((figs / "fm.json").read_text())["data"]
    assert np.asarray(data["stages"]["layer4"]["channels"]).shape == (2, 3)
    # By default, the first image of each class.
    ids = json.loads((figs / "per_class.json").read_text())["data"]["image_ids"]
    probe = load_probe_set("cifar10-probe", n=30)
    label = dict(zip(probe.ids.tolist(), probe.labels.tolist()))
    first = {c: min(i for i in label if label[i] == c) for c in sorted(set(label.values()))}
    assert ids == list(first.values())


def test_the_featuremaps_figures_data_names_the_model_and_weights_it_drew(tmp_path,
                                                                          monkeypatch):
    """Its data held channel numbers and image ids but not whose channels they were (the
    `repsim featuremaps` files carry the model and weights; the figure's did not)."""
    from repsim.figures.runner import build_all

    monkeypatch.setattr(draw, "save", lambda fig, *a, **k: draw.plt.close(fig) or [])  # slow
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "fm.toml").write_text(
        'kind = "featuremaps"\nmodel = {model = "resnet18_cifar", weights = "random", label = '
        '"R"}\nimages = 1\nstages = "layer1"\ntop = 1\n[probe]\ndataset = "cifar10-probe"\n'
        'n = 4\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [b["name"] for b in res["built"]] == ["fm"], res
    data = json.loads((tmp_path / "f" / "fm.json").read_text())["data"]
    assert (data["model"], data["label"], data["weights"]["weights"]) == (
        "resnet18_cifar", "R", "random")


def test_a_model_in_train_mode_is_measured_in_eval_mode_and_left_as_it_was():
    # In train mode BatchNorm normalised by the batch's own statistics (a ResNet-18's layer1
    # mean map 0.77 off for a batch of one) and updated its running statistics: drawing maps
    # changed the model.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    want = FM.feature_maps(net, x, ["2"], top=2)["2"]
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    got = FM.feature_maps(net, x[:1], ["2"], top=2)["2"]
    assert net.training and all(m.training for m in net.modules())
    np.testing.assert_allclose(got.mean_map, want.mean_map[:1], rtol=1e-5, atol=1e-6)
    for k, v in net.state_dict().items():
        assert torch.equal(v, buffers[k]), k
