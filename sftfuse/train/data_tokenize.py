"""Tokenizing normalized rows with prompt masking (re-exported by sftfuse.train.data), and the prompt a row's
evaluation generates from, tokenized the same way.

Labels are -100 on every token the model should not learn to produce: the prompt, and for chats everything
outside assistant turns. A chat is rendered once with the tokenizer's chat template; each assistant turn's
character span is found by rendering the conversation up to it (with the generation prompt) and up to its end,
which works for any template that renders a conversation as a prefix of a longer one; templates that rewrite
earlier turns (e.g. dropping reasoning) fall back to locating the turn's text. Token labels then follow from the
fast tokenizer's character offsets. Responses end with EOS (the chat template's end-of-turn token where it is EOS).

Special-token text in a message (a user pasting `<|im_end|>`) is text, not a control token: the template's own
markup is tokenized with its special tokens, the content of such a message with special tokens split. Its place
in the rendered chat is found by rendering the chat with a unique marker for each content, then checking that
putting the contents back gives the real rendering; a template that rewrites such a message is an error of the
row. Prompt/completion and text rows are the user's own rendering, so their special-token text stays special.

A row the tokenizer cannot take (the template refuses the conversation, an assistant turn not found) raises
`DataError`; `tokenize_rowset` names its file and line, or skips and counts it.
"""

from __future__ import annotations

import re

from jinja2.exceptions import TemplateError

from sftfuse.train.data_io import FORMATS, DataError

