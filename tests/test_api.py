"""The public API: any nn.Module in, activations out, CKA against a registry model."""

import subprocess
import sys

import numpy as np
import pytest
import reference
import torch
from torch import nn

import repsim
from repsim import models, registry
from repsim.errors import UserError


@pytest.fixture
def vit_weights(tmp_path, monkeypatch):
    """vit_cifar's default weights, written by the test (seeded random init)."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    torch.save(models.build_model("vit_cifar", seed=5).state_dict(), ck / "vit_cifar.pt")
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    return ck


def test_own_module_against_a_registry_model_in_a_few_lines(vit_weights):
    # The README's first example, as written there.
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                        nn.Flatten(), nn.Linear(256, 10))
    images = repsim.load_probe_set("cifar10-probe", n=64).images  # (64, 32, 32, 3) uint8
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mine = repsim.extract(net, x, layers=["1", "4"])  # {layer: (n, p) array}
    vit = repsim.extract("vit_cifar", images, layers=["blocks.0", "blocks.5"])
    m = repsim.cka_matrix(mine, vit, estimator="debiased")
    assert m.shape == (2, 2) and np.isfinite(m).all()
    assert mine["1"].shape == (64, 16 * 32 * 32) and vit["blocks.0"].shape == (64, 65 * 512)
    with torch.no_grad():  # the activations are the module's own outputs
        want = net[1](net[0](x)).flatten(1).numpy()
    np.testing.assert_allclose(mine["1"], want, rtol=1e-5, atol=1e-6)
    assert m[0, 1] == pytest.approx(reference.cka(mine["1"], vit["blocks.5"], debiased=True),
                                    abs=1e-6)


def test_extract_takes_a_loader_and_reduces():
    net = models.build_model("vit_cifar")
    x = torch.rand(10, 3, 32, 32)
    loader = [(x[:6], torch.zeros(6)), (x[6:], torch.zeros(4))]  # (images, labels) batches
    out = repsim.extract(net, loader, layers="blocks.*", reduce="mean")
    assert list(out) == [f"blocks.{i}" for i in range(6)]
    assert all(v.shape == (10, 512) and v.dtype == np.float32 for v in out.values())
    whole = repsim.extract(net, x, layers="blocks.*", reduce="mean", batch_size=3)
    for k in out:
        np.testing.assert_allclose(out[k], whole[k], rtol=1e-5, atol=1e-5)


def test_capture_removes_its_hooks_and_keeps_raw_outputs():
    net = models.build_model("resnet18_cifar")
    with repsim.capture(net, ["stem", "layer3"], reduce=None) as cap:
        net(torch.rand(2, 3, 32, 32))
    assert cap.outputs["stem"].shape == (2, 64, 32, 32)
    assert cap.outputs["layer3"].shape == (2, 256, 8, 8)
    assert not any(m._forward_hooks for m in net.modules())


def test_cls_of_a_vit_without_class_token_is_refused_not_a_patch_token():
    # timm ViTs without a class token (global_pool='avg') have num_prefix_tokens == 0: token 0
    # is the top-left patch, which reduce='cls' returned as if it were a class token.
    from timm.models.vision_transformer import VisionTransformer

    from repsim.hooks import ReductionError

    net = VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=2, num_heads=2,
                            num_classes=3, class_token=False, global_pool="avg").eval()
    with pytest.raises(ReductionError, match="reduce='cls' needs class or register tokens"):
        repsim.extract(net, torch.rand(2, 3, 16, 16), layers="blocks.1", reduce="cls")


@pytest.mark.parametrize("batch_size", [0, -1])
def test_non_positive_batch_size_is_one_user_error(batch_size):
    # 0 raised range()'s "arg 3 must not be zero", -1 said "no images" of 3 images.
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UserError, match=f"batch_size={batch_size} is not valid"):
        repsim.extract(net, torch.rand(3, 4), layers="0", batch_size=batch_size)


@pytest.mark.parametrize("call", ["extract", "capture"])
def test_an_unknown_reduction_is_one_user_error(call):
    # repsim.extract(net, x, layers=..., reduce="pool") raised a bare ValueError.
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UserError, match="reduce='pool' is unknown; valid: flatten, mean"):
        if call == "extract":
            repsim.extract(net, torch.rand(3, 4), layers="0", reduce="pool")
        else:
            repsim.capture(net, ["0"], reduce="pool")


class _Gated(nn.Module):
    """Runs ``b`` only on batches whose sum is positive."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x)) if x.sum() > 0 else self.a(x)


