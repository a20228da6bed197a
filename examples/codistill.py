"""Co-distillation from scratch: a tiny teacher and a tinier student learn the same text at the same time.

The teacher trains on the next-token labels only; the student trains on the labels and on the teacher's
current (detached) predictions, ``alpha * T^2 KL(teacher || student) + (1 - alpha) CE`` (labelstore's
``CoDistillation``). No store is involved: this is the online technique. Both models are byte-level Llama
models from ``transformers``, trained on the bytes of a Python standard-library source file; the run takes
one to two minutes on two CPU cores and writes both loss curves to a PNG.

    python examples/codistill.py [--steps 250] [--out examples/codistill_losses.png]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labelstore.student.losses import CoDistillation, label_ce

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_llama(hidden: int, layers: int, heads: int, seq: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def load_bytes() -> torch.Tensor:
    import argparse as corpus_module  # any stdlib file will do; argparse.py is ~100 KB of Python

    with open(inspect.getsourcefile(corpus_module), "rb") as f:
        return torch.tensor(list(f.read()), dtype=torch.long)


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]  # inputs, next-token labels


@torch.no_grad()
def held_out_ce(model: LlamaForCausalLM, data: torch.Tensor, seq: int, n: int = 8) -> float:
    model.eval()
    starts = torch.linspace(0, len(data) - seq - 2, n).long()
    chunk = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
    loss = label_ce(model(chunk[:, :-1]).logits, chunk[:, 1:]).item()
    model.train()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--max-seconds", type=float, default=100.0, help="stop early past this wall time")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "codistill_losses.png"))
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    data = load_bytes()
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    teacher = tiny_llama(hidden=96, layers=2, heads=4, seq=args.seq)
    student = tiny_llama(hidden=24, layers=1, heads=2, seq=args.seq)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    print(f"corpus: {len(data)} bytes; teacher {n_t / 1e3:.0f}K params, student {n_s / 1e3:.0f}K params")

    codistill = CoDistillation(teacher, student, alpha=args.alpha, temperature=args.temperature)
    opt = torch.optim.AdamW(codistill.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    hist = {k: [] for k in ("step", "teacher", "student", "student_kl", "student_ce")}
    evals = {k: [] for k in ("step", "teacher", "student")}
    t0 = time.perf_counter()
    for step, (x, y) in zip(range(1, args.steps + 1), batches(train, args.batch, args.seq, gen)):
        out = codistill(x, y)
        opt.zero_grad(set_to_none=True)
        out.total.backward()  # teacher <- its CE only; student <- its CE + KL to the detached teacher
        torch.nn.utils.clip_grad_norm_(codistill.parameters(), 1.0)
        opt.step()
        hist["step"].append(step)
        for key in ("teacher", "student", "student_kl", "student_ce"):
            hist[key].append(getattr(out, key).item())
        if step % 25 == 0 or step == 1:
            evals["step"].append(step)
            evals["teacher"].append(held_out_ce(teacher, held, args.seq))
            evals["student"].append(held_out_ce(student, held, args.seq))
            print(
                f"step {step:4d}  teacher CE {out.teacher.item():.3f}  student CE {out.student_ce.item():.3f}"
                f"  KL {out.student_kl.item():.3f}  held-out CE t/s {evals['teacher'][-1]:.3f}"
                f"/{evals['student'][-1]:.3f}  {time.perf_counter() - t0:.0f}s"
            )
        if time.perf_counter() - t0 > args.max_seconds:
            print(f"stopping at step {step}: --max-seconds reached")
            break

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v, n=10):
        return [sum(v[max(0, i - n + 1) : i + 1]) / len(v[max(0, i - n + 1) : i + 1]) for i in range(len(v))]

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=90)
    steps = hist["step"]
    ax.plot(steps, smooth(hist["teacher"]), label="teacher: CE on labels (train)", color="tab:blue")
    ax.plot(steps, smooth(hist["student_ce"]), label="student: CE on labels (train)", color="tab:orange")
    ax.plot(steps, smooth(hist["student_kl"]), ":", label="student: KL(teacher||student)", color="tab:green")
    ax.plot(evals["step"], evals["teacher"], "o--", color="tab:blue", ms=3, label="teacher: held-out CE")
    ax.plot(evals["step"], evals["student"], "s--", color="tab:orange", ms=3, label="student: held-out CE")
    ax.set_xlabel("step (both models updated every step)")
    ax.set_ylabel("nats per byte")
    ax.set_title(f"Co-distillation on argparse.py bytes (alpha={args.alpha}, T={args.temperature})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    summary = dict(
        steps=hist["step"][-1],
        seconds=round(time.perf_counter() - t0, 1),
        final_held_out_ce=dict(teacher=evals["teacher"][-1], student=evals["student"][-1]),
        png=os.path.relpath(args.out),
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
