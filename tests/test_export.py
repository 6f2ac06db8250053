"""Export (ONNX / TorchScript) with its parity check, prediction from the exported file, class-folder export."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cvkit.cli import main
from cvkit.config import load_experiment
from cvkit.data.rle import rle_decode
from cvkit.training import run as run_experiment

pytest.importorskip("onnx", reason="export tests need the 'export' extra: pip install onnx onnxruntime")
pytest.importorskip("onnxruntime", reason="export tests need the 'export' extra: pip install onnx onnxruntime")

from cvkit.export import ExportError, TOLERANCES, export_model, export_run, preprocessing  # noqa: E402
from cvkit.inference.runtime import ExportedModel, Preprocess, contract_path  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
TASKS = ("classification", "class_box", "keypoints", "segmentation")
TEST_TABLES = {"classification": "classification_5_per_class", "class_box": "boxes_3_per_class",
               "keypoints": "keypoints_3_per_class", "segmentation": "segmentation_3_per_class"}
# Exported vs checkpoint submissions: labels identical, coordinates (px) within this, mask pixels agreeing at least this.
COORD_TOL_PX, MASK_AGREEMENT = 0.05, 0.999


def train_demo(task: str, root: Path, per_class: int) -> Path:
    """A demo run of ``task`` in seconds: a few images per class, one epoch per stage."""
    logdir = root / task
    config = load_experiment(CONFIGS / f"{task}_demo.yaml", [
        f"logdir={logdir}", f"data.root={root / 'demo_data'}", f"data.per_class={per_class}", "data.limit=32",
        "stages.0.epochs=1", "stages.1.epochs=1"])
    run_experiment(config, verbose=False)
    return logdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export_runs")
    return {task: train_demo(task, root, 5 if task == "classification" else 3) for task in TASKS}


def _test_csv(run: Path, task: str) -> Path:
    return run.parent / "demo_data" / TEST_TABLES[task] / "test.csv"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("task", TASKS)
def test_export_writes_a_checked_model_and_its_contract(runs, task, fmt, tmp_path):
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    report = export_run(runs[task], fmt, out=out, dynamic_batch=task == "classification")
    assert report.path == out and out.is_file() and report.images > 1
    assert report.max_abs_diff <= report.tolerance == TOLERANCES[report.compared]
    contract = json.loads(contract_path(out).read_text())
    assert contract["parity"]["max_abs_diff"] == report.max_abs_diff
    assert contract["task"] == task and contract["format"] == fmt
    recorded = json.loads((runs[task] / "config.json").read_text())["pipelines"]
    last = json.loads((runs[task] / "config.json").read_text())["stages"][-1]["name"]
    norm = [s for s in recorded[last]["eval"]["transform"]["transforms"] if "Normalize" in s["__class_fullname__"]][0]
    assert contract["preprocess"]["normalize"]["mean"] == norm["mean"]
    assert contract["preprocess"]["normalize"]["std"] == norm["std"]
    classes = runs[task] / "classes.json"
    assert contract["classes"] == (json.loads(classes.read_text()) if classes.is_file() else [])
    assert contract["input"]["batch"] == (None if task == "classification" else 1)
    if fmt == "onnx":
        import onnx

        onnx.checker.check_model(onnx.load(str(out)))


def test_export_command_prints_the_parity_line(runs, tmp_path, capsys):
    out = tmp_path / "seg.onnx"
    assert main(["export", str(runs["segmentation"]), "--format", "onnx", "--out", str(out), "--image-size", "96"]) == 0
    printed = capsys.readouterr().out
    assert "max |diff| of mask logits" in printed and str(out) in printed
    contract = json.loads(contract_path(out).read_text())
    assert (contract["input"]["height"], contract["input"]["width"]) == (96, 96)
    assert contract["tuning_file"] == "postprocess.json" and (tmp_path / "postprocess.json").is_file()


def test_parity_failure_is_a_one_line_error_and_writes_nothing(runs, tmp_path, monkeypatch):
    import cvkit.export as export

    def perturbed(model, *args, **kwargs):
        model = export.deployable(model)
        with torch.no_grad():
            next(p for p in model.parameters() if p.ndim > 1).add_(0.5)
        return export_model(model, *args, **kwargs)

    monkeypatch.setattr(export, "export_model", perturbed)
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="disagrees with PyTorch: max .diff. of probabilities") as info:
        export_run(runs["classification"], "onnx", out=out)
    assert "\n" not in str(info.value) and not out.exists() and not contract_path(out).exists()


def test_channels_last_and_compiled_models_export_and_stay_as_they_were():
    from cvkit.models.tasks import create_task_model

    torch.manual_seed(0)
    model = create_task_model("classifier", arch="test_resnet", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    model.to(memory_format=torch.channels_last)
    model.compile()
    data = export_model(model, x[:1], "onnx", dynamic_batch=True)
    got = ExportedModel(data, "onnx")(x)
    assert (got - expected).abs().max() < 1e-4
    assert model._compiled_call_impl is not None, "export must not uncompile the caller's model"
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_preprocessing_refuses_a_step_without_runtime_equivalent():
    import albumentations as A

    from cvkit.data.augment import compose, transform_to_dict

    pipeline = transform_to_dict(compose([A.CenterCrop(32, 32), A.Resize(16, 16)]))
    with pytest.raises(ExportError, match="step 'CenterCrop' has no runtime equivalent"):
        preprocessing(pipeline, "config.json: eval pipeline")


def test_runtime_preprocessing_equals_the_albumentations_pipeline():
    import albumentations as A

    from cvkit.data.augment import compose, transform_to_dict

    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for interpolation in (1, 3):
        pipeline = compose([A.Resize(24, 40, interpolation=interpolation)], ((0.3, 0.4, 0.5), (0.2, 0.25, 0.3)))
        expected = pipeline(image=image)["image"].numpy()
        got = Preprocess(preprocessing(transform_to_dict(pipeline)))(image)
        assert got.dtype == np.float32 and np.array_equal(got, expected)


@pytest.mark.parametrize("task", TASKS)
def test_predict_from_the_exported_model_matches_the_checkpoint(runs, task, tmp_path):
    model = export_run(runs[task], "onnx", out=tmp_path / "model.onnx").path
    images = _test_csv(runs[task], task)
    a, b = tmp_path / "ckpt.csv", tmp_path / "onnx.csv"
    assert main(["predict", "--checkpoint", str(runs[task]), "--config", str(runs[task] / "config.json"),
                 "--images", str(images), "--out", str(a), "--device", "cpu", "--tta", "vflip"]) == 0
    assert main(["predict", "--model", str(model), "--images", str(images), "--out", str(b), "--tta", "vflip"]) == 0
    x, y = pd.read_csv(a, keep_default_na=False), pd.read_csv(b, keep_default_na=False)
    assert list(x.columns) == list(y.columns) and len(x) == len(y)
    assert list(dict.fromkeys(x.iloc[:, 0])) == list(pd.read_csv(images)["path"])
    if task == "segmentation":
        from cvkit.data.io import read_image

        height, width = read_image(images.parent / x.iloc[0, 0]).shape[:2]
        masks = [np.stack([rle_decode(r, (height, width)) for r in f["EncodedPixels"]]) for f in (x, y)]
        assert (masks[0] == masks[1]).mean() >= MASK_AGREEMENT
        return
    numeric = [c for c in x.columns if c not in ("path", "label")]
    assert x.drop(columns=numeric).equals(y.drop(columns=numeric))
    if numeric:
        assert np.abs(x[numeric].to_numpy(float) - y[numeric].to_numpy(float)).max() <= COORD_TOL_PX


HEAVY = """
import sys
from cvkit.cli import main
code = main(sys.argv[1:])
print("HEAVY", sorted(m for m in ("catalyst", "timm", "segmentation_models_pytorch") if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize("task", ["segmentation", "keypoints"])
def test_predict_from_an_exported_model_imports_no_training_stack(runs, task, tmp_path):
    model = export_run(runs[task], "onnx", out=tmp_path / "model.onnx").path
    done = subprocess.run([sys.executable, "-c", HEAVY, "predict", "--model", str(model), "--images",
                           str(_test_csv(runs[task], task)), "--out", str(tmp_path / "s.csv")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY []" in done.stdout


def test_predict_model_without_contract_is_one_line_exit_2(runs, tmp_path, capsys):
    model = export_run(runs["keypoints"], "onnx", out=tmp_path / "model.onnx").path
    contract_path(model).unlink()
    assert main(["predict", "--model", str(model), "--images", str(_test_csv(runs["keypoints"], "keypoints")),
                 "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.onnx.json not found; expected the contract JSON" in err
    assert main(["predict", "--model", str(model), "--config", "c.json", "--images", "x"]) == 2
    assert "drop --config" in capsys.readouterr().err


def test_export_dir_copies_each_image_into_its_predicted_class(runs, tmp_path):
    run, images = runs["classification"], _test_csv(runs["classification"], "classification")
    out, folder = tmp_path / "s.csv", tmp_path / "by_class"
    assert main(["predict", "--checkpoint", str(run), "--config", str(run / "config.json"), "--images", str(images),
                 "--out", str(out), "--device", "cpu", "--export-dir", str(folder)]) == 0
    frame = pd.read_csv(out)
    copied = {p.name: p.parent.name for p in folder.rglob("*") if p.is_file()}
    assert copied == {Path(p).name: label for p, label in zip(frame["path"], frame["label"])}


def test_export_dir_refuses_an_unsafe_class_name(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["classification"], run, ignore=shutil.ignore_patterns("tensorboard", "checkpoints"))
    classes = json.loads((run / "classes.json").read_text())
    (run / "classes.json").write_text(json.dumps([f"../escape{i}" for i in range(len(classes))]))
    folder = tmp_path / "by_class"
    code = main(["predict", "--checkpoint", str(run), "--config", str(run / "config.json"), "--images",
                 str(_test_csv(runs["classification"], "classification")), "--out", str(tmp_path / "s.csv"),
                 "--device", "cpu", "--probs", "--export-dir", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "class name '../escape" in err
    assert not list(tmp_path.glob("escape*")) and not folder.exists()


def test_export_dir_needs_labels(runs, tmp_path, capsys):
    run = runs["segmentation"]
    assert main(["predict", "--checkpoint", str(run), "--config", str(run / "config.json"), "--images",
                 str(_test_csv(run, "segmentation")), "--out", str(tmp_path / "s.csv"), "--device", "cpu",
                 "--export-dir", str(tmp_path / "x")]) == 2
    assert "no label column" in capsys.readouterr().err


def test_predict_tile_option_matches_whole_images_that_fit_one_tile(runs, tmp_path, capsys):
    from cvkit.data.io import read_image

    run, images = runs["segmentation"], _test_csv(runs["segmentation"], "segmentation")
    assert read_image(images.parent / pd.read_csv(images)["path"][0]).shape[:2] == (96, 96)
    base = ["predict", "--checkpoint", str(run), "--config", str(run / "config.json"), "--images", str(images),
            "--device", "cpu", "--tta", "hflip"]
    assert main(base + ["--out", str(tmp_path / "whole.csv"), "--image-size", "96"]) == 0  # no resize
    assert main(base + ["--out", str(tmp_path / "tiled.csv"), "--tile", "128", "--overlap", "16"]) == 0
    assert pd.read_csv(tmp_path / "whole.csv").equals(pd.read_csv(tmp_path / "tiled.csv"))
    run = runs["keypoints"]
    assert main(["predict", "--checkpoint", str(run), "--config", str(run / "config.json"), "--images",
                 str(_test_csv(run, "keypoints")), "--out", str(tmp_path / "k.csv"), "--tile", "64"]) == 2
    assert "tiled inference needs mask outputs" in capsys.readouterr().err


class _Scaled(torch.nn.Module):
    """A run's model with its outputs blown up to the thousands, as a long-trained segmentation model's logits are."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 1000 - 2000


def test_parity_is_relative_to_the_outputs_scale_and_recorded_in_the_contract(runs, tmp_path, monkeypatch):
    import importlib

    from cvkit.export import RTOL

    runs_module = importlib.import_module("cvkit.inference.runs")  # where export_run takes load_run from

    load_run = runs_module.load_run

    def scaled(folder):
        run = load_run(folder)
        run.model = _Scaled(run.model)
        return run

    monkeypatch.setattr(runs_module, "load_run", scaled)
    run, out = runs["segmentation"], tmp_path / "seg.onnx"
    with pytest.raises(ExportError, match=r"max .diff. of mask logits .* > 0.001 \+ 0 x .*nothing written"):
        export_run(run, "onnx", out=out, rtol=0)  # float32 rounding at |logit| ~ 3000 is above an absolute 1e-3
    assert not out.exists()
    report = export_run(run, "onnx", out=out)
    assert report.max_abs_diff > TOLERANCES["mask logits"] and report.rtol == RTOL and report.scale > 1000
    parity = json.loads(contract_path(out).read_text())["parity"]
    assert (parity["atol"], parity["rtol"], parity["scale"]) == (TOLERANCES["mask logits"], RTOL, report.scale)
    assert "atol + rtol" in parity["rule"]
    assert main(["export", str(run), "--out", str(out), "--atol", "0.5", "--rtol", "0"]) == 0
    parity = json.loads(contract_path(out).read_text())["parity"]
    assert (parity["atol"], parity["rtol"]) == (0.5, 0.0)


def test_parity_of_a_one_column_output_compares_the_values_not_a_softmax():
    from cvkit.export import compared_values, parity
    from cvkit.tasks import get_task
    from cvkit.layouts import ValuesLayout

    class Regression(type(get_task("classification"))):
        layout = ValuesLayout()

    class Shifted(torch.nn.Module):
        def __init__(self, model: torch.nn.Module, shift: float) -> None:
            super().__init__()
            self.model, self.shift = model, shift

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x) + self.shift

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1)).eval()
    images = torch.randn(4, 3, 8, 8)
    classification = get_task("classification")
    assert compared_values(classification, torch.zeros(2, 1), 1)[0] == "outputs"  # softmax of one column is 1
    assert compared_values(classification, torch.zeros(2, 3), 3)[0] == "probabilities"
    for task in (classification, Regression()):
        check = parity(task, reference, Shifted(reference, 0.5), images, 1)
        assert check.compared == "outputs" and not check.ok and abs(check.max_abs_diff - 0.5) < 1e-6
        assert parity(task, reference, Shifted(reference, 0.0), images, 1).ok


def test_the_recorded_eval_spec_is_what_the_recorded_pipeline_derives_to(runs):
    from cvkit.data.evalspec import EvalSpec, derive_eval_spec

    for task in TASKS:
        recorded = json.loads((runs[task] / "config.json").read_text())["pipelines"]
        for stage, entry in recorded.items():
            spec = EvalSpec.from_dict(entry["eval_spec"])
            assert spec == derive_eval_spec(entry["eval"]) and spec.size is not None, (task, stage)


def test_an_old_run_folder_without_the_spec_predicts_and_exports_the_same(runs, tmp_path):
    """A config.json written before eval_spec was recorded: the spec derived from its pipelines gives the
    same contract and the same submission."""
    old = tmp_path / "old"
    shutil.copytree(runs["keypoints"], old, ignore=shutil.ignore_patterns("tensorboard", "checkpoints", "export"))
    config = json.loads((old / "config.json").read_text())
    for entry in config["pipelines"].values():
        del entry["eval_spec"]
    (old / "config.json").write_text(json.dumps(config))
    contracts, frames = [], []
    for run in (runs["keypoints"], old):
        model = export_run(run, "onnx", out=tmp_path / run.name / "model.onnx").path
        contracts.append(json.loads(contract_path(model).read_text())["preprocess"])
        out = tmp_path / f"{run.name}.csv"
        assert main(["predict", "--checkpoint", str(run), "--config", str(run / "config.json"), "--images",
                     str(_test_csv(runs["keypoints"], "keypoints")), "--out", str(out), "--device", "cpu"]) == 0
        frames.append(pd.read_csv(out))
    assert contracts[0] == contracts[1] and contracts[0]["resize"] is not None
    assert frames[0].equals(frames[1])


def test_the_checkpoint_and_the_exported_model_share_one_prediction_loop(runs, tmp_path):
    """The same arrays through iter_predict (checkpoint) and Deployed.predict_arrays (exported): the same
    names, indices and sizes in the same order, and the same outputs."""
    from cvkit.inference.predict import iter_predict
    from cvkit.inference.runs import load_run
    from cvkit.inference.runtime import load_deployed

    run = runs["classification"]
    model = export_run(run, "torchscript", out=tmp_path / "model.pt", dynamic_batch=True).path
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 40), (57, 33), (64, 90))]
    trained = load_run(run)
    a = list(iter_predict(trained.model, images, trained.task, tta=["hflip"], batch_size=2, device="cpu",
                          transform=trained.eval_spec(), image_size=trained.eval_spec().size[0]))
    b = list(load_deployed(model).predict_arrays(images, ["0", "1", "2"], tta=["hflip"], batch_size=2))
    assert [(p.name, p.index, p.height, p.width) for p in a] == [(p.name, p.index, p.height, p.width) for p in b]
    assert [(p.height, p.width) for p in a] == [(40, 40), (57, 33), (64, 90)]
    assert max(float((p.output - q.output).abs().max()) for p, q in zip(a, b)) < 1e-5
