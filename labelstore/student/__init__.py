"""The student side: stored labels back into training batches and losses, for any trainer.

``targets`` (vocabulary checks, id maps, re-tempering, dense targets), ``dataset`` (:class:`StoreDataset`,
:class:`StoreIterableDataset`), ``mixture`` (several stores as one), ``collate``, ``sampler``, ``loader``
(:class:`StoreLoader`), ``losses`` (+ ``loss_terms``, ``codistill``: the three techniques), ``hf`` (``datasets`` and
``transformers.Trainer``), ``export`` and ``distillkit`` (open columns for other tools).
"""
