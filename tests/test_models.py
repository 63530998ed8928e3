"""Model zoo: architectures, layer names, weights loading rules and preprocessing (offline)."""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import timm.models._builder
import torch
import torchvision

from repsim import hooks
from repsim import models as M
from repsim import registry as R
from repsim import weights as W
from repsim.errors import UserError


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def capture(model: torch.nn.Module, spec: R.ModelSpec, layers: list[str], x: torch.Tensor):
    """Forward ``x`` and return {layer: unreduced output} (repsim's own hooks)."""
    with torch.no_grad(), hooks.capture(model, layers, reduce=None, spec=spec) as cap:
        model(x)
    return {name: cap.outputs[name] for name in layers}


@pytest.fixture(scope="module")
def vit():
    return M.build_model("vit_cifar", seed=0)


@pytest.fixture(scope="module")
def resnet():
    return M.build_model("resnet18_cifar", seed=0)


@pytest.fixture
def ckpt_dir(tmp_path, monkeypatch):
    d = tmp_path / "ckpts"
    d.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(d))
    return d


class NotATensorDict(collections.OrderedDict):
    """An OrderedDict subclass: unpickling it would need to import this module."""


class Payload:
    pass


# --------------------------------------------------------------------------- architectures


def test_registry_and_specs():
    assert R.list_models() == ["vit_cifar", "resnet18_cifar", "vit_imagenet", "resnet18_imagenet",
                               *R.TINYVIT_MODELS]
    s = R.get_spec("vit_cifar")
    assert (s.family, s.input_size, s.num_classes) == ("vit", 32, 10)
    assert s.mean == (0.0, 0.0, 0.0) and s.std == (1.0, 1.0, 1.0)
    assert s.default_weights == "checkpoints/vit_cifar.pt"
    # The ImageNet specs are written out so that the registry needs no torch; they must stay
    # what timm's pretrained config and torchvision's transforms() say.
    v, arch = R.get_spec("vit_imagenet"), "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert v == dataclasses.replace(R.get_spec(arch), name=v.name, description=v.description)
    assert (v.input_size, v.interpolation) == (224, "bicubic")
    assert v.mean == v.std == (0.5, 0.5, 0.5)
    assert R.get_entry("vit_imagenet").pretrained_tag == R.get_entry(arch).pretrained_tag == arch
    r, w = R.get_spec("resnet18_imagenet"), torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    tf = w.transforms()
    assert (r.input_size, r.mean, r.std, r.interpolation, r.num_classes) == (
        tf.crop_size[0], tuple(tf.mean), tuple(tf.std), tf.interpolation.value,
        len(w.meta["categories"]))
    assert R.get_entry("resnet18_imagenet").pretrained_tag == f"torchvision:{w}"
    info = R.preprocessing_info(v)
    assert info == {
        "input_size": 224,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
    }


def test_specs_need_neither_torch_nor_timm():
    code = ("import sys; from repsim import registry as R; from repsim.weights import sha256_file; "
            "[R.default_weights_file(R.get_spec(n)) for n in R.list_models()]; "
            "print(sorted({'torch', 'torchvision', 'timm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]"]


def test_param_counts_and_forward(vit, resnet):
    assert 9.4e6 <= n_params(vit) <= 9.6e6
    assert 11.1e6 <= n_params(resnet) <= 11.3e6
    assert not vit.training and not resnet.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert vit(x).shape == (2, 10)
        assert resnet(x).shape == (2, 10)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert resnet.conv1.bias is None
    blk = vit.blocks[0]
    assert blk.mlp.fc1.out_features == 512 and blk.attn.num_heads == 8
    assert vit.pos_drop.p == 0.1 and blk.attn.proj_drop.p == 0.1 and blk.attn.attn_drop.p == 0


def test_build_is_seeded_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = M.build_model("resnet18_cifar", seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)  # build_model does not consume the global RNG
    b = M.build_model("resnet18_cifar", seed=1)
    c = M.build_model("resnet18_cifar", seed=2)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert M.build_model("resnet18_cifar", num_classes=7).fc.out_features == 7
    with pytest.raises(UserError, match="num_classes"):
        M.build_model("resnet18_cifar", num_classes=0)


