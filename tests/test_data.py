"""Probe sets: canonical order, stable IDs, seeded subsets, data roots, resizing, errors.

Every test builds its own tiny image tree; nothing touches the network or a shared dataset.
"""

import hashlib
import json
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from repsim import data
from repsim.errors import UserError

CLASSES = ("cat", "ant", "bee")  # deliberately unsorted: canonical order is ant, bee, cat
PER_CLASS = 4


def colour(cls_index: int, file_index: int) -> tuple[int, int, int]:
    """A distinct solid colour per (class, file), far apart so PNG round trips are exact."""
    return (40 * cls_index + 10, 40 * file_index + 10, 200)


def write_tree(split_dir, classes=CLASSES, per_class=PER_CLASS, size=(32, 32)):
    """``split_dir/<class>/<k>.png`` solid-colour images; colour encodes (sorted class, k)."""
    for c, cls in enumerate(sorted(classes)):
        (split_dir / cls).mkdir(parents=True)
        # Written in reverse so directory order differs from sorted file order.
        for k in reversed(range(per_class)):
            Image.new("RGB", size, colour(c, k)).save(split_dir / cls / f"{k:04d}.png")
    return split_dir


def pixel(probe, row):
    return tuple(int(v) for v in probe.images[row, 0, 0])


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A data root holding ``svhn/test`` as a 3-class tree (svhn patched to these 3 classes)."""
    monkeypatch.setitem(data.CLASS_COUNTS, "svhn", len(CLASSES))
    monkeypatch.setitem(data.CLASS_NAMES, "svhn", tuple(sorted(CLASSES)))
    monkeypatch.delenv(data.ENV_DATA_ROOT, raising=False)
    write_tree(tmp_path / "root" / "svhn" / "test")
    return tmp_path / "root"


# --------------------------------------------------------------------------- order and ids


def test_canonical_order_and_labels(root):
    p = data.load_probe_set("svhn", "test", data_root=root)
    assert p.classes == ("ant", "bee", "cat")
    assert p.images.shape == (12, 32, 32, 3) and p.images.dtype == np.uint8
    np.testing.assert_array_equal(p.labels, np.repeat([0, 1, 2], PER_CLASS))
    assert p.labels.dtype == np.int64
    assert [pixel(p, i) for i in range(12)] == [
        colour(c, k) for c in range(3) for k in range(PER_CLASS)
    ]


def test_ids_are_canonical_index_of_full_split(root):
    p = data.load_probe_set("svhn", "test", data_root=root)
    np.testing.assert_array_equal(p.ids, np.arange(12))
    assert p.ids.dtype == np.int64 and p.n_total == 12 and p.seed is None
    assert p.source == f"imagefolder:{root / 'svhn' / 'test'}"


def test_ids_stable_when_files_are_added_to_a_later_class(root):
    before = data.load_probe_set("svhn", "test", data_root=root)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "svhn" / "test" / "cat" / "9999.png")
    after = data.load_probe_set("svhn", "test", data_root=root)
    np.testing.assert_array_equal(after.ids[:12], before.ids)
    np.testing.assert_array_equal(after.images[:12], before.images)


# --------------------------------------------------------------------------- subsets


def test_subset_is_deterministic_and_sorted(root):
    a = data.load_probe_set("svhn", "test", n=5, seed=3, data_root=root)
    b = data.load_probe_set("svhn", "test", n=5, seed=3, data_root=root)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert len(a) == 5 and a.seed == 3 and a.n_total == 12
    assert np.all(np.diff(a.ids) > 0)


def test_different_seed_gives_different_ids(root):
    a = data.load_probe_set("svhn", "test", n=5, seed=0, data_root=root)
    b = data.load_probe_set("svhn", "test", n=5, seed=1, data_root=root)
    assert not np.array_equal(a.ids, b.ids)


def test_subset_matches_full_set_at_its_ids(root):
    full = data.load_probe_set("svhn", "test", data_root=root)
    sub = data.load_probe_set("svhn", "test", n=5, seed=7, data_root=root)
    np.testing.assert_array_equal(sub.images, full.images[sub.ids])
    np.testing.assert_array_equal(sub.labels, full.labels[sub.ids])


def test_subset_opens_only_selected_files(root, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or
                        real_open(fp, *a, **k))
    sub = data.load_probe_set("svhn", "test", n=3, seed=0, data_root=root)
    assert len(set(opened)) == 3 and len(sub) == 3


def test_subset_indices_rule():
    np.testing.assert_array_equal(data.subset_indices(6, None, 0), np.arange(6))
    np.testing.assert_array_equal(data.subset_indices(6, 9, 0), np.arange(6))
    want = np.sort(np.random.default_rng(4).choice(100, 10, replace=False))
    np.testing.assert_array_equal(data.subset_indices(100, 10, 4), want)


def test_n_equal_to_split_size_is_the_full_set(root):
    p = data.load_probe_set("svhn", "test", n=12, seed=5, data_root=root)
    np.testing.assert_array_equal(p.ids, np.arange(12))
    assert p.seed is None


# --------------------------------------------------------------------------- data root


def test_env_var_is_honoured(root, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # ./data does not exist here
    monkeypatch.setenv(data.ENV_DATA_ROOT, str(root))
    assert data.resolve_data_root(None) == root
    assert data.load_probe_set("svhn", "test").n_total == 12


def test_explicit_root_wins_over_env(root, monkeypatch, tmp_path):
    monkeypatch.setenv(data.ENV_DATA_ROOT, str(tmp_path / "elsewhere"))
    assert data.resolve_data_root(root) == root
    assert data.load_probe_set("svhn", "test", data_root=root).n_total == 12


def test_default_root_is_cwd_data(monkeypatch, tmp_path):
    monkeypatch.delenv(data.ENV_DATA_ROOT, raising=False)
    monkeypatch.chdir(tmp_path)
    assert data.resolve_data_root(None) == tmp_path / "data"


def test_root_pointing_at_dataset_folder(root):
    p = data.load_probe_set("svhn", "test", data_root=root / "svhn")
    assert p.n_total == 12 and p.classes == ("ant", "bee", "cat")


def test_cifar10_tree_needs_ten_classes(tmp_path):
    write_tree(tmp_path / "cifar10" / "test")
    with pytest.raises(UserError, match="3 class folders but cifar10 has 10"):
        data.load_probe_set("cifar10", "test", data_root=tmp_path)


CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def test_cifar10_tree_with_other_class_names_is_refused_not_relabelled(tmp_path):
    # torchvision's tutorial names sort as bird, car, cat, ..., plane: bird would be label 0
    # and plane label 7, silently disagreeing with every CIFAR-10 model and the bundled set.
    names = ("plane", "car", *CIFAR10[2:])
    write_tree(tmp_path / "cifar10" / "test", classes=names, per_class=1)
    with pytest.raises(UserError, match="class folders car, plane are not CIFAR-10 class names")\
            as err:
        data.load_probe_set("cifar10", "test", data_root=tmp_path)
    assert str(tmp_path / "cifar10" / "test") in str(err.value) and "\n" not in str(err.value)
    assert "airplane, automobile, bird" in str(err.value)


def test_cifar10_tree_that_names_no_cifar10_class_says_its_labels_are_in_sorted_order(tmp_path):
    # "cars" and "planes" sort into other places than automobile and airplane: labels in
    # sorted folder order were silently taken for CIFAR-10's, so a CIFAR-10 model's accuracy
    # was measured against other labels. The order stays ImageFolder's; a warning says so.
    names = ("planes", "cars", "birds", "cats", "stags", "dogs", "frogs", "horses", "ships",
             "trucks")
    write_tree(tmp_path / "cifar10" / "test", classes=names, per_class=1)
    with pytest.warns(UserWarning, match=r"name no CIFAR-10 class.*sorted order") as said:
        p = data.load_probe_set("cifar10", "test", data_root=tmp_path)
    assert p.classes == tuple(sorted(names))
    np.testing.assert_array_equal(p.labels, np.arange(10))
    msg = str(said[0].message)
    assert "\n" not in msg and str(tmp_path / "cifar10" / "test") in msg
    assert "airplane, automobile, bird" in msg and "imagefolder:" in msg


def test_numbered_or_imagefolder_trees_need_no_word_on_their_order(tmp_path):
    write_tree(tmp_path / "cifar10" / "test", classes=tuple(f"class{k}" for k in range(10)),
               per_class=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.load_probe_set("cifar10", "test", data_root=tmp_path).classes[2] == "class2"
        data.load_probe_set(f"imagefolder:{tmp_path / 'cifar10' / 'test'}")


def test_cifar10_tree_classes_take_cifar10_label_order_whatever_their_case(tmp_path):
    # "Bird" sorts before "airplane" (capitals first): sorted folder names are not the label
    # order once the case differs, the canonical names' order is.
    names = tuple(c.capitalize() if c in ("bird", "ship") else c for c in CIFAR10)
    write_tree(tmp_path / "cifar10" / "test", classes=names, per_class=1)
    p = data.load_probe_set("cifar10", "test", data_root=tmp_path)
    assert tuple(c.lower() for c in p.classes) == CIFAR10
    np.testing.assert_array_equal(p.labels, np.arange(10))


def test_cifar10_tree_of_folders_that_name_no_class_keeps_sorted_order(tmp_path):
    write_tree(tmp_path / "cifar10" / "test", classes=tuple("0123456789"), per_class=1)
    p = data.load_probe_set("cifar10", "test", data_root=tmp_path)
    assert p.classes == tuple("0123456789")


def test_a_tree_of_numbered_class_folders_takes_their_numbers_as_labels(tmp_path):
    # Folders 0..99 sorted as text put "10" before "2": folder 2 got label 12, silently.
    for k in range(100):
        (tmp_path / "cifar100" / "test" / str(k)).mkdir(parents=True)
        Image.new("RGB", (2, 2), (k, 0, 0)).save(tmp_path / "cifar100" / "test" / str(k) / "a.png")
    p = data.load_probe_set("cifar100", "test", data_root=tmp_path)
    assert p.classes == tuple(map(str, range(100)))
    np.testing.assert_array_equal(p.labels, np.arange(100))
    np.testing.assert_array_equal(p.images[:, 0, 0, 0], np.arange(100))  # folder k: sample k


def numbered_tree(split_dir, names):
    """``split_dir/<name>/a.png``, 2x2, red channel = the folder's position in ``names``."""
    for k, name in enumerate(names):
        (split_dir / name).mkdir(parents=True)
        Image.new("RGB", (2, 2), (k, 0, 0)).save(split_dir / name / "a.png")


