"""cvkit.fine_tune (the default recipe: head on cached features, then everything) and the frozen-BN policy."""
from __future__ import annotations

import json

import pytest
import torch
from catalyst.core.callback import Callback
from conftest import tiny_loaders
from torch import nn

import cvkit
from cvkit.io import load_checkpoint
from cvkit.models import create_model
from cvkit.models.groups import bn_modules
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


class RecordGroups(Callback):
    def __init__(self, store: dict) -> None:
        super().__init__(order=199)
        self.store = store

    def on_experiment_start(self, runner) -> None:
        self.store[runner.stage.name] = (
            {g["name"]: g.get("initial_lr", g["lr"]) for g in runner.optimizer.param_groups}, len(runner.optimizer.state),
        )


def test_fine_tune_is_the_default_recipe_head_on_cached_features_then_everything(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_resnet", 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = {}
    runner = cvkit.fine_tune(model, tiny_loaders(), nn.CrossEntropyLoss(), epochs=1, base_lr=0.01, freeze_epochs=3,
                             logdir=tmp_path, verbose=False, engine="cpu", callbacks=lambda s: [RecordGroups(groups)])
    assert isinstance(runner, StagedRunner)
    assert [r["stage"] for r in runner.history][-1] == "unfreeze"
    frozen = load_checkpoint(tmp_path / "checkpoints" / "freeze" / "last.pth")["model"]
    assert torch.equal(frozen["conv1.0.weight"], before["conv1.0.weight"])
    assert not torch.equal(frozen["fc.weight"], before["fc.weight"])
    assert groups["freeze"][0] == {"head": pytest.approx(0.01)}
    lrs, state_size = groups["unfreeze"]
    assert state_size == 0, "the unfreeze stage must start with a fresh optimizer"
    assert lrs["head"] == pytest.approx(0.01)
    backbone = sorted((v for k, v in lrs.items() if k != "head"), reverse=True)
    assert len(backbone) > 2 and backbone[0] == pytest.approx(0.003)
    assert backbone[1] == pytest.approx(0.003 * 0.8)
    config = json.loads((tmp_path / "config.json").read_text())
    freeze, unfreeze = config["stages"]
    assert (freeze["cache_features"], freeze["optimizer"]) == (2, "adamw")
    assert freeze["early_stopping"] == {"patience": 4, "metric": "loss"}
    assert (unfreeze["cache_features"], unfreeze["train_bn"], unfreeze["scheduler"]) == (None, False, "cosine")
    assert (unfreeze["weight_decay"], unfreeze["init"]) == (0.01, "last")
    without = cvkit.fine_tune(create_model("test_resnet", 3), tiny_loaders(), nn.CrossEntropyLoss(), epochs=1,
                              freeze_epochs=1, logdir=tmp_path / "b", verbose=False, engine="cpu",
                              cache_features=None, train_bn=True)
    stages = json.loads((tmp_path / "b" / "config.json").read_text())["stages"]
    assert stages[0]["cache_features"] is None and stages[1]["train_bn"] is True
    assert without.best


@pytest.mark.parametrize("policy", ["train", "eval"])
def test_frozen_bn_policy_for_frozen_blocks(policy, tmp_path):
    model = create_model("test_resnet", 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    StagedRunner().fit(model, [Stage("head", 1, trainable="head", lr=0.01, frozen_bn=policy)], tiny_loaders(),
                       nn.CrossEntropyLoss(), tmp_path, verbose=False, engine="cpu")
    after = model.state_dict()
    stats = [f"{n}.running_mean" for n in bn_modules(model)]
    moved = [k for k in stats if not torch.equal(before[k], after[k])]
    assert torch.equal(before["conv1.0.weight"], after["conv1.0.weight"]), "a frozen convolution moved"
    if policy == "train":
        assert len(moved) == len(stats), "frozen blocks' BatchNorm statistics should keep training"
    else:
        assert moved == []
    with pytest.raises(ValueError, match="frozen_bn must be 'eval' or 'train'"):
        Stage("s", 1, frozen_bn="on")
