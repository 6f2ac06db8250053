"""Export a trained run to ONNX or TorchScript, checked against the PyTorch model before it is declared done.

:func:`export_run` writes the model file and its contract (``<file>.json``, see
:mod:`cvkit.inference.runtime`): input size, resize interpolation and mean/std taken from the run's
recorded eval pipeline, class names, task, output layout (the task's ``tta_target``) and the
parity measured here. The check runs the exported file (ONNX Runtime, or ``torch.jit.load``) and
the PyTorch model on the same images of the run's valid split and compares what the task reads:
probabilities for class scores, coordinates for boxes and keypoints, logits for masks. A
difference above the tolerance is an :class:`ExportError`; nothing is written then.
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from cvkit.inference.runtime import CONTRACT_VERSION, FORMATS, ExportedModel, contract_path
from cvkit.tasks import Task

PathLike = Union[str, os.PathLike]
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 17
PARITY_IMAGES = 8
# Largest max |exported - PyTorch| accepted, per compared quantity (coordinates are fractions of the input).
TOLERANCES = {"probabilities": 1e-4, "coordinates": 1e-4, "mask logits": 1e-3, "outputs": 1e-3}
_NORMALIZE_STEPS = ("NormalizeToTensor", "Normalize")
_PASS_STEPS = ("ToTensorV2",)
_EXPORT_NOISE = (r"You are using the legacy TorchScript-based ONNX export", r"The feature will be removed",
                 r".*torch\.jit.* is deprecated", r"Converting a tensor to a Python", r".*TracerWarning")


class ExportError(ValueError):
    """An export that cannot be made or that disagrees with the PyTorch model (one line)."""


@dataclass
class ExportReport:
    """What :func:`export_run` wrote and how closely the exported model matched PyTorch."""

    path: Path
    contract: Path
    format: str
    task: str
    compared: str
    max_abs_diff: float
    tolerance: float
    images: int

    def summary(self) -> str:
        """One line for the command's output."""
        return (f"wrote {self.path} ({self.format}, task {self.task}) and {self.contract.name}; parity on "
                f"{self.images} images: max |diff| of {self.compared} {self.max_abs_diff:.2e} <= {self.tolerance:.0e}")


# --- the run's preprocessing ----------------------------------------------------------------------

def preprocessing(pipeline: Dict[str, Any], source: str = "eval pipeline") -> Dict[str, Any]:
    """``{"resize": {height, width, interpolation} or None, "normalize": {mean, std, max_pixel_value}}``
    from an albumentations pipeline in its serialised form (what a run's ``config.json`` records).

    Only Resize and the normalisation have a runtime equivalent; any other step is refused.
    """
    steps = (pipeline.get("transform") or pipeline).get("transforms", [])
    resize, normalize = None, None
    for step in steps:
        name = str(step.get("__class_fullname__", "")).rsplit(".", 1)[-1]
        if name == "Resize":
            resize = {"height": int(step["height"]), "width": int(step["width"]),
                      "interpolation": int(step.get("interpolation", 1))}
        elif name == "OneWarp" and step.get("mode") == "resize" and not step.get("hflip") and not step.get("affine"):
            resize = {"height": int(step["size"][0]), "width": int(step["size"][1]), "interpolation": 1}  # bilinear
        elif name in _NORMALIZE_STEPS:
            if name == "Normalize" and step.get("normalization", "standard") != "standard":
                raise ExportError(f"{source}: Normalize(normalization={step['normalization']!r}) has no runtime "
                                  "equivalent; expected the standard (pixel - mean) / std")
            normalize = {"mean": [float(v) for v in step["mean"]], "std": [float(v) for v in step["std"]],
                         "max_pixel_value": float(step.get("max_pixel_value", 255.0))}
        elif name not in _PASS_STEPS:
            raise ExportError(f"{source}: step {name!r} has no runtime equivalent; an exported model's "
                              "preprocessing is Resize + normalisation only")
    if normalize is None:
        raise ExportError(f"{source}: no normalisation step (NormalizeToTensor or Normalize) found")
    return {"resize": resize, "normalize": normalize}


