"""The store: the on-disk format and everything that reads or writes it.

``format`` (schema, metadata, row encoding, digests), ``arrow_file`` (Arrow footers checked before pyarrow decodes),
``bitpack`` and ``entropy`` (the two row encodings), ``safefs`` (no-follow, regular-file-only opens), ``manifest``
(index, commit records, paths), ``writer`` (crash-safe sharded writes), ``resume`` (what a resumed writer checks,
finalize), ``reader`` (:class:`LabelStore`), ``verify`` and ``info`` (the `labelstore verify|info` commands).
docs/FORMAT.md is the spec.
"""