def test_a_layer_a_batch_skips_is_an_error_not_the_last_batchs_rows():
    # Batch 2 does not run "b": its rows were batch 1's outputs again, silently.
    x = torch.cat([torch.ones(2, 4), -torch.ones(2, 4)])
    with pytest.raises(UserError, match="layers b gave no output in this forward pass"):
        repsim.extract(_Gated(), x, layers=["b"], batch_size=2)


def test_a_training_only_module_in_the_default_layers_is_one_user_error():
    # A head called only in training mode was a KeyError traceback in eval-mode extraction.
    net = nn.ModuleDict({"body": nn.Linear(4, 4), "aux": nn.Linear(4, 2)})
    net.forward = lambda x: net["aux"](net["body"](x)) if net.training else net["body"](x)
    with pytest.raises(UserError, match="layers aux gave no output"):
        repsim.extract(net, torch.rand(3, 4))


class _Stack(nn.Module):
    """A user's model whose blocks sit in a ModuleList, which itself never runs."""

    def __init__(self):
        super().__init__()
        self.layers, self.head = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_the_default_layers_of_a_module_list_child_are_its_items():
    # The default was ["layers", "head"]: a ModuleList is never called, so it was refused.
    net, x = _Stack(), torch.rand(3, 4)
    got = repsim.extract(net, x)
    assert list(got) == ["layers.0", "layers.1", "head"]
    np.testing.assert_allclose(got["layers.1"], net.layers[1](net.layers[0](x)).detach().numpy())


def test_mean_of_a_channels_last_timm_model_is_refused_not_pooled_over_channels():
    # Swin's stage outputs are (b, H, W, C): 'mean' averaged W and C, leaving (b, H) rows.
    from timm.models.swin_transformer import SwinTransformer

    from repsim.hooks import ReductionError

    net = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 1),
                          num_heads=(1, 1), num_classes=3).eval()
    with pytest.raises(ReductionError, match="layer 'layers.0': reduce='mean' cannot tell"):
        repsim.extract(net, torch.rand(2, 3, 32, 32), layers="layers.0", reduce="mean")
    flat = repsim.extract(net, torch.rand(2, 3, 32, 32), layers="layers.0")["layers.0"]
    assert flat.shape == (2, 8 * 8 * 8)  # flatten keeps every value, in any layout


def test_unknown_layer_of_an_own_module_lists_close_matches():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UserError, match="close matches: 1"):
        repsim.extract(net, torch.rand(3, 4), layers=["11"])


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations made by a test stay in that test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_registered_model_is_a_name_everywhere(tmp_path, private_registry):
    @repsim.register_model("tiny_mlp_test", input_size=8, num_classes=3,
                           weights=tmp_path / "tiny.pt", head_key="2.weight")
    def tiny(num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5), nn.Linear(5, num_classes))

    torch.save(tiny(3).state_dict(), tmp_path / "tiny.pt")
    assert "tiny_mlp_test" in repsim.list_models()
    model, prov = repsim.load_model("tiny_mlp_test")
    assert prov["weights"] == str(tmp_path / "tiny.pt") and prov["num_classes"] == 3
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    out = repsim.extract("tiny_mlp_test", torch.from_numpy(images), layers=["1"])
    assert out["1"].shape == (6, 5)  # resized to 8 x 8 on the way in
    with pytest.raises(ValueError, match="taken"):  # another model under the name
        repsim.register_model("tiny_mlp_test")(lambda num_classes: nn.Linear(3, num_classes))


