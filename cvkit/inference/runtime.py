"""Prediction from an exported model (``cvkit export``): ONNX Runtime or TorchScript, no training stack.

An exported model sits beside its contract, ``<model file>.json`` (:func:`contract_path`): the
task, the input size, the resize interpolation and the normalisation, the class names, the output
layout and the parity measured at export. This module reads images with OpenCV, resizes and
normalises them with OpenCV and numpy exactly as the run's albumentations eval pipeline did, runs
the model, and hands the output to the task (:mod:`cvkit.tasks`) for decoding and submission rows,
through the same :func:`~cvkit.inference.tta.tta_predict` and
:func:`~cvkit.inference.predict.write_submission` as a checkpoint. Catalyst, timm, smp and
albumentations are never imported on this path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from cvkit.inference.predict import FlipPairs, Prediction, check_flip_pairs, list_images, write_submission
from cvkit.tasks import Task, get_task

PathLike = Union[str, os.PathLike]
FORMATS = ("onnx", "torchscript")
CONTRACT_VERSION = 1
CONTRACT_KEYS = ("version", "format", "task", "output", "input", "preprocess", "classes")


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
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.format, self.batch = format, batch
        if format == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
            data = source if isinstance(source, bytes) else str(source)
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        else:
            import io
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
                self.module = torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                             map_location="cpu").eval()

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


class Preprocess:
    """Resize (OpenCV, the run's interpolation) and normalise an RGB uint8 image into a ``(3, H, W)`` float32 array.

    The normalisation is a per-channel lookup table computed as cvkit's ``NormalizeToTensor`` and
    albumentations' ``Normalize`` compute it, so the input equals the run's eval pipeline output.
    """

    def __init__(self, spec: Dict[str, Any]) -> None:
        resize = spec.get("resize")
        self.size = (int(resize["height"]), int(resize["width"])) if resize else None
        self.interpolation = int(resize.get("interpolation", cv2.INTER_LINEAR)) if resize else cv2.INTER_LINEAR
        norm = spec["normalize"]
        mean, std = np.asarray(norm["mean"], np.float64), np.asarray(norm["std"], np.float64)
        top = float(norm.get("max_pixel_value", 255.0))
        self.luts = ((np.arange(256)[None, :] - mean[:, None] * top) * (1.0 / (std[:, None] * top))).astype(np.float32)

    def __call__(self, image: np.ndarray, full: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """``image`` resized and normalised; ``full``: the file's (height, width) when ``image`` is its
        reduced decode (:func:`cvkit.data.io.read_image_for_resize`), mapped as the run's pipeline maps it."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != len(self.luts):
            raise ValueError(f"expected an RGB uint8 image (H, W, {len(self.luts)}), got {image.dtype} {image.shape}")
        if self.size is not None and image.shape[:2] != self.size:
            image = self._resize(image, full or image.shape[:2])
        return np.stack([lut[image[..., c]] for c, lut in enumerate(self.luts)])

    def _resize(self, image: np.ndarray, full: Tuple[int, int]) -> np.ndarray:
        """One resampling to :attr:`size`. A reduced decode whose sides do not divide by its scale has a
        last row/column of partial blocks: only [0, full / reduce) of it is the image, as OneWarp maps it."""
        rows, cols = image.shape[:2]
        reduce = next((r for r in (1, 2, 4, 8) if (-(-full[0] // r), -(-full[1] // r)) == (rows, cols)), 1)
        if full[0] % reduce == 0 and full[1] % reduce == 0:
            return cv2.resize(image, (self.size[1], self.size[0]), interpolation=self.interpolation)
        sx, sy = self.size[1] * reduce / full[1], self.size[0] * reduce / full[0]
        matrix = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
        rgba = cv2.warpAffine(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), matrix, (self.size[1], self.size[0]),
                              flags=self.interpolation, borderMode=cv2.BORDER_REPLICATE)
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)


def decode_image(data: bytes, name: str = "image", size_hw: Optional[Tuple[int, int]] = None
                 ) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Encoded image bytes (PNG, JPEG...) as RGB uint8 ``(H, W, 3)`` and the full (height, width); a
    ValueError naming ``name`` when they are not an image. With the model's input ``size_hw``
    (:attr:`Preprocess.size`) a JPEG is decoded reduced as files are (:func:`cvkit.data.io.decode_for_resize`)."""
    from cvkit.data.io import decode_for_resize

    return decode_for_resize(data, size_hw, name)


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
    def classes(self) -> List[str]:
        return [str(c) for c in self.contract["classes"]]

    @property
    def tuning(self) -> Any:
        """The run's tuned post-processing copied beside the model at export (``postprocess.json``...), or None."""
        return self.task.load_tuning(self.folder) if self.contract.get("tuning_file") else None

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.contract["preprocess"])

    def predict_arrays(self, images: Sequence[np.ndarray], names: Optional[Sequence[str]] = None,
                       tta: Sequence[str] = (), batch_size: int = 32, flip_pairs: FlipPairs = None,
                       sizes: Optional[Sequence[Tuple[int, int]]] = None) -> Iterator[Prediction]:
        """One :class:`Prediction` per RGB uint8 image, in order. ``sizes``: each image's full
        (height, width) where it is a reduced decode (:func:`decode_image`), so outputs decode to it."""
        names = list(names) if names is not None else [str(i) for i in range(len(images))]
        sizes = list(sizes) if sizes is not None else [im.shape[:2] for im in images]
        return self._predict(((n, (lambda im=im, hw=hw: (im, tuple(hw)))) for n, im, hw in zip(names, images, sizes)),
                             tta, batch_size, flip_pairs)

    def _predict(self, items: Any, tta: Sequence[str], batch_size: int, flip_pairs: FlipPairs) -> Iterator[Prediction]:
        from cvkit.inference.tta import tta_predict

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        task, prep = self.task, self.preprocess
        transforms = ["identity", *[t for t in tta if t != "identity"]]
        check_flip_pairs(task, transforms, flip_pairs)
        kwargs = task.tta_kwargs(self.classes)
        batch: List[Tuple[str, Tuple[int, int], np.ndarray]] = []
        index = 0

        def flush() -> Iterator[Prediction]:
            nonlocal index
            x = torch.from_numpy(np.stack([b[2] for b in batch]))
            out = tta_predict(self.model, x, transforms, target=task.tta_target, flip_pairs=flip_pairs or None,
                              **kwargs).float()
            for k, (name, (height, width), _) in enumerate(batch):
                yield Prediction(name, index, out[k], height, width)
                index += 1
            batch.clear()

        for name, load in items:
            image, size = load()
            batch.append((name, size, prep(image, size)))
            if len(batch) == batch_size:
                yield from flush()
        if batch:
            yield from flush()


def load_deployed(model_path: PathLike, threads: Optional[int] = None) -> Deployed:
    """An exported model and its contract, ready to predict."""
    contract = read_contract(model_path)
    batch = contract["input"].get("batch")
    model = ExportedModel(model_path, contract["format"], batch=int(batch) if batch else None, threads=threads)
    return Deployed(contract, model, Path(model_path).parent)


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
    items = ((name, (lambda f=f: read_image_for_resize(f, size))) for f, name in zip(files, names))
    predictions = deployed._predict(items, tta, batch_size, flip_pairs)
    tuning = deployed.tuning if threshold is None else None
    return write_submission(predictions, deployed.task, deployed.classes, out, probs=probs,
                            threshold=0.5 if threshold is None else threshold, tuning=tuning)


__all__ = ["Deployed", "ExportedModel", "FORMATS", "Preprocess", "contract_path", "decode_image", "load_deployed",
           "predict_exported", "read_contract"]
