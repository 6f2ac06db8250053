"""Worst-prediction images: the k largest-loss samples are kept, drawn and logged."""
from __future__ import annotations

import numpy as np
import torch
from conftest import tiny_loaders
from torch import nn

from cvkit.callbacks.worst import WorstPredictionsCallback
from cvkit.data.draw import draw_keypoints, to_uint8
from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def per_sample_ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def test_keeps_exactly_the_k_largest_losses():
    cb = WorstPredictionsCallback(per_sample_ce, k=3)

    class Stub:
        loader_key = "valid"

    runner = Stub()
    cb.on_loader_start(runner)
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.2]])
    targets = torch.tensor([1, 1, 1, 0, 0, 0])  # losses: big, small, mid, mid, small, mid-
    for half in (slice(0, 3), slice(3, 6)):
        runner.batch = {"features": torch.zeros(3, 3, 8, 8), "logits": logits[half], "targets": targets[half]}
        cb.on_batch_end(runner)
    kept = sorted((round(item[0], 4) for item in cb.heap), reverse=True)
    expected = sorted(per_sample_ce(logits, targets).tolist(), reverse=True)[:3]
    assert kept == [round(v, 4) for v in expected]


def test_draw_keypoints_marks_true_and_predicted_points():
    image = np.zeros((20, 20, 3), np.uint8)
    out = draw_keypoints(image, torch.tensor([0.25, 0.25]), torch.tensor([0.75, 0.75]))
    assert out[5, 5, 0] == 255 and out[15, 15, 1] == 255


def test_to_uint8_inverts_normalisation():
    rgb = torch.rand(3, 4, 4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    norm = (rgb - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    assert np.abs(to_uint8(norm).astype(int) - (rgb.permute(1, 2, 0).numpy() * 255).round().astype(int)).max() <= 1


def test_worst_images_reach_tensorboard_and_disk(tmp_path):
    cb = WorstPredictionsCallback(per_sample_ce, k=4, mean=(0, 0, 0), std=(1, 1, 1), save_dir=tmp_path / "worst")
    StagedRunner().fit(create_model("test_resnet", 3), [Stage("s", 2, lr=0.01)], tiny_loaders(),
                       nn.CrossEntropyLoss(), tmp_path, callbacks=lambda s: [cb], verbose=False)
    assert sorted(p.name for p in (tmp_path / "worst").iterdir()) == ["worst_e001.png", "worst_e002.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard" / "valid"), size_guidance={"images": 10})
    events.Reload()
    assert "worst/valid" in events.Tags()["images"]
    assert len(events.Images("worst/valid")) == 2
