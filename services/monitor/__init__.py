"""The monitor service: drift, performance decay, outliers and alerts for the
models in production.

Its first building block is :mod:`.drift`, the statistics that compare a
window of predictions' features with the version's reference. The service
itself (its server, store and windows) is not built yet, so nothing
registers it.
"""
