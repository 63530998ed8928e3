"""repsim: compare what neural networks learn, layer by layer, with CKA.

The public API, imported on first use (so ``repsim --help`` stays instant)::

    import repsim
    acts = repsim.extract(model, images, layers=["blocks.0", "blocks.5"])  # any nn.Module
    ref = repsim.extract("vit_cifar", uint8_images)                       # or a model name
    m = repsim.cka_matrix(acts, ref, estimator="debiased")                # (La, Lb) float64

The rest: ``capture``, ``linear_cka``, ``rbf_cka``, ``MinibatchCKA``, ``minibatches``,
``load_model``, ``list_models``, ``register_model``, ``load_probe_set``, ``Store``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_MODULES = {  # the public names of each module
    "repsim.hooks": ("capture", "extract"),  # activations of named layers
    "repsim.cka": ("cka_matrix", "linear_cka", "rbf_cka", "MinibatchCKA", "minibatches"),
    "repsim.models": ("load_model",),
    "repsim.registry": ("list_models", "register_model"),
    "repsim.data": ("load_probe_set",),
    "repsim.store": ("Store",),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'repsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
