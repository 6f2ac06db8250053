"""Outlier search: find mislabelled and broken images from a trained model's pooled features.

Embed every image with :func:`extract_features`, score how unusual each one is with
:func:`score_outliers` (per class by default, so an image that looks like another class stands
out), rank them with :func:`rank_outliers` and look at the top suspects on a
:func:`contact_sheet` before deciding what to relabel or drop.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from cvkit.io import atomic_write_bytes

PathLike = Union[str, os.PathLike]
METHODS = ("centroid", "dbscan", "isolation_forest")
_METHOD_KWARGS = {
    "centroid": (),
    "dbscan": ("eps", "min_samples"),
    "isolation_forest": ("n_estimators", "max_samples", "random_state"),
}


def extract_features(
    model: nn.Module,
    loader: Any,
    device: Union[str, torch.device] = "cpu",
    feature_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Pooled pre-logits features of every image: ``(features N x D, labels or None, indices)``.

    timm models give ``forward_head(forward_features(x), pre_logits=True)``; other models with a
    ``forward_features`` are global-average pooled; ``feature_fn(x)`` overrides both. Batches are
    ``{"features", "targets", "index"}`` dicts (targets and index optional) or ``(x, y)`` tuples;
    labels are None when a batch has no targets. The model is moved to ``device`` and run in eval
    mode; its train/eval modes are restored afterwards.
    """
    from cvkit.inference.loop import outputs_over

    embed = feature_fn or _embedder(model)
    model.to(device)
    feats: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    has_labels = True
    indices: List[np.ndarray] = []
    seen = 0
    for batch, out in outputs_over(model, loader, device, embed, inputs=lambda b: _unpack(b)[0]):
        x, y, index = _unpack(batch)
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"features must be (batch, dim), got {tuple(out.shape)} for a batch of {x.shape[0]}")
        feats.append(out.float().cpu().numpy())
        has_labels = has_labels and y is not None
        if has_labels:
            labels.append(_numpy(y))
        indices.append(np.arange(seen, seen + len(out)) if index is None else _numpy(index))
        seen += len(out)
    if not feats:
        raise ValueError("the loader yields no batches")
    return np.concatenate(feats), np.concatenate(labels) if has_labels else None, np.concatenate(indices)


def _numpy(values: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(values).cpu()).reshape(-1)


def _embedder(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    features = getattr(model, "forward_features", None)
    head = getattr(model, "forward_head", None)
    if callable(features) and callable(head) and "pre_logits" in inspect.signature(head).parameters:
        return lambda x: head(features(x), pre_logits=True)
    if callable(features):
        return lambda x: _global_pool(features(x))
    raise TypeError(
        f"{type(model).__name__} has neither timm's forward_head(..., pre_logits=True) nor forward_features: "
        "pass feature_fn=lambda x: <(batch, dim) tensor> to extract_features"
    )


def _global_pool(out: torch.Tensor) -> torch.Tensor:
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    if out.ndim == 3:
        return out.mean(dim=1)
    if out.ndim == 2:
        return out
    raise ValueError(f"cannot pool forward_features output of shape {tuple(out.shape)}; pass feature_fn=")


def _unpack(batch: Any) -> Tuple[torch.Tensor, Any, Any]:
    if isinstance(batch, dict):
        if "features" not in batch:
            raise KeyError(f"batch dict lacks 'features'; it has keys {sorted(batch)}")
        return batch["features"], batch.get("targets"), batch.get("index")
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], batch[1] if len(batch) > 1 else None, None
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    raise TypeError(f"a batch must be a dict with 'features', an (x, y) tuple or a tensor, got {type(batch).__name__}")


