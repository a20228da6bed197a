"""The teacher: device and dtype, loading the model and tokenizer as a user would, and their fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from labelstore.errors import LabelStoreError
from labelstore.fingerprints import tokenizer_fingerprint  # noqa: F401 (the compile's import)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLE_VALUES = 4096  # values per parameter tensor hashed into the teacher fingerprint


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_teacher(name: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` exactly as a user would call it, in eval mode on ``device``."""
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs = {}
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    if trust_remote_code:  # never passed unless the user asked for it
        kwargs["trust_remote_code"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"cannot load teacher {name!r}: {exc}") from None
    return model.to(device).eval()


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"cannot load tokenizer {name!r}: {exc}") from None


def config_vocab_size(name: str, trust_remote_code: bool = False) -> int:
    """The teacher's vocabulary from its config alone (inputs are validated before the weights load)."""
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        cfg = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"cannot load the config of teacher {name!r}: {exc}") from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.vocab_size)


def output_vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def teacher_fingerprint(model) -> str:
    """SHA-256 over every parameter's name, shape and up to 4096 evenly spaced values (fast for any size)."""
    h = hashlib.sha256(json.dumps(list(getattr(model.config, "architectures", None) or [])).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE_VALUES)
        sample = flat[::step][:SAMPLE_VALUES].float().cpu().numpy()
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def display_name(name: str) -> str:
    p = Path(name)
    return p.resolve().name if p.exists() else name