def test_a_tree_numbered_from_one_is_refused_not_shifted_by_a_label(tmp_path):
    # SVHN's own files number the digit 0 as 10: folders 1..10 took labels by rank, so the
    # digit 1 got label 0 (torchvision's digit 0) and every label was off by one, silently.
    numbered_tree(tmp_path / "svhn" / "test", [str(k) for k in range(1, 11)])
    with pytest.raises(UserError, match=r"numbered 1\.\.10 are not svhn's labels 0\.\.9") as err:
        data.load_probe_set("svhn", "test", data_root=tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path / "svhn" / "test") in str(err.value)


def test_class_folders_named_class0_to_class99_take_their_numbers_as_labels(tmp_path):
    # As text "class10" sorts before "class2": folder class2 got label 12, silently.
    numbered_tree(tmp_path / "cifar100" / "test", [f"class{k}" for k in range(100)])
    p = data.load_probe_set("cifar100", "test", data_root=tmp_path)
    assert p.classes == tuple(f"class{k}" for k in range(100))
    np.testing.assert_array_equal(p.labels, np.arange(100))
    np.testing.assert_array_equal(p.images[:, 0, 0, 0], np.arange(100))  # folder k: sample k


SVHN_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def test_svhn_tree_of_digit_words_takes_the_digits_as_labels(tmp_path):
    # Sorted as text, eight was label 0 and five label 1: every digit mislabelled, silently.
    numbered_tree(tmp_path / "svhn" / "test", [w.capitalize() if w == "two" else w
                                               for w in SVHN_WORDS])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = data.load_probe_set("svhn", "test", data_root=tmp_path)
    assert tuple(c.lower() for c in p.classes) == SVHN_WORDS
    np.testing.assert_array_equal(p.labels, np.arange(10))
    np.testing.assert_array_equal(p.images[:, 0, 0, 0], np.arange(10))  # folder k: digit k