def test_vit_block_hooks_match_timm_intermediates(vit):
    spec = R.get_spec("vit_cifar")
    x = torch.rand(2, 3, 32, 32)
    names = [f"blocks.{i}" for i in range(6)]
    got = capture(vit, spec, ["embed", *names], x)
    with torch.no_grad():
        inter = vit.forward_intermediates(x, intermediates_only=True, norm=False, output_fmt="NLC")
    # timm splits off the class token; the hook sees it at position 0.
    assert len(inter) == 6 and vit.num_prefix_tokens == 1
    for name, ref in zip(names, inter):
        assert got[name].shape == (2, 65, 512)
        torch.testing.assert_close(got[name][:, vit.num_prefix_tokens :], ref)
    # "embed" is exactly the input of blocks.0.
    with torch.no_grad():
        torch.testing.assert_close(vit.blocks[0](got["embed"]), got["blocks.0"])
        tokens = vit._pos_embed(vit.patch_embed(x))
    torch.testing.assert_close(got["embed"], tokens)


def test_resnet_stage_hooks_match_manual_forward(resnet):
    spec = R.get_spec("resnet18_cifar")
    x = torch.rand(2, 3, 32, 32)
    layers = M.layer_names(resnet, spec)
    got = capture(resnet, spec, layers, x)
    with torch.no_grad():
        h = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        torch.testing.assert_close(got["stem"], h)
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(resnet, stage)(h)
            torch.testing.assert_close(got[stage], h)
    assert got["stem"].shape == (2, 64, 32, 32) and got["layer4"].shape == (2, 512, 4, 4)


# --------------------------------------------------------------------------- layer names


def test_default_and_blocks_layers(vit, resnet):
    vs, rs = R.get_spec("vit_cifar"), R.get_spec("resnet18_cifar")
    vit_default = ["embed"] + [f"blocks.{i}" for i in range(6)]
    assert M.layer_names(vit, vs) == vit_default
    assert M.layer_names(vit, vs, "default") == vit_default
    assert M.layer_names(vit, vs, "blocks") == vit_default
    assert M.layer_names(resnet, rs) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert M.layer_names(resnet, rs, "blocks") == ["stem"] + [
        f"layer{i}.{j}" for i in range(1, 5) for j in range(2)
    ]
    assert M.module_for(vit, vs, "embed") is vit.norm_pre
    assert M.module_for(resnet, rs, "stem") is resnet.maxpool
    assert M.module_for(resnet, rs, "layer2.1") is resnet.layer2[1]


def test_globs_lists_and_commas_keep_model_order(vit, resnet):
    vs, rs = R.get_spec("vit_cifar"), R.get_spec("resnet18_cifar")
    assert M.layer_names(vit, vs, "blocks.*") == [f"blocks.{i}" for i in range(6)]
    assert M.layer_names(vit, vs, "blocks.5,blocks.0") == ["blocks.0", "blocks.5"]
    assert M.layer_names(vit, vs, ["blocks.3", "embed", "blocks.?", "embed"]) == [
        "embed",
        *[f"blocks.{i}" for i in range(6)],
    ]
    assert M.layer_names(vit, vs, "blocks.[01].mlp") == ["blocks.0.mlp", "blocks.1.mlp"]
    assert M.layer_names(resnet, rs, "layer?.1") == [f"layer{i}.1" for i in range(1, 5)]
    # An alias sits at its module's position (stem before layer1 even if asked later).
    assert M.layer_names(resnet, rs, ["layer1", "stem", "maxpool"]) == ["stem", "maxpool", "layer1"]


