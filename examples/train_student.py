"""Train a tiny student from a label store with a plain PyTorch loop.

    python examples/train_student.py                      # builds a small demo store first, then trains
    python examples/train_student.py --store STORE_DIR    # any store: the student gets the store's vocabulary

The demo store's "teacher" is an exact one: text is drawn from a random first-order Markov chain, and the
stored distribution at each position is the chain's true next-token distribution given the current token,
kept as its top-k (log8 codec) plus the exact tail mass, i.e. what `labelstore compile` stores for a real
teacher. A student that learns from the store should approach the chain: the script prints the training loss
(sparse forward KL with tail, `labelstore.student.losses.distillation_loss`) and, for the demo store, the student's
full KL to the true chain on fresh text, before and after training.

The loop is resumable mid-epoch: the checkpoint holds the loader's `state_dict()` next to the model's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labelstore.codecs import get_codec
from labelstore.store.writer import StoreWriter
from labelstore.student.dataset import StoreDataset
from labelstore.student.loader import StoreLoader
from labelstore.student.losses import distillation_loss


def markov_chain(vocab: int, seed: int, sharpness: float = 4.0) -> torch.Tensor:
    """A random transition matrix [V, V] with peaked rows (a few likely successors per token)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(vocab, vocab, generator=g) * sharpness, dim=-1)


def sample_text(chain: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, chain.shape[0], (n,), generator=g)
    for t in range(1, length):
        x[:, t] = torch.multinomial(chain[x[:, t - 1]], 1, generator=g)[:, 0]
    return x


def build_demo_store(path: Path, *, vocab=256, k=16, n=256, length=64, seed=0) -> torch.Tensor:
    """Write the demo store (top-k of the chain's true next-token distributions); return the chain."""
    chain = markov_chain(vocab, seed)
    codec = get_codec("log8")
    meta = {
        "vocab_size": vocab, "label_kind": "soft", "selection": {"mode": "topk", "k": k},
        "value_codec": codec.to_json(), "temperature": 1.0,
        "teacher": {"name": f"markov-chain-v{vocab}-seed{seed}", "hash": f"{seed:016x}"},
        "tokenizer": {"name": "identity", "hash": "0" * 16},
    }
    text = sample_text(chain, n, length, seed + 1)
    with StoreWriter(path, meta) as w:
        for i in range(n):
            p = chain[text[i]]  # [T, V]: the distribution of token t + 1 given token t
            top, ids = p.topk(k, dim=-1)
            kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids, True)
            tail = torch.where(kept, 0.0, p).sum(-1)  # a sum over the non-kept entries, never 1 - sum(kept)
            values = codec.encode(top.log() - top[:, :1].log())
            w.add(i, text[i].numpy(), np.full(length, k), ids.numpy(), values.numpy(), tail.numpy())
    return chain


@torch.no_grad()
def kl_to_chain(model, chain: torch.Tensor, device, n=32, length=64, seed=99) -> float:
    """Mean full KL(chain || student) over fresh text (the demo store's ground truth)."""
    x = sample_text(chain, n, length, seed).to(device)
    logq = torch.log_softmax(model(input_ids=x).logits.float(), -1)
    p = chain.to(device)[x]
    return (p * (p.clamp_min(1e-30).log() - logq)).sum(-1).mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="a label store directory (default: build a demo store)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=1.0, help="distillation weight; 1 - alpha goes to label CE")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--checkpoint", type=Path, help="save model + loader state here at the end; resume if present")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    chain = None
    tmp = None
    store = args.store
    if store is None:  # a demo store in a temporary folder; a --store that is not a store is an error, not a demo
        tmp = tempfile.TemporaryDirectory()
        store = Path(tmp.name) / "demo-store"
        print(f"building a demo store at {store}")
        chain = build_demo_store(store)
    elif not (store / "manifest.json").is_file():
        ap.error(f"--store {store}: not a label store (no manifest.json there); compile one with `labelstore "
                 "compile`, or leave --store out to train on a demo store")

    ds = StoreDataset(store)  # a real student: StoreDataset(store, student=(model, tokenizer)) checks it
    cfg = LlamaConfig(vocab_size=ds.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loader = StoreLoader(ds, batch_size=args.batch_size, seed=0, num_workers=args.num_workers,
                         pin_memory=args.device.startswith("cuda"))
    step, epoch = 0, 0
    if args.checkpoint and args.checkpoint.exists():
        ckpt = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        loader.load_state_dict(ckpt["loader"])
        step, epoch = ckpt["step"], ckpt["loader"]["epoch"]
        print(f"resumed at step {step}, epoch {epoch}, {ckpt['loader']['consumed']} samples into it")
    if chain is not None:
        print(f"student KL to the true chain before training: {kl_to_chain(model, chain, args.device):.3f} nats")

    t0, target = time.perf_counter(), step + args.steps
    while step < target:
        loader.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = distillation_loss(logits, batch, alpha=args.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 25 == 0 or step == target:
                print(f"step {step:5d}  epoch {epoch}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)")
            if step >= target:
                break
        else:
            epoch += 1
    if chain is not None:
        print(f"student KL to the true chain after training:  {kl_to_chain(model, chain, args.device):.3f} nats")
    if args.checkpoint:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loader": loader.state_dict(),
                    "step": step}, args.checkpoint)
        print(f"checkpoint written to {args.checkpoint}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
