"""The inference service's building blocks (the server comes with its issue).

:mod:`.tensors`: Open Inference Protocol tensors to NumPy arrays and back,
every datatype, raw or typed, each bad tensor named. :mod:`.batching`: the
per-model dynamic batcher (bounded queue, deadlines, exact split-back,
Triton-style statistics).
"""
