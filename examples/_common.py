"""Options and error reporting the example scripts share (not part of cvkit: examples are scripts a user copies).

Examples import it as ``from _common import ...``; Python puts a script's own folder first on
``sys.path``, so that works for ``python examples/x.py`` from anywhere.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from cvkit.data.demo import demo_pretrained
from cvkit.engines import engine_names

DEVICES = engine_names(distributed=False)


def common_args(doc: str, name: str, arch: Optional[str], epochs: int, batch_size: int,
                devices: Sequence[str] = DEVICES) -> argparse.ArgumentParser:
    """A parser with the options every example takes (``--arch``/``--pretrained`` unless ``arch`` is None)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="competition data folder (default: a demo set built from sklearn digits)")
    p.add_argument("--logdir", type=Path, default=Path("runs") / name, help="where logs, checkpoints, predictions go")
    if arch is not None:
        p.add_argument("--arch", default=arch, help="timm architecture name")
        p.add_argument("--pretrained", help="local weights file for --arch (nothing is downloaded)")
    p.add_argument("--epochs", type=int, default=epochs, help="maximum epochs of each stage after the first")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, choices=list(devices), help="engine; default gpu if available")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="use only this many train and test images (smoke runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def starting_weights(args: argparse.Namespace) -> Optional[Path]:
    """``--pretrained`` when given; on demo data (no ``--data``) the demo's pretext-task backbone
    (:func:`cvkit.data.demo.demo_pretrained`, cached under ``LOGDIR/../demo_data/pretrained``); else None."""
    if args.pretrained:
        return Path(args.pretrained)
    if args.data is None:
        return demo_pretrained(args.arch, args.logdir.parent / "demo_data" / "pretrained")
    return None


def predict_device(args: argparse.Namespace) -> str:
    """Where the examples' test-set predictions run: the CPU when ``--device cpu``, else a GPU when visible."""
    return "cpu" if args.device == "cpu" else "auto"


def run_script(main: Callable[[], Any]) -> None:
    """Run an example's ``main()`` as ``cvkit`` runs a command: bad input (a ValueError, KeyError or
    OSError, e.g. a weights file that would run code, a missing folder) is one line on stderr, exit code 2."""
    try:
        main()
    except (ValueError, KeyError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{Path(sys.argv[0]).name}: error: {' '.join(str(message).split())}", file=sys.stderr)
        sys.exit(2)
