"""YAML experiments: versions by name, overrides, typos caught with the nearest key, round trip."""
from __future__ import annotations

import json

import pytest
import yaml

from cvkit.config import ConfigError, load_config, resolve, stages_from
from cvkit.versions import VERSIONS, get_version, list_versions, register_version

BASE = {
    "task": "classification",
    "data": {"kind": "stl10"},
    "model": {"name": "classifier", "arch": "test_resnet"},
    "optimizer": "sgd_v1",
    "scheduler": "rop_v1",
    "stages": [
        {"name": "head", "epochs": 2, "trainable": "head", "lr": {"head": 0.01}},
        {"name": "full", "epochs": 5, "optimizer": "adam_v1", "scheduler": None, "lr": 0.001},
    ],
}


def test_versions_expand_and_stage_overrides_win(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path, ["stages.1.epochs=7", "stages.0.lr.head=0.05"])
    head, full = config["stages"]
    assert (head["optimizer"], head["optimizer_kwargs"], head["weight_decay"]) == ("sgd", {"momentum": 0.9, "nesterov": True}, 5e-4)
    assert (head["scheduler"], head["scheduler_kwargs"]) == ("plateau", {"factor": 0.15, "patience": 2})
    assert (full["optimizer"], full["scheduler"], full["epochs"]) == ("adam", None, 7)
    assert head["lr"] == {"head": 0.05}
    assert [s.name for s in stages_from(config)] == ["head", "full"]


def test_round_trip_through_config_json_is_identical():
    config = load_config(BASE)
    again = load_config(json.loads(json.dumps(config)))
    assert again == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimzer": "sgd_v1"}, "unknown key 'optimzer'; did you mean 'optimizer'"),
        ({"task": "clasification"}, "did you mean 'classification'"),
        ({"seed": "42"}, "seed: expected int, got str"),
        ({"stages": [{"name": "a", "epoch": 1}]}, r"stages\[0\]: unknown key 'epoch'; did you mean 'epochs'"),
        ({"stages": [{"name": "a", "epochs": "ten"}]}, r"stages\[0\]: stage 'a': epochs must be an int"),
        ({"stages": [{"name": "a", "epochs": 1, "optimizer": "adam_v9"}]}, r"stages\[0\].optimizer: unknown optimizer version 'adam_v9'"),
        ({"stages": [{"name": "a", "epochs": 1, "optimizer": {"name": "sgd", "momentumm": 0.9}}]}, "momentumm"),
        ({"stages": [{"name": "a", "epochs": 1, "scheduler": {"name": "cosine_x"}}]}, "did you mean 'cosine'"),
        ({"model": "v7"}, "unknown model version 'v7'"),
    ],
)
def test_typos_and_wrong_types_name_the_place(change, message):
    with pytest.raises((ConfigError, TypeError), match=message):
        resolve({**BASE, **change})


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="no key 'stagez'; did you mean 'stages'"):
        load_config(BASE, ["stagez.0.epochs=1"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(BASE, ["stages.5.epochs=1"])


def test_users_register_their_own_versions():
    @register_version("optimizer")
    def my_sgd_v2():
        return {"name": "sgd", "momentum": 0.5}

    assert "my_sgd_v2" in list_versions("optimizer")
    config = resolve({**BASE, "optimizer": "my_sgd_v2"})
    assert config["stages"][0]["optimizer_kwargs"] == {"momentum": 0.5}
    first = get_version("optimizer", "my_sgd_v2")
    first["momentum"] = 0.0
    assert get_version("optimizer", "my_sgd_v2")["momentum"] == 0.5, "versions must be copies"
    with pytest.raises(KeyError, match="already registered"):
        register_version("optimizer", "my_sgd_v2")(lambda: {"name": "adam"})
    register_version("optimizer", "my_sgd_v2", override=True)(lambda: {"name": "adam"})
    assert get_version("optimizer", "my_sgd_v2") == {"name": "adam"}
    VERSIONS["optimizer"].unregister("my_sgd_v2")


def test_default_logdir_is_named_by_time_and_hyperparameters_and_never_reused(tmp_path, monkeypatch):
    from cvkit.config import default_logdir

    monkeypatch.chdir(tmp_path)
    config = {"name": "exp", "model": {"arch": "resnet50"}, "stages": [{"name": "a", "lr": {"head": 0.003},
                                                                        "batch_size": 16}]}
    first = default_logdir(config, now=0.0)
    assert first.startswith("runs/exp/") and first.endswith("_resnet50_bs16_lr0.003")
    (tmp_path / first).mkdir(parents=True)
    assert default_logdir(config, now=0.0) == first + "_2"
