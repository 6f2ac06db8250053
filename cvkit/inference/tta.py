"""Invertible test-time augmentation: augment a batch, predict, map each prediction back, average.

Every transform moves the image (``image``) and maps each target type back to the original
image (``logits``, ``mask``, ``keypoints``, ``boxes``; see :data:`TARGETS`). Coordinates are
normalised to [0, 1] with 0 the left/top edge and 1 the right/bottom edge of the image, the
convention of :class:`cvkit.models.tasks.KeypointModel`, :class:`~cvkit.models.tasks.ClassBoxModel`
and albumentations' normalised boxes. The image operations are pixel-exact where they can be
(flips, integer-pixel shifts with zero fill) and use ``grid_sample(align_corners=False)``
for zoom, whose coordinate map is exactly the one the point inverses use.

Transforms are named, so a config can list them::

    tta_predict(model, images, ["identity", "hflip", ("shift(4, 0)", 0.5), "scale(1.1)"])
"""
from __future__ import annotations

import ast
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvkit.registry import Registry
from cvkit.layouts import ACTIVATIONS, LAYOUTS, OutputLayout, get_layout, list_layouts

TARGETS: Tuple[str, ...] = ("logits", "mask", "keypoints", "boxes")
PREDICT_TARGETS: Tuple[str, ...] = TARGETS + ("class_box", "values")
Size = Tuple[int, int]
FlipPairs = Optional[Sequence[Tuple[int, int]]]


class TTATransform:
    """One invertible test-time transform.

    Subclasses implement ``image`` (forward, on a ``(B, C, H, W)`` batch), ``mask`` (inverse on a
    ``(B, C, H, W)`` prediction) and ``points`` (inverse on normalised ``(..., 2)`` x, y);
    keypoints and boxes are derived from ``points``. ``size`` is the ``(H, W)`` of the image the
    model saw; only transforms that work in pixels (``shift``) need it.
    """

    name = "transform"
    swaps_pairs = False  # a mirror: keypoint labels such as "left eye"/"right eye" trade places

    def image(self, x: Tensor) -> Tensor:
        """The augmented image batch."""
        raise NotImplementedError

    def logits(self, y: Tensor, size: Optional[Size] = None) -> Tensor:
        """Class scores do not move."""
        return y

    def mask(self, y: Tensor, size: Optional[Size] = None) -> Tensor:
        """A ``(B, C, H, W)`` prediction on the augmented image, mapped back to the original."""
        raise NotImplementedError

    def points(self, xy: Tensor, size: Optional[Size] = None) -> Tensor:
        """Normalised ``(..., 2)`` points on the augmented image, mapped back to the original."""
        raise NotImplementedError

    def keypoints(self, p: Tensor, size: Optional[Size] = None, flip_pairs: FlipPairs = None) -> Tensor:
        """``(B, 2N)`` x0, y0, x1, y1... mapped back; a mirror swaps the ``flip_pairs`` indices."""
        if p.ndim != 2 or p.shape[1] % 2:
            raise ValueError(f"keypoints must be (B, 2N) as x0, y0, x1, y1..., got {tuple(p.shape)}")
        xy = self.points(p.reshape(p.shape[0], -1, 2), size)
        if self.swaps_pairs and flip_pairs:
            xy = xy[:, pair_permutation(flip_pairs, xy.shape[1])]
        return xy.reshape(p.shape)

    def boxes(self, b: Tensor, size: Optional[Size] = None) -> Tensor:
        """``(B, 4)`` x1, y1, x2, y2 mapped back, corners re-sorted so that x1 <= x2 and y1 <= y2."""
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes must be (B, 4) as x1, y1, x2, y2, got {tuple(b.shape)}")
        corners = self.points(b.reshape(-1, 2, 2), size)
        return torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)

    def invert(self, target: Union[str, OutputLayout], y: Tensor, size: Optional[Size] = None,
               flip_pairs: FlipPairs = None) -> Tensor:
        """Map a prediction of layout ``target`` (an output layout or its name, e.g. one of :data:`TARGETS`)
        back to the original image: the layout asks this transform for the geometry it needs."""
        if not isinstance(target, OutputLayout) and target not in LAYOUTS:
            raise ValueError(f"target must be one of {list_layouts()} or an OutputLayout, got {target!r}")
        return get_layout(target).deaugment(self, y, size, flip_pairs)[0]

    def __repr__(self) -> str:
        return self.name


