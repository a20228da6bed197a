"""One DistillationTrainer optimizer step on a tiny Llama student: called in-process by the tests, or run under
torchrun (gloo, CPU) to train on several ranks::

    python -m torch.distributed.run --nproc-per-node 2 tests/_trainer_step.py STORE OUT.pt PER_DEVICE_BATCH ACCUM

Rank 0 saves the student's parameters after the step to OUT.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from labelstore.student.dataset import StoreDataset  # noqa: E402
from labelstore.student.hf import DistillationTrainer  # noqa: E402


def tiny_student(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def train_one_step(store, out_dir, batch: int, accum: int):
    """(parameters after one SGD step, logged loss) for ``batch`` sequences per device and ``accum`` micro-batches."""
    ds = StoreDataset(store)
    model = tiny_student(ds.vocab_size, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True, logging_steps=1, weight_decay=0.0, max_grad_norm=0.0, seed=0, data_seed=0,
        remove_unused_columns=False,
    )
    trainer = DistillationTrainer(model=model, args=args, train_dataset=ds, loss_kwargs={"alpha": 0.7})
    trainer.train()
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), loss


if __name__ == "__main__":
    torch.set_num_threads(1)
    store, out, batch, accum = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    params, _ = train_one_step(store, os.path.join(os.path.dirname(out), "trainer"), batch, accum)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(params, out)