def test_svhn_tree_that_names_no_digit_says_its_labels_are_in_sorted_order(tmp_path):
    names = tuple("abcdefghij")
    numbered_tree(tmp_path / "svhn" / "test", names)
    with pytest.warns(UserWarning, match=r"name no SVHN class.*sorted order") as said:
        p = data.load_probe_set("svhn", "test", data_root=tmp_path)
    assert p.classes == names and "zero, one, two" in str(said[0].message)


def test_svhn_tree_mixing_digit_words_and_other_names_is_refused(tmp_path):
    numbered_tree(tmp_path / "svhn" / "test", [*SVHN_WORDS[:9], "nein"])
    with pytest.raises(UserError, match="class folders nein are not SVHN class names") as err:
        data.load_probe_set("svhn", "test", data_root=tmp_path)
    assert "\n" not in str(err.value) and "zero, one, two" in str(err.value)


def test_cifar100_class_names_are_its_labels_in_sorted_order():
    names = data.CLASS_NAMES["cifar100"]
    assert len(set(names)) == 100 and list(names) == sorted(names)
    assert names[:3] == ("apple", "aquarium_fish", "baby") and names[-1] == "worm"


def test_cifar100_tree_of_its_class_names_takes_their_labels_whatever_their_case(tmp_path):
    # "Apple" sorts after "worm" as text; its label is still 0.
    names = ["Apple", *data.CLASS_NAMES["cifar100"][1:]]
    numbered_tree(tmp_path / "cifar100" / "test", names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = data.load_probe_set("cifar100", "test", data_root=tmp_path)
    assert p.classes[0] == "Apple" and p.classes[1:] == data.CLASS_NAMES["cifar100"][1:]
    np.testing.assert_array_equal(p.images[:, 0, 0, 0], np.arange(100))  # folder k: label k


def test_cifar100_tree_that_names_no_cifar100_class_warns(tmp_path):
    numbered_tree(tmp_path / "cifar100" / "test", [f"kind_{chr(97 + k // 26)}{chr(97 + k % 26)}"
                                                   for k in range(100)])
    with pytest.warns(UserWarning, match=r"name no CIFAR-100 class.*sorted order"):
        data.load_probe_set("cifar100", "test", data_root=tmp_path)


def test_cifar100_tree_mixing_its_names_and_others_is_refused(tmp_path):
    names = [*data.CLASS_NAMES["cifar100"][:99], "earthworm"]
    numbered_tree(tmp_path / "cifar100" / "test", names)
    with pytest.raises(UserError, match="class folders earthworm are not CIFAR-100 class names"):
        data.load_probe_set("cifar100", "test", data_root=tmp_path)



# --------------------------------------------------------------------------- imagefolder:PATH


def test_imagefolder_mixed_sizes_become_uniform(tmp_path):
    folder = tmp_path / "mine"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    Image.new("RGB", (40, 20), "red").save(folder / "a" / "x.png")
    Image.new("RGB", (17, 33), "blue").save(folder / "b" / "y.jpg")
    p = data.load_probe_set(f"imagefolder:{folder}", image_size=16)
    assert p.images.shape == (2, 16, 16, 3)
    assert p.classes == ("a", "b") and p.dataset == f"imagefolder:{folder}"
    default = data.load_probe_set(f"imagefolder:{folder}")
    assert default.images.shape == (2, 224, 224, 3)


def jpeg_folder(folder, sizes=((32, 32),) * 3):
    """Noise JPEGs of several kinds (4:2:0, 4:4:4, progressive, grayscale) in ``folder``."""
    folder.mkdir(parents=True)
    gen = np.random.default_rng(0)
    kinds = [dict(subsampling=2), dict(subsampling=0, quality=95), dict(progressive=True)]
    for k, (w, h) in enumerate(sizes):
        img = Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(folder / f"{k:03d}.jpg", **kinds[k % 3])
    Image.fromarray(gen.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / "gray.jpg")
    return sorted(folder.iterdir())


def test_jpegs_decode_to_pils_pixels(tmp_path):
    jpeg_folder(tmp_path / "jpegs")
    Image.new("CMYK", (32, 32), (10, 200, 30, 40)).save(tmp_path / "jpegs" / "zcmyk.jpg")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "jpegs" / "zpng.jpg", format="PNG")
    files = sorted((tmp_path / "jpegs").iterdir())
    p = data.load_probe_set(f"imagefolder:{tmp_path / 'jpegs'}")
    want = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.testing.assert_array_equal(p.images, want)


