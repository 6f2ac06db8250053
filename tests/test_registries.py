"""Checks generated over every entry of every cvkit registry (criteria, metrics, schedulers, presets, TTA...)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cvkit import losses, metrics, stages
from cvkit.data import augment
from cvkit.inference import tta
from cvkit.models import tasks
from cvkit.registry import Registry, RegistryError
from cvkit import layouts

B = 4

# registry -> (public register call: (name, entry, override) -> None, public create call that fails on a bad name)
Register = Callable[[str, Any, bool], Any]
PUBLIC: Dict[str, Tuple[Registry, Register, Callable[[str], Any]]] = {
    "criterion": (losses.CRITERIA,
                  lambda n, e, o: losses.register_criterion(e, name=n, override=o),
                  lambda n: losses.create_criterion(n)),
    "metric": (metrics.METRICS,
               lambda n, e, o: metrics.register_metric(e, name=n, override=o),
               lambda n: metrics.create_metric(n)),
    "optimizer": (stages.OPTIMIZERS,
                  lambda n, e, o: stages.register_optimizer(e, name=n, override=o),
                  lambda n: stages.create_optimizer(n, [])),
    "scheduler": (stages.SCHEDULERS,
                  lambda n, e, o: stages.register_scheduler("epoch", name=n, override=o)(e),
                  lambda n: stages.Stage("s", 1, scheduler=n)),
    "preset": (augment.PRESETS,
               lambda n, e, o: augment.register_preset(n, override=o)(e),
               lambda n: augment.create_preset(n, 8)),
    "tta": (tta.TTA_TRANSFORMS,
            lambda n, e, o: tta.register_tta(n, override=o)(e),
            lambda n: tta.create_tta(n)),
    "layout": (layouts.LAYOUTS,
               lambda n, e, o: layouts.register_layout(e, name=n, override=o),
               lambda n: layouts.get_layout(n)),
    "task_model": (tasks.TASK_MODELS,
                   lambda n, e, o: tasks.register_task_model(e, name=n, override=o),
                   lambda n: tasks.create_task_model(n)),
}
ENTRIES = [(kind, name) for kind, (registry, _, _) in PUBLIC.items() for name in registry.list()]


def _typo(name: str) -> str:
    """``name`` with its 2nd and 3rd letters swapped (or an extra letter when that changes nothing)."""
    swapped = name[0] + name[2] + name[1] + name[3:] if len(name) > 2 else name
    return swapped if swapped != name else name + "x"


def test_every_registry_has_entries():
    assert all(len(registry) > 0 for registry, _, _ in PUBLIC.values())


@pytest.mark.parametrize("kind, name", ENTRIES)
def test_a_taken_name_is_refused_unless_override(kind: str, name: str):
    registry, register, _ = PUBLIC[kind]
    original, meta = registry.get(name), registry.meta(name)

    class Replacement:
        pass

    try:
        with pytest.raises(RegistryError, match=f"{name!r} is already registered; pass override=True"):
            register(name, Replacement, False)
        assert registry.get(name) is original
        register(name, Replacement, True)
        assert registry.get(name) is Replacement
    finally:
        registry.register(original, name=name, override=True, **meta)
    assert registry.get(name) is original and registry.meta(name) == meta


@pytest.mark.parametrize("kind, name", ENTRIES)
def test_a_typo_names_the_nearest_name(kind: str, name: str):
    registry, _, create = PUBLIC[kind]
    typo = _typo(name)
    if typo in registry:
        pytest.skip(f"{kind} {name!r}: its typo {typo!r} is itself registered")
    with pytest.raises(KeyError, match=f"unknown {registry.kind} {typo!r}; did you mean .*{name!r}"):
        create(typo)
    assert registry.list(name) == [name] and name in registry.list(name[:2] + "*")


# Criteria -------------------------------------------------------------------------------------

def _with_grad(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone().requires_grad_(True)
    if isinstance(value, dict):
        return {k: _with_grad(v) for k, v in value.items()}
    return type(value)(_with_grad(v) for v in value)


def _leaves(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    values = value.values() if isinstance(value, dict) else value
    return [t for v in values for t in _leaves(v)]


@pytest.mark.parametrize("name", losses.list_criteria())
def test_criterion_per_sample_losses_average_to_the_mean_and_carry_gradients(name: str):
    torch.manual_seed(0)
    try:
        outputs, targets = losses.criterion_example(name, B)
    except KeyError:
        pytest.skip(f"criterion {name!r} registered no example input")
    outputs = _with_grad(outputs)
    per_sample = losses.per_sample_loss(losses.create_criterion(name), outputs, targets)
    assert per_sample.shape == (B,) and torch.isfinite(per_sample).all()
    mean = losses.create_criterion(name, reduction="mean")(outputs, targets)
    assert torch.allclose(per_sample.mean(), mean, atol=1e-6)
    per_sample.mean().backward()
    for tensor in _leaves(outputs):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


# Metrics --------------------------------------------------------------------------------------

def _metric(name: str) -> Tuple[metrics.Metric, Any, Any]:
    torch.manual_seed(0)
    try:
        kwargs, outputs, targets = metrics.metric_example(name, B)
    except KeyError:
        pytest.skip(f"metric {name!r} registered no example input")
    return metrics.create_metric(name, **kwargs), outputs, targets


@pytest.mark.parametrize("name", metrics.list_metrics())
def test_metric_keys_are_what_compute_returns_and_say_their_direction(name: str):
    metric, outputs, targets = _metric(name)
    metric.update(outputs, targets)
    keys = metric.keys()
    assert set(keys) == set(metric.compute()) and len(keys) == len(set(keys))
    assert set(metric.lower_is_better) <= set(keys)
    for key in keys:
        assert metrics.metric_minimized([metric], key) is (key in metric.lower_is_better)
    assert metrics.metric_minimized([metric], "loss") and metrics.metric_minimized([metric], "loss_box")
    with pytest.raises(ValueError, match=f"'no_such_key' is produced by none .*{keys[0]!r}") as info:
        metrics.metric_minimized([metric], "no_such_key")
    assert "\n" not in str(info.value)


def test_metric_direction_comes_from_the_metric_producing_the_key():
    found = [metrics.create_metric("classification", num_classes=2), metrics.create_metric("keypoint", image_size=8)]
    assert not metrics.metric_minimized(found, "f1_macro")
    assert metrics.metric_minimized(found, "nme") and metrics.metric_minimized(found, "mean_error_px")
    assert not metrics.metric_minimized([metrics.create_metric("segmentation", num_classes=1)], "dice_1")


@pytest.mark.parametrize("name", metrics.list_metrics())
def test_metric_sync_sums_every_state_tensor_through_all_reduce(name: str, monkeypatch: pytest.MonkeyPatch):
    """Two ranks holding the same statistics: after sync each has the sums of a metric updated twice."""
    metric, outputs, targets = _metric(name)
    twice, _, _ = _metric(name)
    metric.update(outputs, targets)
    twice.update(outputs, targets)
    twice.update(outputs, targets)
    reduced: List[torch.Tensor] = []

    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        reduced.append(tensor)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *args: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert type(metric).sync is metrics.Metric.sync, f"{name} must sync through Metric.sync (one path for all)"
    metric.sync()
    state = metric.state_tensors()
    assert len(reduced) == len(state) and all(r is s for r, s in zip(reduced, state))
    for synced, expected in zip(state, twice.state_tensors()):
        assert torch.allclose(synced, expected, equal_nan=True)
    assert metric.compute() == pytest.approx(twice.compute(), nan_ok=True)


def test_metric_sync_without_a_process_group_changes_nothing():
    metric, outputs, targets = _metric("classification")
    metric.update(outputs, targets)
    before = metric.confusion.clone()
    metric.sync()
    assert torch.equal(metric.confusion, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a GPU")
def test_metric_sync_under_nccl_reduces_cpu_statistics_on_the_gpu(tmp_path):
    """NCCL rejects CPU tensors; every metric keeps CPU statistics and must still sync."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for name in metrics.list_metrics():
            metric, outputs, targets = _metric(name)
            metric.update(outputs, targets)
            before = [t.clone() for t in metric.state_tensors()]
            metric.sync()
            for synced, old in zip(metric.state_tensors(), before):
                assert synced.device.type == "cpu" and torch.equal(synced, old)
    finally:
        dist.destroy_process_group()


