"""Chaos test of `labelstore compile`: SIGKILL it at random and at chosen moments, resume, compare.

    python benchmarks/chaos_compile.py [--trials 24] [--seed 0] [--selections topk,topk+sample] [--demo]

Each trial starts `labelstore compile` in a subprocess and kills it with SIGKILL, then resumes the store with
the same settings (in this process) and compares it with an uninterrupted compile of the same inputs: the
same sample ids, byte-identical labels (input ids, counts, kept ids, value bytes, tails, document starts),
no sample twice, none missing, and `verify_store` clean. Kill moments cycle through:

- ``random``: a random delay after the store directory appears, up to 1.1x the uninterrupted compile's time;
- ``poll-shard-tmp`` / ``poll-commit``: the store directory is polled and the process killed as soon as an
  open ``shards/.tmp-*`` shard appears, or as soon as a new commit record appears (the next shard then opens);
- in-process kill points (the child SIGKILLs itself, exactly there; ``os.replace`` is how every shard,
  commit record, teacher-mass file, done marker and the manifest become visible):
  ``before-replace:N`` / ``after-replace:N`` around the N-th rename, ``mid-shard:N`` after the N-th record
  batch went into an open shard, ``before-manifest`` / ``after-done`` at the very end.

Default teacher: a tiny random Llama-style model built here (like tests/_teachers.py), so a run takes a few
minutes on two cores. ``--demo`` uses the cached demo teacher (~/.cache/labelstore/demo-teacher-v1, built by
`labelstore demo`) on held-out standard-library files instead. Writes benchmarks/results/chaos.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from _teachers import (  # noqa: E402
    make_documents,
    make_tokenizer,
    raw_rows_differences,
    raw_store_rows,
    save_teacher,
    write_corpus,
)

from labelstore.store.manifest import list_commits  # noqa: E402
from labelstore.store.verify import verify_store  # noqa: E402
from labelstore.teacher.compile import CompileOptions, compile_store  # noqa: E402

# The child: `labelstore compile` with an optional self-SIGKILL at an exact point (CHAOS_POINT).
CHILD = r"""
import os, signal, sys, time
point = os.environ.get("CHAOS_POINT", "")
delay = float(os.environ.get("CHAOS_DELAY", "0"))
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if delay:
    import labelstore.teacher.pipeline as c
    slow = c.pad_batch
    def pad_batch(*a, **k):
        time.sleep(delay)
        return slow(*a, **k)
    c.pad_batch = pad_batch
if point:
    kind, _, n = point.partition(":")
    n = int(n or 0)
    hits = [0]
    if kind in ("before-replace", "after-replace", "before-manifest", "after-done"):
        real = os.replace
        def replace(src, dst, *a, **k):
            name = os.path.basename(str(dst))
            hits[0] += 1
            hit = hits[0] == n if kind.endswith("replace") else False
            if (kind == "before-replace" and hit) or (kind == "before-manifest" and name == "manifest.json"):
                die()
            out = real(src, dst, *a, **k)
            if (kind == "after-replace" and hit) or (kind == "after-done" and name.endswith(".done")):
                die()
            return out
        os.replace = replace
    elif kind == "mid-shard":
        import labelstore.store.writer as w
        real_batch = w.rows_to_batch
        def rows_to_batch(*a, **k):  # called with the temp shard open, before the batch is written to it
            hits[0] += 1
            if hits[0] == n:
                die()
            return real_batch(*a, **k)
        w.rows_to_batch = rows_to_batch
