"""The teacher: device and dtype, loading the model and tokenizer as a user would, and their fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from labelstore.errors import ConfigMismatchError, LabelStoreError
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


def load_teacher(name: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
                 device_map: str | None = None, tp_mesh=None):
    """``AutoModelForCausalLM.from_pretrained`` exactly as a user would call it, in eval mode on ``device``.

    ``device_map`` (e.g. ``"auto"``) is handed to ``from_pretrained``: accelerate places the layers across this
    node's GPUs, then CPU memory, and moves activations between them; ``device`` is then unused. ``tp_mesh`` (a
    1-D device mesh of this rank's tensor-parallel group) loads the teacher with transformers' own tensor
    parallelism, ``tp_plan="auto"`` (:mod:`labelstore.teacher.parallel`).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs = {}
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    if trust_remote_code:  # never passed unless the user asked for it
        kwargs["trust_remote_code"] = True
    if device_map is not None:
        kwargs["device_map"] = device_map
    if tp_mesh is not None:
        kwargs.update(tp_plan="auto", device_mesh=tp_mesh)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"cannot load teacher {name!r}: {exc}") from None
    return (model if device_map is not None or tp_mesh is not None else model.to(device)).eval()


def input_device(model, default: torch.device) -> torch.device:
    """Where a batch's token ids go: the input embedding's device (the first one under a device map)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.device.type != "meta":
        return w.device
    return default


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"cannot load tokenizer {name!r}: {exc}") from None


def text_config(name: str, trust_remote_code: bool = False):
    """The teacher's (text) config alone, without its weights."""
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        cfg = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"cannot load the config of teacher {name!r}: {exc}") from None
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def config_vocab_size(name: str, trust_remote_code: bool = False) -> int:
    """The teacher's vocabulary from its config alone (inputs are validated before the weights load)."""
    return int(text_config(name, trust_remote_code).vocab_size)


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
DEFAULT_MAX_LENGTH = 2048  # when the config names no context length
AUTO_LENGTH_CAP = 16384  # default --max-length cap under --tokens-per-batch auto


def context_length(name: str, trust_remote_code: bool = False) -> tuple[int | None, str]:
    """``(positions the teacher was built for, the config key saying so)``, or ``(None, "")`` if it says nothing."""
    return config_context_length(text_config(name, trust_remote_code))


def config_context_length(config) -> tuple[int | None, str]:
    """:func:`context_length` of a loaded model's config (the Python API's teacher objects)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in CONTEXT_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, key
    return None, ""


def resolve_max_length(requested: int | None, context: tuple[int | None, str], tokens_per_batch: int | str) -> int:
    """``--max-length``: the teacher's context length capped by ``--tokens-per-batch`` (16384 when ``auto``) when
    not given; a value above the context length is refused before anything is read or written (positions past
    it crash the teacher, e.g. GPT-2's position table, or give garbage)."""
    ctx, key = context
    if not isinstance(tokens_per_batch, int):
        tokens_per_batch = AUTO_LENGTH_CAP
    if requested is None:
        return min(ctx, tokens_per_batch) if ctx else min(DEFAULT_MAX_LENGTH, tokens_per_batch)
    if ctx is not None and requested > ctx:
        raise ConfigMismatchError(f"--max-length {requested} exceeds the teacher's context length {ctx} ({key} in "
                                  f"its config): use --max-length {ctx} or less, or omit it (default: the context "
                                  "length). Nothing was written.")
    return requested


def output_vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


CHECKSUM_CHUNK = 1 << 22  # elements per step of the full-weight checksum (bounded temporary memory)
_PRIME = 65521


def _weight_checksum(p: torch.Tensor) -> tuple[int, int]:
    """Two 64-bit sums over every element's bits: ``sum b_i`` and ``sum b_i * (i mod 65521 + 1)``, modulo 2^64.

    Integer arithmetic modulo 2^64 is exact in any order, so the result is the same on any device and for any
    chunking; any change of one element, and of almost any set of elements, changes it (a checksum for telling
    teachers apart, not a defence against an adversary). Runs where the weight lives, a chunk at a time.
    """
    x = p.detach().reshape(-1)
    if x.dtype.is_floating_point or x.dtype.is_complex:
        x = x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    s1 = s2 = 0
    for a in range(0, x.numel(), CHECKSUM_CHUNK):
        b = x[a:a + CHECKSUM_CHUNK].to(torch.int64)
        w = torch.arange(a, a + b.numel(), dtype=torch.int64, device=b.device) % _PRIME + 1
        s1 = (s1 + int(b.sum())) % (1 << 64)
        s2 = (s2 + int((b * w).sum())) % (1 << 64)
    return s1, s2


def legacy_teacher_fingerprint(model) -> str:
    """The 0.1 identity: every parameter's name, shape and up to 4096 evenly spaced values. Kept only to resume
    stores that recorded it (:func:`labelstore.teacher.compile` accepts it for them)."""
    h = hashlib.sha256(json.dumps(list(getattr(model.config, "architectures", None) or [])).encode())
    for name, p in sorted(model.state_dict().items()):
        if hasattr(p, "full_tensor"):  # a tensor-parallel shard (DTensor): hash the whole tensor, like one process
            p = p.full_tensor()
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE_VALUES)
        sample = flat[::step][:SAMPLE_VALUES].float().cpu().numpy()
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def teacher_fingerprint(model) -> str:
    """SHA-256 over the architecture and every parameter's name, shape, dtype and a checksum of all of its
    elements (:func:`_weight_checksum`): two teachers that differ in any weight get different identities."""
    h = hashlib.sha256(json.dumps(["v2", list(getattr(model.config, "architectures", None) or [])]).encode())
    for name, p in sorted(model.state_dict().items()):
        if hasattr(p, "full_tensor"):  # a tensor-parallel shard (DTensor): hash the whole tensor, like one process
            p = p.full_tensor()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{_weight_checksum(p)}".encode())
    return h.hexdigest()


def display_name(name: str) -> str:
    p = Path(name)
    return p.resolve().name if p.exists() else name
