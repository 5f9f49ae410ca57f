"""Instruction data for decoder-only LMs (``--task instruct``): JSONL files (optionally
gzipped) whose lines are either

    {"prompt": "...", "response": "..."}                       (field names: --columns
                                                                 prompt=FIELD,response=FIELD)
    {"messages": [{"role": "user", "content": "..."}, ...,
                  {"role": "assistant", "content": "..."}]}     (chat: the last message,
                                                                 an assistant's, is the response)

and their tokenisation into ``input_ids`` (L,) with ``labels`` (L,) equal to the ids on
response tokens and -100 on prompt tokens, so that the loss is taken on the response only.

How an example becomes tokens:
- prompt/response: the prompt is tokenised with the tokenizer's special tokens (a BOS for
  Llama-style tokenizers; GPT-2 adds none), the response without them, and the EOS token is
  appended to the response (scored: the model learns where to stop). The two are joined at
  the token level, so put the separator you will prompt with at inference (a newline,
  ``### Response:``) at the end of the prompt or the start of the response.
- chat: the tokenizer's chat template renders the conversation without its last message
  and with ``add_generation_prompt=True`` (the prompt: exactly what a model is given at
  inference), and the whole conversation (the prompt followed by the response, with the
  template's end-of-turn tokens). The first rendering must begin the second, else the
  response cannot be told apart and the example is refused. Both parts are tokenised
  without adding special tokens (the template writes them).
- truncation to ``max_length``: the prompt is always kept whole and the response is cut at
  its end; an example whose prompt leaves no room for a scored response token is dropped
  and counted (``dropped``), as are the responses cut (``truncated``).

Every problem in a file is a one-line ``DataError`` naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rxf.errors import DataError
from rxf.tasks.loading import parse_column_map, read_records

INSTRUCT_TASK = "instruct"
COLUMN_KEYS = ("prompt", "response", "messages")
IGNORE = -100


@dataclass
class Instructions:
    """One split: (N,) examples, each ``{"prompt": str, "response": str}`` or
    ``{"messages": [{"role": str, "content": str, ...}, ...]}``, the (N,) line of the file
    each came from, and the file."""

    examples: list[dict]
    lines: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.examples)

    def head(self, n: int | None) -> "Instructions":
        if n is None or n >= len(self):
            return self
        return Instructions(self.examples[:n], self.lines[:n], self.source)

    def is_chat(self, i: int) -> bool:
        return "messages" in self.examples[i]


def load_instructions(spec) -> dict[str, Instructions]:
    """{"train", "dev"} from ``--train-file``/``--dev-file`` (or ``train.*``/``dev.*`` in
    ``--data-dir``), read with the field names of ``--columns``."""
    from rxf.tasks.generic import split_paths

    columns = parse_column_map(spec.columns, valid_keys=COLUMN_KEYS)
    train, dev = split_paths(spec)
    return {"train": read_instructions(train, columns), "dev": read_instructions(dev, columns)}


def read_instructions(path: Path, columns: dict[str, str] | None = None) -> Instructions:
    """The examples of one file; ``columns`` maps prompt/response/messages to its field
    names. A line with the messages field is a chat, any other needs prompt and response."""
    columns = columns or {}
    names = {key: columns.get(key, key) for key in COLUMN_KEYS}
    examples, lines = [], []
    for lineno, record in read_records(Path(path)):
        examples.append(_example(record, names, path, lineno))
        lines.append(lineno)
    return Instructions(examples, lines, str(path))


def _example(record: dict, names: dict[str, str], path, lineno: int) -> dict:
    where = f"{path}:{lineno}"
    if names["messages"] in record:
        return {"messages": _messages(record[names["messages"]], where)}
    for key in ("prompt", "response"):
        field = names[key]
        if field not in record:
            have = ", ".join(sorted(map(str, record))) or "no fields"
            raise DataError(f"{where}: no {field!r} field (the line has {have}); name the fields with --columns "
                            f"prompt=FIELD,response=FIELD, or give a {names['messages']!r} list of chat messages")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: {field!r} must be a string, got {type(record[field]).__name__}")
    if not record[names["response"]].strip():
        raise DataError(f"{where}: empty {names['response']!r}: nothing to learn from")
    return {"prompt": record[names["prompt"]], "response": record[names["response"]]}


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{where}: messages must be a list of at least two {{role, content}} objects (the prompt "
                        "and the assistant's response)")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
    if value[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message is the response and must be the assistant's, not "
                        f"{value[-1]['role']!r}")
    if not value[-1]["content"].strip():
        raise DataError(f"{where}: the assistant's response is empty: nothing to learn from")
    return value


# --- tokenisation --------------------------------------------------------------------


def _chat_texts(split: Instructions, i: int, tokenizer) -> tuple[str, str]:
    """(prompt text, response text) of a chat example, rendered by the chat template."""
    where = f"{split.source}:{split.lines[i]}"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: a chat example (messages) needs a tokenizer with a chat template, and this "
                        "one has none: use a chat model's tokenizer, or prompt/response fields")
    messages = split.examples[i]["messages"]
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja errors, and templates that raise on e.g. unexpected roles
        raise DataError(f"{where}: the chat template cannot render this conversation ({exc})") from None
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template's rendering of the conversation does not begin with its "
                        "rendering of the prompt (add_generation_prompt=True), so the response's tokens cannot be "
                        "told apart; use prompt/response fields")
    return prompt, full[len(prompt):]


def _appends_eos(tokenizer) -> bool:
    """Whether the tokenizer's special tokens end a text with EOS (some Llama configs):
    such an EOS would sit between prompt and response."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    with_specials, without = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_specials[-1:] == [eos] and without[-1:] != [eos]