from labelstore.cli import main
sys.exit(main(sys.argv[1:]))
"""

KINDS = ["random", "poll-shard-tmp", "poll-commit", "before-replace", "after-replace", "mid-shard",
         "before-manifest", "after-done"]


def build_inputs(base: Path, demo: bool) -> dict:
    if demo:
        from labelstore.tools.demo_model import (
            corpus_files,
            default_cache_root,
            default_config,
            split_files,
            utf8_files,
        )

        teacher = default_cache_root() / default_config().cache_name()
        if not (teacher / "config.json").exists():
            raise SystemExit(f"--demo: no cached demo teacher at {teacher}; run `labelstore demo` first")
        files = utf8_files(split_files(corpus_files())[1])[:12]
        return {"teacher": str(teacher), "data": [str(f) for f in files], "max_length": 128,
                "tokens_per_batch": 512, "shard_mb": 0.05, "k": 16}
    tok = make_tokenizer()
    teacher = save_teacher(base / "teacher", "llama", tok, extra_vocab=7)
    write_corpus(base / "corpus", make_documents(40, seed=5))
    return {"teacher": str(teacher), "data": [str(base / "corpus")], "max_length": 64, "tokens_per_batch": 128,
            "shard_mb": 0.004, "k": 8}


def settings(inputs: dict, selection: str) -> dict:
    extra = {"topk": {}, "topk+sample": {"k_exact": 2, "samples": 8, "seed": 3},
             "sample": {"samples": 8, "seed": 3}, "topp": {"top_p": 0.2}}[selection]
    out = dict(inputs, selection=selection, **extra)
    if selection in ("sample", "topk+sample"):  # --k sizes topk/topp stores only (and is refused with the others)
        out.pop("k", None)
    return out


def cli_args(s: dict, out: Path) -> list[str]:
    args = ["compile", "--teacher", s["teacher"], "--data", *s["data"], "--out", str(out), "--device", "cpu",
            "--quiet", "--selection", s["selection"]]
    for key in ("k", "max_length", "tokens_per_batch", "shard_mb", "k_exact", "samples", "seed", "top_p"):
        if key in s:
            args += [f"--{key.replace('_', '-')}", str(s[key])]
    return args


def options(s: dict, out: Path) -> CompileOptions:
    kw = {k: v for k, v in s.items() if k != "data"}
    return CompileOptions(data=list(s["data"]), out=str(out), device="cpu", progress=False, **kw)


def child_env(point: str = "", delay: float = 0.0) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHAOS_POINT": point, "CHAOS_DELAY": str(delay)}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def store_state(out: Path) -> str:
    """What the store directory looked like at the kill: committed shards, open temp files, manifest."""
    try:
        commits = len(list_commits(out))
    except Exception:
        commits = -1
    tmp = sum(1 for p in out.rglob(".tmp-*")) if out.exists() else 0
    shards = len(list((out / "shards").glob("r*.arrow"))) if (out / "shards").exists() else 0
    man = (out / "manifest.json").exists()
    return f"{commits} commits, {shards} shard files, {tmp} tmp, manifest {'yes' if man else 'no'}"


def run_trial(i: int, kind: str, s: dict, ref: dict, duration: float, work: Path, rng: random.Random,
              n_replace: int, n_batches: int) -> dict:
    out = work / f"trial{i:03d}"
    point, delay, target = "", 0.0, None
    if kind in ("before-replace", "after-replace"):
        point = f"{kind}:{rng.randint(1, n_replace)}"
    elif kind == "mid-shard":
        point = f"mid-shard:{rng.randint(1, n_batches)}"
    elif kind in ("before-manifest", "after-done"):
        point = kind
    elif kind.startswith("poll"):
        delay = 0.02  # slows the batches a little so that the poller sees the moment it waits for
    else:
        target = rng.uniform(0.0, 1.1) * duration  # seconds after the store appears (startup excluded)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *cli_args(s, out)], env=child_env(point, delay),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = ""
    if target is not None or kind.startswith("poll"):
        seen, started = None, None
        while proc.poll() is None:
            if target is not None and started is None and (out / "config.json").exists():
                started = time.monotonic()
            if started is not None and time.monotonic() - started >= target:
                break
            if kind == "poll-shard-tmp" and (out / "shards").exists() and any((out / "shards").glob(".tmp-*")):
                if rng.random() < 0.5 or seen:  # a random open shard, not always the first one
                    break
                seen = True
                time.sleep(rng.uniform(0, 0.3))
                continue
            if kind == "poll-commit" and (out / "commits").exists():
                n = len(list((out / "commits").glob("r*-*.json")))
                if seen is None:
                    seen, want = n, rng.randint(1, 4)
                elif n >= seen + want:
                    break
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            state = store_state(out)
    log = proc.communicate()[0].decode(errors="replace")
    rc = proc.returncode
    if not state:
        state = store_state(out)
    killed = rc == -signal.SIGKILL
    row = {"trial": i, "selection": s["selection"], "kind": kind, "point": point or (
        f"store+{target:.2f}s" if target is not None else "polled"),
        "killed": killed, "exit": rc, "state_at_kill": state}
    if not killed and rc != 0:
        row.update(ok=False, problem=f"compile failed with exit status {rc}: {log[-500:]}")
        return row
    t1 = time.monotonic()
    try:
        res = compile_store(options(s, out))
        row["resumed_samples"], row["skipped"] = res.samples, res.skipped
    except Exception as exc:  # any failure to resume is a failed trial, reported as such
        row.update(ok=False, problem=f"resume failed: {type(exc).__name__}: {exc}")
        return row
    row["resume_s"] = round(time.monotonic() - t1, 2)
    problems = raw_rows_differences(ref["rows"], raw_store_rows(out))
    ver = verify_store(out)
    if not ver["ok"]:
        problems += [f"verify: {p}" for p in ver["problems"]]
    prior = np.fromfile(out / "tail_prior.f32", dtype="<f4") if (out / "tail_prior.f32").exists() else None
    if (prior is None) != (ref["prior"] is None) or (
            prior is not None and not np.allclose(prior, ref["prior"], rtol=1e-5, atol=1e-9)):
        problems.append("tail prior differs from the uninterrupted compile's")
    # Leftover temp files do not change what the store holds (readers and verify ignore them), so they are
    # reported apart from the data checks.
    row["leftovers"] = sorted(str(p.relative_to(out)) for p in out.rglob(".tmp-*"))
    row.update(ok=not problems, problem="; ".join(problems[:5]))
    return row


def reference(s: dict, work: Path) -> dict:
    out = work / f"reference-{s['selection']}"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *cli_args(s, out)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = None
    while proc.poll() is None:
        if started is None and (out / "config.json").exists():
            started = time.monotonic()
        time.sleep(0.002)
    log = proc.communicate()[0]
    duration = time.monotonic() - (started or time.monotonic())  # from the store's creation to the exit
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted compile failed:\n{log}")
    assert verify_store(out)["ok"]
    commits = list_commits(out)
    prior = np.fromfile(out / "tail_prior.f32", dtype="<f4") if (out / "tail_prior.f32").exists() else None
    # renames of one compile: per shard (shard, commit record, maybe teacher mass) + done marker + manifest(s)
    n_replace = 3 * len(commits) + 2
    return {"rows": raw_store_rows(out), "prior": prior, "duration": duration, "shards": len(commits),
            "n_replace": n_replace, "n_batches": len(commits)}  # record batches written (one per shard here)


def run(trials: int, seed: int, selections: list[str], demo: bool, work: Path, log=print,
        kinds: list[str] | None = None) -> dict:
    kinds = list(kinds or KINDS)
    rng = random.Random(seed)
    inputs = build_inputs(work, demo)
    refs = {}
    for sel in selections:
        refs[sel] = reference(settings(inputs, sel), work)
        log(f"uninterrupted {sel}: {len(refs[sel]['rows'])} samples in {refs[sel]['shards']} shards, "
            f"{refs[sel]['duration']:.1f}s from the store's creation to exit")
    rows = []
    for i in range(trials):
        kind = kinds[i % len(kinds)]
        sel = selections[(i // len(kinds) + i) % len(selections)]
        r = refs[sel]
        row = run_trial(i, kind, settings(inputs, sel), r, r["duration"], work, rng, r["n_replace"],
                        r["n_batches"])
        rows.append(row)
        log(format_row(row))
    return {"trials": rows, "passed": sum(r["ok"] for r in rows), "killed": sum(r["killed"] for r in rows),
            "with_leftover_tmp_files": sum(bool(r.get("leftovers")) for r in rows),
            "teacher": "demo" if demo else "tiny-llama", "selections": selections, "seed": seed,
            "samples": {s: len(refs[s]["rows"]) for s in selections},
            "shards": {s: refs[s]["shards"] for s in selections}}


HEADER = f"{'#':>3} {'selection':<12} {'kind':<16} {'point':<20} {'killed':<6} {'state at kill':<46} {'resumed':>7} ok"


def format_row(r: dict) -> str:
    line = (f"{r['trial']:>3} {r['selection']:<12} {r['kind']:<16} {r['point']:<20} {str(r['killed']):<6} "
            f"{r['state_at_kill']:<46} {r.get('resumed_samples', '-'):>7} {'OK' if r['ok'] else 'FAIL'}")
    line += f"  {r['problem']}" if r.get("problem") else ""
    return line + (f"  (left behind: {', '.join(r['leftovers'])})" if r.get("leftovers") else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--selections", default="topk,topk+sample", help="comma-separated selection modes to cycle")
    ap.add_argument("--demo", action="store_true", help="use the cached demo teacher (slower)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "chaos.json"))
    args = ap.parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    print(HEADER)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="labelstore-chaos-") as tmp:
        res = run(args.trials, args.seed, args.selections.split(","), args.demo, Path(tmp))
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["command"] = "python benchmarks/chaos_compile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{res['passed']}/{len(res['trials'])} trials passed the data checks ({res['killed']} killed "
          f"mid-compile, the rest finished before the kill landed); {res['with_leftover_tmp_files']} left a "
          f"temporary file behind; {res['seconds']}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if res["passed"] == len(res["trials"]) else 1


if __name__ == "__main__":
    sys.exit(main())
