"""Pseudo-labelling: which predictions are kept, how they are served, and the STL-10 stage that uses them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from cvkit.tools.pseudo import PseudoLabelled, PseudoLabels, pseudo_label

# softmax rows of these logits: confidences 0.98, 0.50, 0.95, 0.88, 0.97 (classes 0, -, 1, 1, 1)
LOGITS = torch.log(torch.tensor([[0.98, 0.01, 0.01], [0.5, 0.5, 0.0 + 1e-9], [0.02, 0.95, 0.03],
                                 [0.06, 0.88, 0.06], [0.01, 0.97, 0.02]]))


class Stored(Dataset):
    """Item i holds its own index as the image, so a model can look its logits up."""

    def __len__(self) -> int:
        return len(LOGITS)

    def __getitem__(self, i: int) -> dict:
        return {"features": torch.tensor([float(i)]), "targets": torch.tensor(-1), "index": i}


class Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training
        return LOGITS[x[:, 0].long()] + self.dummy


def test_keeps_confident_predictions_only():
    model = Lookup().train()
    kept = pseudo_label(model, DataLoader(Stored(), batch_size=2), threshold=0.9)
    assert kept.indices.tolist() == [0, 2, 4]
    assert kept.labels.tolist() == [0, 1, 1]
    assert kept.confidence == pytest.approx([0.98, 0.95, 0.97], abs=1e-4)
    assert kept.total == 5 and kept.kept_fraction == pytest.approx(0.6)
    assert kept.class_counts(3).tolist() == [1, 2, 0]
    assert model.training  # mode restored


def test_max_per_class_keeps_the_most_confident():
    kept = pseudo_label(Lookup(), DataLoader(Stored(), batch_size=3), threshold=0.8, max_per_class=1)
    assert kept.indices.tolist() == [0, 4]  # class 1: 0.97 beats 0.95 and 0.88
    assert kept.labels.tolist() == [0, 1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        pseudo_label(Lookup(), DataLoader(Stored()), threshold=0.0)
    with pytest.raises(ValueError, match="max_per_class"):
        pseudo_label(Lookup(), DataLoader(Stored()), max_per_class=0)


def test_pseudo_labelled_serves_new_labels_with_unique_indices():
    kept = PseudoLabels(np.array([1, 3]), np.array([2, 0]), np.array([0.95, 0.91], np.float32), total=5)
    served = PseudoLabelled(Stored(), kept, index_offset=10)
    assert len(served) == 2
    assert [int(served[i]["targets"]) for i in range(2)] == [2, 0]
    assert [float(served[i]["features"][0]) for i in range(2)] == [1.0, 3.0]
    both = ConcatDataset([Stored(), served])
    assert [both[i]["index"] for i in range(len(both))] == [0, 1, 2, 3, 4, 10, 11]


@pytest.mark.slow
def test_stl10_pseudo_label_stage_with_bce(tmp_path):
    import examples_loader

    example = examples_loader.load("stl10_train")
    result = example.main(["--logdir", str(tmp_path / "run"), "--limit", "200", "--head-epochs", "1", "--epochs", "1",
                           "--image-size", "32", "--pseudo-label", "--pseudo-epochs", "1", "--pseudo-threshold", "0.1",
                           "--loss", "bce", "--quiet", "--arch", "test_resnet", "--pretrained", "none"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert [s["name"] for s in config["stages"]] == ["head", "full", "pseudo"]
    assert "BCEOneHotLoss" in config["criterion"]
    summary = json.loads((tmp_path / "run" / "pseudo_labels.json").read_text())
    assert summary["total"] == 200 and summary["kept"] == 200  # every prediction beats 0.1 with 10 classes
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[-1].startswith("pseudo,")
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
