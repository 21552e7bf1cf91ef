"""The monitor service: drift, performance decay, outliers and alerts for the
models in production.

Its first building blocks, free of gRPC and storage so that every number can
be checked against SciPy and scikit-learn: :mod:`.statistics` (the drift tests
and distances), :mod:`.drift` (which test for which feature, corrections and
verdicts), :mod:`.performance` (quality per window of labelled predictions
against the registered metrics) and :mod:`.outliers` (per-prediction scores
against the reference). The service itself (its server, store and windows) is
not built yet, so nothing registers it.
"""