class Identity(TTATransform):
    """No change: the plain prediction."""

    name = "identity"

    def image(self, x: Tensor) -> Tensor:
        return x

    def mask(self, y: Tensor, size: Optional[Size] = None) -> Tensor:
        return y

    def points(self, xy: Tensor, size: Optional[Size] = None) -> Tensor:
        return xy


class HFlip(TTATransform):
    """Mirror left-right; keypoints listed in ``flip_pairs`` swap labels on the way back."""

    name = "hflip"
    swaps_pairs = True

    def image(self, x: Tensor) -> Tensor:
        return x.flip(-1)

    def mask(self, y: Tensor, size: Optional[Size] = None) -> Tensor:
        return y.flip(-1)

    def points(self, xy: Tensor, size: Optional[Size] = None) -> Tensor:
        return torch.stack([1 - xy[..., 0], xy[..., 1]], dim=-1)


class VFlip(TTATransform):
    """Mirror top-bottom (keypoint labels are kept: register your own transform to swap them)."""

    name = "vflip"

    def image(self, x: Tensor) -> Tensor:
        return x.flip(-2)

    def mask(self, y: Tensor, size: Optional[Size] = None) -> Tensor:
        return y.flip(-2)

    def points(self, xy: Tensor, size: Optional[Size] = None) -> Tensor:
        return torch.stack([xy[..., 0], 1 - xy[..., 1]], dim=-1)


class Shift(TTATransform):
    """Move the content by ``dx`` right and ``dy`` down, filling with zeros (the normalised mean).

    An int is pixels; a float in (-1, 1) is a fraction of the width/height, rounded to whole
    pixels so that the move and its inverse are exact.
    """

    def __init__(self, dx: Union[int, float] = 0, dy: Union[int, float] = 0) -> None:
        for arg, value in (("dx", dx), ("dy", dy)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"shift {arg} must be int pixels or a float fraction, got {value!r}")
            if isinstance(value, float) and not -1 < value < 1:
                raise ValueError(f"shift {arg}={value!r}: a float is a fraction in (-1, 1); use an int for pixels")
        self.dx, self.dy = dx, dy
        self.name = f"shift({dx}, {dy})"

    def pixels(self, size: Size) -> Tuple[int, int]:
        """``(dx, dy)`` in whole pixels for an image of ``size`` (H, W)."""
        height, width = size
        px = self.dx if isinstance(self.dx, int) else round(self.dx * width)
        py = self.dy if isinstance(self.dy, int) else round(self.dy * height)
        if abs(px) >= width or abs(py) >= height:
            raise ValueError(f"{self.name} moves the whole {height}x{width} image out of view")
        return px, py

    def image(self, x: Tensor) -> Tensor:
        px, py = self.pixels(tuple(x.shape[-2:]))
        return shift_pixels(x, px, py)

    def mask(self, y: Tensor, size: Optional[Size] = None) -> Tensor:
        height, width = y.shape[-2:]
        size = _need_size(self, size)
        px, py = self.pixels(size)
        mx, my = px * width / size[1], py * height / size[0]
        if mx != int(mx) or my != int(my):
            raise ValueError(
                f"{self.name}: a {height}x{width} mask cannot undo a {px},{py} px shift of a {size[0]}x{size[1]} "
                "image exactly; shift by a multiple of the output stride"
            )
        return shift_pixels(y, -int(mx), -int(my))

    def points(self, xy: Tensor, size: Optional[Size] = None) -> Tensor:
        height, width = _need_size(self, size)
        px, py = self.pixels((height, width))
        return xy - xy.new_tensor([px / width, py / height])


class Scale(TTATransform):
    """Zoom about the centre by ``s`` (> 1 zooms in and crops, < 1 zooms out and pads with zeros)."""

    def __init__(self, s: float = 1.1) -> None:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0:
            raise ValueError(f"scale s must be a positive number, got {s!r}")
        self.s = float(s)
        self.name = f"scale({s})"

    def image(self, x: Tensor) -> Tensor:
        return zoom(x, self.s)

    def mask(self, y: Tensor, size: Optional[Size] = None) -> Tensor:
        return zoom(y, 1 / self.s)

    def points(self, xy: Tensor, size: Optional[Size] = None) -> Tensor:
        return 0.5 + (xy - 0.5) / self.s


