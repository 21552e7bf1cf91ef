"""Magnitude pruning of a PyTorch classifier, with an optional short fine-tune.

Prunable layers are the ``Linear`` and ``Conv2d`` weights of the model's body,
except the final classification layer (pruning its rows would silence whole
classes). Unstructured pruning removes the individual weights of smallest
absolute value across all those layers at once
(``prune.global_unstructured``, L1); structured pruning removes, per layer,
the output channels or neurons of smallest L2 norm (``prune.ln_structured``,
n=2, dim=0). Either way the masks are made permanent (``prune.remove``), so
the result is an ordinary module whose zeros the export keeps.

Fine-tuning keeps the masks while it trains (the pruned weights stay zero),
with Adam on the training split, seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn.utils import prune

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.services.trainer.architectures import Classifier
from conveyor.shared.errors import FailedPreconditionError

FINE_TUNE_BATCH: Final = 32
FINE_TUNE_SEED: Final = 0


def prunable_layers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The ``(module, "weight")`` pairs pruning may touch: every Linear and
    Conv2d but the last Linear (the classification layer)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    linear = [m for m in layers if isinstance(m, nn.Linear)]
    if linear:
        layers.remove(linear[-1])
    return [(layer, "weight") for layer in layers]


def prune_model(
    model: Classifier,
    options: pb.PruningOptions,
    *,
    fine_tune: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None = None,
    learning_rate: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> Classifier:
    """``model`` (a logits classifier) pruned in place by ``options``, then
    fine-tuned for ``options.fine_tune_epochs`` on ``fine_tune`` (features,
    labels); returned in eval mode with the pruning made permanent."""
    layers = prunable_layers(model)
    if not layers:
        raise FailedPreconditionError(
            "the model has no layer to prune besides its classification layer",
            reason="NOTHING_TO_PRUNE",
        )
    if options.method == pb.PRUNING_METHOD_UNSTRUCTURED:
        prune.global_unstructured(
            layers, pruning_method=prune.L1Unstructured, amount=options.amount
        )
    else:
        for layer, name in layers:
            prune.ln_structured(  # type: ignore[no-untyped-call]
                layer, name=name, amount=options.amount, n=2, dim=0
            )
    if options.fine_tune_epochs and fine_tune is not None:
        _fine_tune(model, *fine_tune, options.fine_tune_epochs, learning_rate, should_stop)
    for layer, name in layers:
        prune.remove(layer, name)  # type: ignore[no-untyped-call]
    model.eval()
    return model


def _fine_tune(
    model: nn.Module,
    features: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    epochs: int,
    learning_rate: float,
    should_stop: Callable[[], bool],
) -> None:
    generator = torch.Generator().manual_seed(FINE_TUNE_SEED)
    inputs = torch.from_numpy(np.array(features, dtype=np.float32))
    targets = torch.from_numpy(np.array(labels, dtype=np.int64))
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate
    )
    loss_function = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), FINE_TUNE_BATCH):
            if should_stop():
                return
            chosen = order[start : start + FINE_TUNE_BATCH]
            optimizer.zero_grad()
            loss = loss_function(model(inputs[chosen]), targets[chosen])
            loss.backward()
            optimizer.step()
    model.eval()
