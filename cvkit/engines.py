"""The Catalyst engines a run can name: ``ENGINES`` (``cpu``, ``gpu``, ``amp``, ``ddp``, ``ddp_amp``) and
:func:`make_engine`, the one place an engine is built from a name.

Config validation (``engine:`` in YAML), the runner and the examples' ``--device`` read this registry.
Importing this module needs neither torch nor Catalyst; building an engine does.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Callable, Iterator, Tuple, Union

from cvkit.registry import Registry

if TYPE_CHECKING:
    from catalyst.core.engine import Engine

ENGINES: Registry[Callable[[], "Engine"]] = Registry("engine")


@ENGINES.register(name="cpu", cuda=False, distributed=False)
def cpu_engine() -> "Engine":
    """The CPU."""
    from catalyst import dl

    return dl.CPUEngine()


def _cuda_engine(engine: str) -> Callable[[], "Engine"]:
    """The builder of a CUDA engine: ``amp`` names mean fp16, ``ddp`` names one process per visible GPU (nccl),
    on one machine or on every node of a torchrun / Slurm launch."""

    def build() -> "Engine":
        import torch
        from catalyst import dl

        if not torch.cuda.is_available():
            raise ValueError(f"engine {engine!r} needs a CUDA GPU and none is visible; use engine='cpu'")
        precision = "fp16" if engine.endswith("amp") else "no"
        if engine.startswith("ddp"):
            from cvkit.distributed import engine_from_env

            return engine_from_env(mixed_precision=precision)
        return dl.GPUEngine(mixed_precision=precision)

    build.__doc__ = f"Catalyst's engine for {engine!r}."
    return build


for _name in ("gpu", "amp", "ddp", "ddp_amp"):
    ENGINES.register(_cuda_engine(_name), name=_name, cuda=True, distributed=_name.startswith("ddp"))


def engine_names(distributed: bool = True) -> Tuple[str, ...]:
    """The registered engine names (without the multi-process ones when ``distributed`` is False)."""
    return tuple(n for n in ENGINES.list() if distributed or not ENGINES.meta(n).get("distributed"))


def unknown_engine(engine: object) -> str:
    """The one-line message for an engine name that is not registered, listing the valid ones."""
    return f"unknown engine {engine!r}; valid: {', '.join(repr(n) for n in ENGINES.list())} or a catalyst Engine"


def make_engine(engine: Union[None, str, "Engine"] = None) -> "Engine":
    """An explicit Catalyst engine: ``cpu``, ``gpu``, ``amp`` (fp16 on GPU), ``ddp``/``ddp_amp``
    (one process per visible GPU, nccl; across machines as torchrun's or Slurm's environment says,
    see :func:`cvkit.distributed.engine_from_env`), or the best available.

    Catalyst's own default builds ``GPUEngine(fp16=...)``, which recent accelerate rejects. For DDP
    on CPU pass :func:`cvkit.distributed.ddp_engine` ``(cpu=True, workers=...)`` yourself.
    """
    import torch
    from catalyst.core.engine import Engine

    if isinstance(engine, Engine):
        return engine
    if engine is None:
        engine = "gpu" if torch.cuda.is_available() else "cpu"
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(unknown_engine(engine))
    return ENGINES.create(engine)


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Silence the known, harmless warnings of the pinned stack that every stage would repeat: accelerate<1.0
    deprecating its TPU enum, Catalyst's loss metric calling float() on the undetached loss, and Catalyst not
    recognising cvkit's per-batch plateau callback as a scheduler callback."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The `TPU` of `<enum 'DistributedType'>`", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"Converting a tensor with requires_grad=True to a scalar")
        warnings.filterwarnings("ignore", message=r"No ``ISchedulerCallback/SchedulerCallback`` were found")
        yield


__all__ = ["ENGINES", "engine_names", "known_warnings_silenced", "make_engine", "unknown_engine"]
