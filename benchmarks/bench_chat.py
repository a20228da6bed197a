"""Bytes saved by ``--assistant-only`` on a chat-shaped corpus (SYNTHETIC conversations, tiny random teacher).

The same corpus is compiled twice per setting, with labels at every position and with labels only where the
next token belongs to an assistant turn (``--assistant-only``), and the stores' sizes on disk are compared.
The conversations are SYNTHETIC (random words; a system prompt half of the time, 1 to 3 user/assistant turns,
user turns 10-150 words, assistant turns 20-200 words) and the teacher is a tiny randomly initialised Llama
(V = 2048): the figure that carries over to real data is bytes per *labelled* position and the share of
positions an assistant-only store keeps, which depends on the corpus (printed). Positions without a label cost
their count byte and, in packed rows, their 4-byte tail (zstd rows compress the run of zero tails).

    python benchmarks/bench_chat.py [--conversations 300] [--k 32]

Results: ``benchmarks/results/chat.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from labelstore.store.info import summary
from labelstore.teacher.compile import compile_store
from labelstore.tools.demo_model import train_tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "chat.json"
WORDS = ("the of and to in is was for on that with as by at from his her which or def return class import self "
         "value data model token label store teacher student shard write read batch loss mass tail how why what "
         "please explain answer code list sort file path error run test python function result number").split()
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": words(rng, 20, 60)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": words(rng, 10, 150)})
            msgs.append({"role": "assistant", "content": words(rng, 20, 200)})
        out.append(msgs)
    return out


def build_teacher(path: Path, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(seed)
    tok = train_tokenizer([words(rng, 20, 200) for _ in range(2000)], 2048)
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.2, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=300)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        tmp = Path(tmp)
        build_teacher(tmp / "teacher", args.seed)
        data = tmp / "chat.jsonl"
        data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations(args.conversations,
                                                                                           args.seed + 1)))
        for encoding in ("packed", "zstd"):
            for selection in ("topk", "sample"):
                sizes = {}
                for assistant_only in (False, True):
                    out = tmp / f"{encoding}-{selection}-{assistant_only}"
                    t0 = time.perf_counter()
                    compile_store(teacher=tmp / "teacher", data=data, out=out, selection=selection,
                                  k=args.k if selection == "topk" else None,
                                  samples=16, encoding=encoding, assistant_only=assistant_only,
                                  max_length=args.max_length, device="cpu", progress=False)
                    s = summary(out)
                    sizes[assistant_only] = s
                    print(f"  compiled {out.name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
                full, asst = sizes[False], sizes[True]
                labelled = asst["labelled_positions"]
                rows.append({
                    "encoding": encoding, "selection": selection,
                    "k": args.k if selection == "topk" else 16,
                    "tokens": full["tokens"], "labelled_positions": labelled,
                    "labelled_share": labelled / full["tokens"],
                    "bytes_all_positions": full["bytes_on_disk"], "bytes_assistant_only": asst["bytes_on_disk"],
                    "bytes_per_token_all": full["bytes_per_token"],
                    "bytes_per_token_assistant": asst["bytes_per_token"],
                    "bytes_per_labelled_position": asst["bytes_on_disk"] / labelled,
                    "saved": 1 - asst["bytes_on_disk"] / full["bytes_on_disk"],
                })
    print("\nSYNTHETIC chat corpus, tiny random teacher (V = 2048); sizes on disk")
    print("| encoding | selection | tokens | labelled share | bytes/token all | bytes/token assistant-only | "
          "bytes/labelled position | saved |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['encoding']} | {r['selection']} k={r['k']} | {r['tokens']:,} | {r['labelled_share']:.1%} | "
              f"{r['bytes_per_token_all']:.1f} | {r['bytes_per_token_assistant']:.1f} | "
              f"{r['bytes_per_labelled_position']:.1f} | {r['saved']:.1%} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"synthetic": True, "args": vars(args), "rows": rows}, indent=1))
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