def encode(split: Instructions, tokenizer, max_length: int) -> tuple[dict[str, list], dict[str, int]]:
    """Token ids and labels of ``split``, and what truncation did.

    Returns:
        ``{"input_ids": [(L_i,) ...], "labels": [(L_i,) ...]}`` with L_i <= max_length and
        labels -100 on prompt tokens, and ``{"used", "dropped", "truncated",
        "response_tokens"}`` (response_tokens: the tokens the loss is taken on, each
        predicted from the one before it).
    """
    chat = [i for i in range(len(split)) if split.is_chat(i)]
    plain = [i for i in range(len(split)) if not split.is_chat(i)]
    prompts, responses = [[] for _ in split.examples], [[] for _ in split.examples]
    if chat:
        texts = [_chat_texts(split, i, tokenizer) for i in chat]
        # The template writes the special tokens itself (BOS, end of turn).
        for i, p, r in zip(chat, tokenizer([t[0] for t in texts], add_special_tokens=False)["input_ids"],
                           tokenizer([t[1] for t in texts], add_special_tokens=False)["input_ids"]):
            prompts[i], responses[i] = p, r
    if plain:
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        strip_eos = _appends_eos(tokenizer)
        for i, p, r in zip(plain, tokenizer([split.examples[i]["prompt"] for i in plain])["input_ids"],
                           tokenizer([split.examples[i]["response"] for i in plain],
                                     add_special_tokens=False)["input_ids"]):
            prompts[i], responses[i] = (p[:-1] if strip_eos else p), r + eos
    columns = {"input_ids": [], "labels": []}
    stats = {"used": 0, "dropped": 0, "truncated": 0, "response_tokens": 0}
    for prompt, response in zip(prompts, responses):
        kept = response[:max(0, max_length - len(prompt))]
        # Position 0 is never predicted: a response that starts the sequence loses its first token.
        scored = len(kept) - (0 if prompt else 1)
        if scored < 1:
            stats["dropped"] += 1
            continue
        stats["truncated"] += len(kept) < len(response)
        stats["used"] += 1
        stats["response_tokens"] += scored
        columns["input_ids"].append(prompt + kept)
        columns["labels"].append([IGNORE] * len(prompt) + kept)
    if not stats["used"]:
        raise DataError(f"{split.source}: no example leaves room for a response token within --max-length "
                        f"{max_length} (the prompt is kept whole): raise --max-length")
    return columns, stats
