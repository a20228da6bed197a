"""The teacher side: `labelstore compile` runs a teacher over a corpus and writes a store.

``options`` (:class:`CompileOptions`; the CLI is generated from it), ``objects`` (models and datasets passed as
Python objects), ``model`` (loading, device, context length, identities), ``head`` (the fused LM head's plan),
``parallel`` (tensor-parallel groups), inputs: ``sources`` and ``records`` (files), ``hf_sources`` (``datasets``),
``chat`` (chat templates, assistant masks), ``inputs`` (documents -> the plan), ``labels`` (assistant-only label
positions); ``batching``, ``prior`` (the tail prior's mass), ``progress``, ``outdir`` (what ``--out`` may be),
``pipeline`` (forward + extraction + writer thread), ``resume_checks`` and ``compile`` (:func:`compile_store`).
"""
