"""A segmentation run tunes its post-processing on the valid split after training, records it, and
`cvkit predict` applies it unless a threshold is given."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cvkit.cli import main
from cvkit.experiment import build, load_experiment
from cvkit.training import run
from cvkit.inference import load_run, predict, write_submission

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "segmentation_demo.yaml"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tuned")
    overrides = [f"logdir={folder / 'run'}", f"data.root={folder / 'demo'}", "stages.1.epochs=1"]
    config = load_experiment(EXAMPLE, overrides)
    return folder, config, run(config, verbose=False)


def test_tuning_uses_the_valid_split_only_and_is_recorded(tuned):
    folder, config, result = tuned
    saved = json.loads((folder / "run" / "postprocess.json").read_text())
    valid = build(config).datasets["valid"]
    assert saved["images"] == len(valid), "the search must see the valid split and nothing else"
    assert result["postprocess"]["before"] == saved["before"] and saved["after"] >= saved["before"]
    assert json.loads((folder / "run" / "metrics.json").read_text())["postprocess"]["after"] == saved["after"]


def test_predict_applies_the_tuning_unless_a_threshold_is_given(tuned, tmp_path):
    folder, config, _ = tuned
    test_csv = next((folder / "demo").rglob("test.csv"))
    loaded = load_run(folder / "run")
    assert loaded.tuning is not None
    preds = predict(loaded.model, test_csv, loaded.task, transform=loaded.transform(), device="cpu")
    expected = write_submission(preds, loaded.task, tuning=loaded.tuning)
    plain = write_submission(preds, loaded.task, threshold=0.5)
    base = ["predict", "--checkpoint", str(folder / "run"), "--config", str(folder / "run" / "config.json"),
            "--images", str(test_csv), "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "tuned.csv")]) == 0
    assert main(base + ["--out", str(tmp_path / "plain.csv"), "--threshold", "0.5"]) == 0
    read = lambda p: pd.read_csv(p, keep_default_na=False)  # noqa: E731
    assert read(tmp_path / "tuned.csv").equals(read_frame(expected))
    assert read(tmp_path / "plain.csv").equals(read_frame(plain))


def read_frame(frame: pd.DataFrame) -> pd.DataFrame:
    import io

    return pd.read_csv(io.StringIO(frame.to_csv(index=False)), keep_default_na=False)
