"""make_loader defaults: seeded shuffling that the runner can replay, no pinning on CPU."""
from __future__ import annotations

import pytest
import torch
from conftest import TinyImages

from cvkit.data.loaders import default_workers, make_loader


def order(loader):
    return [i for batch in loader for i in batch["index"].tolist()]


def test_train_order_is_a_function_of_the_seed_and_eval_is_in_order():
    ds = TinyImages(20)
    a, b = make_loader(ds, 4, train=True, workers=0, seed=5), make_loader(ds, 4, train=True, workers=0, seed=5)
    assert order(a) == order(b) and sorted(order(a)) == list(range(20)) and order(a) != list(range(20))
    a.generator.manual_seed(5)  # what StagedRunner does at each epoch: the same order again
    assert order(a) == order(b.__class__(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(5)))
    assert order(make_loader(ds, 6, train=False, workers=0)) == list(range(20))


def test_defaults_on_this_machine():
    loader = make_loader(TinyImages(10), 4, train=True, workers=2)
    assert loader.pin_memory == torch.cuda.is_available()
    assert loader.prefetch_factor == 4 and loader.persistent_workers is False and loader.drop_last
    assert 0 <= default_workers() <= 8
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(TinyImages(4), 0, train=False)
