"""`sftfuse chat`: talk to a tuned model in its chat template, with the answer streamed as it is generated.

The model is an adapter directory (merged in memory the way `sftfuse merge` merges it, without the fidelity
measurement), a merged model directory (`sftfuse merge`'s output or any HF model directory), a .gguf file
(`sftfuse export-gguf`'s output), or, with no path, the default base model. Three ways to use it:

- interactive (default): a conversation; `/reset` forgets it, `/exit`, Ctrl-D or Ctrl-C at the prompt ends it, and
  Ctrl-C during an answer stops that answer;
- `--prompt TEXT`: one answer, streamed to stdout;
- `--file PROMPTS.jsonl`: one JSON object per line, `{"prompt": "..."}` or `{"messages": [...]}` (a JSON string
  alone is a prompt too); every line is checked before the first answer, and each answer is one JSONL line on
  stdout, `{"prompt" or "messages": ..., "answer": "..."}`.

Decoding is greedy unless `--temperature` > 0 (then sampled, top-p 0.95).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sftfuse.train import adapter as ad


def load_chat_model(path: str | None, *, base_model: str | None = None):
    """(model, tokenizer) for `path` (module docstring), fp32 and in eval mode.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is neither an adapter directory, a model directory nor a .gguf file.
    """
    from sftfuse.train.models import load_model_and_tokenizer

    if path is None:
        model, tok = load_model_and_tokenizer(base_model, dtype=torch.float32)
        return model.eval(), tok
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory (expected an adapter directory, a merged model "
                                "directory or a .gguf file)")
    if p.is_dir() and (p / ad.ADAPTER_CONFIG).exists():
        from sftfuse.train.merge import merge

        merged = merge(p, base_model=base_model, fidelity_rows=0)
        return merged.model, merged.tok
    if p.is_dir() and (p / "config.json").exists() or p.suffix == ".gguf" and p.is_file():
        if base_model is not None:
            raise ValueError(f"--model {base_model}: only an adapter directory takes a base model; {p} is a model")
        model, tok = load_model_and_tokenizer(str(p), dtype=torch.float32)
        return model.eval(), tok
    raise ValueError(f"{p}: not an adapter directory ({ad.ADAPTER_CONFIG}), a model directory (config.json) or a "
                     ".gguf file")


def read_prompts(path: str | Path) -> list[tuple[str, object]]:
    """(key, value) per line of a prompts JSONL file: ("prompt", text) or ("messages", [...]).

    Raises:
        ValueError: a line that is not one of those, naming the file and line.
    """
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:line {n}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if isinstance(rec, str):
                rec = {"prompt": rec}
            if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                out.append(("prompt", rec["prompt"]))
            elif isinstance(rec, dict) and _is_messages(rec.get("messages")):
                out.append(("messages", rec["messages"]))
            else:
                raise ValueError(f"{where}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [{{\"role\": ..., "
                                 "\"content\": ...}}, ...]}}")
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _is_messages(m) -> bool:
    return isinstance(m, list) and bool(m) and all(
        isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str) for x in m)


@torch.no_grad()
def answer(model, tok, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
           stream=None) -> str:
    """The model's reply to `messages` in its chat template; `stream`: a file the tokens are written to as they
    come (None: not streamed)."""
    from sftfuse.train.evaluation import render_prompt

    ids = tok(render_prompt(tok, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    streamer = _streamer(tok, stream) if stream is not None else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sample = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else \
        {"do_sample": False}
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id, streamer=streamer, **sample)
    except KeyboardInterrupt:
        if streamer is None:
            raise
        streamer.end()
        return streamer.text
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _streamer(tok, out):
    """A TextStreamer writing the answer's text to `out` as it comes, and keeping it (`.text`)."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.text += text
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _Streamer(tok, skip_prompt=True, skip_special_tokens=True)


def run_chat(args) -> int:
    """The `sftfuse chat` command (cli.py parses `args`)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature}: expected >= 0")
    if args.prompt is not None and args.file is not None:
        raise ValueError("--prompt and --file: give one of them")
    prompts = read_prompts(args.file) if args.file is not None else None  # checked before the model loads
    model, tok = load_chat_model(args.path, base_model=args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    kw = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.prompt is not None:
        answer(model, tok, [*system, {"role": "user", "content": args.prompt}], stream=sys.stdout, **kw)
        return 0
    if prompts is not None:
        for key, value in prompts:
            messages = [*system, {"role": "user", "content": value}] if key == "prompt" else value
            text = answer(model, tok, messages, **kw)
            print(json.dumps({key: value, "answer": text}, ensure_ascii=False), flush=True)
        return 0
    return _interactive(model, tok, system, kw)


def _interactive(model, tok, system: list[dict], kw: dict) -> int:
    print("sftfuse chat: /reset forgets the conversation, /exit or Ctrl-D ends it.", file=sys.stderr)
    history = list(system)
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = list(system)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("model> ")
        reply = answer(model, tok, history, stream=sys.stdout, **kw)
        history.append({"role": "assistant", "content": reply.strip()})