def test_unknown_layer_suggests_a_glob_of_the_models_own_family(vit, resnet):
    with pytest.raises(UserError, match=r"globs like 'layer1\.\*'") as e:
        M.layer_names(resnet, R.get_spec("resnet18_cifar"), "layer9")
    assert "blocks.*" not in str(e.value)
    with pytest.raises(UserError, match=r"globs like 'blocks\.\*'"):
        M.layer_names(vit, R.get_spec("vit_cifar"), "blokcs.1")


def test_unknown_layer_suggests_close_match(vit, resnet):
    vs = R.get_spec("vit_cifar")
    with pytest.raises(UserError, match="blocks.1") as e:
        M.layer_names(vit, vs, "blokcs.1")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="'layer9'"):
        M.layer_names(resnet, R.get_spec("resnet18_cifar"), ["layer1", "layer9"])
    with pytest.raises(UserError, match="nothing"):
        M.layer_names(vit, vs, "nothing.*")
    with pytest.raises(UserError, match="embed"):
        M.module_for(vit, vs, "embd")
    with pytest.raises(UserError):
        M.layer_names(vit, vs, " , ")


# --------------------------------------------------------------------------- specs


def test_get_spec_errors_and_timm_prefix():
    with pytest.raises(UserError, match="vit_cifar") as e:
        R.get_spec("vit_cfiar")
    assert "did you mean" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="timm:resnet18"):
        R.get_spec("resnet18")  # a bare timm name: suggest the prefix
    with pytest.raises(UserError, match="nonexistent_model_xyz"):
        R.get_spec("timm:nonexistent_model_xyz")
    spec = R.get_spec("timm:resnet18")
    assert (spec.family, spec.input_size, spec.num_classes) == ("resnet", 224, 1000)
    assert spec.default_weights == "timm" and "timm:resnet18" not in R.list_models()
    assert R.get_spec("timm:vit_tiny_patch16_224").family == "vit"
    model = M.build_model("timm:resnet18", num_classes=5)
    assert model.fc.out_features == 5 and not model.training
    assert M.layer_names(model, spec) == ["stem", "layer1", "layer2", "layer3", "layer4"]


# --------------------------------------------------------------------------- weights


def test_load_state_dict_file_exact(tmp_path):
    src = M.build_model("vit_cifar", seed=7)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    model, prov = M.load_model("vit_cifar", weights=str(path), seed=0)
    assert not model.training
    for (k, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert prov == {
        "model": "vit_cifar",
        "weights": str(path),
        "weights_sha256": W.sha256_file(path),
        "num_classes": 10,
        "seed": 0,
    }
    assert len(prov["weights_sha256"]) == 64


def test_load_half_checkpoint_dict_module_prefix_and_num_classes(tmp_path):
    src = M.build_model("resnet18_cifar", num_classes=100, seed=3)
    sd = {
        f"module.{k}": v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()
    }
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "model": "resnet18_cifar", "num_classes": 100, "epoch": 5}, path)
    model, prov = M.load_model("resnet18_cifar", weights=path)
    assert prov["num_classes"] == 100 and model.fc.out_features == 100  # inferred from fc.weight
    for k, v in model.state_dict().items():
        ref = src.state_dict()[k]
        assert v.dtype == ref.dtype, k
        if v.is_floating_point():
            torch.testing.assert_close(v, ref.half().float(), rtol=0, atol=0)
    # An explicit, contradicting num_classes is a shape error, not a silent head reset.
    with pytest.raises(UserError, match="fc.weight"):
        M.load_model("resnet18_cifar", weights=path, num_classes=10)


def test_load_vit_half_checkpoint(tmp_path):
    src = M.build_model("vit_cifar", seed=5)
    path = tmp_path / "vit16.pt"
    torch.save(
        {"state_dict": {k: v.half() for k, v in src.state_dict().items()}, "model": "vit_cifar"},
        path,
    )
    model, _ = M.load_model("vit_cifar", weights=path)
    assert model.cls_token.dtype == torch.float32
    torch.testing.assert_close(model.cls_token, src.cls_token.half().float(), rtol=0, atol=0)


