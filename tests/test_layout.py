"""The architecture holds: imports run one way, and each shared fact is stated in one place.

Checked on the source (AST), so a new import that breaks the layering fails here, not in a user's process.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "labelstore"
BASE = {"errors", "constants", "codecs", "selection", "reconstruction", "distributed", "fingerprints"}


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        return "labelstore_kernels." + ".".join(path.relative_to(ROOT / "kernels").with_suffix("").parts)
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved), at any depth in the file."""
    tree = ast.parse(path.read_text() if source is None else source)
    here = _module_name(path).split(".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _stage(mod: str) -> str | None:
    parts = mod.split(".")
    if parts[0] == "labelstore_kernels":
        return "kernels"
    if parts[0] != "labelstore" or len(parts) < 2:
        return None
    return "base" if parts[1] in BASE else parts[1]


# what each stage may import (besides itself); the CLI dispatcher and the package's lazy __init__ are exempt
ALLOWED = {
    "base": {"base"},
    "kernels": {"base"},
    "store": {"base"},
    "teacher": {"base", "store", "kernels"},
    "student": {"base", "store", "kernels"},
    "tools": {"base", "store", "teacher", "student", "kernels"},
}


@pytest.mark.parametrize("path", _files(PKG) + _files(ROOT / "kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    mine = _stage(_module_name(path))
    if mine is None or path.name in ("cli.py", "__main__.py") or path == PKG / "__init__.py":
        return
    bad = sorted(m for m in _imports(path)
                 if _stage(m) not in (None, mine) and _stage(m) not in ALLOWED[mine]
                 and m != "labelstore.__version__" and m != "labelstore")
    assert not bad, f"{path.relative_to(ROOT)} ({mine}) imports {bad}; allowed: {sorted(ALLOWED[mine])}"


def test_the_layering_check_catches_a_wrong_import():
    """The checker itself: a store module importing the student side (absolutely or relatively) is flagged."""
    probe = PKG / "store" / "probe.py"  # never written: the source is given
    for source in ("from labelstore.student.losses import sparse_kl\n", "from ..student import losses\n"):
        mine = _stage(_module_name(probe))
        flagged = sorted(m for m in _imports(probe, source)
                         if _stage(m) not in (None, mine) and _stage(m) not in ALLOWED[mine])
        assert flagged and all(m.startswith("labelstore.student") for m in flagged), (source, flagged)


# facts that once lived in two to five places: each literal may appear in one module only
FACTS = {
    r"1\.4426950408889634": "labelstore/constants.py",  # LOG2E
    r"(?<![\w.])-100\b": "labelstore/constants.py",  # IGNORE_INDEX
    r"MAX_SAMPLES\s*=": "labelstore/constants.py",
    r"TRITON_MAX_K\s*=": "labelstore/constants.py",
    r"SAMPLED_MODES\s*=|SAMPLED\s*=": "labelstore/selection.py",
    r"\"<u1\" if": "labelstore/constants.py",  # the count dtype rule
    r"def spread_tail\(": "labelstore/reconstruction.py",
    r"def pad_row\(": "labelstore/reconstruction.py",
    r"def reconstruct\(": "labelstore/reconstruction.py",
    r"def row_crc32\(": "labelstore/store/format.py",
    r"def tokenizer_fingerprint\(": "labelstore/fingerprints.py",
    r"def rank_world\(|def dist_rank_world\(|def _dist_env\(": "labelstore/distributed.py",
    r"def parse_selection\(|def check_selection\(|def _validate_selection\(": None,  # see below
}


@pytest.mark.parametrize("pattern,home", [(p, h) for p, h in FACTS.items() if h is not None])
def test_each_fact_is_stated_once(pattern, home):
    hits = sorted(str(p.relative_to(ROOT)) for p in _files(PKG) + _files(ROOT / "kernels")
                  if re.search(pattern, p.read_text()))
    assert hits == [home], f"{pattern!r} is stated in {hits}, expected only in {home}"


def test_one_selection_validator():
    """The kernels' parse_selection and the format's validation both delegate to labelstore.selection."""
    defs = sorted(str(p.relative_to(ROOT)) for p in _files(PKG) + _files(ROOT / "kernels")
                  if re.search(r"def check_selection\(|def _validate_selection\(", p.read_text()))
    assert defs == ["labelstore/selection.py"]
    for user in ("kernels/select_torch.py", "labelstore/store/format.py", "labelstore/teacher/options.py"):
        assert "check_selection(" in (ROOT / user).read_text(), user


def test_no_module_of_the_compile_is_over_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in _files(PKG / "teacher")}
    assert sizes and max(sizes.values()) <= 400, sizes
