"""Chat and instruction records -> token ids plus a per-token *target* flag (what the student should learn).

Two record shapes besides plain text:

- **messages**: the OpenAI / Hugging Face list of ``{"role": ..., "content": ...}`` turns, rendered with the
  teacher tokenizer's chat template (or a template the user names: ``--chat-template FILE``). A token is a
  target when it belongs to an assistant turn. Where the template marks assistant text with
  ``{% generation %}`` blocks, the flags come from Hugging Face's ``return_assistant_tokens_mask``; otherwise
  from rendered prefixes: for assistant turn ``i`` the text between ``render(turns[:i], add_generation_prompt)``
  and ``render(turns[:i + 1])`` is that turn (its content and whatever closes it, e.g. an end-of-turn token),
  mapped to tokens through the tokenizer's character offsets. Templates that render earlier turns differently
  once later turns exist are refused (the prefix rule would be wrong there); add ``{% generation %}`` to them.
- **prompt / completion**: ``prompt`` tokenized with the tokenizer's special tokens (a BOS where it adds one),
  ``completion`` without, concatenated; the completion's tokens are the targets. When both are lists of turns
  (TRL's conversational form), the pair is rendered with the chat template and the targets are the tokens after
  the rendered prompt with its generation prompt.

Rendered text is tokenized with ``add_special_tokens=False`` (a template writes its own BOS), as
``apply_chat_template(tokenize=True)`` does. The target flags only matter under ``--assistant-only``
(:mod:`labelstore.teacher.inputs` turns them into the positions that keep a label); the teacher always reads
every token.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labelstore.errors import InputDataError

GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
ROLES_NEEDED = ("role", "content")


@dataclass(frozen=True)
class Chat:
    """One conversation: a list of ``{"role", "content"}`` turns."""

    messages: list
    where: str


@dataclass(frozen=True)
class Pair:
    """One instruction pair: the completion is what the student learns."""

    prompt: str
    completion: str
    where: str


def check_messages(messages, where: str) -> list:
    """The turns of a ``messages`` field, checked: a non-empty list of dicts with string role and content."""
    if not isinstance(messages, list) or not messages:
        raise InputDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} turns, "
                             f"got {type(messages).__name__}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or any(k not in m for k in ROLES_NEEDED):
            keys = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise InputDataError(f"{where}: turn {j} of 'messages' needs 'role' and 'content' (it has {keys})")
        if not isinstance(m["role"], str) or not isinstance(m["content"], (str, list)):
            raise InputDataError(f"{where}: turn {j} of 'messages' has a non-string role or content")
    return messages


class ChatRenderer:
    """Renders :class:`Chat` and :class:`Pair` records with one tokenizer and one chat template.

    Args:
        tokenizer: the teacher's tokenizer (a fast tokenizer is needed for templates without
            ``{% generation %}``: the prefix rule maps characters to tokens through offsets).
        template: the Jinja chat template text; None uses the tokenizer's own (checked when a chat appears).
    """

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template if template is not None else getattr(tokenizer, "chat_template", None)
        if isinstance(self.template, dict):  # tokenizers with several named templates
            self.template = self.template.get("default")
        self.used_template = False
        self.used_generation = False

    @property
    def template_sha256(self) -> str | None:
        return hashlib.sha256(self.template.encode()).hexdigest() if isinstance(self.template, str) else None

    # ------------------------------------------------------------------------------------ messages
    def _render(self, messages, where: str, **kw) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False, **kw)
        except Exception as exc:  # jinja raises anything the template raises (raise_exception, TypeError...)
            raise InputDataError(f"{where}: the chat template failed on this conversation: "
                                 f"{type(exc).__name__}: {exc}") from None

    def render_chat(self, chat: Chat) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int64 [T], target flags bool [T]) of one conversation."""
        if not isinstance(self.template, str) or not self.template:
            raise InputDataError(
                f"{chat.where}: a 'messages' record needs a chat template, but the tokenizer has none: pass "
                "--chat-template FILE (a Jinja template, as in a tokenizer_config.json's chat_template)")
        messages = check_messages(chat.messages, chat.where)
        self.used_template = True
        if GENERATION_RE.search(self.template):
            self.used_generation = True
            try:
                enc = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=True,
                                                         return_dict=True, return_assistant_tokens_mask=True)
            except Exception as exc:
                raise InputDataError(f"{chat.where}: the chat template failed on this conversation: "
                                     f"{type(exc).__name__}: {exc}") from None
            ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(-1)
            flags = np.asarray(enc["assistant_masks"], dtype=bool).reshape(-1)
            return ids, flags
        text = self._render(messages, chat.where)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], chat.where, add_generation_prompt=True) if i else \
                self._render_empty(chat.where)
            upto = self._render(messages[:i + 1], chat.where)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise InputDataError(
                    f"{chat.where}: the chat template renders turn {i} differently once later turns follow, so the "
                    "assistant tokens cannot be found from rendered prefixes; use a template with "
                    "{% generation %} blocks around assistant text (--chat-template FILE)")
            spans.append((len(before), len(upto)))
        return self._tokens_with_spans(text, spans, chat.where)

    def _render_empty(self, where: str) -> str:
        """What the template writes before a first assistant turn (a default system prompt...), or ""."""
        try:
            return self._render([], where, add_generation_prompt=True)
        except InputDataError:  # templates that index messages[0]
            return ""

    def _tokens_with_spans(self, text: str, spans: list[tuple[int, int]], where: str):
        if not spans:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return np.asarray(ids, dtype=np.int64), np.zeros(len(ids), dtype=bool)
        if not getattr(self.tokenizer, "is_fast", False):
            raise InputDataError(f"{where}: finding assistant tokens without {{% generation %}} blocks needs a fast "
                                 "tokenizer (character offsets); use a template with {% generation %} blocks")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64).reshape(-1)
        flags = np.zeros(ids.size, dtype=bool)
        for a, b in spans:
            flags |= (starts >= a) & (starts < b)
        return ids, flags

    # ------------------------------------------------------------------------------------ pairs
    def render_pair(self, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, target flags) of one prompt/completion pair: the completion's tokens are the targets.

        Conversational pairs (``prompt`` and ``completion`` both lists of turns) are rendered with the chat
        template; the targets are the tokens after ``render(prompt, add_generation_prompt=True)``.
        """
        if isinstance(pair.prompt, list) and isinstance(pair.completion, list):
            return self._render_conversational_pair(pair)
        for name, value in (("prompt", pair.prompt), ("completion", pair.completion)):
            if not isinstance(value, str):
                raise InputDataError(f"{pair.where}: field {name!r} is a {type(value).__name__}, not a string")
        p = self.tokenizer(pair.prompt, add_special_tokens=True)["input_ids"]
        c = self.tokenizer(pair.completion, add_special_tokens=False)["input_ids"]
        ids = np.asarray(list(p) + list(c), dtype=np.int64)
        flags = np.zeros(ids.size, dtype=bool)
        flags[len(p):] = True
        return ids, flags

    def _render_conversational_pair(self, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(self.template, str) or not self.template:
            raise InputDataError(f"{pair.where}: a conversational prompt/completion record needs a chat template, "
                                 "but the tokenizer has none: pass --chat-template FILE")
        prompt = check_messages(pair.prompt, pair.where)
        messages = prompt + check_messages(pair.completion, pair.where)
        self.used_template = True
        text = self._render(messages, pair.where)
        before = self._render(prompt, pair.where, add_generation_prompt=True)
        if not text.startswith(before):
            raise InputDataError(f"{pair.where}: the chat template renders the prompt differently once the completion "
                                 "follows, so the completion's tokens cannot be found; use plain-text prompt and "
                                 "completion fields, or a 'messages' record")
        return self._tokens_with_spans(text, [(len(before), len(text))], pair.where)


def read_template(path: str | None) -> str | None:
    """The text of a ``--chat-template`` file (None: none given)."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(f"cannot read --chat-template {path}: {exc}") from None
