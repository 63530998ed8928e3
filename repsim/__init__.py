"""repsim: compare what neural networks learn, layer by layer, with CKA.

The public API, imported on first use (so ``repsim --help`` stays instant)::

    import repsim
    acts = repsim.extract(model, images, layers=["blocks.0", "blocks.5"])  # any nn.Module
    ref = repsim.extract("vit_cifar", uint8_images)                       # or a model name
    m = repsim.cka_matrix(acts, ref, estimator="debiased")                # (La, Lb) float64

- ``extract``, ``capture``: activations of named layers (:mod:`repsim.hooks`);
- ``cka_matrix``, ``linear_cka``, ``rbf_cka``, ``MinibatchCKA``, ``minibatches``
  (:mod:`repsim.cka`);
- ``load_model`` (:mod:`repsim.models`); ``list_models``, ``register_model`` (its registry);
- ``load_probe_set`` (:mod:`repsim.data`), ``Store`` (:mod:`repsim.store`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "capture": "repsim.hooks",
    "extract": "repsim.hooks",
    "cka_matrix": "repsim.cka",
    "linear_cka": "repsim.cka",
    "rbf_cka": "repsim.cka",
    "MinibatchCKA": "repsim.cka",
    "minibatches": "repsim.cka",
    "load_model": "repsim.models",
    "list_models": "repsim.registry",
    "register_model": "repsim.registry",
    "load_probe_set": "repsim.data",
    "Store": "repsim.store",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'repsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