def test_plain_jpegs_take_the_batched_decoder(tmp_path):
    files = jpeg_folder(tmp_path / "jpegs")
    arrays = data._decode_jpegs(files)
    assert arrays is not None and len(arrays) == len(files)
    for f, a in zip(files, arrays):
        np.testing.assert_array_equal(a, np.asarray(Image.open(f).convert("RGB")))
    Image.new("CMYK", (32, 32), (10, 200, 30, 40)).save(tmp_path / "jpegs" / "cmyk.jpg")
    assert data._decode_jpegs([*files, tmp_path / "jpegs" / "cmyk.jpg"]) is None


def test_mixed_size_jpegs_become_uniform(tmp_path):
    jpeg_folder(tmp_path / "jpegs", sizes=[(32, 32), (40, 24), (32, 32)])
    p = data.load_probe_set(f"imagefolder:{tmp_path / 'jpegs'}")
    assert p.images.shape == (4, 224, 224, 3)


def test_imagefolder_flat_folder_is_one_class(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for k in range(3):
        Image.new("RGB", (8, 8), (k * 50, 0, 0)).save(folder / f"{k}.bmp")
    p = data.load_probe_set(f"imagefolder:{folder}", split="train")
    assert p.classes == ("images",) and p.split == "train"
    np.testing.assert_array_equal(p.labels, [0, 0, 0])
    assert p.images.shape == (3, 8, 8, 3)  # same sizes: native kept


# --------------------------------------------------------------------------- torchvision layout


class FakeCIFAR:
    """Stands in for torchvision.datasets.CIFAR10: found on disk, 5 images coded by index."""

    def __init__(self, root, train=True, download=False):
        self.data = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 4, 4, 3),
                                                                                np.uint8)
        self.targets = [4, 3, 2, 1, 0]
        self.classes = [f"c{i}" for i in range(10)]


