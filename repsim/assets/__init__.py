"""Data shipped inside the package: the bundled CIFAR-10 probe set ``cifar10-probe``.

``cifar10_test_probe.npz``: 1,000 CIFAR-10 test images (100 per class) with their canonical
sample IDs (index in the full test split sorted by class, then file name), so stores from it
line up with stores from the full set; ``meta`` records the source and the selection. Rebuilt
by ``python -m repsim.assets.build_probe --source DIR``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from repsim.errors import UserError

if TYPE_CHECKING:
    import numpy as np

PROBE_NAME = "cifar10-probe"
DEFAULT_DATASET = PROBE_NAME  # every command but `repsim train`: offline, no data root
PROBE_FILE = Path(__file__).resolve().parent / "cifar10_test_probe.npz"

# Each dataset's class names in label order (0, 1, ...), as its own files name them.
# CIFAR-100's fine labels are its names sorted; SVHN's labels are the digits.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR100_CLASSES = tuple((
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split())
SVHN_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_NAMES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES, "svhn": SVHN_CLASSES}


@functools.lru_cache(maxsize=1)
def read_bundle() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], dict, str]:
    """(images (1000, 32, 32, 3) uint8, labels, ids, classes, meta, file sha256), read once;
    :func:`repsim.data.load_probe_set` serves them as ``cifar10-probe``."""
    import numpy as np  # here: naming the default dataset imports nothing

    if not PROBE_FILE.is_file():
        raise UserError(f"the bundled probe set {PROBE_FILE} is missing from this install; "
                        "reinstall repsim (pip install -e .), or use dataset='cifar10' with "
                        "data_root=DIR")
    with np.load(PROBE_FILE, allow_pickle=False) as z:
        images, labels, ids = z["images"], z["labels"].astype(np.int64), z["ids"].astype(np.int64)
        classes = tuple(str(c) for c in z["classes"])
        meta = json.loads(str(z["meta"]))
    sha = hashlib.sha256(PROBE_FILE.read_bytes()).hexdigest()
    return images, labels, ids, classes, meta, sha
