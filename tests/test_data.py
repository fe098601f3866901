"""Built-in data: sample photos, the digits split, ImageFolder trees and get_loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from eqcore.models.digits_data import digits_loaders, digits_split
from eqcore.models.image_folder import image_folder_loader, scan_image_folder
from eqcore.models.loaders import get_loaders, without_labels
from eqcore.models.samples import find_sample, sample_images, samples_loader
from eqcore.models.specs import (
    DIGITS_MEAN,
    DIGITS_STD,
    InputSpec,
    digits_spec,
    imagenet_categories,
    imagenet_spec,
)
from eqcore.errors import EQError

SPEC = imagenet_spec()
SMALL = imagenet_spec(crop_size=64, resize_size=72)


def _batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_sample_labels_are_real_imagenet_categories():
    samples = sample_images()
    assert samples[0].name == "grace_hopper" and samples[0].label == "military uniform"
    categories = imagenet_categories()
    assert len(categories) == 1000
    for sample in samples:
        if sample.label is not None:
            assert categories[sample.imagenet_index] == sample.label
        image = sample.load()
        assert image.mode == "RGB" and min(image.size) >= 256
    assert len({s.name for s in samples}) == len(samples)


def test_scikit_image_photos_are_included():
    pytest.importorskip("skimage")
    by_name = {s.name: s for s in sample_images()}
    assert by_name["chelsea"].label == "tabby" and by_name["coffee"].label == "espresso"
    assert by_name["astronaut"].label is None and by_name["rocket"].label is None
    assert find_sample("Espresso").name == "coffee" and find_sample("CHELSEA").name == "chelsea"


def test_unknown_sample_error_lists_the_available_ones():
    with pytest.raises(EQError) as info:
        find_sample("Samoyed")
    assert "'Samoyed'" in str(info.value) and "grace_hopper (military uniform)" in str(info.value)


def test_samples_eval_matches_torchvision_preprocessing_and_labels():
    images, labels = _batches(samples_loader(SPEC, split="eval", batch_size=3))
    samples = sample_images()
    assert images.shape == (len(samples), 3, 224, 224)
    expected_labels = [-1 if s.label is None else s.imagenet_index for s in samples]
    assert labels.tolist() == expected_labels and labels.dtype == torch.int64
    reference = T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(SPEC.mean, SPEC.std)]
    )(samples[0].load())
    torch.testing.assert_close(images[0], reference, rtol=0, atol=1e-6)


def test_samples_eval_follows_the_spec_size():
    images, _ = _batches(samples_loader(imagenet_spec(crop_size=299, resize_size=342), batch_size=8))
    assert images.shape[1:] == (3, 299, 299)


def test_labels_map_by_name_into_the_spec():
    spec = InputSpec(
        shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize_size=32, crop_size=32,
        labels=("dog", "military uniform"),
    )
    _, labels = _batches(samples_loader(spec))
    assert labels[0] == 1 and set(labels[1:].tolist()) <= {-1}


def test_calibration_crops_are_seeded_and_deterministic():
    first, labels = _batches(samples_loader(SMALL, split="calib", batch_size=4, n_augmented=10, seed=0))
    torch.manual_seed(1234)
    again, _ = _batches(samples_loader(SMALL, split="calib", batch_size=5, n_augmented=10, seed=0))
    other, _ = _batches(samples_loader(SMALL, split="calib", batch_size=4, n_augmented=10, seed=1))
    assert first.shape == (10, 3, 64, 64)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    n_images = len(sample_images())
    assert labels.tolist() == [labels[i % n_images].item() for i in range(10)]
    eval_images, _ = _batches(samples_loader(SMALL, split="eval"))
    assert not torch.equal(first[:n_images], eval_images)


def test_bad_loader_arguments():
    with pytest.raises(EQError, match="split"):
        samples_loader(SPEC, split="train")
    with pytest.raises(EQError, match="batch_size"):
        samples_loader(SPEC, batch_size=0)


def test_digits_split_is_fixed_stratified_and_disjoint():
    split = digits_split()
    assert split.x_train.shape == (1347, 1, 8, 8) and split.x_test.shape == (450, 1, 8, 8)
    assert split.x_train.dtype == np.float32 and 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    assert np.bincount(split.y_test).tolist() == [round(0.25 * c) for c in counts]
    assert not set(split.train_index.tolist()) & set(split.test_index.tolist())
    assert sorted([*split.train_index.tolist(), *split.test_index.tolist()]) == list(range(1797))
    digits = load_digits()
    np.testing.assert_array_equal(split.x_test[:, 0] * 16, digits.images[split.test_index])
    np.testing.assert_array_equal(split.y_train, digits.target[split.train_index])
    # Pinned: the shipped digits weights were trained on this split; it must never move.
    assert split.test_index[:5].tolist() == [3, 7, 13, 16, 19]
    assert abs(split.x_train.mean() - DIGITS_MEAN) < 1e-3 and abs(split.x_train.std() - DIGITS_STD) < 1e-3


def test_digits_loaders_are_normalized_and_ordered():
    loaders = digits_loaders(batch_size=100)
    images, labels = _batches(loaders.test)
    split = digits_split()
    expected = (torch.from_numpy(split.x_test.copy()) - DIGITS_MEAN) / DIGITS_STD
    torch.testing.assert_close(images, expected)
    assert labels.tolist() == split.y_test.tolist()
    again, _ = _batches(digits_loaders(batch_size=7).test)
    assert torch.equal(images, again)
    assert len(loaders.train.dataset) == 1347


def _write_image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


def test_image_folder_with_index_and_label_names(tmp_path):
    _write_image(tmp_path / "281" / "a.png", (255, 0, 0))
    _write_image(tmp_path / "golden_retriever" / "b.jpg", (0, 255, 0))
    _write_image(tmp_path / "golden_retriever" / "nested" / "c.png", (0, 0, 255))
    (tmp_path / "golden_retriever" / "notes.txt").write_text("not an image")
    index = scan_image_folder(tmp_path, SMALL)
    assert index.labeled and index.class_folders == ("281", "golden_retriever")
    assert list(index.labels) == [281, 207, 207]
    images, labels = _batches(image_folder_loader(tmp_path, SMALL, batch_size=2))
    assert images.shape == (3, 3, 64, 64) and labels.tolist() == [281, 207, 207]


def test_image_folder_with_unknown_names_is_unlabeled(tmp_path):
    _write_image(tmp_path / "cats" / "a.png", (1, 2, 3))
    _write_image(tmp_path / "dogs" / "b.png", (4, 5, 6))
    index = scan_image_folder(tmp_path, SMALL)
    assert not index.labeled and set(index.labels) == {-1}
    loaders = get_loaders(str(tmp_path), SMALL, batch_size=1, calib_batches=1)
    assert not loaders.has_labels and loaders.num_eval == 2 and loaders.num_calib == 1


def test_partially_matching_folders_warn_and_stay_unlabeled(tmp_path):
    _write_image(tmp_path / "tabby" / "a.png", (1, 2, 3))
    _write_image(tmp_path / "kitty" / "b.png", (4, 5, 6))
    with pytest.warns(UserWarning, match="kitty"):
        index = scan_image_folder(tmp_path, SMALL)
    assert not index.labeled


def test_flat_folder_of_images_and_grayscale_specs(tmp_path):
    _write_image(tmp_path / "x.png", (10, 20, 30))
    gray = InputSpec(shape=(1, 8, 8), mean=(0.5,), std=(0.5,), resize_size=8, crop_size=8, labels=tuple("ab"))
    images, labels = _batches(image_folder_loader(tmp_path, gray))
    assert images.shape == (1, 1, 8, 8) and labels.tolist() == [-1]


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda p: p / "absent", "does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is not a directory"),
        (lambda p: (p / "empty" / "cls").mkdir(parents=True) or p / "empty", "contains no images"),
    ],
)
def test_bad_image_folders_name_the_path(tmp_path, make, phrase):
    path = make(tmp_path)
    with pytest.raises(EQError) as info:
        scan_image_folder(path, SMALL)
    assert str(path) in str(info.value) and phrase in str(info.value)
    assert "one sub-folder per class" in str(info.value)


def test_get_loaders_samples():
    loaders = get_loaders("samples", SMALL, batch_size=4, calib_batches=3, seed=0)
    assert loaders.name == "samples" and loaders.has_labels
    assert loaders.num_calib == 12 and loaders.num_eval == len(sample_images())
    calib, _ = _batches(loaders.calib)
    again, _ = _batches(get_loaders("samples", SMALL, batch_size=4, calib_batches=3, seed=0).calib)
    assert torch.equal(calib, again)


def test_get_loaders_digits():
    loaders = get_loaders("digits", digits_spec(), batch_size=32, calib_batches=2)
    assert loaders.name == "digits" and loaders.has_labels
    assert loaders.num_calib == 64 and loaders.num_eval == 450
    calib, labels = _batches(loaders.calib)
    split = digits_split()
    torch.testing.assert_close(calib, (torch.from_numpy(split.x_train[:64].copy()) - DIGITS_MEAN) / DIGITS_STD)
    assert labels.tolist() == split.y_train[:64].tolist()


def test_get_loaders_directory_calibration_subset_is_seeded(tmp_path):
    for i in range(6):
        _write_image(tmp_path / "0" / f"{i}.png", (i * 40, 0, 0))
    first = get_loaders(str(tmp_path), SMALL, batch_size=2, calib_batches=1, seed=3)
    again = get_loaders(str(tmp_path), SMALL, batch_size=2, calib_batches=1, seed=3)
    assert first.has_labels and first.num_eval == 6 and first.num_calib == 2
    assert torch.equal(_batches(first.calib)[0], _batches(again.calib)[0])


@pytest.mark.parametrize(
    ("data", "spec", "phrase"),
    [
        ("digits", SPEC, "digits data are 1x8x8"),
        ("samples", digits_spec(), "use --eq-data digits"),
        ("no/such/dir", SPEC, "neither a built-in data set"),
    ],
)
def test_get_loaders_rejects_data_that_does_not_fit_the_model(data, spec, phrase):
    with pytest.raises(EQError, match=phrase):
        get_loaders(data, spec, model_name="m")


def test_max_label_is_the_label_space_the_data_can_hold(tmp_path):
    # The samples' labels are ImageNet classes, whichever photos are installed: 999.
    assert get_loaders("samples", SMALL, batch_size=4, calib_batches=1).max_label == 999
    assert get_loaders("digits", digits_spec(), batch_size=64, calib_batches=1).max_label == 9
    _write_image(tmp_path / "3" / "a.png", (1, 2, 3))
    _write_image(tmp_path / "281" / "b.png", (4, 5, 6))
    assert get_loaders(str(tmp_path), SMALL, batch_size=1, calib_batches=1).max_label == 281
    _write_image(tmp_path / "x.png", (7, 8, 9))  # a loose image: the folder is unlabeled
    assert get_loaders(str(tmp_path), SMALL, batch_size=1, calib_batches=1).max_label == -1


def test_without_labels_keeps_the_images_and_drops_every_label():
    labeled = get_loaders("samples", SMALL, batch_size=3, calib_batches=1)
    unlabeled = without_labels(labeled)
    images, labels = _batches(unlabeled.eval)
    original, original_labels = _batches(labeled.eval)
    assert (original_labels >= 0).any() and labels.tolist() == [-1] * len(original_labels)
    assert torch.equal(images, original) and unlabeled.eval.batch_size == 3
    assert not unlabeled.has_labels and unlabeled.max_label == -1 and unlabeled.num_eval == labeled.num_eval
    assert unlabeled.calib is labeled.calib