# Schedulers -----------------------------------------------------------------------------------

SCHEDULER_KWARGS: Dict[str, Dict[str, Any]] = {"plateau": {"patience": 0}, "plateau_batch": {"patience": 1}}


@pytest.mark.parametrize("minimize", [True, False])
@pytest.mark.parametrize("name", stages.list_schedulers())
def test_scheduler_built_as_the_runner_builds_it_changes_the_lr(name: str, minimize: bool):
    stage = stages.Stage("s", 3, lr=0.1, optimizer="sgd", scheduler=name,
                         scheduler_kwargs=SCHEDULER_KWARGS.get(name, {}))
    weight = torch.zeros(2, requires_grad=True)
    optimizer = stage.build_optimizer([{"params": [weight], "lr": 0.1, "name": "head"}])
    scheduler = stage.build_scheduler(optimizer, steps_per_epoch=4, minimize=minimize)
    start = optimizer.param_groups[0]["lr"]
    steps = stage.epochs * (4 if stage.interval == "batch" else 1)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    # the monitored value only gets worse: it grows when minimised, falls when maximised
    worse = [float(i) if minimize or not plateau else -float(i) for i in range(steps)]
    lrs = []
    for value in worse:
        weight.sum().backward()
        optimizer.step()
        if isinstance(scheduler, stages.SmoothedLossPlateau):
            scheduler.update(value)
        elif plateau:
            scheduler.step(value)
        else:
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert any(lr != pytest.approx(start) for lr in lrs), f"{name}: the LR stayed {start} over {steps} steps"
    if plateau:
        assert lrs[-1] < start


