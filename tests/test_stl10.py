"""STL-10 binary reader/writer and the demo example end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cvkit.data import stl10
from cvkit.io import load_checkpoint, state_dict_of


def test_round_trip_matches_column_major_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 96, 96, 3), dtype=np.uint8)
    labels = np.array([0, 9, 4])
    stl10.write_images(tmp_path / "train_X.bin", images)
    stl10.write_labels(tmp_path / "train_y.bin", labels)
    got, got_labels = stl10.load_split(tmp_path, "train")
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
    raw = np.fromfile(tmp_path / "train_X.bin", dtype=np.uint8)
    # STL-10 stores channel by channel, each column-major: byte 1 is pixel (row 1, col 0) of red.
    assert raw[1] == images[0, 1, 0, 0] and raw[96] == images[0, 0, 1, 0] and raw[96 * 96] == images[0, 0, 0, 1]
    assert np.fromfile(tmp_path / "train_y.bin", dtype=np.uint8).tolist() == [1, 10, 5]


def test_wrong_size_and_bad_labels_name_the_file(tmp_path):
    (tmp_path / "test_X.bin").write_bytes(b"\0" * (96 * 96 * 3 + 5))
    with pytest.raises(stl10.STL10FormatError, match="test_X.bin.*truncated"):
        stl10.read_images(tmp_path / "test_X.bin")
    (tmp_path / "train_y.bin").write_bytes(bytes([1, 11]))
    with pytest.raises(stl10.STL10FormatError, match="train_y.bin: label 11 at position 1"):
        stl10.read_labels(tmp_path / "train_y.bin")
    with pytest.raises(FileNotFoundError, match="unlabeled_X.bin"):
        stl10.load_split(tmp_path, "unlabeled")


def test_demo_is_deterministic_and_stratified(tmp_path):
    a = stl10.build_demo(tmp_path / "a", seed=3)
    b = stl10.build_demo(tmp_path / "b", seed=3)
    assert (a / "train_X.bin").read_bytes() == (b / "train_X.bin").read_bytes()
    _, labels = stl10.load_split(a, "train")
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 0.8 * counts.max()
    assert stl10.class_names(a)[0] == "digit_0"


@pytest.mark.slow
def test_example_runs_repeats_with_its_seed_and_best_pth_reproduces_its_test_metrics(tmp_path):
    import examples_loader

    example = examples_loader.load("stl10_train")
    args = ["--limit", "240", "--head-epochs", "1", "--epochs", "2", "--image-size", "32", "--quiet",
            "--arch", "test_resnet", "--pretrained", "none"]
    result = example.main(["--logdir", str(tmp_path / "run"), *args])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"] == pytest.approx(result["test"])
    # same seed, same demo data: same initial weights, augmentation and order, so the same result
    assert example.main(["--logdir", str(tmp_path / "again"), *args])["test"] == result["test"]
    for name in ("config.json", "progress.png", "best.pth", "log.csv"):
        assert (tmp_path / "run" / name).is_file()
    from cvkit.metrics import ClassificationMetrics
    from cvkit.models import create_model
    from cvkit.runners import evaluate

    model = create_model("test_resnet", 10)
    model.load_state_dict(state_dict_of(load_checkpoint(tmp_path / "run" / "best.pth")))
    images, labels = stl10.load_split(tmp_path / "demo_data" / "stl10", "test")
    test = torch.utils.data.DataLoader(
        stl10.ArrayDataset(images[:240], labels[:240], example.transforms(32, train=False)), batch_size=64)
    again = evaluate(model, test, torch.nn.CrossEntropyLoss(label_smoothing=0.1),  # the example's criterion
                     lambda: [ClassificationMetrics(10)])
    assert again["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert again["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)


def _old_read_images(path):
    """The reader before memory-mapping: whole file, then a transposed copy."""
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3, 96, 96)
    return np.ascontiguousarray(raw.transpose(0, 3, 2, 1))


def test_images_are_memory_mapped_and_identical_to_a_full_read(tmp_path):
    import pickle

    from cvkit.data.datasets import STL10Dataset

    root = stl10.build_demo(tmp_path, seed=0, unlabeled=50)
    for split in ("train", "test", "unlabeled"):
        images, _ = stl10.load_split(root, split)
        assert isinstance(images, np.memmap) and not images.flags.writeable
        assert np.array_equal(images, _old_read_images(root / f"{split}_X.bin"))
    dataset = STL10Dataset(tmp_path, "test")
    assert isinstance(dataset.images, stl10.ImageFile), "the dataset holds an in-memory copy"
    assert np.array_equal(dataset.images[[2, 0, 5]], _old_read_images(root / "test_X.bin")[[2, 0, 5]])
    old = _old_read_images(root / "test_X.bin")
    reference = stl10.ArrayDataset(old, dataset.labels, dataset.transform)
    for i in (0, 7, len(dataset) - 1):
        item = dataset[i]
        assert torch.equal(item["features"], reference[i]["features"]) and item["targets"] == reference[i]["targets"]
    array_item = stl10.ArrayDataset(stl10.load_split(root, "test")[0], dataset.labels)[3]["features"]
    assert torch.equal(array_item, torch.from_numpy(old[3].transpose(2, 0, 1).copy()).float() / 255)
    blob = pickle.dumps(dataset)
    assert len(blob) < old.nbytes / 10, "pickling copied the images"
    again = pickle.loads(blob)
    assert isinstance(again.images, stl10.ImageFile) and torch.equal(again[5]["features"], dataset[5]["features"])
