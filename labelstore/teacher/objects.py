"""A compile's teacher, tokenizer and data given as Python objects (:func:`labelstore.compile_store`) or paths.

An object is used as it is: a model keeps its device and dtype (unless ``device`` is given), is put in eval mode
for the compile and restored after. A name that looks like a local path must exist: otherwise transformers
would try the hub (retries, then a misleading message) for a directory that is simply missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from labelstore.errors import InputDataError
from labelstore.teacher.model import DTYPES


@dataclass
class Objects:
    """Python objects given to :func:`compile_store` instead of paths."""

    model: object = None
    tokenizer: object = None
    data: object = None


def name_or_object(x, what: str, objs: Objects) -> str:
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    setattr(objs, "model" if what == "teacher" else "tokenizer", x)
    return getattr(x, "name_or_path", None) or f"<{type(x).__name__}>"


def check_local_path(name: str, what: str) -> None:
    """A teacher or tokenizer that names a local path must exist (else transformers tries the hub, slowly)."""
    if Path(name).exists():
        return
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if looks_local:
        raise InputDataError(f"--{what} {name}: no such directory (a local model directory, or a hub name such as "
                             "org/model)")


def model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def model_dtype(model, requested: str) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    have = p.dtype if p is not None else torch.float32
    if requested != "auto" and DTYPES[requested] != have:
        raise ValueError(f"dtype={requested!r} but the teacher object is in {str(have).removeprefix('torch.')}: "
                         "convert the model (model.to(dtype)) or pass it by path")
    return have


def model_vocab(model) -> int:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.vocab_size)
