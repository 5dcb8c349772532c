"""An example crfl plugin: an aggregation rule, a dataset and an attack of your own.

Use it from the command line (from the repository's root):

    crfl list aggregators --plugin examples/my_parts.py
    crfl train --plugin examples/my_parts.py --dataset digits-1k --set aggregation.name=clipped-mean --out runs/mine

A plugin is any module that registers parts when imported (``crfl.aggregation.register_aggregator``,
``crfl.data.register_dataset``, ``crfl.attacks.register_attack``, ``crfl.model.register_model``).
"""

from __future__ import annotations

import torch

from crfl.aggregation import AggregateResult, register_aggregator
from crfl.attacks import register_attack
from crfl.data import Dataset, load_dataset, register_dataset


@register_aggregator("clipped-mean", "weighted mean of the updates, each first clipped to norm 'clip' (an example)")
def clipped_mean(updates: torch.Tensor, client_weights: torch.Tensor, *, clip: float = 1.0) -> AggregateResult:
    norms = torch.linalg.vector_norm(updates, dim=1, keepdim=True)
    clipped = updates * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)
    w = client_weights.to(updates.dtype) / client_weights.sum()
    # not a fixed weighted mean of the updates (the clipping depends on them): weights None, so a
    # run with this rule is trained and certified empirically, radius_certified false
    return AggregateResult(update=(w[:, None] * clipped).sum(0), weights=None, info={"clip": clip})


@register_dataset("digits-1k", "the first 1000/300 of the built-in MNIST digits (an example; fast)")
def digits_1k(data_dir, seed: int, **options) -> Dataset:
    ds = load_dataset("mnist-5k", None, seed)
    return Dataset(name="digits-1k", x_train=ds.x_train[:1000], y_train=ds.y_train[:1000], x_test=ds.x_test[:300],
                   y_test=ds.y_test[:300], num_classes=ds.num_classes, input_scale=ds.input_scale,
                   image_shape=ds.image_shape, class_names=ds.class_names, source={"from": "mnist-5k"})


@register_attack("reverse", description="send the honest update reversed and scaled by 'scale' (an example)")
def reverse(ctx, *, scale: float = 1.0) -> torch.Tensor:
    return -scale * ctx.honest