# --- the model ------------------------------------------------------------------------------------

def deployable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` fit to export: uncompiled (``torch.compile`` wrapper or in-place ``.compile()``),
    contiguous (not channels_last), on the CPU, in eval mode; ``model`` itself is left as it was."""
    module = getattr(model, "_orig_mod", model)
    compiled = {m: m._compiled_call_impl for m in module.modules() if getattr(m, "_compiled_call_impl", None)}
    for m in compiled:
        m._compiled_call_impl = None
    try:
        out = copy.deepcopy(module)
    finally:
        for m, impl in compiled.items():
            m._compiled_call_impl = impl
    return out.cpu().to(memory_format=torch.contiguous_format).float().eval()


def export_model(model: nn.Module, example: Tensor, format: str, dynamic_batch: bool = False,
                 opset: int = OPSET) -> bytes:
    """The serialised ``model`` traced on ``example`` (``(B, 3, H, W)``): ONNX or TorchScript bytes."""
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    module, buffer = deployable(model), io.BytesIO()
    example = example.detach().cpu().float().contiguous()
    with warnings.catch_warnings(), torch.no_grad():
        for pattern in _EXPORT_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            if format == "onnx":
                axes = {"images": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset,
                                  input_names=["images"], output_names=["output"], dynamic_axes=axes)
            else:
                torch.jit.save(torch.jit.trace(module, example), buffer)
        except Exception as exc:  # the exporters raise many types; the user needs one line either way
            raise ExportError(f"{format} export failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    return buffer.getvalue()


def check_onnx(data: bytes) -> None:
    """``onnx.checker`` on a serialised model; an ExportError naming the problem."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load_from_string(data))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the export: {' '.join(str(exc).split())[:300]}") from None


def compared_values(task: Task, output: Tensor, num_classes: int) -> Tuple[str, Tensor]:
    """What parity compares for the task's output layout: class probabilities (plus the box), coordinates or logits."""
    target = task.tta_target
    if target == "logits":
        return "probabilities", output.float().softmax(dim=1)
    if target == "class_box":
        return "probabilities", torch.cat([output[:, :num_classes].float().softmax(dim=1),
                                           output[:, num_classes:].float()], dim=1)
    if target in ("keypoints", "boxes"):
        return "coordinates", output.float()
    if target == "mask":
        return "mask logits", output.float()
    return "outputs", output.float()


def parity(task: Task, reference: nn.Module, exported: nn.Module, images: Tensor, num_classes: int) -> Tuple[str, float]:
    """``(what was compared, max |exported - reference|)`` on a batch of normalised images."""
    with torch.no_grad():
        expected = reference.eval()(images)
        got = exported(images)
    if tuple(got.shape) != tuple(expected.shape):
        raise ExportError(f"exported model gives shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    what, a = compared_values(task, expected, num_classes)
    _, b = compared_values(task, got, num_classes)
    return what, float((a - b).abs().max())


# --- a run ----------------------------------------------------------------------------------------

def _parity_images(run_folder: Path, transform: Any, task: Task, count: int) -> Tensor:
    """The first ``count`` images of the run's valid split (else test, else train) through ``transform``."""
    from cvkit.config import load_experiment
    from cvkit.experiment import build, with_transform

    experiment = build(load_experiment(run_folder / "config.json"))
    split = next(s for s in ("valid", "test", "train") if s in experiment.datasets)
    dataset = task.wrap(with_transform(experiment.datasets[split], transform))
    if not len(dataset):
        raise ExportError(f"{run_folder}: the {split} split is empty; parity needs real images")
    return torch.stack([dataset[i]["features"].float() for i in range(min(count, len(dataset)))])


def export_run(run_folder: PathLike, format: str = "onnx", image_size: Optional[int] = None,
               dynamic_batch: bool = False, out: Optional[PathLike] = None, images: int = PARITY_IMAGES,
               tolerance: Optional[float] = None, opset: int = OPSET) -> ExportReport:
    """Export a run's ``best.pth`` to ``format`` (``onnx`` or ``torchscript``), check parity, write model + contract.

    Args:
        run_folder: the run (its ``config.json``, ``best.pth``, ``classes.json``).
        image_size: the input size (default: the run's last stage size, from its recorded eval pipeline).
        dynamic_batch: accept any batch size (default: batch 1).
        out: the model file (default ``<run>/export/model.onnx`` or ``model.pt``); the contract is ``<out>.json``.
        images: how many valid images the parity check runs.
        tolerance: the largest max |difference| accepted (default: :data:`TOLERANCES` for the task's output).
    """
    from cvkit.data.augment import transform_to_dict
    from cvkit.inference.predict import load_run
    from cvkit.io import atomic_write_bytes, atomic_write_json

    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    if image_size is not None and image_size < 1:
        raise ExportError(f"image_size must be a positive number of pixels, got {image_size}")
    folder = Path(run_folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: not a run folder (no config.json); expected the logdir of a finished run")
    run = load_run(folder)
    task = run.task
    transform = run.transform(image_size)
    prep = preprocessing(transform_to_dict(transform), f"{folder / 'config.json'}: eval pipeline")
    if prep["resize"] is None:
        raise ExportError(f"{folder / 'config.json'}: the eval pipeline does not resize, so the input size is "
                          "unknown; pass image_size (CLI: --image-size N)")
    x = _parity_images(folder, transform, task, images)
    num_classes = len(run.classes) or int(run.config["model"].get("num_classes") or 0)
    data = export_model(run.model, x[:1], format, dynamic_batch, opset)
    if format == "onnx":
        check_onnx(data)
    exported = ExportedModel(data, format, batch=None if dynamic_batch else 1)
    compared, diff = parity(task, run.model, exported, x, num_classes)
    limit = TOLERANCES.get(compared, TOLERANCES["outputs"]) if tolerance is None else float(tolerance)
    if not diff <= limit:
        raise ExportError(f"{format} export of {folder} disagrees with PyTorch: max |diff| of {compared} "
                          f"{diff:.3g} > tolerance {limit:g} on {len(x)} images; nothing written")
    path = Path(out) if out is not None else folder / "export" / f"model{SUFFIXES[format]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tuning_file = _copy_tuning(task, folder, path.parent)
    with torch.no_grad():
        output_shape = list(run.model.eval()(x[:1]).shape[1:])
    contract = {
        "version": CONTRACT_VERSION,
        "format": format,
        "file": path.name,
        "opset": opset if format == "onnx" else None,
        "task": task.name,
        "output": task.tta_target,
        "output_shape": ["batch" if dynamic_batch else 1, *output_shape],
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "color": "RGB", "channels": int(x.shape[1]),
                  "height": int(x.shape[2]), "width": int(x.shape[3]), "batch": None if dynamic_batch else 1},
        "preprocess": prep,
        "classes": list(run.classes),
        "num_classes": num_classes or None,
        "num_keypoints": run.config["model"].get("num_keypoints"),
        "tuning_file": tuning_file,
        "parity": {"compared": compared, "max_abs_diff": diff, "tolerance": limit, "images": int(len(x)),
                   "reference": "PyTorch best.pth on the run's eval pipeline"},
        "source": {"run": str(folder.resolve()), "checkpoint": "best.pth"},
    }
    atomic_write_bytes(path, data)
    atomic_write_json(contract_path(path), contract)
    return ExportReport(path, contract_path(path), format, task.name, compared, diff, limit, int(len(x)))


def _copy_tuning(task: Task, run_folder: Path, target: Path) -> Optional[str]:
    """Copy the run's tuned post-processing file beside the export; its name, or None when the run has none."""
    name = task.tuning_file
    if not name or not (run_folder / name).is_file():
        return None
    if (run_folder / name).resolve() != (target / name).resolve():
        from cvkit.io import atomic_write_bytes

        atomic_write_bytes(target / name, (run_folder / name).read_bytes())
    return name


__all__ = ["ExportError", "ExportReport", "OPSET", "TOLERANCES", "check_onnx", "compared_values", "deployable",
           "export_model", "export_run", "parity", "preprocessing"]
