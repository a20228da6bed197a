"""Compile progress: a tqdm bar on a terminal, a plain line every ``every`` seconds in a batch job's log.

A log (stderr not a terminal) gets lines like::

    compile: 1,024/8,192 sequences (12.5%), 2,097,152 tokens, 3,819 tok/s, 91.5 B/tok, ETA 1h05m

and a last line when the compile ends. Nothing is printed with ``--quiet``.
"""

from __future__ import annotations

import sys
import time

LOG_EVERY = 30.0  # seconds between progress lines in a log


def _duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressLog:
    """The part of tqdm's interface the compile uses (``update``, ``set_postfix_str``, ``close``), as log lines."""

    def __init__(self, total: int, desc: str, every: float = LOG_EVERY, file=None):
        self.total, self.desc, self.every = (None if total is None else int(total)), desc, float(every)
        self.file = file if file is not None else sys.stderr
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def _line(self, now: float) -> None:
        if self.total is None:  # --plan units: a rank learns its sequences unit by unit
            print(f"{self.desc}: {self.n:,} sequences{f', {self.postfix}' if self.postfix else ''}, "
                  f"{_duration(now - self.t0)} elapsed", file=self.file, flush=True)
            return
        frac = self.n / self.total if self.total else 1.0
        eta = (now - self.t0) * (1 - frac) / frac if frac > 0 else float("nan")
        print(f"{self.desc}: {self.n:,}/{self.total:,} sequences ({frac:.1%})"
              f"{f', {self.postfix}' if self.postfix else ''}, "
              f"{'ETA ' + _duration(eta) if frac < 1 and eta == eta else f'{_duration(now - self.t0)} elapsed'}",
              file=self.file, flush=True)

    def close(self) -> None:
        if self.n:
            self._line(time.monotonic())


def progress_bar(total: int | None, desc: str):
    """tqdm on a terminal, :class:`ProgressLog` otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="seq", desc=desc, file=sys.stderr, dynamic_ncols=True)
    return ProgressLog(total, desc, every=LOG_EVERY)
