"""Export a trained run to ONNX or TorchScript, checked against the PyTorch model before it is declared done.

:func:`export_run` writes the model file and its contract (``<file>.json``, see
:mod:`cvkit.inference.runtime`): input size, resize interpolation and mean/std (the run's recorded
eval spec, :meth:`cvkit.inference.runs.RunModel.eval_spec`), class names, task, output layout (the name
of the task's ``layout``) and the parity measured here. The check runs the exported file (ONNX Runtime, or ``torch.jit.load``) and
the PyTorch model on the same images of the run's valid split and compares what the task reads:
probabilities for class scores, coordinates for boxes and keypoints, logits for masks, raw values
for a one-column or unactivated output. Each value must satisfy
``|exported - PyTorch| <= atol + rtol * scale``, ``scale`` being the largest ``|PyTorch|`` of that
image's compared output: float32 rounding grows with the output's magnitude (mask logits near
-2900 differ by more than 1e-3 between two correct runtimes), so the bound does too. A value
outside it is an :class:`ExportError`; nothing is written then.
"""
from __future__ import annotations

import copy
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from cvkit.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from cvkit.data.evalspec import derive_eval_spec
from cvkit.inference.runtime import CONTRACT_VERSION, FORMATS, ExportedModel, contract_path
from cvkit.tasks import Task

PathLike = Union[str, os.PathLike]
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 17
PARITY_IMAGES = 8
# Parity: |exported - PyTorch| <= atol + RTOL * (largest |PyTorch| of the image's compared output), per value;
# atol per compared quantity (coordinates are fractions of the input).
TOLERANCES = {"probabilities": 1e-4, "coordinates": 1e-4, "mask logits": 1e-3, "outputs": 1e-3}
RTOL = 1e-4
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
    tolerance: float  # atol, the absolute part of the bound
    images: int
    rtol: float = RTOL
    scale: float = 0.0

    def summary(self) -> str:
        """One line for the command's output."""
        return (f"wrote {self.path} ({self.format}, task {self.task}) and {self.contract.name}; parity on "
                f"{self.images} images: max |diff| of {self.compared} {self.max_abs_diff:.2e}, within "
                f"{self.tolerance:g} + {self.rtol:g} x max |PyTorch| per image (max |PyTorch| {self.scale:.3g})")


@dataclass(frozen=True)
class Parity:
    """How the exported model's compared values differ from PyTorch's, against ``atol + rtol * scale``."""

    compared: str
    max_abs_diff: float
    scale: float  # the largest |PyTorch| of one image's compared output, over the images
    atol: float
    rtol: float
    worst: str  # the value furthest outside its bound, or "" when every value is within it

    @property
    def ok(self) -> bool:
        return not self.worst


# --- the run's preprocessing ----------------------------------------------------------------------

def preprocessing(pipeline: Dict[str, Any], source: str = "eval pipeline") -> Dict[str, Any]:
    """The contract's ``preprocess`` (``{"resize": {height, width, interpolation} or None, "normalize":
    {mean, std, max_pixel_value}}``) of an albumentations pipeline in its serialised form, through
    :func:`cvkit.data.evalspec.derive_eval_spec`: Resize and the normalisation only, any other step refused."""
    try:
        return derive_eval_spec(pipeline, source).preprocess()
    except ValueError as exc:
        raise ExportError(str(exc)) from None


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
    """What parity compares for the task's output layout (:meth:`cvkit.layouts.OutputLayout.compare`),
    as prediction reads it: class probabilities (plus the box), coordinates, mask logits, or the raw
    values of an output that is not activated or whose activation would hide a difference (a softmax
    over one column is always 1)."""
    return task.layout.compare(output, num_classes or None)


