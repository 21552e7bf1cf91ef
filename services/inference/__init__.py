"""The inference service's building blocks (the server comes with its issue).

:mod:`.tensors`: Open Inference Protocol tensors to NumPy arrays and back,
every datatype, raw or typed, each bad tensor named. :mod:`.batching`: the
per-model dynamic batcher (bounded queue, deadlines, exact split-back,
Triton-style statistics). :mod:`.models`: a model ready to serve (an ONNX
Runtime session on a provider that really works here, its tensors in protocol
terms, checked against the registered signature, warmed up).
"""