_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template or tokenizer gives them meaning


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to (not including) the answer to be generated."""
    if "messages" in row:
        msgs = list(row["messages"])
        while msgs and msgs[-1].get("role") == "assistant":
            msgs.pop()
        return msgs
    if "prompt" in row:
        return [{"role": "user", "content": row["prompt"]}]
    if "instruction" in row:
        text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": text}]
    raise ValueError(f"row has no messages/prompt/instruction: keys {sorted(row)}")


def special_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the text of any of the tokenizer's special tokens (longest first), or None."""
    texts = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    texts |= set(getattr(tokenizer, "all_special_tokens", ()))
    texts = sorted((t for t in texts if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def _render(tokenizer, messages: list[dict], **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except TemplateError as e:
        raise DataError(f"the chat template refused this conversation ({e})") from None


def _plain_spans(messages: list[dict], tokenizer, full: str, pattern, **kw) -> list[tuple[int, int]]:
    """Character spans of `full` holding message contents with special-token text (to be tokenized as text)."""
    hits = [pattern.search(m["content"]) if pattern is not None else None for m in messages]
    if not any(hits):
        return []
    marked = _render(tokenizer, [{**m, "content": f"\ue000{j}\ue001"} for j, m in enumerate(messages)], **kw)
    for strip in (False, True):  # templates that trim contents (Llama 3's) put back the trimmed text
        pieces, spans, pos, n = [], [], 0, 0
        for mt in _MARK.finditer(marked):
            j = int(mt.group(1))
            content = messages[j]["content"] if j < len(messages) else mt.group()
            content = content.strip() if strip else content
            pieces += [marked[pos:mt.start()], content]
            n += mt.start() - pos
            if j < len(messages) and hits[j]:
                spans.append((n, n + len(content)))
            n += len(content)
            pos = mt.end()
        if "".join(pieces) + marked[pos:] == full:
            return spans
    j = next(j for j, h in enumerate(hits) if h)
    raise DataError(f"message {j + 1} holds special-token text {hits[j].group()!r} and the chat template rewrites "
                    f"messages, so it cannot be kept as plain text")


def _encode(tokenizer, text: str, plain: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`, the `plain` spans tokenized with special tokens split."""
    if not plain:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])
    cuts, pos = [], 0
    for a, b in plain:
        cuts += [(pos, a, False), (a, b, True)]
        pos = b
    cuts.append((pos, len(text), False))
    ids, offsets = [], []
    for a, b, split in cuts:
        if a < b:
            enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True,
                            split_special_tokens=split)
            ids += enc["input_ids"]
            offsets += [(x + a, y + a) for x, y in enc["offset_mapping"]]
    return ids, offsets


def _chat_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans [start, end) of its assistant turns (end-of-turn included)."""
    full = _render(tokenizer, messages)
    render = tokenizer.apply_chat_template
    eos = tokenizer.eos_token or ""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = upto = None
        if i:  # a chat opening with an assistant turn has no prefix to render: use the fallback
            try:
                before = render(messages[:i], tokenize=False, add_generation_prompt=True)
                upto = render(messages[: i + 1], tokenize=False)
            except Exception:  # noqa: BLE001  (a template may refuse a partial chat)
                before = upto = None
        if before is not None and full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
            k = full.rfind(eos, start, end) if eos else -1
            if k >= 0:  # stop after the end-of-turn token: trailing newlines belong to the template
                end = k + len(eos)
        else:  # the template rewrites earlier turns: locate the turn's text itself
            start = full.find(m["content"], cursor)
            if start < 0:
                raise DataError(f"assistant message {i + 1} not found in the rendered chat template")
            end = start + len(m["content"])
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def _chat_labels(row: dict, ids: list[int], offsets, spans, eos_id) -> tuple[list[int], list[int]]:
    """Labels of a rendered chat from token offsets: a token is trained when it starts inside an assistant span."""
    labels = [-100] * len(ids)
    si = 0
    for t, (a, b) in enumerate(offsets):
        while si < len(spans) and a >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= a < spans[si][1] and b > a:
            labels[t] = ids[t]
    trained = [t for t, lab in enumerate(labels) if lab != -100]
    if row["messages"][-1]["role"] == "assistant" and eos_id is not None and trained \
            and ids[trained[-1]] != eos_id:  # a template that does not end turns with EOS
        ids.append(eos_id)
        labels.append(eos_id)
    return ids, labels


def _batch(tokenizer, texts: list[str], **kw) -> dict[str, list]:
    """`tokenizer(texts, **kw)` in chunks: one call per chunk instead of per text is what makes 50k rows fast."""
    out = {"input_ids": [], "offset_mapping": []}
    for s in range(0, len(texts), 2048):
        enc = tokenizer(texts[s:s + 2048], return_attention_mask=False, return_token_type_ids=False, **kw)
        for k in out:
            out[k] += enc.get(k, [])
    return out


def _tokenize_many(rows: list[dict], tokenizer, pattern) -> list:
    """(ids, labels) per row, or the row's DataError. Texts are tokenized in batches, chats rendered one by one."""
    eos_id = tokenizer.eos_token_id
    out: list = [None] * len(rows)
    kinds: dict[str, list[int]] = {"messages": [], "text": [], "prompt": []}
    for i, r in enumerate(rows):
        kinds["messages" if "messages" in r else "text" if "text" in r else "prompt"].append(i)
    texts = _batch(tokenizer, [rows[i]["text"] for i in kinds["text"]])["input_ids"]
    for i, ids in zip(kinds["text"], texts, strict=True):
        ids = list(ids) + ([eos_id] if eos_id is not None and (not ids or ids[-1] != eos_id) else [])
        out[i] = (ids, list(ids))
    prompts = _batch(tokenizer, [rows[i]["prompt"] for i in kinds["prompt"]])["input_ids"]
    resps = _batch(tokenizer, [rows[i]["completion"] for i in kinds["prompt"]], add_special_tokens=False)["input_ids"]
    for i, prompt, resp in zip(kinds["prompt"], prompts, resps, strict=True):
        if eos_id is not None and prompt and prompt[-1] == eos_id:  # tokenizers that append EOS to every text
            prompt = prompt[:-1]
        resp = list(resp) + ([eos_id] if eos_id is not None else [])
        out[i] = (list(prompt) + resp, [-100] * len(prompt) + resp)
    plain_chats = []  # (row index, rendered chat, assistant spans) of chats without special-token text
    for i in kinds["messages"]:
        try:
            full, spans = _chat_spans(rows[i]["messages"], tokenizer)
            plain = _plain_spans(rows[i]["messages"], tokenizer, full, pattern)
        except DataError as e:
            out[i] = e
            continue
        if plain:
            out[i] = _chat_labels(rows[i], *_encode(tokenizer, full, plain), spans, eos_id)
        else:
            plain_chats.append((i, full, spans))
    enc = _batch(tokenizer, [c[1] for c in plain_chats], add_special_tokens=False, return_offsets_mapping=True)
    for (i, _, spans), ids, offsets in zip(plain_chats, enc["input_ids"], enc["offset_mapping"], strict=True):
        out[i] = _chat_labels(rows[i], list(ids), offsets, spans, eos_id)
    return out


def _prompt_text_ids(prompt: str, tokenizer) -> list[int]:
    ids = list(tokenizer(prompt)["input_ids"])
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids.pop()  # tokenizers that append EOS to every text
    return ids


def prompt_ids(row: dict, tokenizer) -> list[int]:
    """Token ids of the prompt a normalized `row` is evaluated on, made the way training tokenized the row: a chat
    through the template with the generation prompt, a prompt/completion row's raw prompt (no template)."""
    if "prompt" in row and "messages" not in row:
        return _prompt_text_ids(row["prompt"], tokenizer)
    msgs = prompt_messages(row)
    full = _render(tokenizer, msgs, add_generation_prompt=True)
    return _encode(tokenizer, full, _plain_spans(msgs, tokenizer, full, special_pattern(tokenizer),
                                                 add_generation_prompt=True))[0]


def _check_args(rows: list[dict], tokenizer, max_length: int, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {FORMATS}")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: expected >= 2")
    if any("messages" in r for r in rows) and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template: chat rows need one (or use prompt/completion rows)")


def _example(ids: list[int], labels: list[int], max_length: int) -> dict:
    n = len(ids)
    first_resp = next((t for t, lab in enumerate(labels) if lab != -100), None)
    lost = sum(lab != -100 for lab in labels[max_length:])
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": n > max_length,
            "n_response_lost": lost, "prompt_cut": first_resp is not None and first_resp >= max_length,
            "length": n}


def tokenize_rows(rows: list[dict], tokenizer, *, max_length: int, fmt: str) -> list[dict]:
    """Tokenize normalized rows with prompt masking, EOS on responses and truncation to `max_length`.

    Returns one dict per row: "input_ids" and "labels" (lists of length <= max_length, labels -100 on prompt /
    non-assistant tokens), "truncated", "n_response_lost" (response tokens cut off), "prompt_cut" (the cut fell
    before the first response token) and "length" (tokens before truncation).

    Raises:
        DataError: for a row the tokenizer cannot take, naming its index ("row N"); `tokenize_rowset` names the
            file and line.
    """
    _check_args(rows, tokenizer, max_length, fmt)
    out = []
    for i, got in enumerate(_tokenize_many(rows, tokenizer, special_pattern(tokenizer))):
        if isinstance(got, DataError):
            raise DataError(f"row {i + 1}: {got}")
        out.append(_example(*got, max_length))
    return out


def tokenize_rowset(rowset, tokenizer, *, max_length: int, skip_bad_rows: bool = False) -> list[dict]:
    """`tokenize_rows` on a RowSet: a row the tokenizer cannot take raises DataError with its file and line, or
    with `skip_bad_rows` is dropped from `rowset` and counted there, so rows and examples stay aligned."""
    try:
        _check_args(rowset.rows, tokenizer, max_length, rowset.fmt)
    except DataError as e:
        raise DataError(f"{rowset.path}: {e}") from None
    out, kept = [], []
    for i, got in enumerate(_tokenize_many(rowset.rows, tokenizer, special_pattern(tokenizer))):
        if isinstance(got, DataError):
            rowset.bad_row(f"{rowset.where(i)}: {got}", skip=skip_bad_rows)
        else:
            out.append(_example(*got, max_length))
            kept.append(i)
    if len(kept) < len(rowset.rows):
        rowset.keep(kept)
    return out