def parity(task: Task, reference: nn.Module, exported: nn.Module, images: Tensor, num_classes: int,
           atol: Optional[float] = None, rtol: float = RTOL) -> Parity:
    """The exported model against ``reference`` on a batch of normalised images: each compared value
    within ``atol + rtol * scale`` (``scale``: the largest |reference| of its image; ``atol`` default
    :data:`TOLERANCES` of the compared quantity)."""
    with torch.no_grad():
        expected = reference.eval()(images)
        got = exported(images)
    if tuple(got.shape) != tuple(expected.shape):
        raise ExportError(f"exported model gives shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    what, a = compared_values(task, expected, num_classes)
    _, b = compared_values(task, got, num_classes)
    atol = TOLERANCES.get(what, TOLERANCES["outputs"]) if atol is None else float(atol)
    diff = (a - b).abs().flatten(1)
    scale = a.abs().flatten(1).amax(dim=1, keepdim=True)
    excess = diff - (atol + rtol * scale)
    worst = ""
    if not bool((excess <= 0).all()):  # NaN differences fail too
        image, index = divmod(int(torch.nan_to_num(excess, nan=float("inf")).argmax()), diff.shape[1])
        worst = (f"image {image} value {index}: |diff| {float(diff[image, index]):.3g} > {atol:g} + {rtol:g} x "
                 f"{float(scale[image]):.3g}")
    return Parity(what, float(diff.max()), float(scale.max()), atol, rtol, worst)


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


def check_image_size(size: Any, source: str = "image_size") -> int:
    """``size`` when it is a whole number of pixels within the image sizes a run trains at
    (:data:`cvkit.config.MIN_IMAGE_SIZE` to :data:`~cvkit.config.MAX_IMAGE_SIZE`), else a one-line
    ExportError naming ``source``."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ExportError(f"{source} {size!r}: expected an image size in pixels from {MIN_IMAGE_SIZE} to "
                          f"{MAX_IMAGE_SIZE}, as a run trains at (larger images: predict with --tile)")
    return size


def check_tolerance(value: Any, source: str) -> float:
    """``value`` as a finite number >= 0, else a one-line ExportError naming ``source`` (``atol``, ``rtol``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ExportError(f"{source} {value!r}: expected a finite number >= 0")
    return float(value)


def export_run(run_folder: PathLike, format: str = "onnx", image_size: Optional[int] = None,
               dynamic_batch: bool = False, out: Optional[PathLike] = None, images: int = PARITY_IMAGES,
               tolerance: Optional[float] = None, opset: int = OPSET, atol: Optional[float] = None,
               rtol: float = RTOL) -> ExportReport:
    """Export a run's ``best.pth`` to ``format`` (``onnx`` or ``torchscript``), check parity, write model + contract.

    Args:
        run_folder: the run (its ``config.json``, ``best.pth``, ``classes.json``).
        image_size: the input size, within :func:`check_image_size`'s range (default: the run's last
            stage size, from its recorded eval pipeline).
        dynamic_batch: accept any batch size (default: batch 1).
        out: the model file (default ``<run>/export/model.onnx`` or ``model.pt``); the contract is ``<out>.json``.
        images: how many valid images the parity check runs.
        tolerance: the former name of ``atol`` (a FutureWarning).
        atol, rtol: parity holds when every compared value has ``|exported - PyTorch| <= atol + rtol * scale``,
            ``scale`` the largest |PyTorch| of its image (default atol: :data:`TOLERANCES` of the compared
            quantity; rtol: :data:`RTOL`). Both are recorded in the contract.

    An export into the run folder (the default) holds the run's lock (:class:`cvkit.lock.RunLock`) while it
    reads the run and writes, so it never mixes with a run still writing there.
    """
    from cvkit.lock import RunLock

    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    if tolerance is not None:
        warnings.warn("export_run(tolerance=...) is now atol=...", FutureWarning, stacklevel=2)
        atol = tolerance if atol is None else atol
    if image_size is not None:
        check_image_size(image_size)
    atol = None if atol is None else check_tolerance(atol, "atol")
    rtol = check_tolerance(rtol, "rtol")
    folder = Path(run_folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: not a run folder (no config.json); expected the logdir of a finished run")
    path = Path(out) if out is not None else folder / "export" / f"model{SUFFIXES[format]}"
    if not path.resolve().is_relative_to(folder.resolve()):
        return _export(folder, path, format, image_size, dynamic_batch, images, opset, atol, rtol)
    with RunLock(folder):
        return _export(folder, path, format, image_size, dynamic_batch, images, opset, atol, rtol)


def _export(folder: Path, path: Path, format: str, image_size: Optional[int], dynamic_batch: bool, images: int,
            opset: int, atol: Optional[float], rtol: float) -> ExportReport:
    """:func:`export_run` of ``folder`` into ``path``, its arguments checked."""
    from cvkit.data.augment import eval_pipeline
    from cvkit.inference.runs import load_run
    from cvkit.io import atomic_write_bytes, atomic_write_json

    run = load_run(folder)
    task = run.task
    try:
        spec = run.eval_spec(image_size)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    transform, prep = eval_pipeline(spec), spec.preprocess()
    if prep["resize"] is None:
        raise ExportError(f"{folder / 'config.json'}: the eval pipeline does not resize, so the input size is "
                          "unknown; pass image_size (CLI: --image-size N)")
    x = _parity_images(folder, transform, task, images)
    num_classes = len(run.classes) or int(run.config["model"].get("num_classes") or 0)
    data = export_model(run.model, x[:1], format, dynamic_batch, opset)
    if format == "onnx":
        check_onnx(data)
    exported = ExportedModel(data, format, batch=None if dynamic_batch else 1)
    check = parity(task, run.model, exported, x, num_classes, atol, rtol)
    if not check.ok:
        raise ExportError(f"{format} export of {folder} disagrees with PyTorch: max |diff| of {check.compared} "
                          f"{check.max_abs_diff:.3g} on {len(x)} images, {check.worst} (the largest |PyTorch| of "
                          f"its image); nothing written (loosen with atol/rtol, CLI --atol/--rtol)")
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
        "output": task.layout.name,
        "output_shape": ["batch" if dynamic_batch else 1, *output_shape],
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "color": "RGB", "channels": int(x.shape[1]),
                  "height": int(x.shape[2]), "width": int(x.shape[3]), "batch": None if dynamic_batch else 1},
        "preprocess": prep,
        "classes": list(run.classes),
        "num_classes": num_classes or None,
        "num_keypoints": run.config["model"].get("num_keypoints"),
        "tuning_file": tuning_file,
        "parity": {"compared": check.compared, "max_abs_diff": check.max_abs_diff, "atol": check.atol,
                   "rtol": check.rtol, "scale": check.scale, "images": int(len(x)),
                   "rule": "|exported - PyTorch| <= atol + rtol * (largest |PyTorch| of the image), every value",
                   "reference": "PyTorch best.pth on the run's eval pipeline"},
        "source": {"run": str(folder.resolve()), "checkpoint": "best.pth"},
    }
    atomic_write_bytes(path, data)
    atomic_write_json(contract_path(path), contract)
    return ExportReport(path, contract_path(path), format, task.name, check.compared, check.max_abs_diff, check.atol,
                        int(len(x)), check.rtol, check.scale)


def _copy_tuning(task: Task, run_folder: Path, target: Path) -> Optional[str]:
    """Copy the run's tuned post-processing file beside the export; its name, or None when the run has none."""
    name = task.tuning_file
    if not name or not (run_folder / name).is_file():
        return None
    if (run_folder / name).resolve() != (target / name).resolve():
        from cvkit.io import atomic_write_bytes

        atomic_write_bytes(target / name, (run_folder / name).read_bytes())
    return name


__all__ = ["ExportError", "ExportReport", "OPSET", "Parity", "RTOL", "TOLERANCES", "check_image_size", "check_onnx",
           "check_tolerance", "compared_values", "deployable", "export_model", "export_run", "parity", "preprocessing"]