def test_torchvision_layout_ids_are_dataset_index(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    p = data.load_probe_set("cifar10", "test", n=3, seed=1, data_root=tmp_path)
    np.testing.assert_array_equal(p.images[:, 0, 0, 0], p.ids)
    np.testing.assert_array_equal(p.labels, 4 - p.ids)
    assert p.source == f"torchvision:{tmp_path}" and p.n_total == 5


def test_no_data_names_root_and_both_fixes(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def missing(root, train=True, download=False):
        calls.append(download)
        if download:
            raise OSError("[Errno -3] Temporary failure in name resolution")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", missing)
    with pytest.raises(UserError) as err:
        data.load_probe_set("cifar100", "train", data_root=tmp_path)
    msg = str(err.value)
    assert calls == [False, True] and "\n" not in msg
    for part in (str(tmp_path), "cifar100/train/<class>", "run online", "data_root=DIR",
                 "REPSIM_DATA", "name resolution"):
        assert part in msg


def test_no_data_without_download_never_downloads(tmp_path, monkeypatch):
    import torchvision.datasets

    def missing(root, split="train", download=False):
        assert not download
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "SVHN", missing)
    with pytest.raises(UserError, match="downloading is off"):
        data.load_probe_set("svhn", "test", data_root=tmp_path, download=False)


# --------------------------------------------------------------------------- balanced subsets


def test_balanced_subset_takes_fraction_of_each_class():
    labels = np.repeat([0, 1, 2], [10, 20, 40])
    idx = data.balanced_subset(labels, 0.25, seed=0)
    assert np.bincount(labels[idx]).tolist() == [2, 5, 10]  # round(2.5) == 2 (half to even)
    assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64


def test_balanced_subset_is_deterministic():
    labels = np.tile(np.arange(5), 30)
    a = data.balanced_subset(labels, 0.5, seed=9)
    np.testing.assert_array_equal(a, data.balanced_subset(labels, 0.5, seed=9))
    assert not np.array_equal(a, data.balanced_subset(labels, 0.5, seed=10))


# --------------------------------------------------------------------------- provenance


def test_provenance_keys_and_hash(root):
    p = data.load_probe_set("svhn", "test", n=4, seed=2, data_root=root)
    prov = p.provenance()
    assert set(prov) == {"dataset", "split", "n", "n_total", "seed", "source", "ids_sha256"}
    assert json.loads(json.dumps(prov)) == prov
    assert prov["n"] == 4 and prov["seed"] == 2
    assert prov["ids_sha256"] == hashlib.sha256(p.ids.astype("<i8").tobytes()).hexdigest()


@pytest.mark.parametrize("kw", [dict(seed=3), dict(n=1000), dict(n=1000, seed=5)])
def test_a_seed_that_picks_nothing_leaves_the_record_unchanged(kw):
    # The whole split under any seed is the same rows in the same order: one record, so one
    # store key and one figure fingerprint (both build on it).
    assert data.load_probe_set(**kw).provenance() == data.load_probe_set().provenance()

def test_provenance_hash_is_stable_across_loads(root):
    a = data.load_probe_set("svhn", "test", n=4, seed=2, data_root=root).provenance()
    b = data.load_probe_set("svhn", "test", n=4, seed=2, data_root=root).provenance()
    c = data.load_probe_set("svhn", "test", n=4, seed=3, data_root=root).provenance()
    assert a["ids_sha256"] == b["ids_sha256"] != c["ids_sha256"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"dataset": "mnist"}, "cifar10, cifar100, svhn, cifar10-probe, imagefolder:PATH"),
        ({"split": "val"}, "use one of train, test"),
        ({"n": 0}, "pass a positive n"),
        ({"n": -3}, "pass a positive n"),
        ({"n": 13}, "which has 12 images; pass n <= 12"),
        ({"dataset": "imagefolder:"}, "has no path"),
    ],
)
def test_bad_load_arguments(root, kwargs, pattern):
    args = {"dataset": "svhn", "split": "test", "data_root": root, **kwargs}
    with pytest.raises(UserError, match=pattern) as err:
        data.load_probe_set(**args)
    assert "\n" not in str(err.value)