# Augmentation presets -------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("name", augment.list_presets())
def test_preset_reloads_from_file_and_gives_the_same_output(name: str, suffix: str, tmp_path):
    transform = augment.create_preset(name, (24, 32))
    path = tmp_path / f"{name}{suffix}"
    augment.save_transform(transform, path)
    loaded = augment.load_transform(path)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = rng.integers(0, 2, (30, 40), dtype=np.uint8)
    for seed in range(3):
        transform.set_random_seed(seed)
        loaded.set_random_seed(seed)
        want, got = transform(image=image, mask=mask), loaded(image=image, mask=mask)
        assert torch.equal(want["image"], got["image"]) and torch.equal(want["mask"], got["mask"])


# TTA ------------------------------------------------------------------------------------------

H, W = 24, 32


@pytest.mark.parametrize("spec", tta.tta_examples())
def test_tta_example_inverts_a_mask(spec: str):
    """Image forward then mask inverse is the identity wherever the augmented image still shows it."""
    transform = tta.create_tta(spec)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    ramp = torch.stack([0.3 + 0.5 * xs, 1.0 - 0.7 * ys + 0.2 * xs])[None]  # bilinear resampling keeps it exactly
    back = transform.mask(transform.image(ramp), (H, W))
    seen = transform.mask(transform.image(torch.ones(1, 1, H, W)), (H, W)) > 0.999
    inner = -F.max_pool2d(-seen.float(), 3, 1, 1) > 0  # away from the edge of what was seen
    assert inner.sum() > H * W / 3
    region = inner.expand_as(ramp)
    assert torch.allclose(back[region], ramp[region], atol=1e-5)
