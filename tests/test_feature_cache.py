"""Head stages on cached features: the slow path's head weights, copies per epoch, resume, refusals."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import Interrupt, StopAtEpoch, TinyImages, tiny_loaders
from torch.utils.data import DataLoader

from cvkit.config import ConfigError, load_config
from cvkit.feature_cache import CachedFeatures, cached_loaders
from cvkit.io import load_checkpoint
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model, create_task_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def _fit(logdir, cache, model=None, epochs=3, callbacks=None, resume=None, head="bn_dropout"):
    torch.manual_seed(0)
    model = model or create_model("test_resnet", 3, head=head)
    stage = Stage("head", epochs, trainable="head", lr=0.05, optimizer="sgd", scheduler="cosine", cache_features=cache)
    runner = StagedRunner().fit(model, [stage], tiny_loaders(), torch.nn.CrossEntropyLoss(), logdir,
                                metrics=lambda: [ClassificationMetrics(3)], valid_metric="accuracy", verbose=False,
                                callbacks=callbacks, resume=resume)
    return runner, model


def test_cached_head_stage_gives_the_slow_paths_head(tmp_path, capsys):
    _, slow = _fit(tmp_path / "slow", None)
    _, fast = _fit(tmp_path / "fast", 1)
    for (name, a), (_, b) in zip(slow.state_dict().items(), fast.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    assert not torch.equal(slow.get_classifier()[2].weight, torch.zeros(3, slow.num_features))  # it learnt
    slow_log, fast_log = pd.read_csv(tmp_path / "slow" / "log.csv"), pd.read_csv(tmp_path / "fast" / "log.csv")
    pd.testing.assert_series_equal(slow_log["valid/accuracy"], fast_log["valid/accuracy"])
    assert (slow_log["train/loss"] - fast_log["train/loss"]).abs().max() < 1e-5
    # after the stage the model takes images again: the test-time path is the ordinary one
    x = torch.randn(2, 3, 32, 32)
    assert fast.eval()(x).shape == (2, 3)


def test_copies_are_augmented_passes_read_one_per_epoch() -> None:
    class Noisy(TinyImages):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "features": item["features"] + torch.randn(3, 32, 32)}  # a random augmentation

    torch.manual_seed(0)
    model = create_model("test_resnet", 3)
    model.requires_grad_(False)
    loaders = {"train": DataLoader(Noisy(20), 8, shuffle=True, generator=torch.Generator().manual_seed(0)),
               "valid": DataLoader(TinyImages(10, seed=1), 8)}
    cached = cached_loaders(model, loaders, 2, seed=5, device=torch.device("cpu"), verbose=False)
    train = cached["train"].dataset
    assert isinstance(train, CachedFeatures) and len(train.copies) == 2 and len(cached["valid"].dataset.copies) == 1
    assert train.copies[0]["features"].shape == (20, model.num_features, 1, 1)
    assert not torch.allclose(train.copies[0]["features"], train.copies[1]["features"])
    assert torch.equal(train.copies[0]["targets"], loaders["train"].dataset.y)  # index order, targets kept
    train.set_epoch(3)
    assert torch.equal(train[4]["features"], train.copies[1]["features"][4])
    again = cached_loaders(model, loaders, 2, seed=5, device=torch.device("cpu"), verbose=False)["train"].dataset
    assert torch.equal(again.copies[1]["features"], train.copies[1]["features"])  # seeded: a resume rebuilds it
    assert cached["train"].batch_sampler is loaders["train"].batch_sampler  # same batches, same order


def test_a_killed_cached_stage_resumes_to_the_same_run(tmp_path) -> None:
    _fit(tmp_path / "full", 2, epochs=4)
    with pytest.raises(Interrupt):
        _fit(tmp_path / "cut", 2, epochs=4, callbacks=lambda stage: [StopAtEpoch(3)])
    _fit(tmp_path / "cut", 2, epochs=4, resume=True)
    full = load_checkpoint(tmp_path / "full" / "best.pth")["model"]
    resumed = load_checkpoint(tmp_path / "cut" / "best.pth")["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "full" / "log.csv").drop(columns="time", errors="ignore"),
                                  pd.read_csv(tmp_path / "cut" / "log.csv").drop(columns="time", errors="ignore"))


def test_task_wrappers_cache_their_backbone(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_task_model("keypoints", arch="test_resnet", num_keypoints=2)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    loaders = {"train": DataLoader(TinyImages(12), 4), "valid": DataLoader(TinyImages(8, seed=1), 4)}
    cached = cached_loaders(model, loaders, 1, seed=0, device=torch.device("cpu"), verbose=False)
    assert cached["train"].dataset.copies[0]["features"].shape == (12, model.num_features, 1, 1)


def test_refusals_are_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match="cache_features needs trainable='head'"):
        Stage("s", 1, trainable="all", cache_features=1)
    with pytest.raises(ValueError, match="cache_features must be an int >= 1"):
        Stage("s", 1, trainable="head", cache_features=0)
    with pytest.raises(ValueError, match="drop mixup"):
        Stage("s", 1, trainable="head", cache_features=1, mixup={"mixup_alpha": 0.2})
    with pytest.raises(ValueError, match="class token or attention pooling"):
        _fit(tmp_path / "vit", 1, model=create_model("test_vit", 3, img_size=32), epochs=1)
    with pytest.raises(ConfigError, match=r"stages\[0\]: stage 'head': cache_features needs trainable='head'"):
        load_config({"task": "classification", "data": {"kind": "demo"}, "model": {"arch": "test_resnet"},
                     "stages": [{"name": "head", "epochs": 1, "cache_features": 2}]})
