"""The optimizer: ONNX export, graph optimisation, int8 and fp16 quantisation
and pruning of registered models, each measured against its baseline and
gated on accuracy, latency and parity.

The library, usable in-process: :mod:`.source` (the model and data a job
starts from), :mod:`.transforms` (the model transformations),
:mod:`.pruning`, :mod:`.measurement` (metrics, latency, parity),
:mod:`.gate` (the acceptance gate) and :mod:`.techniques` (one technique
applied and judged, with its report). :mod:`.runtime` picks the execution
provider from whether a GPU is really present.
"""
