"""repsim.evaluation.evaluate: top-1 and loss against hand counts, batch sizes, model modes."""

import math
import types

import numpy as np
import pytest
import torch
from torch import nn

from repsim import evaluation
from repsim.errors import UserError

# preprocess() needs only these fields: 2 px inputs, pixels scaled to [0, 1], no normalising.
SPEC = types.SimpleNamespace(input_size=2, interpolation="bilinear", mean=(0.0, 0.0, 0.0),
                             std=(1.0, 1.0, 1.0), family="toy")


class Guess(nn.Module):
    """Predicts class ``v`` for an image of grey level ``v``: logits ``-|k - v|``, k = 0..4."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(1)  # a submodule whose mode can be frozen

    def forward(self, x):
        v = x[:, 0, 0, 0:1] * 255
        return -(torch.arange(5.0) - v).abs()


def _images(levels):
    x = torch.tensor(levels, dtype=torch.uint8)[:, None, None, None]
    return x.expand(-1, 2, 2, 3).contiguous()


def test_accuracy_and_loss_count_every_image_by_hand():
    # 7 images in batches of 3 (the last one short): 5 labels match the guess, 2 do not.
    levels, labels = [0, 1, 2, 3, 4, 1, 2], torch.tensor([0, 1, 2, 3, 4, 0, 4])
    res = evaluation.evaluate(Guess(), SPEC, _images(levels), labels, batch_size=3)
    assert res["n"] == 7 and res["accuracy"] == pytest.approx(100 * 5 / 7, abs=1e-12)
    logits = -np.abs(np.arange(5.0)[None] - np.array(levels)[:, None])
    nll = [math.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels.tolist())]
    assert res["loss"] == pytest.approx(np.mean(nll), rel=1e-6)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_below_one_is_a_user_error_not_zero_accuracy(batch_size):
    # range(0, n, -1) is empty: no batch ran, and top-1 read 0.00 % with loss 0 over n images;
    # 0 was range()'s own ValueError.
    with pytest.raises(UserError, match=f"batch_size={batch_size} is not valid; pass"):
        evaluation.evaluate(Guess(), SPEC, _images([0, 1]), torch.tensor([0, 1]),
                            batch_size=batch_size)


def test_evaluate_gives_every_module_its_own_mode_back():
    # Training with a frozen part (BatchNorm kept in eval): model.train(True) after the
    # evaluation switched the frozen part back to train mode for the rest of training.
    model = Guess().train()
    model.bn.eval()
    evaluation.evaluate(model, SPEC, _images([0, 1]), torch.tensor([0, 1]))
    assert model.training and not model.bn.training


class Close(nn.Module):
    """Logits 1.0 and 1.004 (class 1 wins) times the grey level: bf16 (8 bits of mantissa)
    rounds both to 1.0, and argmax then names class 0."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2, bias=False)
        self.head.weight.data = torch.tensor([[1.0], [1.004]])

    def forward(self, x):
        return self.head(x[:, 0, 0, 0:1] * 255)


def _cuda_autocast_on_the_cpu(monkeypatch):
    """torch.autocast as a CUDA device sees it here: device 'cuda' becomes bf16 on the CPU."""
    real = torch.autocast

    def autocast(device_type, dtype=None, enabled=True, **kw):
        return real("cpu", dtype=dtype or torch.bfloat16, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", autocast)


def test_top1_on_a_gpu_is_counted_on_float32_logits_not_bf16_ties(monkeypatch):
    # On CUDA evaluate() ran under bf16 autocast: close logits tied and argmax took the lower
    # class (rounding vit_cifar's float32 logits to bf16 alone changed 4 of 1,000 predictions).
    _cuda_autocast_on_the_cpu(monkeypatch)
    x = evaluation.prepare(SPEC, _images([1]))
    with evaluation.autocast(torch.device("cuda")):  # as evaluate() enters it, on a GPU
        logits = Close()(x)
    assert logits.dtype == torch.float32 and logits.argmax(1).tolist() == [1]


def test_fp32_training_on_cuda_gets_no_bf16_autocast(monkeypatch):
    # train.py asks autocast(dev, cpu_bf16=precision == "bf16"); on CUDA it returned bf16
    # autocast whatever was asked, so precision='fp32' trained in bf16 and recorded "fp32".
    _cuda_autocast_on_the_cpu(monkeypatch)
    x = torch.ones(1, 1)
    with evaluation.autocast(torch.device("cuda"), cpu_bf16=False):
        assert Close().head(x).dtype == torch.float32
    with evaluation.autocast(torch.device("cuda"), cpu_bf16=True):
        assert Close().head(x).dtype == torch.bfloat16


@pytest.mark.parametrize("levels, labels", [([], []), ([0, 1, 2], [0, 1])])
def test_images_without_one_label_each_are_refused(levels, labels):
    with pytest.raises(ValueError, match=r"images \(\d+\) and labels \(\d+\)"):
        evaluation.evaluate(Guess(), SPEC, _images(levels).reshape(-1, 2, 2, 3),
                            torch.tensor(labels, dtype=torch.int64))


class _Diverged(Guess):
    """A diverged model: NaN logits for images of grey level 0, else Guess's."""

    def forward(self, x):
        logits = super().forward(x)
        return torch.where(x[:, :1, 0, 0] == 0, torch.nan, logits)


def test_images_with_non_finite_logits_count_as_wrong_with_a_warning():
    # NaN logits argmax to class 0: a diverged model scored the share of class 0, silently.
    with pytest.warns(RuntimeWarning, match="2 of 4 images gave non-finite logits"):
        res = evaluation.evaluate(_Diverged(), SPEC, _images([0, 0, 1, 2]),
                                  torch.tensor([0, 0, 1, 2]))
    assert res["accuracy"] == 50.0 and math.isnan(res["loss"])


def test_int32_labels_count_as_their_values():
    # cross_entropy refuses int32 targets: a RuntimeError for labels from np.int32 arrays.
    res = evaluation.evaluate(Guess(), SPEC, _images([0, 1, 2]),
                              torch.tensor([0, 1, 3], dtype=torch.int32))
    assert res["accuracy"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("data", ["cifar10", ["cifar10"], 3, torch.zeros(2)])
def test_a_foreign_checkpoints_data_entry_of_another_shape_names_no_dataset(tmp_path, data):
    # A user's own {"state_dict": ..., "data": "cifar10"}: ("cifar10" or {}).get was an
    # AttributeError traceback from repsim eval (a tensor: RuntimeError); only repsim's
    # {"dataset": ...} names one.
    path = tmp_path / "mine.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "data": data}, path)
    assert evaluation._trained_on({"weights": str(path), "weights_sha256": "x"}) is None