def test_missing_imagefolder_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_probe_set(f"imagefolder:{tmp_path / 'nope'}")


def test_empty_imagefolder(tmp_path):
    with pytest.raises(UserError, match="is empty"):
        data.load_probe_set(f"imagefolder:{tmp_path}")


def test_empty_class_folder(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="has no images"):
        data.load_probe_set(f"imagefolder:{tmp_path}")


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="cannot read image"):
        data.load_probe_set(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_balanced_subset_rejects_bad_fraction(fraction):
    with pytest.raises(UserError, match=r"must be in \(0, 1\]"):
        data.balanced_subset(np.zeros(10, np.int64), fraction, seed=0)


@pytest.mark.parametrize("fraction", ["0.1", True, None])
def test_balanced_subset_refuses_a_fraction_that_is_no_number(fraction):
    # "0.1" raised a TypeError from the comparison; True passed as 1, every sample.
    with pytest.raises(UserError, match=rf"fraction={fraction!r} .*must be in \(0, 1\]"):
        data.balanced_subset(np.zeros(10, np.int64), fraction, seed=0)


def test_negative_seed_is_a_user_error_not_a_numpy_traceback():
    # numpy's default_rng refuses negative seeds with a bare ValueError.
    with pytest.raises(UserError, match="seed=-1"):
        data.load_probe_set(n=10, seed=-1)


# ------------------------------------------------------------------ checkpoint manifests
# (repsim.checkpoints: the files beside the checkpoints; read here, as data, by every command)


def test_manifest_row_without_a_name_is_a_user_error(tmp_path):
    from repsim.checkpoints import update_manifest

    (tmp_path / "manifest.json").write_text('{"checkpoints": [{"file": "x.pt"}]}')
    with pytest.raises(UserError, match="not a checkpoint manifest"):
        update_manifest(tmp_path / "a.pt", {"name": "a"})


def test_manifest_that_is_not_utf8_is_a_user_error(tmp_path):
    from repsim.checkpoints import update_manifest

    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserError, match="not valid JSON"):
        update_manifest(tmp_path / "a.pt", {"name": "a"})


@pytest.mark.parametrize("text", ['[1, 2]', '{"snapshots": 3}'])
def test_snapshot_index_of_the_wrong_shape_is_a_user_error(tmp_path, text):
    from repsim.checkpoints import snapshots

    (tmp_path / "a_snapshots").mkdir()
    (tmp_path / "a_snapshots" / "index.json").write_text(text)
    with pytest.raises(UserError, match="not a snapshot index"):
        snapshots(tmp_path / "a.pt")


# ------------------------------------------------------------------ atomic writes (repsim.paths)