def _need_size(transform: TTATransform, size: Optional[Size]) -> Size:
    if size is None:
        raise ValueError(f"{transform.name} works in pixels: pass size=(H, W) of the image the model saw")
    return int(size[0]), int(size[1])


def shift_pixels(x: Tensor, dx: int, dy: int) -> Tensor:
    """Move ``x`` (..., H, W) by whole pixels, ``dx`` right and ``dy`` down, filling with zeros."""
    height, width = x.shape[-2:]
    out = torch.zeros_like(x)
    src_y, dst_y = _spans(dy, height)
    src_x, dst_x = _spans(dx, width)
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def _spans(d: int, n: int) -> Tuple[slice, slice]:
    return slice(max(0, -d), n - max(0, d)), slice(max(0, d), n - max(0, -d))


def zoom(x: Tensor, s: float) -> Tensor:
    """Zoom ``x`` (B, C, H, W) about its centre: content at normalised ``u`` moves to ``0.5 + s (u - 0.5)``."""
    theta = x.new_tensor([[1 / s, 0.0, 0.0], [0.0, 1 / s, 0.0]]).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pair_permutation(flip_pairs: Sequence[Tuple[int, int]], num_keypoints: int) -> List[int]:
    """Index list that swaps each ``(i, j)`` of ``flip_pairs``; checks range and repeats."""
    perm = list(range(num_keypoints))
    seen = set()
    for pair in flip_pairs:
        if len(pair) != 2:
            raise ValueError(f"flip_pairs must hold (i, j) index pairs, got {pair!r}")
        i, j = int(pair[0]), int(pair[1])
        for k in (i, j):
            if not 0 <= k < num_keypoints:
                raise ValueError(f"flip_pairs index {k} is outside 0..{num_keypoints - 1} ({num_keypoints} keypoints)")
            if k in seen:
                raise ValueError(f"flip_pairs lists keypoint {k} twice: {list(flip_pairs)}")
            seen.add(k)
        perm[i], perm[j] = j, i
    return perm


# --- registry ---------------------------------------------------------------------------------

TTA_TRANSFORMS: Registry[Callable[..., TTATransform]] = Registry("TTA transform")


def register_tta(name: str, examples: Sequence[str] = (), *, override: bool = False) -> Callable:
    """Register a transform class/factory under ``name``; ``examples`` are specs tests run.

    A transform with arguments should give examples (``"shift(3, -2)"``), else tests use ``name``;
    they are kept as the entry's ``examples`` metadata. A taken name raises
    :class:`cvkit.registry.RegistryError` unless ``override=True``.
    """

    def add(factory: Callable[..., TTATransform]) -> Callable[..., TTATransform]:
        return TTA_TRANSFORMS.register(factory, name=name, override=override, examples=tuple(examples) or (name,))

    return add


register_tta("identity")(Identity)
register_tta("hflip")(HFlip)
register_tta("vflip")(VFlip)
register_tta("shift", examples=("shift(3, -2)", "shift(0.1, 0.05)", "shift(-5, 0)"))(Shift)
register_tta("scale", examples=("scale(1.25)", "scale(0.8)"))(Scale)


def list_tta(pattern: str = "*") -> List[str]:
    """Registered transform names matching a shell-style ``pattern``, sorted."""
    return TTA_TRANSFORMS.list(pattern)


def tta_examples(name: Optional[str] = None) -> List[str]:
    """Example specs of one registered transform, or of all of them."""
    names = [name] if name else list_tta()
    return [spec for n in names for spec in TTA_TRANSFORMS.meta(n)["examples"]]


def create_tta(spec: Union[str, TTATransform], *args, **kwargs) -> TTATransform:
    """A transform from a name (``"hflip"``), a call string (``"shift(4, -2)"``) or an instance."""
    if isinstance(spec, TTATransform):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a TTA transform is a name, 'name(args)' or a TTATransform, got {spec!r}")
    name, parsed_args, parsed_kwargs = _parse(spec)
    return TTA_TRANSFORMS.get(name)(*parsed_args, *args, **parsed_kwargs, **kwargs)


def _parse(spec: str) -> Tuple[str, list, dict]:
    try:
        node = ast.parse(spec.strip(), mode="eval").body
        if isinstance(node, ast.Name):
            return node.id, [], {}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            return node.func.id, args, kwargs
    except (SyntaxError, ValueError):
        pass
    raise ValueError(f"TTA transform spec {spec!r}: expected 'name' or 'name(number, ...)' such as 'shift(4, 0)'")


