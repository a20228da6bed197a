"""8-bit (and 16-bit) value codecs for kept teacher probabilities.

Every codec encodes a kept entry *relative to the position's most probable token*:
the input is ``r = log p - log p_max`` (so ``r <= 0``; ``-inf`` for a zero-probability entry),
and decoding yields an unnormalised weight ``w = exp(r)`` approximately. No per-position scale is stored:
the reader recovers absolute probabilities from the exact stored tail mass ``t``::

    p_i = (1 - t) * w_i / sum_j w_j          (the reconstruction rule: labelstore.reconstruction, docs/FORMAT.md)

which also cancels any common bias of the code. Codecs:

``log8`` (default)
    ``code = min(254, floor(-r / step + 0.5))``, ``w = exp(-code * step)``; code 255 means ``w = 0``.
    ``step = 1/16`` nat covers 15.9 nats below the top token with at most 3.2 % relative error.
``e4m3``
    float8 e4m3fn bits of ``clamp(exp(r) * 256, 0, 448)``: 6.25 % max relative error, entries below
    ``p_max * 2**-17`` flush to zero.
``e5m2``
    float8 e5m2 bits of ``clamp(exp(r) * 32768, 0, 57344)``: 12.5 % error, range ``2**-31``.
``fp16``
    float16 bits (2 bytes, little-endian) of ``exp(r) * 1024``: 0.05 % error, range ``2**-34``.
``none``
    no values at all (hard-label stores keep ids only).
``count8``
    not a probability code: the byte is how many of the position's samples drew the entry (1..255), used by
    the sampled selection modes (``sample``, and the sampled part of ``topk+sample``). Weight = the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from labelstore.constants import MAX_SAMPLES

LOG8_DEFAULT_STEP = 1.0 / 16.0
ZERO_CODE = 255  # log8's code for a zero weight


@dataclass(frozen=True)
class ValueCodec:
    """A value codec as recorded in a store's metadata: ``{"name": ..., "params": {...}}``."""

    name: str
    params: tuple[tuple[str, float], ...] = ()

    @property
    def bytes_per_value(self) -> int:
        return {"none": 0, "fp16": 2}.get(self.name, 1)

    @property
    def param(self) -> dict:
        return dict(self.params)

    def to_json(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}

    # ------------------------------------------------------------------ encode
    def encode(self, logrel: torch.Tensor) -> torch.Tensor:
        """Encode relative log-probabilities ``r = log p - log p_max`` (float32, ``<= 0``, ``-inf`` for 0).

        Returns uint8 codes of shape ``[..., K * bytes_per_value]``.
        """
        r = logrel.float()
        if self.name == "log8":
            step = self.param["step"]
            code = torch.floor(-r / step + 0.5).clamp_(0, ZERO_CODE - 1)
            code = torch.where(torch.isneginf(r), torch.full_like(code, ZERO_CODE), code)
            return code.to(torch.uint8)
        if self.name in ("e4m3", "e5m2"):
            scale, vmax, dt = _FP8[self.name]
            x = (torch.exp(r) * scale).clamp_(0.0, vmax)
            return x.to(dt).view(torch.uint8)
        if self.name == "fp16":
            x = torch.exp(r) * 1024.0
            return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*r.shape[:-1], -1)
        if self.name == "none":
            return torch.zeros(*r.shape[:-1], 0, dtype=torch.uint8)
        if self.name == "count8":
            raise ValueError("count8 encodes sample counts, not log-probabilities: use encode_counts")
        raise ValueError(f"unknown value codec {self.name!r}")

    @staticmethod
    def encode_counts(counts: torch.Tensor) -> torch.Tensor:
        """count8 bytes of per-entry sample counts (0..MAX_SAMPLES)."""
        if counts.numel() and (counts.min() < 0 or counts.max() > MAX_SAMPLES):
            raise ValueError(f"sample counts must lie in [0, {MAX_SAMPLES}]")
        return counts.to(torch.uint8)

    # ------------------------------------------------------------------ decode
    def decode_lut(self) -> np.ndarray:
        """The 256-entry float32 table mapping an 8-bit code to its weight.

        log8: ``float32(exp(-code * step))`` (exp in float64, one rounding), code 255 -> 0. e4m3 / e5m2: the
        float8 value divided by its scale (exact in float32); the codes no writer produces (NaN, infinity,
        negative values) decode to +0, so a weight is never negative or non-finite. count8: the byte's value.
        """
        codes = np.arange(256, dtype=np.uint8)
        if self.name == "count8":
            return codes.astype(np.float32)
        if self.name == "log8":
            step = self.param["step"]
            w = np.exp(-codes.astype(np.float64) * step)
            w[ZERO_CODE] = 0.0
            return w.astype(np.float32)
        if self.name in ("e4m3", "e5m2"):
            scale, _, dt = _FP8[self.name]
            with np.errstate(invalid="ignore"):
                x = torch.from_numpy(codes).view(dt).float().numpy() / np.float32(scale)
            return _finite_nonneg(x)
        raise ValueError(f"codec {self.name!r} has no 8-bit decode table")

    def decode_numpy(self, codes: np.ndarray) -> np.ndarray:
        """Weights (float32) from the raw value bytes of ``n`` entries."""
        codes = np.asarray(codes, dtype=np.uint8)
        if self.name == "fp16":
            return _fp16_lut()[codes.view("<u2")]
        if self.name == "none":
            raise ValueError("codec 'none' stores no values")
        return self.decode_lut()[codes]

    def invalid_codes(self, codes: np.ndarray) -> int:
        """How many of these value codes no writer produces (NaN, infinity, a negative value or -0 for e4m3, e5m2
        and fp16; none for log8 and count8, whose every byte is valid). Readers decode them to +0 (docs/FORMAT.md 5);
        ``labelstore verify`` reports them."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if self.name in _FP8:
            with np.errstate(invalid="ignore"):
                x = torch.from_numpy(codes.copy()).view(_FP8[self.name][2]).float().numpy()
        elif self.name == "fp16":
            x = codes.view("<f2").astype(np.float32)
        else:
            return 0
        return int((~np.isfinite(x) | (x < 0) | ((x == 0) & np.signbit(x))).sum())

    def int_lut(self, k: int, max_code: int | None = None) -> tuple[np.ndarray, int] | None:
        """``(table, q)``: every code's weight as an exact integer multiple of ``2^-q`` (int64), so that a reader sums
        up to ``k`` weights of a position exactly (the rounding rule of docs/FORMAT.md 5) with integer adds. None
        for ``none``, and where ``k`` such integers could overflow int64 (log8 with a step above ~1/12).

        ``max_code`` (log8 only): a table valid for codes ``<= max_code`` and the zero code only (the larger codes'
        entries are 0 and must not be looked up). A row whose codes stop there can then be summed with integers
        even where the whole table could not (a coarse step: the smallest weights set ``q``)."""
        if self.name == "none":
            return None
        lut = (_fp16_lut() if self.name == "fp16" else self.decode_lut()).astype(np.float64)
        if max_code is not None:
            if self.name != "log8":
                raise ValueError("int_lut(max_code=...) is for log8 codes")
            lut = np.where(np.arange(256) <= max_code, lut, 0.0)
        q = 0
        while q < 160 and not np.all(np.ldexp(lut, q) == np.floor(np.ldexp(lut, q))):
            q += 1
        if float(lut.max()) * 2.0**q * max(1, k) >= 2.0**62:
            return None
        return np.ldexp(lut, q).astype(np.int64), q

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Torch version of :meth:`decode_numpy` (last dim holds the value bytes)."""
        if self.name == "fp16":
            x = codes.contiguous().view(torch.float16).float() / 1024.0
            return torch.where(torch.isfinite(x) & (x > 0), x, torch.zeros_like(x))
        lut = torch.from_numpy(self.decode_lut())
        return lut[codes.long()]