def test_atomic_write_failure_names_the_destination_not_its_deleted_temp_file(tmp_path):
    from repsim.errors import one_line
    from repsim.paths import write_json

    (tmp_path / "out.json").mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(IsADirectoryError) as e:
        write_json(tmp_path / "out.json", {})
    assert e.value.filename == str(tmp_path / "out.json")
    assert one_line(e.value).startswith(f"cannot use {tmp_path / 'out.json'}: Is a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # the temp file is gone


def test_atomic_write_into_a_read_only_folder_names_the_destination(tmp_path, monkeypatch):
    # Reproduced on a read-only mount; mocked here (root writes into any chmod-ed folder).
    import errno
    import os
    import tempfile

    from repsim.paths import write_json

    def read_only(prefix, suffix, dir):
        name = os.path.join(dir, f"{prefix}abc123{suffix}")
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as e:
        write_json(tmp_path / "out.json", {})
    assert e.value.errno == errno.EROFS and e.value.filename == str(tmp_path / "out.json")


def test_seed_none_is_refused_not_an_unreproducible_subset():
    # default_rng(None) draws from OS entropy: each call another subset, recorded as seed
    # None (which provenance uses for "the whole split").
    with pytest.raises(UserError, match="seed=None"):
        data.load_probe_set(n=10, seed=None)


def test_a_seed_given_as_text_is_shown_as_text():
    # seed='3' was refused as "seed=3 is not valid", as if the number 3 were the problem.
    with pytest.raises(UserError, match="seed='3' is not valid"):
        data.load_probe_set(n=10, seed="3")

def test_atomic_write_puts_the_data_on_disk_before_the_rename(tmp_path, monkeypatch):
    # A power loss after the rename must not leave a complete-looking file whose data was
    # still in the page cache: fsync of the temporary file comes first.
    import os

    from repsim import paths

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    paths.write_text(tmp_path / "x.json", "{}")
    assert events == ["fsync", "rename"] and (tmp_path / "x.json").read_text() == "{}"


@pytest.mark.parametrize("seed", [None, -1])
def test_balanced_subset_refuses_a_seed_that_draws_unreproducibly_or_not_at_all(seed):
    # default_rng(None) draws from OS entropy: each call (a train fraction, a probe's split)
    # another subset, recorded as seed None; default_rng(-1) is numpy's bare ValueError.
    with pytest.raises(UserError, match=f"seed={seed} is not valid; pass a seed >= 0"):
        data.balanced_subset(np.repeat([0, 1], 10), 0.5, seed=seed)


@pytest.mark.parametrize("inside", ["cifar10/test", "cifar10/test/cat"])
def test_a_data_root_inside_the_tree_names_the_root_to_pass(cifar_root, monkeypatch, inside):
    # The message told the user to put a tree at <their root>/cifar10/test/..., one more level
    # down, and with downloading on, torchvision would have downloaded into the tree.
    monkeypatch.delenv(data.ENV_DATA_ROOT, raising=False)
    with pytest.raises(UserError, match=f"pass data_root={cifar_root}") as err:
        data.load_probe_set("cifar10", "test", data_root=cifar_root / inside)
    assert str(cifar_root / inside) in str(err.value) and "\n" not in str(err.value)


def test_a_data_root_that_is_a_file_says_so(tmp_path):
    (tmp_path / "cifar10.tar.xz").write_bytes(b"xz")
    with pytest.raises(UserError, match=f"data root {tmp_path / 'cifar10.tar.xz'} is a file, "
                                        "not a folder; unpack"):
        data.load_probe_set("cifar10", "test", data_root=tmp_path / "cifar10.tar.xz")


def test_an_imagefolder_path_that_is_a_file_says_so_not_that_it_is_missing(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    with pytest.raises(UserError, match=f"image folder {tmp_path / 'a.png'} is a file, not a "
                                        "folder"):
        data.load_probe_set(f"imagefolder:{tmp_path / 'a.png'}")


def test_pick_images_takes_ids_as_a_numpy_array():
    # `if not ids` on an array of two ids raised numpy's "truth value of an array is
    # ambiguous"; ids straight from a store or a ProbeSet are arrays.
    probe = data.load_probe_set(n=20)
    images, ids = data.pick_images(probe, None, probe.ids[[3, 1]])
    np.testing.assert_array_equal(ids, probe.ids[[3, 1]])
    np.testing.assert_array_equal(images, probe.images[[3, 1]])


@pytest.mark.parametrize("n", [5.0, True, "5"])
def test_a_sample_count_that_is_no_integer_is_a_user_error(n):
    # n=5.0 (say len(x) / 2) was numpy's "expected a sequence of integers" TypeError, n="5"
    # a comparison TypeError, and n=True one image.
    with pytest.raises(UserError, match=f"n={n!r} is not a valid sample count"):
        data.load_probe_set(n=n)


@pytest.mark.parametrize("n", [2.5, True])
def test_pick_images_refuses_a_count_that_is_no_integer(n):
    # int(2.5) drew 2 images and int(True) one, silently.
    probe = data.load_probe_set(n=20)
    with pytest.raises(UserError, match=f"images={n!r}: the probe set has 20 images"):
        data.pick_images(probe, n, None)


@pytest.mark.parametrize("bad", [3.7, True])
def test_pick_images_refuses_ids_that_are_no_integers(bad):
    # int(3.7) drew sample 3 instead, silently.
    probe = data.load_probe_set(n=20)
    with pytest.raises(UserError, match=re.escape(f"ids [{bad}]: ids are whole numbers")):
        data.pick_images(probe, None, [bad])


@pytest.mark.parametrize("bad", [np.int64(7), 7, "17"])
def test_pick_images_refuses_ids_that_are_no_list(bad):
    # ids=np.int64(7) (one id from an array) raised "not iterable"; ids="17" was read as the
    # ids 1 and 7.
    probe = data.load_probe_set(n=20)
    with pytest.raises(UserError, match=re.escape(f"ids={bad!r} is not a list of sample ids")):
        data.pick_images(probe, None, bad)


@pytest.mark.parametrize("size", [32.5, "32", True])
def test_an_image_size_that_is_no_integer_is_a_user_error(size):
    with pytest.raises(UserError, match=f"image_size={size!r} is not a valid size"):
        data.load_probe_set(n=2, image_size=size)


def test_a_torchvision_root_beside_the_split_folders_is_not_taken_for_the_tree(
        cifar_root, tmp_path, monkeypatch):
    # <root>/cifar10/torchvision (torchvision's files) is no split or class folder of the
    # tree beside it: it goes to torchvision, which finds its data there.
    import torchvision.datasets

    seen = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda root, **kw: seen.append(root)
                        or FakeCIFAR(root))
    p = data.load_probe_set("cifar10", "test", data_root=cifar_root / "cifar10" / "torchvision")
    assert seen == [str(cifar_root / "cifar10" / "torchvision")] and p.n_total == 5


class FakeCIFARTest:
    """torchvision's CIFAR-10 test layout: 10,000 images numbered by their index in the
    original batches, not in the sorted-tree order the bundled probe set's ids follow."""

    def __init__(self, root, train=True, download=False):
        self.data = np.zeros((10_000, 32, 32, 3), np.uint8)
        self.data[:, 0, 0, 0] = np.arange(10_000) % 251
        self.targets = [i % 10 for i in range(10_000)]
        self.classes = list(CIFAR10)


def test_ids_beyond_the_probe_set_from_a_data_root_that_numbers_images_otherwise(
        tmp_path, monkeypatch):
    # ids outside the bundled set loaded the whole split from the data root; in torchvision's
    # layout id k is another image than the bundle's id k, and it was drawn without a word.
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFARTest)
    probe = data.load_probe_set("cifar10-probe", n=4)
    other = next(i for i in range(10_000) if i not in probe.ids)
    with pytest.raises(UserError, match="number the images differently") as err:
        data.pick_images(probe, None, [other], data_root=tmp_path)
    assert f"torchvision:{tmp_path}" in str(err.value) and "\n" not in str(err.value)