def test_cli_imports_a_module_that_registers_a_model(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "import repsim\nfrom torch import nn\n\n"
        "@repsim.register_model('cli_mlp', input_size=4)\n"
        "def cli_mlp(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(48, num_classes))\n")
    r = subprocess.run([sys.executable, "-m", "repsim", "--import", "my_models", "cka",
                        "--a", "cli_mlp", "--weights-a", "random", "--b", "cli_mlp",
                        "--weights-b", "random", "--n", "20", "--json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    bad = subprocess.run([sys.executable, "-m", "repsim", "--import", "no_such_mod", "cka",
                          "--a", "x", "--b", "y"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "--import no_such_mod" in bad.stderr


def test_import_repsim_is_light():
    code = "import sys, repsim; print('torch' in sys.modules, callable(repsim.cka_matrix))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["False", "True"]


def test_a_registered_models_store_follows_its_architecture(cifar_root, private_registry):
    # The user edits a registered model's width: random weights of the new architecture must
    # not be read from the old architecture's store, which has the same name and settings.
    from repsim.extraction import ExtractConfig, extract
    from repsim.store import Store

    def register(width: int) -> dict:
        registry._REGISTRY.pop("arch_test", None)
        repsim.register_model("arch_test", input_size=4)(lambda num_classes: nn.Sequential(
            nn.Flatten(), nn.Linear(48, width), nn.Linear(width, num_classes)))
        res = extract(ExtractConfig(model="arch_test", weights="random", dataset="cifar10",
                                    data_root=str(cifar_root), n=4, layers=["1"],
                                    device="cpu", progress=False))
        with Store(res["path"]) as s:
            return {**res, "width": s["1"].shape[1]}

    five, seven, five_again = register(5), register(7), register(5)
    assert (five["width"], seven["width"]) == (5, 7)
    assert not seven["reused"] and five_again["reused"] and five_again["path"] == five["path"]
    assert registry.canonical_name("vit_cifar") == "vit_cifar"  # built-ins: fixed by repsim


@pytest.mark.parametrize("name", ["", " my_net", "my/net", "my_net.h5", "timm:my_net"])
def test_registration_refuses_a_name_no_command_could_use(name, private_registry):
    # repsim cka takes a name with '/' or a store suffix for a store file; 'timm:' is timm's.
    with pytest.raises(ValueError, match="model name .* (not usable|starts with 'timm:')"):
        repsim.register_model(name)
    assert name not in registry.list_models()


def test_a_registration_decorator_applied_twice_does_not_replace_the_first(private_registry):
    register = repsim.register_model("twice_test", input_size=4)
    first = register(lambda num_classes: nn.Linear(48, num_classes))
    with pytest.raises(ValueError, match="'twice_test' is taken"):
        register(lambda num_classes: nn.Linear(48, 2 * num_classes))
    assert registry.get_entry("twice_test").build is first


def test_a_notebook_cell_run_again_updates_its_model(private_registry):
    """Running a cell with `@register_model("my_net")` twice (after editing the model) said
    "'my_net' is taken" until the kernel restarted; the same function defined again (same
    module and name) replaces its model, while another function under the name is refused."""
    def cell(width):
        @repsim.register_model("rerun_test", input_size=4)
        def my_net(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(48, width), nn.Linear(width, num_classes))
        return my_net

    cell(5)
    second = cell(7)
    assert registry.get_entry("rerun_test").build is second
    assert registry.get_entry("rerun_test").build(2)[1].out_features == 7

    def my_net(num_classes):  # another function (another qualname) under the same name
        return nn.Linear(48, num_classes)
    with pytest.raises(ValueError, match="'rerun_test' is taken"):
        repsim.register_model("rerun_test")(my_net)
    with pytest.raises(ValueError, match="'vit_cifar' is taken"):
        repsim.register_model("vit_cifar")(second)


@pytest.mark.parametrize("name, hint", [("VIT_CIFAR", "did you mean vit_cifar "),
                                        ("Timm:resnet18", "timm:resnet18?"),
                                        ("timm:vit_cifar", "did you mean vit_cifar (a repsim"),
                                        ("timm:RESNET18", "close matches: timm:resnet18,")])
def test_an_unknown_name_lists_its_close_matches(name, hint):
    with pytest.raises(UserError) as e:
        registry.get_spec(name)
    assert hint in str(e.value) and "\n" not in str(e.value)



SEEDED = ["repsim.extraction:extract", "repsim.evaluation:evaluate_model", "repsim.compare:run_cka",
          "repsim.figures.attention:run_attention", "repsim.figures.featuremaps:run_featuremaps"]


def _seeded_config(target: str):
    """The config of ``target`` with weights_seed(_b)=3 and the models' own weights."""
    from repsim.compare import CKAConfig
    from repsim.evaluation import EvalConfig
    from repsim.extraction import ExtractConfig
    from repsim.figures.attention import AttentionConfig
    from repsim.figures.featuremaps import FeatureMapsConfig

    return {SEEDED[0]: lambda: ExtractConfig(model="vit_cifar", weights_seed=3),
            SEEDED[1]: lambda: EvalConfig(model="vit_cifar", weights_seed=3),
            SEEDED[2]: lambda: CKAConfig(a="vit_cifar", b="resnet18_cifar", weights_seed_b=3),
            SEEDED[3]: lambda: AttentionConfig(models=["vit_cifar"], weights_seed=3),
            SEEDED[4]: lambda: FeatureMapsConfig(model="resnet18_cifar", weights_seed=3),
            }[target]()


@pytest.mark.parametrize("target", SEEDED)
def test_the_library_refuses_a_weights_seed_that_seeds_nothing(target, tmp_path, monkeypatch):
    """Not only the CLI: each library entry point refuses a seed with the model's own weights
    before any work (the CLI's check, repsim.weights.check_weights_seeds)."""
    import importlib

    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path))
    module, name = target.split(":")
    with pytest.raises(UserError, match=r"^weights_seed(_b)?=3 has no effect"):
        getattr(importlib.import_module(module), name)(_seeded_config(target))


