"""Prediction from an exported model (``cvkit export``): ONNX Runtime or TorchScript, no training stack.

An exported model sits beside its contract, ``<model file>.json`` (:func:`contract_path`): the
task, the input size, the resize interpolation and the normalisation, the class names, the output
layout and the parity measured at export. This module reads images with OpenCV, resizes and
normalises them with OpenCV and numpy exactly as the run's albumentations eval pipeline did, runs
the model, and hands the output to the task (:mod:`cvkit.tasks`) for decoding and submission rows,
through the same :func:`~cvkit.inference.tta.tta_predict` and
:func:`~cvkit.inference.predict.write_submission` as a checkpoint. Catalyst, timm, smp and
albumentations are never imported on this path.

Loading refuses, in one line naming the file, a model file that is not what its format says
(:func:`open_model`: a TorchScript file must be a TorchScript zip, and no model file is ever
unpickled) and a contract that does not fit the model (:func:`check_contract`: class count, input
size, normalisation, output layout), before any image is read.
"""
from __future__ import annotations

import io
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from cvkit.data.evalspec import EvalSpec
from cvkit.data.loaders import make_loader
from cvkit.data.resize_plan import resize
from cvkit.inference.predict import (FlipPairs, Prediction, check_flip_pairs, list_images, prediction_loop,
                                     write_submission)
from cvkit.layouts import LAYOUTS, OutputLayout, get_layout
from cvkit.tasks import Task, get_task

PathLike = Union[str, os.PathLike]
FORMATS = ("onnx", "torchscript")
CONTRACT_VERSION = 1
CONTRACT_KEYS = ("version", "format", "task", "output", "input", "preprocess", "classes")
_TORCHSCRIPT_MEMBERS = ("data.pkl", "constants.pkl", "version")


class ModelFileError(ValueError):
    """An exported model file that cannot be loaded; the one-line message names the file and the problem."""


class ContractError(ValueError):
    """A contract that does not fit its model; the one-line message names the contract file and the key."""


def contract_path(model_path: PathLike) -> Path:
    """The contract of an exported model: its file name plus ``.json`` (``model.onnx`` -> ``model.onnx.json``)."""
    path = Path(model_path)
    return path.with_name(path.name + ".json")


def read_contract(model_path: PathLike) -> Dict[str, Any]:
    """The contract JSON beside ``model_path``, checked for the keys prediction needs (one-line errors)."""
    path = contract_path(model_path)
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"{model_path}: no such exported model (write one with: cvkit export RUN)")
    from cvkit.io import read_mapping

    contract = read_mapping(path, "contract JSON that cvkit export writes beside an exported model")
    missing = [k for k in CONTRACT_KEYS if k not in contract] if isinstance(contract, dict) else list(CONTRACT_KEYS)
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; expected the contract cvkit export writes")
    if contract["version"] != CONTRACT_VERSION or contract["format"] not in FORMATS:
        raise ValueError(f"{path}: contract version {contract['version']!r} / format {contract['format']!r}; "
                         f"expected version {CONTRACT_VERSION} and one of {FORMATS}")
    return contract


class ExportedModel(nn.Module):
    """An exported model as an ``nn.Module`` (``(B, 3, H, W)`` tensor in, output tensor out), so TTA works on it.

    ``batch``: the fixed batch size the model was exported with (None: any batch); a larger batch
    is run in pieces of that size.
    """

    def __init__(self, source: Union[PathLike, bytes], format: str, batch: Optional[int] = None,
                 threads: Optional[int] = None) -> None:
        super().__init__()
        self.format, self.batch = format, batch
        loaded = open_model(source, format, threads)
        if format == "onnx":
            self.session = loaded
            self.input_name = self.session.get_inputs()[0].name
        else:
            self.module = loaded

    def fixed_input_shape(self) -> Optional[List[Optional[int]]]:
        """The input shape an ONNX model declares (None for a dimension left free), or None (TorchScript)."""
        if self.format != "onnx":
            return None
        return [d if isinstance(d, int) and d > 0 else None for d in self.session.get_inputs()[0].shape]

    def _run(self, x: Tensor) -> Tensor:
        if self.format == "onnx":
            array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
            return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        with torch.no_grad():
            return self.module(x.float().contiguous())

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch or x.shape[0] == self.batch:
            return self._run(x)
        pieces = []
        for start in range(0, x.shape[0], self.batch):
            part = x[start:start + self.batch]
            short = self.batch - part.shape[0]
            if short:
                part = torch.cat([part, part[-1:].expand(short, *part.shape[1:])])
            pieces.append(self._run(part)[:self.batch - short])
        return torch.cat(pieces)


