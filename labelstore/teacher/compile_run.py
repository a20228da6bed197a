"""What one compile run holds once its tokenizer and settings are known, shared by both plans (``global``: the
whole corpus in one plan, :mod:`labelstore.teacher.compile`; ``units``: :mod:`labelstore.teacher.unit_compile`):
loading the teacher, resolving ``--tokens-per-batch``, the extraction function, the truncation report."""

from __future__ import annotations

import dataclasses
import sys

import torch

from labelstore.errors import ConfigMismatchError
from labelstore.teacher.inputs import InputConfig
from labelstore.teacher.model import load_teacher, output_vocab_size
from labelstore.teacher.objects import Objects
from labelstore.teacher.options import CompileOptions
from labelstore.teacher.parallel import same_on_all_ranks, tp_mesh
from labelstore.teacher.pipeline import resolve_tokens_per_batch


def report_truncation(st: dict, labelled_positions: int, opts: CompileOptions, rank: int) -> None:
    if rank == 0 and opts.progress and not opts.pack and st.get("truncated_documents"):
        print(f"labelstore compile: --truncate cut {st['truncated_documents']:,} of {st['documents']:,} documents "
              f"at --max-length {opts.max_length}, dropping {st['truncated_tokens']:,} of "
              f"{st['document_tokens']:,} tokens ({st['truncated_tokens'] / max(st['document_tokens'], 1):.1%})"
              + (f" and {st['truncated_label_positions']:,} assistant label positions (keeping "
                 f"{labelled_positions:,}); a larger --max-length or --pack keeps them"
                 if st.get("truncated_label_positions") else ""),
              file=sys.stderr)


@dataclasses.dataclass
class CompileRun:
    """What both plans (global, units) share once the tokenizer and the settings are known."""

    opts: CompileOptions
    objs: Objects
    in_cfg: InputConfig
    tokenizer: object
    V: int
    k: int
    codec: object
    dtype: torch.dtype
    device: torch.device
    tp: object
    rank: int
    world: int
    store_there: bool
    was_training: bool | None = None

    def load_model(self):
        opts, objs = self.opts, self.objs
        if objs.model is not None:
            model, self.was_training = objs.model, objs.model.training
            model.eval()
            if opts.device != "auto":
                model.to(self.device)
        else:
            model = load_teacher(opts.teacher, self.dtype, self.device, opts.trust_remote_code,
                                 device_map=opts.device_map,
                                 tp_mesh=tp_mesh(self.tp, self.device) if self.tp.tp_size > 1 else None)
        if output_vocab_size(model) != self.V:
            raise ConfigMismatchError(f"the teacher's output layer has {output_vocab_size(model):,} rows but "
                                      f"its config says vocab_size {self.V:,}; fix the model's config.json")
        return model

    def resolve_tokens_per_batch(self, model) -> CompileOptions:
        self.opts = dataclasses.replace(self.opts, tokens_per_batch=same_on_all_ranks(
            resolve_tokens_per_batch(self.opts, model, self.V, self.device), self.world))
        return self.opts

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def extract_fn(self, meta: dict):
        from labelstore_kernels import extract, extract_topk

        opts, k, codec = self.opts, self.k, self.codec
        if meta["selection"]["mode"] in ("topk", "argmax"):
            def fn(flat, row_ids):
                return extract_topk(flat, k, temperature=opts.temperature, codec=codec)  # k=1 "none": argmax
        else:  # groups: adaptive's budget groups (the pipeline's budget_groups)
            def fn(flat, row_ids, groups=None):
                return extract(flat, meta["selection"], temperature=opts.temperature, codec=codec,
                               seed=opts.seed, row_ids=row_ids, groups=groups)
        return fn