def test_wrong_architecture_file(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(
        {"state_dict": M.build_model("resnet18_cifar").state_dict(), "model": "resnet18_cifar"},
        path,
    )
    with pytest.raises(UserError) as e:
        M.load_model("vit_cifar", weights=path)
    msg = str(e.value)
    assert "vit_cifar" in msg and "resnet18_cifar" in msg and "\n" not in msg
    n_vit = len(M.build_model("vit_cifar").state_dict())
    n_res = len(M.build_model("resnet18_cifar").state_dict())
    assert f"{n_vit} missing" in msg and f"{n_res} unexpected" in msg


@pytest.mark.parametrize(
    "obj", [{"x": Payload()}, NotATensorDict(w=torch.zeros(2))], ids=["object", "dict-subclass"]
)
def test_unsafe_pickle_refused(tmp_path, obj):
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    with pytest.raises(UserError, match="arbitrary Python objects") as e:
        M.load_model("vit_cifar", weights=path)
    assert "refuses to unpickle" in str(e.value) and "\n" not in str(e.value)


def test_corrupt_missing_and_odd_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all \x00\x01\x02")
    with pytest.raises(UserError, match="corrupt"):
        M.load_model("vit_cifar", weights=bad)
    good = tmp_path / "good.pt"
    torch.save(M.build_model("resnet18_cifar").state_dict(), good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(UserError, match="corrupt"):
        M.load_model("resnet18_cifar", weights=trunc)
    with pytest.raises(UserError, match="does not exist"):
        M.load_model("vit_cifar", weights=tmp_path / "nope.pt")
    notsd = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notsd)
    with pytest.raises(UserError, match="not a state dict"):
        M.load_model("vit_cifar", weights=notsd)
    with pytest.raises(UserError, match="not tensors"):
        torch.save({"epoch": 3, "net": {}}, notsd)
        M.load_model("vit_cifar", weights=notsd)


def test_default_weights_from_checkpoint_dir(ckpt_dir):
    with pytest.raises(UserError, match="repsim train --model vit_cifar") as e:
        M.load_model("vit_cifar")
    assert "weights='random'" in str(e.value) and "\n" not in str(e.value)
    src = M.build_model("resnet18_cifar", seed=4)
    torch.save(
        {"state_dict": src.state_dict(), "model": "resnet18_cifar"}, ckpt_dir / "resnet18_cifar.pt"
    )
    model, prov = M.load_model("resnet18_cifar")
    assert prov["weights"] == str(ckpt_dir / "resnet18_cifar.pt")
    assert torch.equal(model.conv1.weight, src.conv1.weight)


def test_random_weights_are_seeded():
    a, pa = M.load_model("resnet18_cifar", "random", seed=1)
    b, _ = M.load_model("resnet18_cifar", "random", seed=1)
    c, _ = M.load_model("resnet18_cifar", "random", seed=2)
    assert torch.equal(a.fc.weight, b.fc.weight) and not torch.equal(a.fc.weight, c.fc.weight)
    assert pa == {
        "model": "resnet18_cifar",
        "weights": "random",
        "weights_sha256": None,
        "num_classes": 10,
        "seed": 1,
    }
    with pytest.raises(UserError, match="not available"):
        M.load_model("vit_cifar", "timm")
    with pytest.raises(UserError, match="device"):
        M.load_model("resnet18_cifar", "random", device="gpu0")


@pytest.mark.parametrize("name", ["vit_imagenet", "resnet18_imagenet"])
def test_imagenet_models_from_local_file(tmp_path, name, monkeypatch):
    # Any network access would be a bug: make pretrained fetching fail loudly.
    def no_network(*_a, **_k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    src = M.build_model(name, seed=9)
    path = tmp_path / f"{name}.pt"
    torch.save(src.state_dict(), path)
    model, prov = M.load_model(name, weights=path)
    assert prov["num_classes"] == 1000 and prov["weights_sha256"] == W.sha256_file(path)
    first = next(iter(src.state_dict()))
    assert torch.equal(model.state_dict()[first], src.state_dict()[first])
    spec = R.get_spec(name)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    expected = 12 if name == "vit_imagenet" else 4
    assert len(M.layer_names(model, spec)) == expected + 1


def test_pretrained_unavailable_offline_is_a_user_error(monkeypatch):
    def offline(*_a, **_k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="unavailable") as e:
        M.load_model("vit_imagenet")
    msg = str(e.value)
    assert "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k" in msg and "\n" not in msg
    assert "weights=PATH" in msg and "internet" in msg


def test_weights_problem_looks_for_pretrained_weights_without_loading_them(monkeypatch):
    # Checking a figure's inputs must not load ViT-B/16 (330 MB) only to load it again.
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm built it"))
    monkeypatch.setattr(M, "_weights_cache", lambda tag: ("huggingface.co", True, "/hub"))
    assert M.weights_problem("vit_imagenet", None) is None
    monkeypatch.setattr(M, "_weights_cache", lambda tag: ("huggingface.co", False, "/hub"))
    monkeypatch.setenv("REPSIM_OFFLINE", "1")
    problem = M.weights_problem("vit_imagenet", None)
    assert problem.startswith("pretrained weights timm:vit_base_patch16_224") and "/hub" in problem


def test_weights_problem_of_pretrained_weights_named_explicitly_loads_nothing(monkeypatch):
    # weights="timm" is the default of vit_imagenet written out: looked for, not loaded.
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(M, "_weights_cache", lambda tag: ("huggingface.co", True, "/hub"))
    assert M.weights_problem("vit_imagenet", "timm") is None


@pytest.mark.parametrize("command,model,switch", [
    ("extract", "vit_imagenet", "REPSIM_OFFLINE"), ("eval", "resnet18_imagenet", "HF_HUB_OFFLINE")])
def test_offline_without_cached_weights_fails_at_once_naming_the_cache(tmp_path, command,
                                                                       model, switch):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update({switch: "1", "HF_HOME": str(tmp_path / "hf"),
                "TORCH_HOME": str(tmp_path / "torch")})  # empty caches
    r = subprocess.run([sys.executable, "-m", "repsim", command, "--model", model, "--n", "2"],
                       capture_output=True, text=True, env=env, timeout=60)  # no hub retries
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()
    assert "downloads are off" in line and str(tmp_path) in line and "--weights PATH" in line


def test_cached_pretrained_weights_load_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("REPSIM_OFFLINE", "1")
    src = M.build_model("resnet18_imagenet", seed=3)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(src.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model, prov = M.load_model("resnet18_imagenet")
    assert torch.equal(model.fc.weight, src.fc.weight)
    assert prov["weights"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_cifar_identity_scaling():
    spec = R.get_spec("vit_cifar")
    imgs = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    imgs[0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    x = M.preprocess(spec, imgs)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([0.0, 1.0, 128 / 255]))
    torch.testing.assert_close(x, imgs.permute(0, 3, 1, 2).float() / 255)


def test_preprocess_imagenet_resizes_and_normalises():
    spec = R.get_spec("vit_imagenet")
    imgs = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8)
    imgs[1] = 0
    x = M.preprocess(spec, imgs)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.ones(3, 224, 224))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(x[1], -torch.ones(3, 224, 224))
    r = M.preprocess(R.get_spec("resnet18_imagenet"), imgs[:1])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(r[0], ((1 - mean) / std).expand(3, 224, 224))


def test_preprocess_rejects_bad_input():
    spec = R.get_spec("vit_cifar")
    with pytest.raises(UserError, match="uint8"):
        M.preprocess(spec, torch.zeros(2, 32, 32, 3))
    with pytest.raises(UserError, match=r"\(n, H, W, 3\)"):
        M.preprocess(spec, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("settings, valid", [
    ({"weights": None, "weights_seed": 3}, False),  # the model's own (trained) weights
    ({"weights": "a.pt", "weights_seed": -1}, False),
    ({"weights": "random", "weights_seed": 3}, True),
    ({"weights": "a.pt", "weights_seed": 0}, True),  # 0: the default, no seed given
    ({"weights": ["a.pt", "random"], "weights_seed": 2}, True),  # attention: one random model
    ({"weights": [], "weights_seed": 2}, False),
    ({"weights_a": "random", "weights_seed_a": 1, "weights_b": None, "weights_seed_b": 0}, True),
    ({"weights_a": "random", "weights_seed_a": 1, "weights_b": "s0.pt,s1.pt",
      "weights_seed_b": 1}, False),
])
def test_a_weights_seed_where_no_weights_are_random_is_refused(settings, valid):
    if valid:
        W.check_weights_seeds(settings)
        return
    with pytest.raises(UserError) as e:
        W.check_weights_seeds(settings)
    side = "_b" if "weights_b" in settings else ""
    seed = settings[f"weights_seed{side}"]
    msg = str(e.value)
    assert msg.startswith(f"weights_seed{side}={seed} has no effect: it seeds random weights")
    assert f"pass weights{side}='random'" in msg and "\n" not in msg


# --------------------------------------------------------------------------- user models


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations made by a test stay in that test."""
    monkeypatch.setattr(R, "_REGISTRY", dict(R._REGISTRY))


def _flat(num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, num_classes))


def test_a_user_models_relative_default_weights_keep_their_subfolder(ckpt_dir, private_registry):
    # Two seeds' files of the same name: each model must read its own, not <dir>/net.pt.
    R.register_model("seed1_net", input_size=4, weights="seed1/net.pt")(_flat)
    R.register_model("seed2_net", input_size=4, weights="seed2/net.pt")(_flat)
    for seed in (1, 2):
        (ckpt_dir / f"seed{seed}").mkdir()
        torch.save(M.build_model(f"seed{seed}_net", seed=seed).state_dict(),
                   ckpt_dir / f"seed{seed}" / "net.pt")
    assert R.default_weights_file(R.get_spec("seed1_net")) == ckpt_dir / "seed1" / "net.pt"
    a, _ = M.load_model("seed1_net")
    b, _ = M.load_model("seed2_net")
    assert not torch.equal(a[1].weight, b[1].weight)
    assert R.default_weights_file(R.get_spec("vit_cifar")) == ckpt_dir / "vit_cifar.pt"


WIDTH = {"hidden": 8}  # a notebook's global that the registered builder reads


class _EditedNet(torch.nn.Sequential):
    def __init__(self, num_classes: int) -> None:
        super().__init__(torch.nn.Flatten(), torch.nn.Linear(48, WIDTH["hidden"]),
                         torch.nn.Linear(WIDTH["hidden"], num_classes))


def test_a_user_models_name_follows_its_class_edited_without_registering_again(
        private_registry, monkeypatch):
    # A notebook: the cell defining the class is edited and rerun, the register cell is not.
    # The digest was cached per registration, so stores of the old width were reused.
    R.register_model("edited_net", input_size=4)(lambda num_classes: _EditedNet(num_classes))
    narrow = R.canonical_name("edited_net")
    monkeypatch.setitem(WIDTH, "hidden", 64)
    wide = R.canonical_name("edited_net")
    monkeypatch.setitem(WIDTH, "hidden", 8)
    assert wide != narrow and R.canonical_name("edited_net") == narrow


class _ReluNet(torch.nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1)).relu()


class _TanhNet(torch.nn.Module):  # the same class after an edit of its forward() alone
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1)).tanh()


_TanhNet.__qualname__ = _ReluNet.__qualname__


def test_a_user_models_name_follows_an_edit_of_its_forward(private_registry, monkeypatch):
    # README: "edit MyNet and they are made again". Modules and shapes alone were digested,
    # so a forward() that now applies tanh reused the stores and results made with relu.
    net = {"cls": _ReluNet}
    R.register_model("forward_net", input_size=4)(lambda num_classes: net["cls"](num_classes))
    relu = R.canonical_name("forward_net")
    monkeypatch.setitem(net, "cls", _TanhNet)
    tanh = R.canonical_name("forward_net")
    monkeypatch.setitem(net, "cls", _ReluNet)
    assert tanh != relu and R.canonical_name("forward_net") == relu


def test_a_user_model_with_default_weights_trains_from_scratch(ckpt_dir, private_registry):
    # The README's own example: weights="my_net.pt" names the file `repsim train` writes, so
    # training must start from random weights, not ask to train first.
    from repsim.train import initial_model

    R.register_model("my_net_test", input_size=4, weights="my_net_test.pt")(_flat)
    model, prov = initial_model("my_net_test", None, 10, 0)
    assert prov["init"] == "random" and isinstance(model, torch.nn.Sequential)
    assert R.default_weights_file(R.get_spec("my_net_test")) == ckpt_dir / "my_net_test.pt"


def test_a_user_models_missing_weights_name_the_train_command_that_finds_it(ckpt_dir,
                                                                            private_registry):
    # "run `repsim train --model my_net`" was answered "unknown --model 'my_net'": the
    # command line knows a user's model only with --import of the module that registers it.
    R.register_model("my_net_test", input_size=4, weights="my_net_test.pt")(_flat)
    with pytest.raises(UserError, match=re.escape(
            f"run `repsim --import {_flat.__module__} train --model my_net_test`")):
        M.load_model("my_net_test")


@pytest.mark.parametrize("kwargs, what", [
    ({"input_size": 32.7}, "input_size=32.7"), ({"input_size": 0}, "input_size=0"),
    ({"input_size": True}, "input_size=True"), ({"num_classes": 2.5}, "num_classes=2.5"),
    ({"num_classes": -1}, "num_classes=-1"), ({"mean": (0.5,)}, r"mean=\(0.5,\)"),
    ({"mean": 0.5}, "mean=0.5"), ({"std": (0.2, 0.0, 0.2)}, r"std=\(0.2, 0.0, 0.2\)"),
    ({"std": (0.2, float("nan"), 0.2)}, "std="), ({"mean": "abc"}, "mean='abc'")])
def test_registration_refuses_sizes_and_normalisation_it_cannot_use(kwargs, what,
                                                                    private_registry):
    # Else input_size=32.7 silently became 32, a one-value mean crashed in preprocess and a
    # zero std turned every input into NaN.
    with pytest.raises(ValueError, match=what):
        R.register_model("bad_args_test", **kwargs)
    assert "bad_args_test" not in R.list_models()


def test_registration_takes_numpy_sizes_and_normalisation(private_registry):
    R.register_model("np_args_test", input_size=np.int64(8), num_classes=np.int32(3),
                     mean=np.array([0.1, 0.2, 0.3]), std=[0.5, 0.5, 0.5])(_flat)
    spec = R.get_spec("np_args_test")
    assert (spec.input_size, spec.num_classes, spec.mean) == (8, 3, (0.1, 0.2, 0.3))
    assert type(spec.input_size) is int and type(spec.mean[0]) is float


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_a_user_model_without_its_familys_layout_still_names_its_layers(family,
                                                                      private_registry):
    # family="vit" on a model without timm's `blocks` (or "resnet" without layer1..4) made
    # every layer request, even an explicit name, an AttributeError.
    R.register_model("layout_test", family=family, input_size=4)(_flat)
    model, spec = M.build_model("layout_test"), R.get_spec("layout_test")
    assert M.layer_names(model, spec, ["1"]) == ["1"]
    assert M.layer_names(model, spec) == M.layer_names(model, spec, "blocks") == ["0", "1"]


@pytest.mark.parametrize("seed", [None, 1.5, "3", True, -1, 2**70])
def test_a_seed_that_is_no_whole_number_is_a_user_error(seed):
    # None was a TypeError traceback; 1.5 drew seed 1's weights but recorded 1.5.
    with pytest.raises(UserError, match=r"seed=.*valid: a whole number >= 0"):
        M.load_model("resnet18_cifar", "random", seed=seed)


def test_a_numpy_seed_is_recorded_as_a_plain_int():
    _, prov = M.load_model("resnet18_cifar", "random", seed=np.int64(2))
    assert type(prov["seed"]) is int and prov["seed"] == 2  # json.dumps refuses np.int64


@pytest.mark.parametrize("weights", [5, 1.0, ["a.pt"]])
def test_weights_that_are_no_path_are_a_user_error(weights):
    with pytest.raises(UserError, match=r"weights=.*valid: a file path"):
        M.load_model("resnet18_cifar", weights)


def test_registration_refuses_a_mean_on_the_0_to_255_scale(private_registry):
    # mmcv/detectron configs give (123.675, 116.28, 103.53): the model sees [0, 1] inputs, so
    # such a mean would shift every input to about -2, silently.
    with pytest.raises(ValueError, match=r"mean=.*0\.\.255 scale.*0\.485"):
        R.register_model("scale_test", mean=(123.675, 116.28, 103.53),
                         std=(58.395, 57.12, 57.375))
    assert "scale_test" not in R.list_models()


def test_registration_refuses_a_std_on_the_0_to_255_scale(private_registry):
    # A mean divided by 255 and a std copied as it was, (58.395, 57.12, 57.375), passed: every
    # input was divided by about 58, to nearly 0, silently.
    with pytest.raises(ValueError, match=r"std=.*0\.\.255 scale.*0\.229"):
        R.register_model("std_scale_test", mean=(0.485, 0.456, 0.406),
                         std=(58.395, 57.12, 57.375))
    assert "std_scale_test" not in R.list_models()

def test_a_file_of_another_class_count_for_a_model_without_head_key_names_the_fix(
        tmp_path, private_registry):
    # README's register_model example has no head_key, so a file trained for 100 classes was
    # built for 10 and refused with "fix: use matching weights=", though they matched.
    R.register_model("head100_test", input_size=4)(_flat)
    torch.save(_flat(100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(UserError, match=r"\(100, 48\) vs \(10, 48\).*register the model "
                                        r"with head_key"):
        M.load_model("head100_test", tmp_path / "c100.pt")

def test_a_numpy_class_count_is_taken_as_a_plain_int(tmp_path):
    # num_classes read from a labels array (np.int64) was refused as "not a positive integer".
    model = M.build_model("resnet18_cifar", num_classes=np.int64(7))
    torch.save(model.state_dict(), tmp_path / "seven.pt")
    for weights in ("random", tmp_path / "seven.pt"):
        _, prov = M.load_model("resnet18_cifar", weights, num_classes=np.int64(7))
        assert type(prov["num_classes"]) is int and prov["num_classes"] == 7


def test_a_headless_model_loads_its_own_state_dict(tmp_path, private_registry):
    # timm's feature models (DINOv2, ...) have num_classes=0 and no head.weight: the spec said
    # 1000 classes, so their own state dicts were refused for 2 missing head keys.
    assert R.get_spec("timm:vit_small_patch14_dinov2").num_classes == 0
    R.register_model("headless_test", input_size=4, num_classes=0)(
        lambda num_classes: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5)))
    torch.save(M.build_model("headless_test", seed=3).state_dict(), tmp_path / "feat.pt")
    model, prov = M.load_model("headless_test", tmp_path / "feat.pt")
    assert prov["num_classes"] == 0 and model[1].out_features == 5
    with pytest.raises(UserError, match="num_classes=0"):  # a model with a head needs one
        M.load_model("resnet18_cifar", "random", num_classes=0)


def test_a_gpu_index_this_machine_lacks_is_a_user_error(monkeypatch):
    # cuda:1 on a one-GPU machine passed, then model.to() died with 'invalid device ordinal'.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"device='cuda:1'.* 1 CUDA GPU.*cuda:0"):
        M.resolve_device("cuda:1")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an mps device")
def test_a_device_type_this_torch_cannot_use_is_a_user_error():
    # 'mps' on Linux passed, then model.to() raised 'not linked with support for mps devices'.
    with pytest.raises(UserError, match="device='mps' is not usable here.*device='cpu'"):
        M.resolve_device("mps")
