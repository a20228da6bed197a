"""Chat and instruction data: chat templates, assistant-only label positions, prompt/completion pairs.

The reference is hand-built: the tiny tokenizer has special tokens for the roles and the end of a turn, so a
rendered conversation tokenizes as the concatenation of its pieces (special tokens split the text), and the
assistant tokens are known without the code under test.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _teachers import make_tokenizer, raw_store_rows, save_teacher

from labelstore.cli import main as cli_main
from labelstore.errors import InputDataError
from labelstore.store.reader import LabelStore
from labelstore.store.verify import verify_store
from labelstore.student.dataset import StoreDataset
from labelstore.teacher.chat import Chat, ChatRenderer, Pair
from labelstore.teacher.compile import CompileOptions, compile_store
from labelstore.teacher.inputs import InputConfig, build_plan

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]

TURN = "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
PLAIN = ("{% for m in messages %}" + TURN + "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
GENERATION = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
              "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}" + TURN + "{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHATS = [
    [{"role": "system", "content": "the teacher"}, {"role": "user", "content": "read the data"},
     {"role": "assistant", "content": "the label of the store"}, {"role": "user", "content": "and the tail?"},
     {"role": "assistant", "content": "mass from the model"}],
    [{"role": "user", "content": "write a shard"}, {"role": "assistant", "content": "def write(self): return"}],
]
PAIRS = [("class token", " value data"), ("the batch", " loss and mass")]


@pytest.fixture(scope="module")
def tok():
    t = make_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    t.chat_template = PLAIN
    return t


def reference(tok, messages):
    """Ids and assistant flags from the pieces: role token, content tokens, end token."""
    ids, flags = [], []
    for m in messages:
        content = tok(m["content"], add_special_tokens=False)["input_ids"]
        piece = [tok.convert_tokens_to_ids(f"<|{m['role']}|>")] + content + [tok.convert_tokens_to_ids("<|end|>")]
        ids += piece
        flags += [False] + [m["role"] == "assistant"] * (len(piece) - 1)
    return ids, flags


@pytest.mark.parametrize("template", [PLAIN, GENERATION], ids=["prefix-rule", "generation-blocks"])
def test_assistant_tokens_match_a_hand_built_case(tok, template):
    r = ChatRenderer(tok, template)
    for messages in CHATS:
        ids, flags = r.render_chat(Chat(messages, "test"))
        want_ids, want_flags = reference(tok, messages)
        assert ids.tolist() == want_ids
        assert flags.tolist() == want_flags
    assert r.used_generation == (template is GENERATION)


def test_pairs_label_the_completion(tok):
    ids, flags = ChatRenderer(tok).render_pair(Pair("class token", " value data", "p"))
    p = tok("class token", add_special_tokens=True)["input_ids"]
    c = tok(" value data", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == p + c and flags.tolist() == [False] * len(p) + [True] * len(c)


@pytest.mark.parametrize("template", [PLAIN, GENERATION], ids=["prefix-rule", "generation-blocks"])
def test_conversational_pairs_label_only_the_completion(tok, template):
    messages = CHATS[0]  # system, user, assistant, user, assistant
    ids, flags = ChatRenderer(tok, template).render_pair(Pair(messages[:4], messages[4:], "p"))
    want_ids, want_flags = reference(tok, messages)
    n_before = len(reference(tok, messages[:4])[0]) + 1  # the prompt's turns and the generation prompt
    assert ids.tolist() == want_ids
    assert flags.tolist() == [False] * n_before + want_flags[n_before:]  # not the prompt's assistant turn
    assert flags[n_before:].all() and not flags[:n_before].any()


def test_plan_keeps_positions_whose_next_token_is_a_target(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS)
                    + "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    for pack, L in ((True, 16), (False, 1000)):
        plan = build_plan([path], tok, InputConfig(max_length=L, pack=pack, assistant_only=True), len(tok))
        eos = tok.eos_token_id
        stream, keep = [], []
        docs = [reference(tok, m) for m in CHATS]
        for p, c in PAIRS:
            pi, ci = tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]
            docs.append((pi + ci, [False] * len(pi) + [True] * len(ci)))
        for ids, flags in docs:
            ids, flags = ids + [eos], flags + [flags[-1]]  # the appended EOS closes the last turn
            stream_doc = ids
            keep_doc = flags[1:] + [False]
            stream.append(stream_doc)
            keep.append(keep_doc)
        if pack:
            flat, flat_keep = sum(stream, []), sum(keep, [])
            assert np.asarray(plan.tokens).tolist() == flat
            assert plan.label_mask.astype(bool).tolist() == flat_keep
            assert all(len(plan.sequence(i)) == L for i in range(len(plan) - 1))
        else:
            assert [plan.sequence(i).tolist() for i in range(len(plan))] == stream
            assert plan.label_mask.astype(bool).tolist() == sum(keep, [])
        assert plan.labelled_positions == sum(map(sum, keep))
    cut = build_plan([path], tok, InputConfig(max_length=10, pack=False, assistant_only=True), len(tok))
    assert cut.stats["truncated_label_positions"] == sum(sum(k[10:]) for k in keep)
    assert cut.labelled_positions == sum(sum(k[:10]) for k in keep)
    assert cut.stats["truncated_tokens"] == sum(max(len(d) - 10, 0) for d in stream)


def test_chat_errors(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CHATS[0]}) + "\n")
    text = tmp_path / "t.txt"
    text.write_text("plain text")
    with pytest.raises(InputDataError, match=r"t\.txt: --assistant-only keeps labels only for assistant turns"):
        build_plan([path, text], tok, InputConfig(max_length=64, assistant_only=True), len(tok))
    bare = make_tokenizer()
    bare.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    with pytest.raises(InputDataError, match=r"c\.jsonl:1: a 'messages' record needs a chat template.*--chat-template"):
        build_plan([path], bare, InputConfig(max_length=64), len(tok))
    shifting = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<|end|>{% endif %}{% endfor %}"
    with pytest.raises(InputDataError, match="renders turn 2 differently once later turns follow"):
        build_plan([path], tok, InputConfig(max_length=64, chat_template=shifting), len(tok))
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(InputDataError, match=r"b\.jsonl:1: turn 0 of 'messages' needs 'role' and 'content'"):
        build_plan([bad], tok, InputConfig(max_length=64), len(tok))
    only_user = tmp_path / "u.jsonl"
    only_user.write_text(json.dumps({"messages": [{"role": "user", "content": "the"}]}) + "\n")
    with pytest.raises(InputDataError, match="no position .* is followed by an assistant"):
        build_plan([only_user], tok, InputConfig(max_length=64, assistant_only=True), len(tok))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def chat_env(tmp_path_factory, tok):
    base = tmp_path_factory.mktemp("chat")
    teacher = save_teacher(base / "llama", "llama", tok)  # saves the chat template with the tokenizer
    data = base / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 3)
                    + "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS * 3))
    return {"base": base, "teacher": teacher, "data": data}


def test_adaptive_assistant_only_spends_each_sample_budget_on_its_labelled_positions(chat_env, tok):
    """--selection adaptive --assistant-only: a sample's budget is floor(mean_k * labelled positions), all of it
    for those positions (the unlabelled ones store nothing). Reference: extract on a direct forward (one sequence
    per forward in the compile too, so the logits are the same) with the unlabelled rows outside every group."""
    from _teachers import load_model

    from labelstore_kernels import extract

    out = chat_env["base"] / "asst-adaptive"
    compile_store(CompileOptions(out=str(out), teacher=str(chat_env["teacher"]), data=[str(chat_env["data"])],
                                 max_length=40, tokens_per_batch=40, device="cpu", progress=False,
                                 selection="adaptive", k=2, max_k=8, assistant_only=True))
    sel = LabelStore(out).meta["selection"]
    assert sel == {"mode": "adaptive", "k": 8, "mean_k": 2}
    plan = build_plan([chat_env["data"]], tok, InputConfig(max_length=40, assistant_only=True), len(tok))
    model = load_model(chat_env["teacher"])
    differs = 0
    for sid, row in raw_store_rows(out).items():
        keep = plan.label_mask[plan.offsets[sid]:plan.offsets[sid + 1]].astype(bool)
        x = torch.from_numpy(row["input_ids"])[None]
        with torch.inference_mode():
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
        ex = extract(logits, sel, groups=np.where(keep, 0, -1))
        c = np.where(keep, ex.counts.numpy(), 0)
        np.testing.assert_array_equal(row["counts"], c, err_msg=f"sample {sid}")
        slot = np.arange(8)[None, :] < c[:, None]
        np.testing.assert_array_equal(row["ids"], ex.ids.numpy()[slot], err_msg=f"sample {sid}")
        np.testing.assert_array_equal(row["tail"][keep], ex.tail.numpy()[keep], err_msg=f"sample {sid}")
        assert c.sum() <= 2 * keep.sum()
        spread = np.where(keep, extract(logits, sel).counts.numpy(), 0)  # a budget over every position instead
        differs += int(not np.array_equal(c, spread))
    assert differs > 0  # the two budgets really differ, so the equality above pins the compile's grouping


@pytest.mark.parametrize("mode", [dict(selection="topk", k=8), dict(hard_labels=True),
                                  dict(selection="topk+sample", k_exact=4, samples=8)], ids=["topk", "hard", "mixed"])
def test_assistant_only_store_holds_exactly_the_kept_positions(chat_env, tok, mode):
    base = chat_env["base"]
    name = "-".join(map(str, mode.values()))
    kw = dict(teacher=str(chat_env["teacher"]), data=[str(chat_env["data"])], max_length=40, tokens_per_batch=80,
              device="cpu", progress=False, shard_mb=0.002, **mode)
    compile_store(CompileOptions(out=str(base / f"all-{name}"), **kw))
    compile_store(CompileOptions(out=str(base / f"asst-{name}"), assistant_only=True, **kw))
    full, asst = raw_store_rows(base / f"all-{name}"), raw_store_rows(base / f"asst-{name}")
    plan = build_plan([chat_env["data"]], tok, InputConfig(max_length=40, assistant_only=True), len(tok))
    assert sorted(full) == sorted(asst) == list(range(len(plan)))
    bpv = 0 if "hard_labels" in mode else 1
    kept_total = 0
    for sid in asst:
        keep = plan.label_mask[plan.offsets[sid]:plan.offsets[sid + 1]].astype(bool)
        a, f = asst[sid], full[sid]
        assert np.array_equal(a["input_ids"], f["input_ids"])
        assert np.array_equal(a["counts"] > 0, keep)  # a label exactly where the next token is an assistant's
        assert (f["counts"][keep] == a["counts"][keep]).all()
        # the kept entries are the all-positions store's entries at those positions
        ends = np.concatenate([[0], np.cumsum(f["counts"])])
        sel = np.concatenate([np.arange(ends[t], ends[t + 1]) for t in np.flatnonzero(keep)] + [np.zeros(0, int)])
        assert np.array_equal(a["ids"], f["ids"][sel])
        if bpv:
            assert np.array_equal(a["values"], f["values"][sel])
        if a["tail"].size:
            assert (a["tail"][~keep] == 0).all() and np.array_equal(a["tail"][keep], f["tail"][keep])
        kept_total += int(keep.sum())
    assert verify_store(base / f"asst-{name}")["ok"]
    store = LabelStore(base / f"asst-{name}")
    assert store.meta["compile_config"]["label_positions"] == "assistant"
    assert store.meta["compile_config"]["data"]["labelled_positions"] == kept_total == plan.labelled_positions
    assert "label_positions" not in LabelStore(base / f"all-{name}").meta["compile_config"]
    ds = StoreDataset(store)
    items = [ds[i] for i in range(len(ds))]
    for item in items:
        sid = item["sample_id"]
        assert item["position_mask"].tolist() == plan.label_mask[plan.offsets[sid]:plan.offsets[sid + 1]].astype(
            bool).tolist()
    batch = ds.collator()(items[:4])  # CE labels only where the teacher has a label: the assistant's tokens
    for b, item in enumerate(items[:4]):
        x, keep = item["input_ids"], item["position_mask"]
        n = len(x) - 1
        want = [int(x[t + 1]) if keep[t] else -100 for t in range(n)]
        assert batch["shift_labels"][b, :n].tolist() == want  # aligned with the logits (labelstore's losses)
        assert batch["labels"][b, 1:n + 1].tolist() == want  # HF convention: the model shifts it


def test_cli_chat_template_file(chat_env, tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text(GENERATION)
    out = tmp_path / "s"
    args = ["compile", "--teacher", str(chat_env["teacher"]), "--data", str(chat_env["data"]), "--out", str(out),
            "--selection", "topk", "--k", "4", "--max-length", "40", "--device", "cpu", "--quiet", "--assistant-only",
            "--chat-template", str(tpl)]
    assert cli_main(args) == 0
    cfg = LabelStore(out).meta["compile_config"]
    assert cfg["chat_template_sha256"] == hashlib.sha256(GENERATION.encode()).hexdigest()
    assert cli_main(args[:-1] + [str(tmp_path / "missing.jinja")]) == 2


def test_readme_chat_example_runs(chat_env, tmp_path, monkeypatch):
    """The README's Python API example, with its teacher replaced by the tiny chat teacher."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("**Python API.**"):]
    block = block[block.index("```python\n") + 10:]
    block = block[:block.index("```")]
    assert 'TEACHER = "' in block and 'STORE = "' in block
    monkeypatch.chdir(tmp_path)
    code = re.sub(r'TEACHER = "[^"]*"', f"TEACHER = {str(chat_env['teacher'])!r}", block)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    batch, result = scope["batch"], scope["result"]
    assert result.samples == 1 and bool(torch.isfinite(scope["loss"]))
    mask = batch["position_mask"][0]
    assert 0 < int(mask.sum()) < mask.numel()  # only the assistant's and the completion's positions


def test_assistant_only_units_plan_of_one_file_equals_the_global_plan(chat_env, tmp_path):
    """One input file is one work unit, whose sample ids (unit 0: 0, 1, ...) and sequences are the global plan's:
    the --plan units store must equal the global one row for row, label positions included."""
    kw = dict(teacher=str(chat_env["teacher"]), data=[str(chat_env["data"])], max_length=40, tokens_per_batch=80,
              device="cpu", progress=False, shard_mb=0.002, assistant_only=True)
    compile_store(CompileOptions(out=str(tmp_path / "g"), **kw))
    compile_store(CompileOptions(out=str(tmp_path / "u"), plan="units", **kw))
    g, u = raw_store_rows(tmp_path / "g"), raw_store_rows(tmp_path / "u")
    assert sorted(g) == sorted(u)
    for sid in g:
        for key in g[sid]:
            assert np.array_equal(g[sid][key], u[sid][key]), (sid, key)
    cfg = LabelStore(tmp_path / "u").meta["compile_config"]
    assert cfg["plan"] == "units" and cfg["label_positions"] == "assistant"
