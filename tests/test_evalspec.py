"""The eval spec as data, the one resize plan and the one model-over-loader loop (no training here)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cvkit.data import augment
from cvkit.data.evalspec import EvalSpec, derive_eval_spec, recorded_eval_spec
from cvkit.data.resize_plan import decoded_shape, resize
from cvkit.data.warp import SOURCE_KEY, WarpSource
from cvkit.errors import DataError
from cvkit.inference.loop import outputs_over
from cvkit.inference.predict import prediction_loop


@pytest.mark.parametrize("spec", [
    EvalSpec((24, 40), (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)),
    EvalSpec((32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation=3),
    EvalSpec(None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    EvalSpec((16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), max_pixel_value=1023.0),
])
def test_the_pipeline_built_from_a_spec_derives_back_to_it(spec):
    pipeline = augment.transform_to_dict(augment.eval_pipeline(spec))
    assert derive_eval_spec(pipeline) == spec
    assert EvalSpec.from_dict(spec.to_dict()) == spec == EvalSpec.from_preprocess(spec.preprocess())


def test_a_config_without_the_spec_derives_it_from_the_recorded_pipeline_once():
    spec = EvalSpec((48, 48), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    eval_dict = augment.transform_to_dict(augment.eval_pipeline(spec))
    new = {"pipelines": {"full": {"eval": eval_dict, "eval_spec": spec.to_dict()}}}
    old = {"pipelines": {"full": {"eval": eval_dict}}}
    assert recorded_eval_spec(new, "full") == recorded_eval_spec(old, "full") == spec
    assert recorded_eval_spec(old, "head") is None and recorded_eval_spec({}, "full") is None


@pytest.mark.parametrize("recorded,message", [
    ({"size": [8], "mean": [0.1], "std": [0.2]}, r"pipelines.full.eval_spec.size: \[8\]; expected \[height, width\]"),
    ({"size": None, "mean": [0.1], "std": ["x"]}, r"pipelines.full.eval_spec.std: \['x'\]; expected one finite"),
    ({"size": None, "mean": [0.1], "std": [0.0]}, r"pipelines.full.eval_spec: mean \[0.1\] / std \[0.0\]; .*non-zero"),
])
def test_a_recorded_spec_with_a_bad_value_is_one_line_naming_the_key(recorded, message):
    with pytest.raises(ValueError, match="^config.json: " + message) as info:
        recorded_eval_spec({"pipelines": {"full": {"eval_spec": recorded}}}, "full")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("source,size", [((37, 53), (24, 40)), ((101, 203), (16, 24)), ((64, 96), (32, 48))])
def test_the_resize_plan_maps_a_reduced_decode_as_the_resize_pipeline(source, size):
    """The runtime's resize (resize_plan.resize) and OneWarp's: same pixels, on whole and partial blocks."""
    rng = np.random.default_rng(1)
    warp = augment.create_preset("resize", size, normalize="none")
    for reduce in (1, 2, 4):
        image = rng.integers(0, 256, (*decoded_shape(source, reduce), 3), dtype=np.uint8)
        expected = warp(image=image, **{SOURCE_KEY: WarpSource(*source, reduce)})["image"].numpy()
        got = resize(image, size, source).transpose(2, 0, 1) / 255.0
        assert np.abs(got - expected).max() < 1e-6, (source, size, reduce)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_outputs_over_runs_in_eval_mode_without_gradients_and_restores_modes():
    model = _Scale().train()
    model.bn.eval()
    seen = []

    def forward(x):
        seen.append((model.training, torch.is_grad_enabled()))
        return model(x)

    batches = [{"features": torch.ones(2, 1) * k, "index": torch.tensor([2 * k, 2 * k + 1])} for k in range(3)]
    out = [(b["index"].tolist(), o.flatten().tolist()) for b, o in outputs_over(model, batches, forward=forward)]
    assert out == [([0, 1], [0.0, 0.0]), ([2, 3], [2.0, 2.0]), ([4, 5], [4.0, 4.0])]
    assert seen == [(False, False)] * 3
    assert model.training and not model.bn.training
    pairs = list(outputs_over(model, [(torch.ones(1, 1), 0), (torch.ones(3, 1), 1)]))
    assert [o.shape[0] for _, o in pairs] == [1, 3]


def test_the_prediction_loop_keeps_order_index_and_size_and_names_failing_images():
    class Fails(nn.Module):
        def forward(self, x):
            if x.shape[0] == 1:
                raise RuntimeError("shape\nmismatch")
            return x.flatten(1)

    names = ["a.png", "b.png", "c.png"]
    batches = [{"features": torch.zeros(2, 1, 2, 2), "index": torch.tensor([0, 1]), "size": torch.tensor([[5, 6], [7, 8]])},
               {"features": torch.zeros(1, 1, 2, 2), "index": torch.tensor([2])}]
    model = Fails()
    got = prediction_loop(model, batches, names, model)
    first, second = next(got), next(got)
    assert (first.name, first.index, first.height, first.width) == ("a.png", 0, 5, 6)
    assert (second.name, second.index, second.height, second.width) == ("b.png", 1, 7, 8)
    with pytest.raises(DataError, match=r"the model failed on images \['c.png'\]...: shape mismatch"):
        next(got)


def test_predictions_of_files_in_different_folders_never_share_a_name(tmp_path):
    import cv2
    import numpy as np
    import torch

    from cvkit.inference import predict, write_submission

    files = []
    for folder in ("cat", "dog"):
        (tmp_path / "test" / folder).mkdir(parents=True)
        files.append(tmp_path / "test" / folder / "1.png")
        cv2.imwrite(str(files[-1]), np.full((12, 12, 3), 100 if folder == "cat" else 200, np.uint8))
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    predictions = predict(model, files, "classification", image_size=8, device="cpu")
    assert [p.name for p in predictions] == ["cat/1.png", "dog/1.png"]
    assert write_submission(predictions, "classification", ["a", "b"])["path"].tolist() == ["cat/1.png", "dog/1.png"]
    one_folder = predict(model, [files[0]], "classification", image_size=8, device="cpu")
    assert [p.name for p in one_folder] == ["1.png"]