def test_sixteen_bit_grayscale_pngs_keep_their_grey_levels(tmp_path):
    # PIL's convert("RGB") clips 16-bit grey at 255: every pixel but black became white.
    levels = (np.arange(16, dtype=np.uint16) * 4000 + 123).reshape(4, 4)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    p = data.load_probe_set(f"imagefolder:{tmp_path}")
    expected = (levels >> 8).astype(np.uint8)  # the high byte, as PIL reads 16-bit RGB PNGs
    np.testing.assert_array_equal(p.images[0], np.repeat(expected[..., None], 3, axis=-1))


def test_a_numpy_seed_leaves_the_provenance_json_serialisable():
    p = data.load_probe_set(n=5, seed=np.int64(3))
    assert json.loads(json.dumps(p.provenance()))["seed"] == 3  # json refuses np.int64


def test_building_the_bundle_from_a_tree_of_other_class_names_is_refused(tmp_path):
    # The bundle is read as CIFAR-10 (labels 0..9 = airplane..truck); a source tree named
    # Plane, Car, ... was labelled in its sorted order (Bird 0), silently.
    from repsim.assets import build_probe

    names = ("Plane", "Car", *(c.capitalize() for c in CIFAR10[2:]))
    write_tree(tmp_path / "test", classes=names, per_class=1)
    with pytest.raises(SystemExit, match="class folders .* not CIFAR-10's"):
        build_probe.build(tmp_path / "test", tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
