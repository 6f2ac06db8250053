"""Output layouts: what one model output means, owned by one object per layout.

A task names its layout (``Task.layout``, an :class:`OutputLayout` instance); everything that reads a
raw model output asks the layout, never a task name or a layout string:

* :meth:`~OutputLayout.split` — the raw output as named parts (class logits and box, points...);
* :meth:`~OutputLayout.activate` — logits to the probabilities or values that are decoded and averaged;
* :meth:`~OutputLayout.deaugment` — undo a test-time transform's geometry, asking the transform object
  for it (``transform.mask``, ``transform.keypoints``, ``transform.boxes``);
* :meth:`~OutputLayout.average` — the weighted mean of TTA views or ensemble members;
* :meth:`~OutputLayout.compare` — what export parity compares (raw values where an activation would
  hide a difference, as a softmax over one column does);
* :attr:`~OutputLayout.tileable` — whether tiled inference can blend windows of it (masks only).

Layouts are registered by name (:func:`register_layout`); the name is recorded in an export's contract,
so the exported-model runtime finds the layout without the training stack. Torch is imported inside
the methods only: ``cvkit check`` imports the tasks without torch.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from cvkit.registry import Registry

ACTIVATIONS: Tuple[str, ...] = ("softmax", "sigmoid", "none")
BOX_DIMS = 4
Size = Tuple[int, int]
FlipPairs = Optional[Sequence[Tuple[int, int]]]
Weighted = Iterable[Tuple[Any, Any]]


def _apply(output: Any, activation: str) -> Any:
    if activation == "softmax":
        return output.softmax(dim=1)
    if activation == "sigmoid":
        return output.sigmoid()
    return output


class OutputLayout:
    """How one task's model output is read. Subclasses set the class attributes and override the hooks.

    ``activation`` (one of :attr:`activations`, the first is the default) is what :meth:`activate` applies
    before outputs are decoded or averaged.
    """

    name: ClassVar[str] = ""
    dims: ClassVar[int] = 1  # dimensions of one image's output: 1 for a vector, 3 for (C, H, W)
    tileable: ClassVar[bool] = False
    activations: ClassVar[Tuple[str, ...]] = ("none",)
    compared: ClassVar[str] = "outputs"  # what export parity calls the values it compares

    def __init__(self, activation: Optional[str] = None) -> None:
        self.activation = self._check_activation(activation or self.activations[0])

    def _check_activation(self, activation: str) -> str:
        if activation not in self.activations:
            raise ValueError(f"output layout {self.name!r}: activation must be one of {self.activations}, "
                             f"got {activation!r}")
        return activation

    def with_activation(self, activation: Optional[str]) -> "OutputLayout":
        """This layout with another activation (itself when ``activation`` is None or the same)."""
        if activation is None or activation == self.activation:
            return self
        other = copy.copy(self)
        other.activation = self._check_activation(activation)
        return other

    # --- reading the raw output --------------------------------------------------------------------

    def check(self, output: Any, num_classes: Optional[int] = None) -> Any:
        """``output`` (a batch) when its shape fits the layout, else a ValueError saying the expected shape."""
        if output.ndim != self.dims + 1:
            raise ValueError(f"output layout {self.name!r} needs {self.dims} dimension(s) per image, "
                             f"got {tuple(output.shape)}")
        return output

    def split(self, output: Any, num_classes: Optional[int] = None) -> Dict[str, Any]:
        """The raw output as named parts (one part, ``output``, unless the layout packs several)."""
        return {"output": output}

    def join(self, parts: Dict[str, Any]) -> Any:
        """The inverse of :meth:`split`."""
        return parts["output"]

    def activate(self, output: Any, activation: Optional[str] = None) -> Any:
        """Logits as the probabilities or values that are decoded and averaged (``activation`` overrides)."""
        return _apply(output, self._check_activation(activation or self.activation))

    def deaugment(self, transform: Any, output: Any, size: Size, flip_pairs: FlipPairs = None) -> Tuple[Any, Any]:
        """An activated output on a transformed batch mapped back to the original image, and its weight
        (a number, or a coverage map where the transform lost part of the image). The default: outputs
        that do not move with the image."""
        return output, 1.0

    def average(self, predictions: Weighted) -> Any:
        """The weighted mean of ``(prediction, weight)`` pairs (TTA views, ensemble members), streamed."""
        total = norm = None
        for prediction, weight in predictions:
            total = prediction * weight if total is None else total + prediction * weight
            norm = weight if norm is None else norm + weight
        if total is None:
            raise ValueError(f"output layout {self.name!r}: nothing to average")
        return self._mean(total, norm)

    def _mean(self, total: Any, norm: Any) -> Any:
        return total / norm

    def compare(self, output: Any, num_classes: Optional[int] = None) -> Tuple[str, Any]:
        """What export parity compares: ``(name of the quantity, values)``; by default the raw outputs."""
        return self.compared, output.float()

    # --- sizes and checks ----------------------------------------------------------------------------

    def width(self, num_classes: Optional[int], num_keypoints: Optional[int] = None) -> Optional[int]:
        """The values (or channels) one image's output has, where the sizes fix it (None: any)."""
        return num_classes

    def check_tta(self, transforms: Sequence[Any], flip_pairs: FlipPairs) -> None:
        """Refuse test-time transforms this layout cannot undo with what it was given (default: none)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(activation={self.activation!r})"


class ClassesLayout(OutputLayout):
    """Class logits ``(B, C)``: softmax probabilities (``sigmoid`` for multi-label, ``none`` for raw scores)."""

    name = "logits"
    activations = ("softmax", "sigmoid", "none")
    compared = "probabilities"

    def compare(self, output: Any, num_classes: Optional[int] = None) -> Tuple[str, Any]:
        """Probabilities, except where the activation is none or a softmax over one column (always 1)."""
        if self.activation == "none" or (self.activation == "softmax" and output.shape[1] < 2):
            return "outputs", output.float()
        return "probabilities", self.activate(output.float())


class ValuesLayout(OutputLayout):
    """Numbers regressed per image ``(B, N)``: never activated, compared raw."""

    name = "values"


class KeypointsLayout(OutputLayout):
    """Points ``(B, 2N)`` as x0, y0, x1, y1... in [0, 1] of the input; a mirror swaps the ``flip_pairs``."""

    name = "keypoints"
    compared = "coordinates"

    def split(self, output: Any, num_classes: Optional[int] = None) -> Dict[str, Any]:
        if output.shape[-1] % 2:
            raise ValueError(f"keypoints must be (B, 2N) as x0, y0, x1, y1..., got {tuple(output.shape)}")
        return {"points": output.reshape(*output.shape[:-1], -1, 2)}

    def join(self, parts: Dict[str, Any]) -> Any:
        points = parts["points"]
        return points.reshape(*points.shape[:-2], -1)

    def deaugment(self, transform: Any, output: Any, size: Size, flip_pairs: FlipPairs = None) -> Tuple[Any, Any]:
        return transform.keypoints(self.check(output), size, flip_pairs), 1.0

    def width(self, num_classes: Optional[int], num_keypoints: Optional[int] = None) -> Optional[int]:
        return 2 * num_keypoints if num_keypoints else None

    def check_tta(self, transforms: Sequence[Any], flip_pairs: FlipPairs) -> None:
        """A mirror makes keypoints such as left/right eye trade places: refuse to guess the pairs."""
        mirrors = [str(t) for t in transforms if getattr(t, "swaps_pairs", False)]
        if mirrors and flip_pairs is None:
            raise ValueError(f"TTA {mirrors} mirrors the image, so keypoints such as left/right eye trade "
                             "places: pass flip_pairs (CLI: --flip-pairs 0-1,2-3), or an empty list if none do")


class BoxesLayout(OutputLayout):
    """One box ``(B, 4)`` as x1, y1, x2, y2 in [0, 1] of the input; averages are clipped to [0, 1]."""

    name = "boxes"
    compared = "coordinates"

    def check(self, output: Any, num_classes: Optional[int] = None) -> Any:
        if output.ndim != 2 or output.shape[1] != BOX_DIMS:
            raise ValueError(f"boxes must be (B, 4) as x1, y1, x2, y2, got {tuple(output.shape)}")
        return output

    def deaugment(self, transform: Any, output: Any, size: Size, flip_pairs: FlipPairs = None) -> Tuple[Any, Any]:
        return transform.boxes(self.check(output), size), 1.0

    def _mean(self, total: Any, norm: Any) -> Any:
        return (total / norm).clamp(0, 1)

    def width(self, num_classes: Optional[int], num_keypoints: Optional[int] = None) -> Optional[int]:
        return BOX_DIMS


class ClassBoxLayout(OutputLayout):
    """Class logits then one box: ``(..., C + 4)``, the box x1, y1, x2, y2 in [0, 1] of the input.

    The one codec of this layout: the model packs its heads with :meth:`join`; the criterion, the
    metric, TTA, export parity and decoding unpack with :meth:`split` (or :meth:`parts`, which also
    takes the already-split dict/tuple forms); training targets ``(..., 5)`` (class index, box) are
    packed with :meth:`join_targets` and unpacked with :meth:`split_targets`. The activation applies
    to the class part; the box is taken as the model gives it.
    """

    name = "class_box"
    activations = ("softmax", "sigmoid", "none")
    compared = "probabilities"

    def check(self, output: Any, num_classes: Optional[int] = None) -> Any:
        if output.ndim != 2:
            raise ValueError(f"a class + box output must be (B, num_classes + 4), got {tuple(output.shape)}")
        self.split(output, num_classes)
        return output

    def split(self, output: Any, num_classes: Optional[int] = None) -> Dict[str, Any]:
        """``{"class": (..., C), "box": (..., 4)}``; the width must be ``num_classes + 4`` (C >= 1 when not given)."""
        width = output.shape[-1] if getattr(output, "ndim", 0) else None
        if width is None or (width != num_classes + BOX_DIMS if num_classes else width <= BOX_DIMS):
            expected = f"(B, num_classes + 4) = (B, {num_classes + BOX_DIMS})" if num_classes else \
                "(B, num_classes + 4) with num_classes >= 1"
            raise ValueError(f"a class + box output must be {expected}, got {tuple(getattr(output, 'shape', ()))}"
                             + (f" for num_classes={num_classes}" if num_classes else ""))
        return {"class": output[..., :-BOX_DIMS], "box": output[..., -BOX_DIMS:]}

    def join(self, parts: Dict[str, Any]) -> Any:
        return _cat([parts["class"], parts["box"]])

    def parts(self, value: Any, num_classes: Optional[int] = None, targets: bool = False) -> Tuple[Any, Any]:
        """``(class, box)`` from a dict ``{"class", "box"}``, a 2-tuple, or the packed tensor (outputs,
        or ``targets`` rows of class index then box)."""
        if isinstance(value, Mapping):
            missing = sorted({"class", "box"} - set(value))
            if missing:
                raise KeyError(f"{'targets' if targets else 'outputs'} dict needs keys 'class' and 'box'; "
                               f"missing {missing}")
            return value["class"], value["box"]
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return value[0], value[1]
        if getattr(value, "ndim", 0) == 2:
            if targets:
                return self.split_targets(value)
            split = self.split(value, num_classes)
            return split["class"], split["box"]
        raise TypeError(f"{'targets' if targets else 'outputs'} must be a dict with 'class'/'box', a 2-tuple or "
                        f"the packed tensor; got {type(value).__name__} {tuple(getattr(value, 'shape', ()))}")

    def split_targets(self, targets: Any) -> Tuple[Any, Any]:
        """``(class index, box)`` from ``(..., 5)`` target rows (a NaN box: none to score)."""
        if getattr(targets, "ndim", 0) < 1 or targets.shape[-1] != 1 + BOX_DIMS:
            raise ValueError(f"class + box targets must be (B, 5) class index + box, got "
                             f"{tuple(getattr(targets, 'shape', ()))}")
        return targets[..., 0], targets[..., 1:]

    def join_targets(self, label: Any, box: Any) -> Any:
        """One ``(..., 5)`` float row per item: the class index, then the box."""
        return _cat([label.float().reshape(*box.shape[:-1], 1), box.float()])

    def activate(self, output: Any, activation: Optional[str] = None) -> Any:
        parts = self.split(output)
        return self.join({"class": super().activate(parts["class"], activation), "box": parts["box"]})

    def deaugment(self, transform: Any, output: Any, size: Size, flip_pairs: FlipPairs = None) -> Tuple[Any, Any]:
        parts = self.split(output)
        return self.join({"class": parts["class"], "box": transform.boxes(parts["box"], size)}), 1.0

    def _mean(self, total: Any, norm: Any) -> Any:
        parts = self.split(total / norm)
        return self.join({"class": parts["class"], "box": parts["box"].clamp(0, 1)})

    def compare(self, output: Any, num_classes: Optional[int] = None) -> Tuple[str, Any]:
        """Class probabilities (raw where :class:`ClassesLayout` would compare raw) and the box."""
        parts = self.split(output.float(), num_classes)
        what, scores = ClassesLayout(self.activation).compare(parts["class"])
        return what, self.join({"class": scores, "box": parts["box"]})

    def width(self, num_classes: Optional[int], num_keypoints: Optional[int] = None) -> Optional[int]:
        return num_classes + BOX_DIMS if num_classes else None


class MasksLayout(OutputLayout):
    """Mask logits ``(B, C, H, W)``: per-pixel sigmoid (one channel per class, multi-label) or ``softmax``
    (exclusive classes). Pixels a transform lost (a shift, a zoom) are averaged over the views that saw them."""

    name = "mask"
    dims = 3
    tileable = True
    activations = ("sigmoid", "softmax", "none")
    compared = "mask logits"

    def deaugment(self, transform: Any, output: Any, size: Size, flip_pairs: FlipPairs = None) -> Tuple[Any, Any]:
        import torch.nn.functional as F

        if output.ndim != 4:
            raise ValueError(f"target='mask' needs (B, C, H, W) outputs, got {tuple(output.shape)}")
        prediction = transform.mask(output, size)
        seen = transform.mask(transform.image(output.new_ones(1, 1, *size)), size)
        if seen.shape[-2:] != prediction.shape[-2:]:
            seen = F.interpolate(seen, size=prediction.shape[-2:], mode="bilinear", align_corners=False)
        return prediction, seen

    def _mean(self, total: Any, norm: Any) -> Any:
        return total / (norm.clamp_min(1e-12) if hasattr(norm, "clamp_min") else norm)


def _cat(parts: List[Any]) -> Any:
    """Concatenate along the last axis, torch tensors or numpy arrays."""
    if all(type(p).__module__.startswith("torch") for p in parts):
        import torch

        return torch.cat(parts, dim=-1)
    import numpy as np

    return np.concatenate([np.asarray(p) for p in parts], axis=-1)


# --- registry ---------------------------------------------------------------------------------------

LAYOUTS: Registry[Callable[..., OutputLayout]] = Registry("output layout")


def register_layout(cls: Optional[type] = None, *, name: str = "", override: bool = False) -> Any:
    """Class decorator: register an :class:`OutputLayout` subclass under its ``name`` (what contracts record)."""

    def add(layout_cls: type) -> type:
        key = name or layout_cls.name
        if not key:
            raise ValueError(f"{layout_cls.__name__} needs a class attribute name")
        return LAYOUTS.register(layout_cls, name=key, override=override)

    return add(cls) if cls is not None else add


def get_layout(layout: Union[str, OutputLayout], activation: Optional[str] = None) -> OutputLayout:
    """A layout instance: ``layout`` itself, or the registered layout of that name (``activation``: not
    its default)."""
    if isinstance(layout, OutputLayout):
        return layout.with_activation(activation)
    return LAYOUTS.get(layout)(activation)


def list_layouts(pattern: str = "*") -> List[str]:
    """Registered layout names matching a shell-style ``pattern``, sorted."""
    return LAYOUTS.list(pattern)


for _cls in (ClassesLayout, ValuesLayout, KeypointsLayout, BoxesLayout, ClassBoxLayout, MasksLayout):
    register_layout(_cls)

CLASS_BOX = ClassBoxLayout()

__all__ = ["ACTIVATIONS", "BOX_DIMS", "BoxesLayout", "CLASS_BOX", "ClassBoxLayout", "ClassesLayout", "KeypointsLayout",
           "LAYOUTS", "MasksLayout", "OutputLayout", "ValuesLayout", "get_layout", "list_layouts", "register_layout"]
