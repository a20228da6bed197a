"""The store: the on-disk format and everything that reads or writes it.

``format`` (schema, metadata, row encoding), ``bitpack`` and ``entropy`` (the two row encodings), ``manifest``
(index, commit records, paths), ``writer`` (crash-safe sharded writes), ``reader`` (:class:`LabelStore`),
``verify`` and ``info`` (the `labelstore verify|info` commands). docs/FORMAT.md is the spec.
"""
