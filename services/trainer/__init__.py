"""The trainer: PyTorch training on built-in, generated or uploaded datasets.

This package holds the trainer's core library, pure and deterministic, usable
in-process: the dataset catalog, the generator, uploads and splits
(:mod:`.datasets`, :mod:`.loaded`, :mod:`.synthetic`, :mod:`.uploads`,
:mod:`.splits`), the architectures (:mod:`.architectures`),
spec validation (:mod:`.specs`), the training loop with checkpoints and resume
(:mod:`.training`, :mod:`.checkpoints`, :mod:`.augmentation`), test metrics
and reference statistics (:mod:`.evaluation`) and the weights format
(:mod:`.weights`). Everything here speaks the ``conveyor.trainer.v1`` and
``conveyor.registry.v1`` messages.
"""
