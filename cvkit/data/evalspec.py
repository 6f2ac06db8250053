"""The evaluation preprocessing as data: an optional resize, then a per-channel normalisation.

A run records its :class:`EvalSpec` per stage in ``config.json`` beside the stage's pipelines
(``pipelines.<stage>.eval_spec``, so an override that drops the pipelines drops it too); prediction
(:meth:`cvkit.inference.runs.RunModel.transform`), export (the contract's ``preprocess``), tiled
inference and the exported runtime read it, and :func:`cvkit.data.augment.eval_pipeline` builds the
albumentations pipeline from it. A run folder written before the spec was recorded has only the
serialised pipeline: :func:`derive_eval_spec` reads it once, the one place that reads albumentations
step names. No torch, no albumentations: the exported runtime imports this.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

INTER_LINEAR = 1  # cv2.INTER_LINEAR, the resize of cvkit's pipelines (OneWarp)
_NORMALIZE_STEPS = ("NormalizeToTensor", "Normalize")
_PASS_STEPS = ("ToTensorV2",)


@dataclass(frozen=True)
class EvalSpec:
    """Resize to ``size`` (height, width; None: keep the image's size) with OpenCV ``interpolation``, then
    ``(pixel - mean * max_pixel_value) / (std * max_pixel_value)`` per channel."""

    size: Optional[Tuple[int, int]]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: int = INTER_LINEAR
    max_pixel_value: float = 255.0

    def at(self, size: Union[None, int, Sequence[int]]) -> "EvalSpec":
        """The same spec at another ``size`` (an int: square; None: no resize)."""
        if size is None:
            return replace(self, size=None)
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return replace(self, size=hw)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form ``config.json`` records."""
        return {"size": list(self.size) if self.size else None, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std), "max_pixel_value": self.max_pixel_value}

    @classmethod
    def from_dict(cls, data: Any, source: str = "eval_spec") -> "EvalSpec":
        """A spec from :meth:`to_dict`'s form; a one-line ValueError naming ``source`` and the key at fault."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: {data!r}; expected {{size, interpolation, mean, std, max_pixel_value}}")
        size = data.get("size")
        if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 2
                                 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ValueError(f"{source}.size: {size!r}; expected [height, width] positive integers or null")
        mean, std = data.get("mean"), data.get("std")
        for key, values in (("mean", mean), ("std", std)):
            if (not isinstance(values, (list, tuple)) or not values
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
                raise ValueError(f"{source}.{key}: {values!r}; expected one finite number per channel")
        if len(mean) != len(std) or any(v == 0 for v in std):
            raise ValueError(f"{source}: mean {list(mean)} / std {list(std)}; expected as many values, std non-zero")
        top = data.get("max_pixel_value", 255.0)
        if isinstance(top, bool) or not isinstance(top, (int, float)) or not 0 < top < math.inf:
            raise ValueError(f"{source}.max_pixel_value: {top!r}; expected a positive number")
        interpolation = data.get("interpolation", INTER_LINEAR)
        if isinstance(interpolation, bool) or not isinstance(interpolation, int):
            raise ValueError(f"{source}.interpolation: {interpolation!r}; expected an OpenCV interpolation flag")
        return cls(tuple(size) if size else None, tuple(float(v) for v in mean), tuple(float(v) for v in std),
                   interpolation, float(top))

    def preprocess(self) -> Dict[str, Any]:
        """The exported model contract's ``preprocess``: ``{"resize": {height, width, interpolation} or
        None, "normalize": {mean, std, max_pixel_value}}``."""
        resize = ({"height": self.size[0], "width": self.size[1], "interpolation": self.interpolation}
                  if self.size else None)
        return {"resize": resize, "normalize": {"mean": list(self.mean), "std": list(self.std),
                                                "max_pixel_value": self.max_pixel_value}}

    @classmethod
    def from_preprocess(cls, spec: Mapping[str, Any]) -> "EvalSpec":
        """A spec from a contract's ``preprocess`` (:meth:`preprocess`'s form)."""
        resize, norm = spec.get("resize"), spec["normalize"]
        size = (int(resize["height"]), int(resize["width"])) if resize else None
        interpolation = int(resize.get("interpolation", INTER_LINEAR)) if resize else INTER_LINEAR
        return cls(size, tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"]), interpolation,
                   float(norm.get("max_pixel_value", 255.0)))


def derive_eval_spec(pipeline: Mapping[str, Any], source: str = "eval pipeline") -> EvalSpec:
    """The :class:`EvalSpec` of an albumentations pipeline in its serialised form (what a run's
    ``config.json`` records under ``pipelines``): for run folders written before ``eval_spec`` was.

    Resize (``A.Resize``, ``OneWarp`` in ``resize`` mode without flip or affine) and the normalisation
    (``NormalizeToTensor``, or the standard ``Normalize`` + ``ToTensorV2``) are understood; any other
    step is a one-line ValueError naming ``source`` and the step.
    """
    steps = (pipeline.get("transform") or pipeline).get("transforms", [])
    size, interpolation, normalize = None, INTER_LINEAR, None
    for step in steps:
        name = str(step.get("__class_fullname__", "")).rsplit(".", 1)[-1]
        if name == "Resize":
            size, interpolation = (int(step["height"]), int(step["width"])), int(step.get("interpolation", 1))
        elif name == "OneWarp" and step.get("mode") == "resize" and not step.get("hflip") and not step.get("affine"):
            size, interpolation = (int(step["size"][0]), int(step["size"][1])), INTER_LINEAR
        elif name in _NORMALIZE_STEPS:
            if name == "Normalize" and step.get("normalization", "standard") != "standard":
                raise ValueError(f"{source}: Normalize(normalization={step['normalization']!r}) has no runtime "
                                 "equivalent; expected the standard (pixel - mean) / std")
            normalize = (tuple(float(v) for v in step["mean"]), tuple(float(v) for v in step["std"]),
                         float(step.get("max_pixel_value", 255.0)))
        elif name not in _PASS_STEPS:
            raise ValueError(f"{source}: step {name!r} has no runtime equivalent; an exported model's "
                             "preprocessing is Resize + normalisation only")
    if normalize is None:
        raise ValueError(f"{source}: no normalisation step (NormalizeToTensor or Normalize) found")
    return EvalSpec(size, normalize[0], normalize[1], interpolation, normalize[2])


def pipeline_size(serialised: Any) -> Optional[int]:
    """The first output size named in an albumentations pipeline's serialised form (Resize,
    RandomResizedCrop...: ``height``, ``size``, ``max_size`` or ``min_height``), or None."""
    if isinstance(serialised, dict):
        for key in ("height", "size", "max_size", "min_height"):
            value = serialised.get(key)
            if isinstance(value, int):
                return value
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], int):
                return value[0]
        values = serialised.values()
    elif isinstance(serialised, list):
        values = serialised
    else:
        return None
    for value in values:
        found = pipeline_size(value)
        if found:
            return found
    return None


def recorded_eval_spec(config: Mapping[str, Any], stage: Optional[str], source: str = "config.json"
                       ) -> Optional[EvalSpec]:
    """The spec a run recorded for ``stage`` (``pipelines.<stage>.eval_spec``), else derived from the eval
    pipeline it recorded (``pipelines.<stage>.eval``: run folders from before the spec), else None."""
    recorded = (config.get("pipelines") or {}).get(stage or "") or {}
    if recorded.get("eval_spec") is not None:
        return EvalSpec.from_dict(recorded["eval_spec"], f"{source}: pipelines.{stage}.eval_spec")
    if recorded.get("eval") is None:
        return None
    return derive_eval_spec(recorded["eval"], f"{source}: pipelines.{stage}.eval")


__all__ = ["EvalSpec", "derive_eval_spec", "pipeline_size", "recorded_eval_spec"]