def test_a_figure_of_a_registered_model_with_random_weights_follows_its_architecture(
        tmp_path, private_registry):
    # A figure's inputs are fingerprinted without extracting: random weights of an edited
    # architecture must not count as the figure's old input.
    from repsim.figures.context import FigureContext

    def fingerprint(width: int):
        registry._REGISTRY.pop("arch_fig", None)
        repsim.register_model("arch_fig", input_size=4)(lambda num_classes: nn.Sequential(
            nn.Flatten(), nn.Linear(48, width), nn.Linear(width, num_classes)))
        return FigureContext(tmp_path).fingerprint(
            {"type": "model", "ref": {"model": "arch_fig", "weights": "random"}})

    assert fingerprint(5) != fingerprint(7) and fingerprint(5) == fingerprint(5)
    builtin = FigureContext(tmp_path).fingerprint(
        {"type": "model", "ref": {"model": "vit_cifar", "weights": "random"}})
    assert builtin == {"ref": "random"}  # built-ins keep their keys


def test_cached_attention_distances_follow_a_registered_vits_architecture(
        cifar_root, tmp_path, monkeypatch, capsys, private_registry):
    # Same name, random weights, same seed: a patch size of 8 instead of 4 is another model,
    # and its distances must be measured, not read from the cache of the first.
    import json

    from timm.models.vision_transformer import VisionTransformer

    from repsim.cli import main

    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))

    def reused(patch: int) -> bool:
        registry._REGISTRY.pop("arch_vit", None)
        repsim.register_model("arch_vit", family="vit", input_size=16)(
            lambda num_classes: VisionTransformer(
                img_size=16, patch_size=patch, embed_dim=16, depth=1, num_heads=2,
                num_classes=num_classes))
        assert main(["attention", "--model", "arch_vit", "--weights", "random", "--data-root",
                     str(cifar_root), "--probe", "4", "--images", "1", "--out",
                     str(tmp_path / "fig"), "--json"]) == 0
        (res,) = json.loads(capsys.readouterr().out)["reused"]
        return res

    assert [reused(4), reused(8), reused(4)] == [False, False, True]


def test_attention_of_a_model_not_registered_as_a_vit_says_how_to_register_one(
        private_registry):
    from repsim.figures.attention import check_vit

    repsim.register_model("plain_net")(lambda num_classes: nn.Linear(3, num_classes))
    with pytest.raises(UserError, match=r"^plain_net is not registered as a ViT, and .*"
                                        r"register your own with family='vit'"):
        check_vit("plain_net")


