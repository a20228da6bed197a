"""Train a student from a label store with Hugging Face's Trainer (`labelstore.student.hf.DistillationTrainer`).

    python examples/hf_trainer.py                      # builds the demo store of train_student.py, then trains
    python examples/hf_trainer.py --store STORE_DIR    # any store: the student gets the store's vocabulary

What the trainer takes care of: it keeps the teacher columns (`remove_unused_columns` is turned off), collates
with the store's collator (HF-convention `labels`, pre-shifted `shift_labels`, the teacher targets and their
`teacher_info`), takes the temperature from the targets (re-temper them with `StoreDataset(temperature=)` to
distil at another one), and normalises the loss over all the tokens of an optimizer step, across gradient
accumulation steps and devices. A student with the teacher's tokenizer would be checked with
`StoreDataset(store, student=(model, tokenizer))`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_student import build_demo_store, kl_to_chain  # noqa: E402

from labelstore.student.dataset import StoreDataset  # noqa: E402
from labelstore.student.hf import DistillationTrainer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation term (rest: next-token CE)")
    ap.add_argument("--temperature", type=float, default=None, help="re-temper the targets on read (None: as stored)")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    store, chain = args.store, None
    if store is None:
        store = Path(tmp.name) / "demo-store"
        chain = build_demo_store(store)
    torch.manual_seed(0)
    vocab = StoreDataset(store).vocab_size
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=4096))
    train = StoreDataset(store, student=model, temperature=args.temperature)  # checks the student's vocabulary
    targs = TrainingArguments(output_dir=str(Path(tmp.name) / "out"), max_steps=args.steps,
                              per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=3e-3,
                              logging_steps=10, report_to="none", save_strategy="no", use_cpu=True,
                              disable_tqdm=True, remove_unused_columns=False)
    if chain is not None:
        print(f"student KL to the true chain before training: {kl_to_chain(model, chain, 'cpu'):.3f} nats")
    trainer = DistillationTrainer(model=model, args=targs, train_dataset=train, loss_kwargs={"alpha": args.alpha})
    trainer.train()
    if chain is not None:
        print(f"student KL to the true chain after training:  {kl_to_chain(model, chain, 'cpu'):.3f} nats")


if __name__ == "__main__":
    main()
