"""The teacher side: `labelstore compile` runs a teacher over a corpus and writes a store.

``options`` (:class:`CompileOptions`, the CLI is generated from it), ``model`` (loading, device, fingerprints),
``inputs`` (corpus files -> token sequences, the plan), ``batching``, ``prior`` (the tail prior's mass),
``pipeline`` (forward + extraction + writer thread) and ``compile`` (:func:`compile_store`).
"""