def open_model(source: Union[PathLike, bytes], format: str, threads: Optional[int] = None) -> Any:
    """The one loader of exported model files: an ONNX Runtime session or a TorchScript module.

    The file is first looked at (empty, a Python pickle, a zip, and for TorchScript the zip's
    members), then loaded; any failure is a :class:`ModelFileError` naming the file and the problem
    in one line. Nothing is unpickled: a TorchScript archive goes to ``torch.jit.load`` only when it
    holds a TorchScript program (``code/``, ``constants.pkl``...), which TorchScript reads itself.
    """
    if format not in FORMATS:
        raise ModelFileError(f"format must be one of {FORMATS}, got {format!r}")
    where = "the exported model bytes" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            head = source[:8]
        else:
            with open(source, "rb") as handle:
                head = handle.read(8)
    except OSError as exc:
        raise ModelFileError(f"{where}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    kind = _file_kind(head)
    if kind in ("empty", "pickle") or (kind == "zip") != (format == "torchscript"):
        described = {"empty": "is empty (0 bytes)", "pickle": "is a Python pickle (cvkit never unpickles a model file)",
                     "zip": "is a zip archive (TorchScript, or a torch.save checkpoint)",
                     "other": "is not a zip archive"}[kind]
        expected = {"onnx": "an ONNX model", "torchscript": "a TorchScript archive"}[format]
        raise ModelFileError(f"{where}: {described}; expected {expected} as cvkit export writes it (--format {format})")
    if format == "onnx":
        return _onnx_session(source, where, threads)
    return _torchscript_module(source, where)


def _file_kind(head: bytes) -> str:
    """``empty``, ``pickle`` (protocol 2+ starts with PROTO, 0x80), ``zip`` or ``other`` from a file's first bytes."""
    if not head:
        return "empty"
    if head[:1] == b"\x80":
        return "pickle"
    return "zip" if head[:4] == b"PK\x03\x04" else "other"


def _onnx_session(source: Union[PathLike, bytes], where: str, threads: Optional[int]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, InvalidGraph...)
        problem = {"InvalidProtobuf": "does not parse as an ONNX model (truncated, or another kind of file)",
                   "InvalidGraph": "holds an ONNX graph that ONNX Runtime finds invalid",
                   "NotImplemented": "uses an operator this ONNX Runtime does not implement"}.get(
            type(exc).__name__, f"is refused by ONNX Runtime ({type(exc).__name__})")
        raise ModelFileError(f"{where}: {problem}; expected the model.onnx that cvkit export writes") from None


def _torchscript_module(source: Union[PathLike, bytes], where: str) -> nn.Module:
    """``torch.jit.load`` of a file checked to be a TorchScript zip: one folder holding ``code/`` and its records."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise ModelFileError(f"{where}: a damaged zip archive (truncated?), not a TorchScript archive; expected the "
                             "model.pt that cvkit export writes (--format torchscript)") from None
    folders = {name.split("/", 1)[0] for name in names}
    folder = next(iter(folders)) if len(folders) == 1 else ""
    program = any(name.startswith(f"{folder}/code/") for name in names)
    if not folder or not program or any(f"{folder}/{m}" not in names for m in _TORCHSCRIPT_MEMBERS):
        raise ModelFileError(f"{where}: a zip archive that is not a TorchScript archive (expected one folder with "
                             f"code/, {', '.join(_TORCHSCRIPT_MEMBERS)}; a torch.save checkpoint is refused, never "
                             "unpickled); expected the model.pt that cvkit export writes (--format torchscript)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
            return torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                  map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelFileError(f"{where}: a TorchScript archive that torch.jit.load cannot load ({type(exc).__name__}; "
                             "damaged, or saved by another PyTorch)") from None


class Preprocess:
    """Resize (OpenCV, the run's interpolation) and normalise an RGB uint8 image into a ``(3, H, W)`` float32 array,
    as the run's :class:`~cvkit.data.evalspec.EvalSpec` (or a contract's ``preprocess``, its JSON form) says.

    The normalisation is a per-channel lookup table computed as cvkit's ``NormalizeToTensor`` and
    albumentations' ``Normalize`` compute it, so the input equals the run's eval pipeline output.
    """

    def __init__(self, spec: Union[EvalSpec, Dict[str, Any]]) -> None:
        self.spec = spec if isinstance(spec, EvalSpec) else EvalSpec.from_preprocess(spec)
        self.size, self.interpolation = self.spec.size, self.spec.interpolation
        mean, std = np.asarray(self.spec.mean, np.float64), np.asarray(self.spec.std, np.float64)
        top = self.spec.max_pixel_value
        self.luts = ((np.arange(256)[None, :] - mean[:, None] * top) * (1.0 / (std[:, None] * top))).astype(np.float32)

    def __call__(self, image: np.ndarray, full: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """``image`` resized and normalised; ``full``: the file's (height, width) when ``image`` is its
        reduced decode (:func:`cvkit.data.io.read_image_for_resize`), mapped as the run's pipeline maps it."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != len(self.luts):
            raise ValueError(f"expected an RGB uint8 image (H, W, {len(self.luts)}), got {image.dtype} {image.shape}")
        if self.size is not None and image.shape[:2] != self.size:
            image = resize(image, self.size, full or image.shape[:2], self.interpolation)
        return np.stack([lut[image[..., c]] for c, lut in enumerate(self.luts)])


def decode_image(data: bytes, name: str = "image", size_hw: Optional[Tuple[int, int]] = None,
                 max_pixels: Optional[int] = None) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Encoded image bytes (PNG, JPEG...) as RGB uint8 ``(H, W, 3)`` and the full (height, width); a
    ValueError naming ``name`` when they are not an image, an ImageTooLargeError when the header claims
    more than ``max_pixels`` (:func:`cvkit.data.io.max_image_pixels`). With the model's input ``size_hw``
    (:attr:`Preprocess.size`) a JPEG is decoded reduced as files are (:func:`cvkit.data.io.decode_for_resize`)."""
    from cvkit.data.io import decode_for_resize

    return decode_for_resize(data, size_hw, name, max_pixels)


@dataclass
class Deployed:
    """An exported model with its contract: preprocessing, the task, the class names, the run's post-processing."""

    contract: Dict[str, Any]
    model: ExportedModel
    folder: Path

    @property
    def task(self) -> Task:
        return get_task(self.contract["task"])

    @property
    def layout(self) -> OutputLayout:
        """The task's output layout (:func:`check_contract` made sure it is the one the contract names)."""
        return self.task.layout

    @property
    def classes(self) -> List[str]:
        return [str(c) for c in self.contract["classes"]]

    @property
    def tuning(self) -> Any:
        """The run's tuned post-processing copied beside the model at export (``postprocess.json``...), or None."""
        return self.task.load_tuning(self.folder) if self.contract.get("tuning_file") else None

    @property
    def preprocess(self) -> Preprocess:
        """The contract's ``preprocess`` read as the run's :class:`~cvkit.data.evalspec.EvalSpec`."""
        return Preprocess(EvalSpec.from_preprocess(self.contract["preprocess"]))

    def predict_arrays(self, images: Sequence[np.ndarray], names: Optional[Sequence[str]] = None,
                       tta: Sequence[str] = (), batch_size: int = 32, flip_pairs: FlipPairs = None,
                       sizes: Optional[Sequence[Tuple[int, int]]] = None) -> Iterator[Prediction]:
        """One :class:`Prediction` per RGB uint8 image, in order. ``sizes``: each image's full
        (height, width) where it is a reduced decode (:func:`decode_image`), so outputs decode to it."""
        names = list(names) if names is not None else [str(i) for i in range(len(images))]
        sizes = list(sizes) if sizes is not None else [im.shape[:2] for im in images]
        loads = [(lambda im=im, hw=hw: (im, tuple(hw))) for im, hw in zip(images, sizes)]
        return self._predict(names, loads, tta, batch_size, flip_pairs)

    def _predict(self, names: Sequence[str], loads: Sequence[Callable[[], Tuple[np.ndarray, Tuple[int, int]]]],
                 tta: Sequence[str], batch_size: int, flip_pairs: FlipPairs) -> Iterator[Prediction]:
        """Each ``loads[i]()`` (an RGB image and its full size) preprocessed and predicted through
        :func:`~cvkit.inference.predict.prediction_loop`, the loop a checkpoint predicts with."""
        from cvkit.inference.tta import tta_predict

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        task = self.task
        transforms = ["identity", *[t for t in tta if t != "identity"]]
        check_flip_pairs(task, transforms, flip_pairs)
        kwargs = task.tta_kwargs(self.classes)

        def forward(x: Tensor) -> Tensor:
            return tta_predict(self.model, x, transforms, target=self.layout, flip_pairs=flip_pairs or None,
                               **kwargs).float()

        loader = make_loader(_Prepared(loads, self.preprocess), batch_size, train=False, workers=0)
        return prediction_loop(self.model, loader, list(names), forward, "cpu")


class _Prepared(torch.utils.data.Dataset):
    """Images loaded on demand (``loads[i]() -> (image, full size)``) and preprocessed, as prediction batches them."""

    def __init__(self, loads: Sequence[Callable[[], Tuple[np.ndarray, Tuple[int, int]]]], prep: Preprocess) -> None:
        self.loads, self.prep = list(loads), prep

    def __len__(self) -> int:
        return len(self.loads)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image, size = self.loads[index]()
        return {"features": torch.from_numpy(self.prep(image, size)), "index": index, "size": torch.tensor(size)}


def load_deployed(model_path: PathLike, threads: Optional[int] = None) -> Deployed:
    """An exported model and its contract, checked against each other (:func:`check_contract`), ready to predict."""
    contract = read_contract(model_path)
    where = contract_path(model_path)
    _, _, _, batch = _input_spec(contract, where)
    model = ExportedModel(model_path, contract["format"], batch=batch, threads=threads)
    check_contract(contract, model, where)
    return Deployed(contract, model, Path(model_path).parent)


# --- the contract against its model ---------------------------------------------------------------

def check_contract(contract: Dict[str, Any], model: ExportedModel, where: PathLike) -> None:
    """Refuse a contract its model cannot honour, before any image is read: a :class:`ContractError`
    naming ``where`` (the contract file) and the key.

    Checked: the task and its output layout (``task``, ``output``), the input size against the
    input shape an ONNX model fixes (``input.*``), the preprocessing (``preprocess.resize`` equal to
    the input size, ``preprocess.normalize`` finite with a non-zero std), and, from one run of the
    model on zeros of the input size, the output's shape against the layout, the class count
    (``classes`` / ``num_classes``), ``num_keypoints`` and ``output_shape``.
    """
    task = _contract_task(contract, where)
    if not isinstance(contract["output"], str) or contract["output"] not in LAYOUTS:
        raise ContractError(f"{where}: output {contract['output']!r} is not a registered output layout; expected "
                            f"{task.layout.name!r}, the layout of task {task.name!r}")
    if contract["output"] != task.layout.name:
        raise ContractError(f"{where}: output {contract['output']!r} is not the output layout of task {task.name!r}; "
                            f"expected {task.layout.name!r}")
    channels, height, width, batch = _input_spec(contract, where)
    _check_preprocess(contract.get("preprocess"), channels, (height, width), where)
    declared = model.fixed_input_shape()
    if declared is not None:
        if len(declared) != 4:
            raise ContractError(f"{where}: input.layout NCHW, but the model's input has {len(declared)} dimensions")
        for key, want, fixed in zip(("batch", "channels", "height", "width"), (batch, channels, height, width),
                                    declared):
            if fixed is not None and want is not None and want != fixed:
                raise ContractError(f"{where}: input.{key} is {want}, but the model's input is fixed at {fixed} "
                                    f"(shape {declared}); expected the size the model was exported with")
    shape = (batch or 1, channels, height, width)
    try:
        output = model(torch.zeros(shape))
    except Exception as exc:  # ONNX Runtime and TorchScript raise their own types; either way the sizes disagree
        raise ContractError(f"{where}: the model fails on an input of shape {shape} (input.channels/height/width): "
                            f"{type(exc).__name__}; expected the input size the model was exported with") from None
    _check_output(contract, tuple(int(d) for d in output.shape[1:]), where)


def _contract_task(contract: Dict[str, Any], where: PathLike) -> Task:
    try:
        return get_task(contract["task"])
    except KeyError:
        from cvkit.tasks import TASKS

        raise ContractError(f"{where}: task {contract['task']!r} is not a registered task; expected one of "
                            f"{TASKS.list()}") from None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _input_spec(contract: Dict[str, Any], where: PathLike) -> Tuple[int, int, int, Optional[int]]:
    """``(channels, height, width, batch or None)`` from the contract's ``input``, each a positive integer."""
    spec = contract["input"]
    if not isinstance(spec, dict):
        raise ContractError(f"{where}: input is {spec!r}; expected {{channels, height, width, batch}}")
    for key in ("channels", "height", "width"):
        if not _positive_int(spec.get(key)):
            raise ContractError(f"{where}: input.{key} is {spec.get(key)!r}; expected a positive integer")
    batch = spec.get("batch")
    if batch is not None and not _positive_int(batch):
        raise ContractError(f"{where}: input.batch is {batch!r}; expected a positive integer or null (any batch)")
    return spec["channels"], spec["height"], spec["width"], batch


def _check_preprocess(spec: Any, channels: int, size: Tuple[int, int], where: PathLike) -> None:
    """``preprocess.resize`` equal to the input size; ``preprocess.normalize`` finite, one value per channel,
    a non-zero std."""
    resize = spec.get("resize") if isinstance(spec, dict) else None
    if not isinstance(resize, dict) or (resize.get("height"), resize.get("width")) != size:
        shown = (resize.get("height"), resize.get("width")) if isinstance(resize, dict) else resize
        raise ContractError(f"{where}: preprocess.resize is {shown}; expected the input size (height, width) {size}")
    norm = spec.get("normalize")
    if not isinstance(norm, dict):
        raise ContractError(f"{where}: preprocess.normalize is {norm!r}; expected {{mean, std, max_pixel_value}}")
    for key in ("mean", "std"):
        values = norm.get(key)
        if (not isinstance(values, list) or len(values) != channels
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise ContractError(f"{where}: preprocess.normalize.{key} is {values!r}; expected {channels} finite "
                                "numbers")
    if any(v == 0 for v in norm["std"]):
        raise ContractError(f"{where}: preprocess.normalize.std is {norm['std']}; a std of 0 divides by zero, "
                            "expected non-zero values")
    top = norm.get("max_pixel_value", 255.0)
    if not isinstance(top, (int, float)) or not math.isfinite(top) or top <= 0:
        raise ContractError(f"{where}: preprocess.normalize.max_pixel_value is {top!r}; expected a positive number")


def _check_output(contract: Dict[str, Any], shape: Tuple[int, ...], where: PathLike) -> None:
    """One image's output ``shape`` against the layout the contract names (:func:`cvkit.layouts.get_layout`),
    the class count, ``num_keypoints`` and ``output_shape``."""
    name, classes, count = contract["output"], contract["classes"], contract.get("num_classes")
    layout = get_layout(name)
    if len(shape) != layout.dims:
        raise ContractError(f"{where}: output {name!r} needs {layout.dims} dimension(s) per image, but the model "
                            f"gives {list(shape)}; expected the layout the model was exported with")
    if not isinstance(classes, list) or (count is not None and not _positive_int(count)):
        raise ContractError(f"{where}: classes {classes!r} / num_classes {count!r}; expected a list of names and "
                            "a positive integer or null")
    if classes and count is not None and len(classes) != count:
        raise ContractError(f"{where}: classes names {len(classes)} classes but num_classes is {count}; expected "
                            "one name per class")
    points = contract.get("num_keypoints")
    if points is not None and not _positive_int(points):
        raise ContractError(f"{where}: num_keypoints is {points!r}; expected a positive integer or null")
    key, count = ("classes", len(classes)) if classes else ("num_classes", count)
    width, expected = shape[0], layout.width(count or None, points)
    if expected is not None and width != expected:
        given = f"{key} gives {count} classes, so " if layout.width(None, points) != expected else ""
        unit = "channels" if layout.dims == 3 else "values"
        raise ContractError(f"{where}: {given}output {name!r} expects {expected} {unit} per image, but the model "
                            f"outputs {width} (shape {list(shape)})")
    try:
        layout.check(torch.zeros(1, *shape), count or None)
    except ValueError as exc:
        raise ContractError(f"{where}: output {name!r}: {exc}; expected the layout the model was exported with") from None
    recorded = contract.get("output_shape")
    if recorded is not None and (not isinstance(recorded, list) or list(recorded[1:]) != list(shape)):
        raise ContractError(f"{where}: output_shape is {recorded!r}, but the model gives {['batch', *shape]}; "
                            "expected the shape recorded at export")


def predict_exported(
    model_path: PathLike,
    images: PathLike,
    out: Optional[PathLike] = None,
    tta: Sequence[str] = (),
    probs: bool = False,
    batch_size: int = 32,
    threshold: Optional[float] = None,
    root: Optional[PathLike] = None,
    path_col: str = "path",
    flip_pairs: FlipPairs = None,
) -> Any:
    """An exported model's submission for a folder or CSV of images (the same table as from the checkpoint).

    The run's tuned post-processing (copied beside the model at export) applies unless ``threshold`` is given.
    """
    from cvkit.data.io import read_image_for_resize

    deployed = load_deployed(model_path)
    size = deployed.preprocess.size
    files, names = list_images(images, root, path_col)
    loads = [(lambda f=f: read_image_for_resize(f, size)) for f in files]
    predictions = deployed._predict(names, loads, tta, batch_size, flip_pairs)
    tuning = deployed.tuning if threshold is None else None
    return write_submission(predictions, deployed.task, deployed.classes, out, probs=probs,
                            threshold=0.5 if threshold is None else threshold, tuning=tuning)


__all__ = ["ContractError", "Deployed", "ExportedModel", "FORMATS", "ModelFileError", "Preprocess", "check_contract",
           "contract_path", "decode_image", "load_deployed", "open_model", "predict_exported", "read_contract"]
