"""The student side: stored labels back into training batches and losses, for any trainer.

``targets`` (vocabulary checks, id maps, re-tempering, dense targets), ``dataset`` (:class:`StoreDataset`,
:class:`StoreIterableDataset`), ``collate``, ``sampler``, ``loader`` (:class:`StoreLoader`), ``losses`` (the
three techniques) and ``hf`` (``datasets`` and ``transformers.Trainer`` integration).
"""
