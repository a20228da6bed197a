"""Identities recorded in a store and checked by its readers: one definition for the teacher side and the student's.

The compile records ``tokenizer_fingerprint(tokenizer)`` as the store's ``tokenizer.hash``; a student's tokenizer is
checked against it with the same function (:func:`labelstore.student.targets.tokenizer_hash`).
"""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's full definition (its ``tokenizer.json``, or its vocabulary), EOS/BOS and class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = backend.to_str()
    else:
        data = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.eos_token, tokenizer.bos_token, type(tokenizer).__name__])
    return hashlib.sha256((data + extra).encode()).hexdigest()