def score_outliers(
    features: np.ndarray,
    labels: Optional[Sequence[Any]] = None,
    method: str = "centroid",
    per_class: bool = True,
    normalize: bool = True,
    **kwargs: Any,
) -> np.ndarray:
    """One score per row, higher = more suspicious.

    Methods: ``centroid`` (cosine distance to the centroid), ``dbscan`` (distance to the nearest
    core point, so noise points come first; ``eps`` from the knee of the sorted k-distances unless
    given, ``min_samples`` = 5), ``isolation_forest`` (``-score_samples``; ``n_estimators``,
    ``max_samples``, ``random_state``). With ``per_class`` each class is scored on its own, which
    is what exposes mislabelled images; ``normalize`` L2-normalises the features first.
    Classes with fewer than 3 images score 0 under dbscan and isolation_forest.
    """
    if method not in _METHOD_KWARGS:
        raise KeyError(f"unknown outlier method {method!r}; valid: {list(METHODS)}")
    unknown = sorted(set(kwargs) - set(_METHOD_KWARGS[method]))
    if unknown:
        raise TypeError(f"method {method!r} takes no argument(s) {unknown}; it takes {list(_METHOD_KWARGS[method])}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"features hold {int((~np.isfinite(x)).sum())} NaN/inf values")
    if normalize:
        x = _unit(x)
    scorer = _SCORERS[method]
    if not per_class:
        return scorer(x, **kwargs)
    if labels is None:
        raise ValueError("per_class=True needs labels; pass labels= or per_class=False")
    labels = np.asarray(labels)
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} feature rows but {len(labels)} labels")
    scores = np.zeros(len(x))
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        scores[rows] = scorer(x[rows], **kwargs)
    return scores


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _centroid_scores(x: np.ndarray) -> np.ndarray:
    centre = _unit(x.mean(axis=0, keepdims=True))[0]
    return 1.0 - _unit(x) @ centre


def _dbscan_scores(x: np.ndarray, eps: Optional[float] = None, min_samples: int = 5) -> np.ndarray:
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    if len(x) < 3:
        return np.zeros(len(x))
    k = max(2, min(int(min_samples), len(x) - 1))
    distances, _ = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    k_distance = distances[:, -1]
    if eps is None:
        eps = knee(np.sort(k_distance))
    if not eps > 0:
        return k_distance
    core = DBSCAN(eps=eps, min_samples=k).fit(x).core_sample_indices_
    if len(core) == 0:
        return k_distance
    to_core, _ = NearestNeighbors(n_neighbors=1).fit(x[core]).kneighbors(x)
    return to_core[:, 0]


def knee(sorted_values: np.ndarray) -> float:
    """The value where an increasing curve bends most: farthest below the chord from first to last."""
    y = np.asarray(sorted_values, dtype=np.float64)
    if len(y) < 3 or y[-1] == y[0]:
        return float(y[-1]) if len(y) else 0.0
    t = np.linspace(0.0, 1.0, len(y))
    return float(y[int(np.argmax(t - (y - y[0]) / (y[-1] - y[0])))])


def _isolation_forest_scores(
    x: np.ndarray, n_estimators: int = 200, max_samples: Union[int, float, str] = "auto", random_state: int = 0
) -> np.ndarray:
    from sklearn.ensemble import IsolationForest

    if len(x) < 3:
        return np.zeros(len(x))
    forest = IsolationForest(n_estimators=n_estimators, max_samples=max_samples, random_state=random_state)
    return -forest.fit(x).score_samples(x)


_SCORERS: Dict[str, Callable[..., np.ndarray]] = {
    "centroid": _centroid_scores,
    "dbscan": _dbscan_scores,
    "isolation_forest": _isolation_forest_scores,
}