# --- prediction -------------------------------------------------------------------------------

TransformSpec = Union[str, TTATransform, Tuple[Union[str, TTATransform], float]]


def tta_predict(
    model: nn.Module,
    images: Tensor,
    transforms: Sequence[TransformSpec] = (("identity", 1.0), ("hflip", 1.0)),
    target: Union[str, OutputLayout] = "logits",
    flip_pairs: FlipPairs = None,
    num_classes: Optional[int] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """Weighted mean of the model's de-augmented predictions over ``transforms``.

    Args:
        model: called as ``model(images)``; run in eval mode, without gradients.
        images: ``(B, C, H, W)`` batch, already normalised.
        transforms: specs or ``(spec, weight)`` pairs (see :func:`create_tta`).
        target: the output layout (a task's ``layout``, see :mod:`cvkit.layouts`) or a registered
            layout's name: ``logits`` (B, C), ``mask`` (B, C, H, W), ``keypoints`` (B, 2N) normalised,
            ``boxes`` (B, 4) normalised xyxy, ``class_box`` (B, C + 4) from ClassBoxModel, ``values``
            (B, N) raw numbers.
        flip_pairs: keypoint index pairs that swap under a mirror (left eye, right eye).
        num_classes: the number of class columns of a ``class_box`` output (checked when given).
        activation: overrides the layout's, applied before averaging to logits/masks/the class part:
            ``softmax``, ``sigmoid`` or ``none``. The layouts' defaults: ``softmax`` for logits and
            class_box (averaging probabilities, not logits), ``sigmoid`` for masks (cvkit's masks are
            multi-label, one channel per class; pass ``softmax`` for exclusive classes), none for
            coordinates and values.

    Returns probabilities (or raw averages with ``activation="none"``) in the original frame.
    Mask pixels are averaged only over the transforms that saw them (a shift or zoom loses a
    border); keep ``identity`` in the list so every pixel is covered. Boxes are clipped to [0, 1].
    """
    layout = _layout(target, activation)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    weighted = _weighted(transforms)
    size = (int(images.shape[-2]), int(images.shape[-1]))

    def views() -> Iterator[Tuple[Tensor, Union[Tensor, float]]]:
        for transform, weight in weighted:
            out = layout.check(model(transform.image(images)), num_classes)
            prediction, seen = layout.deaugment(transform, layout.activate(out), size, flip_pairs)
            yield prediction, seen * weight

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return layout.average(views())
    finally:
        model.train(was_training)


def _layout(target: Union[str, OutputLayout], activation: Optional[str]) -> OutputLayout:
    """The layout ``target`` names, with ``activation`` when given; one-line errors for either."""
    if not isinstance(target, OutputLayout) and target not in LAYOUTS:
        raise ValueError(f"target must be one of {list_layouts()} or an OutputLayout, got {target!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return get_layout(target, activation)


def _weighted(transforms: Sequence[TransformSpec]) -> List[Tuple[TTATransform, float]]:
    if isinstance(transforms, (str, TTATransform)) or not transforms:
        raise ValueError(f"transforms must be a non-empty list of specs or (spec, weight) pairs, got {transforms!r}")
    out = []
    for item in transforms:
        spec, weight = item if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"TTA weight of {spec!r} must be a positive number, got {weight!r}")
        out.append((create_tta(spec), float(weight)))
    return out


__all__ = [
    "ACTIVATIONS",
    "HFlip",
    "Identity",
    "PREDICT_TARGETS",
    "TTA_TRANSFORMS",
    "Scale",
    "Shift",
    "TARGETS",
    "TTATransform",
    "VFlip",
    "create_tta",
    "flip_pairs_from_names",
    "list_tta",
    "pair_permutation",
    "register_tta",
    "shift_pixels",
    "tta_examples",
    "tta_predict",
    "zoom",
]


def flip_pairs_from_names(names: Sequence[str]) -> List[Tuple[int, int]]:
    """Index pairs of keypoints whose names differ only by ``left``/``right`` (they trade places under a mirror)."""
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        mirrored = name.replace("left", "\0").replace("right", "left").replace("\0", "right")
        j = index.get(mirrored)
        if j is not None and i < j:
            pairs.append((i, j))
    return pairs
