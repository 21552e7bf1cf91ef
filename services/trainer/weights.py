"""The weights format of a trained model: a ``state_dict`` of plain tensors.

:func:`export_weights` writes ``torch.save`` of the state dict, nothing else:
the bytes load with ``torch.load(io.BytesIO(data), weights_only=True)``,
which refuses any pickled code, and a module is rebuilt from the architecture
spec (:func:`load_model`), never unpickled.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict

import torch
from torch import nn

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer.architectures import (
    Classifier,
    ProbabilityOutput,
    build_model,
    parse_architecture,
)
from conveyor.shared.errors import InvalidArgumentError

WEIGHTS_MEDIA_TYPE = "application/vnd.pytorch.state-dict"
"""What the bytes are; loadable with ``torch.load(..., weights_only=True)``."""


def export_weights(model: nn.Module) -> bytes:
    """``model``'s state dict, on the CPU and contiguous, as ``torch.save`` bytes."""
    state = OrderedDict(
        (key, value.detach().to("cpu").contiguous().clone())
        for key, value in model.state_dict().items()
    )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_weights(data: bytes) -> dict[str, torch.Tensor]:
    """The state dict in ``data``, loaded with ``weights_only=True`` onto the CPU.

    INVALID_ARGUMENT (reason ``WEIGHTS_UNREADABLE``) when the bytes are not a
    state dict of tensors.
    """
    # torch.save writes a zip archive; anything else (a bare pickle) is refused unread.
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise InvalidArgumentError(
            "the weights are not a torch.save archive", reason="WEIGHTS_UNREADABLE"
        )
    try:
        loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as error:
        raise InvalidArgumentError(
            f"the weights are not a readable state dict ({type(error).__name__})",
            reason="WEIGHTS_UNREADABLE",
        ) from error
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise InvalidArgumentError(
            "the weights are not a mapping of names to tensors", reason="WEIGHTS_UNREADABLE"
        )
    return dict(loaded)


def load_model(
    data: bytes,
    spec: registry_pb.ArchitectureSpec,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    probabilities: bool = False,
) -> nn.Module:
    """Rebuild the module of ``spec`` and load the weights in ``data`` into it.

    Returns the :class:`Classifier` (logits) in eval mode, or with
    ``probabilities`` its :class:`ProbabilityOutput`. INVALID_ARGUMENT (reason
    ``WEIGHTS_MISMATCH``) when the weights do not fit the architecture.
    """
    config = parse_architecture(spec, input_shape, num_classes)
    model = build_model(config)
    load_into(model, load_weights(data))
    model.eval()
    return ProbabilityOutput(model).eval() if probabilities else model


def load_into(model: Classifier, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` strictly (same keys, same shapes)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        key for key in set(expected) & set(state) if expected[key].shape != state[key].shape
    )
    if missing or unexpected or wrong_shape:
        details = [
            f"{label}: {', '.join(keys[:5])}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong_shape),
            )
            if keys
        ]
        raise InvalidArgumentError(
            f"the weights do not fit the architecture ({'; '.join(details)})",
            reason="WEIGHTS_MISMATCH",
        )
    model.load_state_dict(state, strict=True)