def test_a_loader_of_dict_batches_gives_their_images():
    # A loader of {"image": x, "label": y} batches (Hugging Face style) failed in
    # torch.as_tensor with "Could not infer dtype of dict".
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(5, 3, 2, 2)
    loader = [{"image": x[:3], "label": torch.zeros(3)}, {"image": x[3:], "label": torch.ones(2)}]
    out = repsim.extract(net, loader, layers="1")["1"]
    np.testing.assert_allclose(out, net(x).detach().numpy(), rtol=1e-6, atol=1e-6)


def test_a_dict_batch_without_an_image_key_is_one_user_error_naming_its_keys():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(UserError, match=r"batch is a dict with keys 'a', 'b'; valid: .*'image'"):
        repsim.extract(net, [{"a": torch.rand(2, 12), "b": torch.zeros(2)}], layers="1")


class _TimeFirst(nn.Module):
    """Takes (b, T, D) but runs ``inner`` on (T, b, D), as modules without batch_first do."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


def test_a_layer_whose_rows_are_not_the_samples_is_refused():
    # Its (T, b, D) output gave T rows per batch of b images: 3 rows for 2 samples, silently,
    # and in the store a broadcasting error from h5py.
    with pytest.raises(UserError, match=r"layer 'inner' gave 3 rows for a batch of 2 inputs"):
        repsim.extract(_TimeFirst(), torch.rand(2, 3, 4), layers="inner", reduce="mean")


class _Score(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(x).squeeze(1)


def test_a_layer_with_one_value_per_sample_is_a_one_column_matrix():
    # A (b,) output raised IndexError from flatten(1).
    net = nn.Sequential(_Score())
    x = torch.rand(3, 4)
    out = repsim.extract(net, x, layers="0")["0"]
    np.testing.assert_allclose(out, net(x).detach().numpy()[:, None], rtol=1e-6)


def test_a_single_non_string_layer_is_one_user_error():
    # layers=1 (an index, not the name "1") raised "'int' object is not iterable".
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UserError, match=r"layers=1 is not a layer request; valid: names"):
        repsim.extract(net, torch.rand(3, 4), layers=1)


class _Twice(nn.Module):
    """Calls ``act`` twice per pass, as torchvision's BasicBlock calls its ``relu``."""

    def __init__(self):
        super().__init__()
        self.a, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.act(self.a(self.act(x)) - 1)


def test_a_layer_called_twice_in_one_pass_is_refused_not_its_last_call():
    # layers="layer1.0.relu" of a torchvision ResNet gave the block's output (the relu's 2nd
    # call), silently: which call a name means is ambiguous.
    with pytest.raises(UserError, match=r"layer 'act' ran 2 times in one forward pass"):
        repsim.extract(_Twice(), torch.rand(3, 4), layers="act")


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.head(x)}


def test_a_layer_whose_output_is_not_a_tensor_is_one_user_error():
    # A layer returning a dict (Hugging Face style) raised "'dict' object has no attribute
    # 'detach'" from inside the hook.
    net = nn.ModuleDict({"body": _DictOut()})
    net.forward = lambda x: net["body"](x)["logits"]
    with pytest.raises(UserError, match=r"layer 'body' outputs a dict; valid: layers whose "
                                        r"output is a tensor"):
        repsim.extract(net, torch.rand(3, 4), layers="body")
    assert not net["body"]._forward_hooks


def test_a_module_given_directly_runs_where_its_parameters_are(monkeypatch):
    # On a machine with a GPU, extract() moved the user's CPU module there by default and left
    # it there: their next net(x) on a CPU tensor failed. (The GPU is faked: with none here,
    # moving to it fails.)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    net = nn.Sequential(nn.Linear(4, 2))
    x = torch.rand(3, 4)
    out = repsim.extract(net, x, layers="0")["0"]
    assert next(net.parameters()).device.type == "cpu"
    np.testing.assert_allclose(out, net(x).detach().numpy(), rtol=1e-6)


def test_an_explicit_device_sends_the_module_back_where_it_was():
    # extract(net, x, device=d) moved the caller's module to d and left it there: their next
    # net(x) on their own device failed. (A CPU has one device: a spy records where net is
    # sent, moving nothing; 'cpu:1' is another device to torch that tensors can go to.)
    net = nn.Sequential(nn.Linear(4, 2))
    sent = []
    net.to = lambda dev: sent.append(torch.device(dev)) or net
    repsim.extract(net, torch.rand(3, 4), layers="0", device="cpu:1")
    assert sent == [torch.device("cpu:1"), torch.device("cpu")]


