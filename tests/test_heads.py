"""Every new or resized head starts small: zero outputs, a first-batch loss of log(C), and it learns."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image

from cvkit.models import create_model, create_task_model, head_names

FAMILIES = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit", "test_byobnet", "test_nfnet",
            "test_efficientnet_gn"]


def _photo_batch(size: int = 64, n: int = 8) -> torch.Tensor:
    """``n`` crops of scikit-learn's two sample photos, ImageNet-normalised: real image statistics."""
    crops = []
    for i in range(n):
        photo = load_sample_image(("china.jpg", "flower.jpg")[i % 2])
        y, x = 40 * i, 60 * i
        crops.append(torch.from_numpy(photo[y:y + size, x:x + size].astype(np.float32) / 255))
    x = torch.stack(crops).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("head", [None, "bn_dropout"])
def test_new_classifier_starts_at_log_c_and_learns(arch: str, head) -> None:
    torch.manual_seed(0)
    num_classes = 5
    model = create_model(arch, num_classes=num_classes, head=head).train()
    x, y = _photo_batch(), torch.arange(8) % num_classes
    timm_default = timm.create_model(arch, num_classes=num_classes).train()
    with torch.no_grad():
        default_loss = float(torch.nn.functional.cross_entropy(timm_default(x), y))
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    assert float(loss) == pytest.approx(math.log(num_classes), abs=1e-5)
    assert abs(default_loss - math.log(num_classes)) > 1e-3  # timm's own init does not start there
    head_params = [p for n in head_names(model) for p in model.get_submodule(n).parameters()]
    optimizer = torch.optim.SGD(head_params, lr=1e-3)
    loss.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in head_params)
    optimizer.step()
    assert float(torch.nn.functional.cross_entropy(model(x), y)) < float(loss)


def test_task_model_heads_start_small() -> None:
    x = _photo_batch()
    box = create_task_model("class_box", arch="test_resnet", num_classes=3)
    out = box(x)
    assert torch.equal(out[:, :3], torch.zeros(8, 3))           # logits 0: loss log(3)
    assert torch.equal(out[:, 3:], torch.full((8, 4), 0.5))     # sigmoid(0)
    points = create_task_model("keypoints", arch="test_resnet", num_keypoints=5)
    assert torch.equal(points(x), torch.full((8, 10), 0.5))


def test_a_classifier_loaded_from_the_file_is_kept(tmp_path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    same = create_model("test_resnet", num_classes=7, pretrained=path)
    assert torch.equal(same.get_classifier().weight, source.get_classifier().weight)
    resized = create_model("test_resnet", num_classes=3, pretrained=path)
    assert torch.equal(resized.get_classifier().weight, torch.zeros_like(resized.get_classifier().weight))
    assert torch.equal(resized.conv1[0].weight if isinstance(resized.conv1, torch.nn.Sequential)
                       else resized.conv1.weight,
                       source.conv1[0].weight if isinstance(source.conv1, torch.nn.Sequential) else source.conv1.weight)