def _finite_nonneg(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` with every NaN, infinity and negative value (and -0) replaced by +0."""
    x = np.asarray(x, dtype=np.float32)
    return np.where(np.isfinite(x) & (x > 0), x, np.float32(0)).astype(np.float32)


_FP16_LUT: np.ndarray | None = None


def _fp16_lut() -> np.ndarray:
    """float32 weight of each of the 65536 fp16 codes: ``float16 value / 1024`` (exact), +0 for NaN, infinity and
    negative codes."""
    global _FP16_LUT
    if _FP16_LUT is None:
        with np.errstate(invalid="ignore"):  # the signalling-NaN codes
            _FP16_LUT = _finite_nonneg(np.arange(1 << 16, dtype=np.uint16).view("<f2").astype(np.float32) / 1024)
    return _FP16_LUT


_FP8 = {
    "e4m3": (256.0, 448.0, torch.float8_e4m3fn),
    "e5m2": (32768.0, 57344.0, torch.float8_e5m2),
}

CODEC_NAMES = ("log8", "e4m3", "e5m2", "fp16", "none", "count8")
DEFAULT_CODEC = "log8"


def get_codec(name: str | dict | ValueCodec, **params) -> ValueCodec:
    """Look a codec up by name (or by its metadata dict). Unknown names raise ValueError."""
    if isinstance(name, ValueCodec):
        return name
    if isinstance(name, dict):
        params = {**name.get("params", {}), **params}
        name = name["name"]
    if name not in CODEC_NAMES:
        raise ValueError(f"unknown value codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    if name == "log8":
        step = float(params.get("step", LOG8_DEFAULT_STEP))
        if not (math.isfinite(step) and 0 < step <= 1):
            raise ValueError(f"log8 step must be in (0, 1], got {step}")
        return ValueCodec("log8", (("step", step),))
    if params:
        raise ValueError(f"codec {name!r} takes no parameters, got {sorted(params)}")
    return ValueCodec(name)