def test_a_layer_output_a_later_op_changes_in_place_is_kept_as_the_layer_gave_it():
    # A view of the output was kept, so nn.ReLU(inplace=True) after the layer (torchvision's
    # ResNets: bn1 -> relu; bn2 -> out += identity) rewrote it: layer '0' came back as relu(0).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = net[0](x).numpy()
    assert (want < 0).any()
    np.testing.assert_allclose(repsim.extract(net, x, layers="0")["0"], want, rtol=1e-6)


@pytest.mark.parametrize("how", ["flatten", "mean", "cls", "prefix"])
def test_each_reduction_of_a_vit_with_registers_equals_its_hand_computation(how):
    # Class token first, then 2 registers, then 16 patch tokens (timm's order): 'mean' averages
    # the patches only, 'cls' is token 0, 'prefix' the 3 prefix tokens side by side.
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=2, num_heads=2,
                            num_classes=3, reg_tokens=2).eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        tokens = net.blocks[1](net.blocks[0](net.norm_pre(net._pos_embed(net.patch_embed(x)))))
    want = {"flatten": tokens.flatten(1), "mean": tokens[:, 3:].mean(1), "cls": tokens[:, 0],
            "prefix": tokens[:, :3].flatten(1)}[how]
    got = repsim.extract(net, x, layers="blocks.1", reduce=how)["blocks.1"]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_a_layer_that_takes_no_hooks_leaves_no_hook_on_the_others():
    # Hooks were registered in one list comprehension: when the second layer refused one (a
    # TorchScript module), the first kept its hook for good, and the error was torch's.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
        net = nn.Sequential(nn.Linear(4, 4), torch.jit.script(nn.Linear(4, 4)))
    with pytest.raises(UserError, match=r"layer '1' takes no forward hooks \(register_"):
        repsim.extract(net, torch.rand(3, 4), layers=["0", "1"])
    assert not net[0]._forward_hooks


def test_a_numpy_integer_batch_size_is_a_positive_integer():
    # np.int64(2) (from a config array or np.arange) was refused: "is not valid; pass a
    # positive integer".
    net = nn.Sequential(nn.Linear(4, 4))
    assert repsim.extract(net, torch.rand(3, 4), layers="0", batch_size=np.int64(2))["0"].shape \
        == (3, 4)


def test_a_dataset_of_samples_is_batched_not_taken_for_batches():
    # Each (x_i, y_i) sample of a Dataset was fed as a batch: x_i (3, 4, 4) ran unbatched and
    # its channels passed for samples.
    net = nn.Sequential(nn.Conv2d(3, 2, 1))
    x = torch.rand(5, 3, 4, 4)
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(5))
    out = repsim.extract(net, dataset, layers="0", batch_size=2)["0"]
    np.testing.assert_allclose(out, net(x).detach().flatten(1).numpy(), rtol=1e-6)


def test_a_numpy_array_with_negative_strides_is_read_as_its_values():
    # images[..., ::-1] (BGR -> RGB) or x[::-1] are numpy views with negative strides, which
    # torch.as_tensor refused with a ValueError from deep inside the loop.
    net = nn.Sequential(nn.Linear(4, 3))
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    with torch.no_grad():
        want = net(torch.from_numpy(x[::-1, ::-1].copy())).numpy()
    np.testing.assert_allclose(repsim.extract(net, x[::-1, ::-1], layers="0", batch_size=2)["0"],
                               want, rtol=1e-6)


def test_without_device_a_module_is_not_moved_at_all():
    # extract() without device= called net.to(the first parameter's device): a model split
    # across devices (its first half on one GPU, the rest on another, as accelerate's
    # device_map places it) was gathered onto one device and left there. (A spy records
    # where net is sent.)
    net = nn.Sequential(nn.Linear(4, 2))
    sent = []
    net.to = lambda *a, **k: sent.append((a, k)) or net
    repsim.extract(net, torch.rand(3, 4), layers="0")
    assert sent == []