def rank_outliers(
    features: np.ndarray,
    labels: Optional[Sequence[Any]] = None,
    indices: Optional[Sequence[int]] = None,
    method: str = "centroid",
    per_class: bool = True,
    path: Optional[PathLike] = None,
    **kwargs: Any,
) -> "pandas.DataFrame":  # noqa: F821
    """Suspects first: a DataFrame with ``index``, ``label``, ``score``, ``rank`` (1 = most suspicious).

    Arguments are those of :func:`score_outliers`; ``indices`` defaults to ``0..N-1``. With
    ``path`` the table is also written there as CSV, atomically.
    """
    import pandas as pd

    scores = score_outliers(features, labels, method=method, per_class=per_class, **kwargs)
    n = len(scores)
    indices = np.arange(n) if indices is None else np.asarray(indices)
    if len(indices) != n:
        raise ValueError(f"{n} feature rows but {len(indices)} indices")
    order = np.argsort(-scores, kind="stable")
    frame = pd.DataFrame({
        "index": indices[order],
        "label": np.asarray(labels)[order] if labels is not None else [None] * n,
        "score": scores[order],
        "rank": np.arange(1, n + 1),
    })
    if path is not None:
        atomic_write_bytes(path, frame.to_csv(index=False).encode())
    return frame


def contact_sheet(
    images_or_paths: Sequence[Any],
    indices: Sequence[int],
    scores: Sequence[float],
    path: PathLike,
    labels: Optional[Sequence[Any]] = None,
    ncols: int = 8,
    thumb: int = 96,
) -> None:
    """Write a PNG grid of the images at ``indices``, each captioned ``#index``, its label and score.

    ``images_or_paths[i]`` is an HxWxC / HxW image (uint8, or float in [0, 1]) or a file path;
    pass the top rows of :func:`rank_outliers` (``df["index"]``, ``df["score"]``, ``df["label"]``).
    """
    import cv2

    indices, scores = list(indices), list(scores)
    if not indices:
        raise ValueError("contact_sheet needs at least one index")
    if len(scores) != len(indices) or (labels is not None and len(labels) != len(indices)):
        raise ValueError(f"{len(indices)} indices, {len(scores)} scores and "
                         f"{'no' if labels is None else len(labels)} labels: they must match")
    if ncols < 1 or thumb < 16:
        raise ValueError(f"need ncols >= 1 and thumb >= 16, got ncols={ncols}, thumb={thumb}")
    font_scale = 0.35 * thumb / 96
    line = int(round(13 * thumb / 96))
    cell_h, pad = thumb + 2 * line + 4, 2
    nrows = -(-len(indices) // ncols)
    sheet = np.full((nrows * (cell_h + pad) + pad, min(ncols, len(indices)) * (thumb + pad) + pad, 3), 255, np.uint8)
    for k, (index, score) in enumerate(zip(indices, scores)):
        top, left = pad + (k // ncols) * (cell_h + pad), pad + (k % ncols) * (thumb + pad)
        sheet[top : top + thumb, left : left + thumb] = _thumbnail(_as_rgb(images_or_paths[int(index)]), thumb)
        first = f"#{int(index)}" + ("" if labels is None else f" y={labels[k]}")
        for j, text in enumerate((first, f"s={float(score):.3g}")):
            cv2.putText(sheet, text, (left + 2, top + thumb + (j + 1) * line), cv2.FONT_HERSHEY_SIMPLEX,
                        font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the contact sheet for {path}")
    atomic_write_bytes(path, png.tobytes())


def _as_rgb(item: Any) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        from cvkit.data.io import read_image

        return read_image(item)  # an ImageReadError naming the file, the pixel cap included
    image = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)
    if image.ndim == 3 and image.shape[2] in (1, 4):
        image = image[..., :1].repeat(3, axis=2) if image.shape[2] == 1 else image[..., :3]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"cannot show an image of shape {image.shape}")
    if image.dtype != np.uint8:
        image = image.astype(np.float64)
        image = np.clip(image * 255 if image.max(initial=0) <= 1.0 else image, 0, 255).astype(np.uint8)
    return image


def _thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    scale = size / max(h, w)
    resized = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    tile = np.full((size, size, 3), 255, np.uint8)
    top, left = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    tile[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return tile


__all__ = ["METHODS", "contact_sheet", "extract_features", "knee", "rank_outliers", "score_outliers"]
