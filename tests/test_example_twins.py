"""YAML twins: ``cvkit train examples/configs/<example>.yaml`` is the Python example's own experiment.

The twinned examples build their run from a config dict (``CONFIG`` plus the command line) through
:mod:`cvkit.experiment`, the builders ``cvkit train`` uses, and the YAML file holds that dict. Checked
two ways: the YAML file equals ``CONFIG`` and the example's defaults complete to the same experiment;
and a small run of each path gives exactly the same test metrics (CPU, one seed, deterministic).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import examples_loader
from cvkit.config import complete, load_config, load_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
# example -> (its smoke-run options, the same choices as `cvkit train --set` overrides)
TWINS = {
    "sports_train": (["--limit", "40", "--epochs", "1"], ["data.limit=40", "stages.1.epochs=1"]),
    "steel_segmentation_train": (["--limit", "16", "--head-epochs", "1", "--epochs", "1"],
                                 ["data.limit=16", "stages.0.epochs=1", "stages.1.epochs=1"]),
}


def plain(obj: object) -> object:
    """JSON's view of ``obj`` (tuples become lists), as a run's config.json stores it."""
    return json.loads(json.dumps(obj))


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twin_yaml_is_the_examples_config_and_its_defaults(name, tmp_path, monkeypatch):
    example = examples_loader.load(name)
    twin = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert plain(example.CONFIG) == twin
    monkeypatch.chdir(tmp_path)
    from_python = plain(complete(load_config(example.experiment(example.parse_args([])))))
    from_yaml = plain(complete(load_config(CONFIGS / f"{name}.yaml")))
    assert from_python.pop("logdir") == f"runs/{twin['name']}"  # the YAML run gets a time-stamped folder
    from_yaml.pop("logdir")
    assert from_python == from_yaml


def completed(run_dir: Path) -> dict:
    """A run's experiment as config.json records it, without its logdir."""
    config = plain(complete(load_experiment(run_dir / "config.json")))
    config.pop("logdir")
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TWINS))
def test_cvkit_train_on_the_twin_gives_the_examples_test_metrics(name, tmp_path):
    from cvkit.cli import main as cvkit

    python_args, overrides = TWINS[name]
    example = examples_loader.load(name)
    example.main(["--logdir", str(tmp_path / "python"), "--quiet", *python_args])
    python_config = json.loads((tmp_path / "python" / "config.json").read_text())
    sets = [f"logdir={tmp_path / 'yaml'}", *overrides]
    if python_config["model"].get("pretrained"):  # the demo backbone the example cached beside its logdir
        sets.append(f"model.pretrained={python_config['model']['pretrained']}")
    assert cvkit(["train", str(CONFIGS / f"{name}.yaml"), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0

    assert completed(tmp_path / "yaml") == completed(tmp_path / "python")
    from_python = json.loads((tmp_path / "python" / "metrics.json").read_text())
    from_yaml = json.loads((tmp_path / "yaml" / "metrics.json").read_text())
    assert from_yaml["test"] == from_python["test"]  # exactly: same builders, same seed
    assert from_yaml["best"]["epoch"] == from_python["best"]["epoch"]
    # every epoch of every stage too: the best epoch of a smoke run may come from the first stage alone
    assert (tmp_path / "yaml" / "log.csv").read_text() == (tmp_path / "python" / "log.csv").read_text()
    print(f"{name}: test {from_python['test']}")
