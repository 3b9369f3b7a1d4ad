"""TrainConfig: every option of `sftfuse train`, with defaults that run the bundled job on a 2-core CPU.

A config comes from three layers, later ones winning: the dataclass defaults below, a YAML file of
`key: value` pairs, then `key=value` overrides (the CLI's positional arguments and its `--key value` flags).
Each value is parsed from its text by the option's type, never as a YAML scalar first: `output_dir=0777` stays
the string "0777" (YAML 1.1 reads octal 511) and `output_dir=yes` stays "yes" (YAML reads True), in a YAML file as
on the command line. Ints and floats are read as Python reads them (`lr=1e-3`, `max_steps=0777` is 777), booleans
from true/false/yes/no/on/off/1/0, lists from `[a, b]`, `a,b` or a YAML sequence; `null` or `~` unquoted means
None where an option allows None, and a quoted value is always its text. `validate()` then checks every field's
type and range (NaN and inf included), so a typo or an impossible value fails before a model is loaded.

The defaults were chosen by measurement: SmolLM2-135M-Instruct, LoRA r=16 on every linear layer of the frozen
16-bit base, bf16 where the CPU computes it natively, 4 packed rows of 256 tokens per step, lr 1e-3, 80 steps with
half as many replayed base-model answers as task examples (`replay_ratio` 0.5). Chosen from the gain-against-
forgetting front in bench/results/forgetting.md (an NF4 base alone raised the forgetting probe's NLL by 27%).
Measured on a 2-core Xeon with AMX-BF16 (torch 2.13, nothing else running; README has the command): 6 min 1 s wall
for the whole `sftfuse train`; test-split accuracy over the 9 families 6.5% -> 70.4% (+63.9 points, no family
worse), probe NLL -10.6%, answer agreement 92.3%; peak RSS 4.0 GiB.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")  # fp16 is refused by device.resolve_dtype (no loss scaling)
ALIASES = {"data": "train_file"}  # the name a user tries first


@dataclass
class TrainConfig:
    """Options of one SFT run. `None` means "the bundled default" where the comment says so."""

    # -- model and data ---------------------------------------------------------------------------------------
    model: str | None = None  # HF directory, hub id, or .gguf file; None: SmolLM2-135M-Instruct (load_default_model)
    train_file: str | None = None  # None: the bundled train split (data.bundled_path("train")); alias `data`
    validation_file: str | None = None  # None: bundled validation split when train_file is None, else no validation
    test_file: str | None = None  # None: bundled test split when train_file is None, else no task evaluation
    data_format: str | None = None  # alpaca | prompt_completion | messages | text; None: detected
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping on the first one
    max_length: int = 256  # tokens per row (and per packed row)
    packing: bool = True  # best-fit-decreasing packing with per-document attention

    # -- adapters -----------------------------------------------------------------------------------------------
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))  # leaf names of linear layers
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    # issue 19: `mode` is the one switch (train/modes.py); `qlora` is its old form (true: qlora, false: lora)
    mode: str | None = None  # full | lora | qlora | dora; null: lora, or what `qlora` says
    qlora: bool | None = None  # null: follow `mode`; after validate() it is true exactly for mode=qlora
    freeze: list[str] = field(default_factory=list)  # mode=full: parameter/module name patterns kept frozen
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit (bitsandbytes; train/optim.py)
    patch: bool = True  # patch_model: fused loss, LoRA and NF4 linears, gated MLP, RMSNorm and attention
    verify_patch: bool = True  # first batch: patched loss and adapter gradients vs plain PyTorch (train/parity.py)

    # -- optimisation -------------------------------------------------------------------------------------------
    batch_size: int = 4  # rows per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate; null: the mode's (1e-3 for adapters, 5e-5 full; issue 19)
    warmup_steps: int = 6  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_steps: int = 80  # optimizer steps; 0 means "use epochs" (80: replay takes a third of the rows)
    epochs: float = 1.0  # only used when max_steps == 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    max_bad_steps: int = 3  # non-finite (NaN/inf) steps in a row that stop the run; each one is skipped
    dtype: str = "auto"  # auto | bf16 | fp32 ; auto: bf16 where the CPU/GPU computes it natively (fp16 refused)
    gradient_checkpointing: bool = False
    seed: int = 0

    # -- validation, early stopping, checkpoints --------------------------------------------------------------
    eval_interval: int = 20  # steps between validation losses; 0 disables
    max_eval_rows: int = 64  # validation rows (after packing) per evaluation; 0 = all
    patience: int = 3  # evaluations without improvement before stopping; 0 disables early stopping
    checkpoint_interval: int = 20  # steps between checkpoints; 0 disables
    keep_checkpoints: int = 2  # newest checkpoints kept on disk; 0 keeps all

    # -- forgetting probe and task evaluation ---------------------------------------------------------------
    probe: bool = True  # NLL of the base model's own answers to general prompts, before vs after
    probe_file: str | None = None  # JSON list of prompts; None: the bundled probe_prompts.json
    replay_ratio: float = 0.5  # base-model answers to the replay prompts mixed in per training example
    replay_file: str | None = None  # JSON list of replay prompts; None: the bundled replay_prompts.json
    task_eval: bool = True  # accuracy per task family on the test split, before and after
    max_test_rows: int = 0  # 0 = all
    max_new_tokens: int = 48
    gen_batch_size: int = 32

    # -- output ---------------------------------------------------------------------------------------------------
    output_dir: str = "runs/sftfuse"
    log_every: int = 1

    def validate(self) -> TrainConfig:
        """Check every field's type and range; returns self.

        Raises:
            TypeError: a field of the wrong type (a config built in Python without load_config).
            ValueError: a value out of its range, NaN or inf, or an impossible combination; names the option.
        """
        types = field_types()
        for name, tp in types.items():
            _check_type(name, getattr(self, name), tp)
        from sftfuse.train.modes import resolve_config  # issue 19: fills mode, qlora and lr

        resolve_config(self)
        if self.optimizer not in ("adamw", "adamw8bit", "paged_adamw8bit"):
            raise ValueError(f"optimizer={self.optimizer!r}: expected one of adamw, adamw8bit, paged_adamw8bit")
        for name, bounds in BOUNDS.items():
            value = getattr(self, name)
            if not bounds.holds(value):
                finite = "" if math.isfinite(value) else "a finite number "
                raise ValueError(f"{name}={value!r}: must be {finite}{bounds}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("max_steps=0 and epochs=0: nothing to train")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
        from sftfuse.train.data import FORMATS

        if self.data_format is not None and self.data_format not in FORMATS:
            raise ValueError(f"data_format={self.data_format!r}: expected one of {', '.join(FORMATS)}, or null "
                             "to detect it")
        for name, tp in types.items():
            if tp in (str, str | None) and getattr(self, name) == "":
                hint = "; use null for the default" if tp is not str else ""
                raise ValueError(f"{name}='': needs a value{hint}")
        if not self.target_modules or "" in self.target_modules:
            raise ValueError(f"target_modules={self.target_modules!r}: need one or more linear layer names")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"target_modules={self.target_modules!r}: a name is given twice")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Bounds:
    """A closed or half-open interval [lo, hi] of allowed values (NaN is never inside)."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # what a boundary value means, for the error message

    def holds(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        return (v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        lo, hi = (int(x) if float(x).is_integer() else x for x in (self.lo, self.hi))
        text = (f"{'>' if self.lo_open else '>='} {lo}" if math.isinf(self.hi)
                else f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}")
        return f"{text} ({self.note})" if self.note else text


# The range of every int and float option (tests/train/test_config.py checks that none is missing).
BOUNDS: dict[str, Bounds] = {
    "max_length": Bounds(1), "lora_r": Bounds(1), "batch_size": Bounds(1), "grad_accum": Bounds(1),
    "max_new_tokens": Bounds(1), "gen_batch_size": Bounds(1), "log_every": Bounds(1),
    "lora_alpha": Bounds(0, lo_open=True),  # alpha 0 scales the adapter's output to nothing: nothing is learned
    "lora_dropout": Bounds(0, 1, hi_open=True),
    "lr": Bounds(0, lo_open=True),
    "min_lr_ratio": Bounds(0, 1),  # a negative ratio is a negative learning rate: gradient ascent
    "warmup_steps": Bounds(0), "weight_decay": Bounds(0), "max_steps": Bounds(0, note="0: train for `epochs`"),
    "epochs": Bounds(0),
    "grad_clip": Bounds(0, note="0 disables clipping"),  # NaN used to disable it silently
    "seed": Bounds(0, 2**32 - 1),  # what numpy's and every torch generator's seed accept
    "eval_interval": Bounds(0, note="0 disables"), "max_eval_rows": Bounds(0, note="0: all"),
    "patience": Bounds(0, note="0 disables early stopping"), "checkpoint_interval": Bounds(0, note="0 disables"),
    "keep_checkpoints": Bounds(0, note="0 keeps all"),  # -1 used to delete the checkpoint just written
    "replay_ratio": Bounds(0), "max_test_rows": Bounds(0, note="0: all"),
    "max_bad_steps": Bounds(1),
}


def field_types() -> dict[str, object]:
    """{option name: its type annotation}, resolved (`int`, `str | None`, `list[str]`, ...)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _check_type(name: str, value, tp) -> None:
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return
        tp = next(a for a in args if a is not type(None))
    if typing.get_origin(tp) is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise TypeError(f"{name}={value!r}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__}")


# ======================================================================================= parsing values from text
_NULLS = ("~", "null", "Null", "NULL")  # YAML's spellings of null, for the options that allow None
_FLOATS = {".nan": math.nan, ".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf}  # YAML's spellings
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


@dataclass(frozen=True)
class Text:
    """A value as written: its text, and whether it was quoted (a quoted value is always that text)."""

    text: str
    quoted: bool = False


def _parse(name: str, value: Text | list[Text], tp):
    """The value of option `name` (annotation `tp`) from its text, or raise TypeError naming the option."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
    if isinstance(value, list):
        if typing.get_origin(tp) is not list:
            raise TypeError(f"{name}: expected a single value, got a list")
        return [v.text for v in value]
    text = value.text
    if optional and not value.quoted and text in _NULLS:
        return None
    if typing.get_origin(tp) is list:
        return _split_list(text)
    if tp is str:
        return text
    s = text.strip()
    if tp is bool:
        if s.lower() in _BOOLS:
            return _BOOLS[s.lower()]
        raise TypeError(f"{name}={text!r}: expected true or false")
    if tp is int:
        try:
            return int(s)
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            f = math.nan
        if math.isfinite(f) and f.is_integer():  # 1e3, 2.0
            return int(f)
        raise TypeError(f"{name}={text!r}: expected an integer")
    if tp is float:
        try:
            return _FLOATS[s.lower()] if s.lower() in _FLOATS else float(s)  # NaN/inf: refused by validate()
        except ValueError:
            raise TypeError(f"{name}={text!r}: expected a number") from None
    raise TypeError(f"{name}: unsupported field type {tp!r}")


def _split_list(text: str) -> list[str]:
    """'[q_proj, v_proj]' or 'q_proj,v_proj' -> ['q_proj', 'v_proj'] (items keep their text; quotes stripped)."""
    s = text.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    items = [v.strip() for v in s.split(",")]
    return [v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v for v in items if v]


def _key(raw: str) -> str:
    key = raw.strip().lstrip("-").replace("-", "_")
    return ALIASES.get(key, key)


def parse_override(item: str) -> tuple[str, Text]:
    """'lr=1e-3' -> ('lr', Text('1e-3')). Dashes in the key are accepted ('replay-ratio=0.2'); a value in matching
    quotes ('model="null"') is quoted: always that text."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        try:
            node = yaml.compose(raw, Loader=yaml.SafeLoader)  # YAML's quoting rules (escapes in "...")
        except yaml.YAMLError:
            node = None
        if isinstance(node, yaml.ScalarNode):
            return _key(key), Text(node.value, quoted=True)
    return _key(key), Text(raw)


def _node_value(path, key: str, node) -> Text | list[Text]:
    where = f"config file {path}, line {node.start_mark.line + 1}, option {key}"
    if isinstance(node, yaml.ScalarNode):
        return Text(node.value, quoted=node.style is not None)
    if isinstance(node, yaml.SequenceNode) and all(isinstance(n, yaml.ScalarNode) for n in node.value):
        return [Text(n.value, quoted=n.style is not None) for n in node.value]
    raise ValueError(f"{where}: expected a value or a list of values, got a {node.id}")


def read_config_file(path: str | Path) -> tuple[dict[str, Text | list[Text]], dict[str, int]]:
    """({option: value as written}, {option: its line}) from a YAML mapping; every problem is one ValueError line
    naming the file."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"config file {path}: not found") from None
    except OSError as e:
        raise ValueError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes, not values: the text of each scalar survives
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"config file {path}: invalid YAML{at}: {' '.join(problem.split())}") from None
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise ValueError(f"config file {path}: expected a mapping of option: value, got a {root.id}")
    values: dict[str, Text | list[Text]] = {}
    lines: dict[str, int] = {}
    for knode, vnode in root.value:
        if not isinstance(knode, yaml.ScalarNode):
            raise ValueError(f"config file {path}, line {knode.start_mark.line + 1}: an option name must be text")
        key = _key(knode.value)
        if key in values:
            raise ValueError(f"config file {path}, line {knode.start_mark.line + 1}: option {key} is given twice")
        values[key] = _node_value(path, key, vnode)
        lines[key] = knode.start_mark.line + 1
    return values, lines


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build a TrainConfig from defaults, an optional YAML file, then `key=value` overrides.

    Raises:
        ValueError: an unreadable or malformed config file, an unknown key, a malformed override, or an
            out-of-range value; one line naming the file or option.
        TypeError: a value that cannot be converted to the option's type.
    """
    types = field_types()
    values, lines = read_config_file(path) if path is not None else ({}, {})
    origin = {k: f"config file {path}, line {n}" for k, n in lines.items()}  # where a file's value came from
    for item in overrides:
        k, v = parse_override(item)
        values[k] = v
        origin.pop(k, None)
    unknown = sorted(set(values) - set(types))
    if unknown:
        where = "".join(f"{origin[k]}: " for k in unknown[:1] if k in origin)
        raise ValueError(f"{where}unknown option(s) {unknown}; valid options: {sorted(types)}")
    try:
        return TrainConfig(**{k: _parse(k, v, types[k]) for k, v in values.items()}).validate()
    except (TypeError, ValueError) as e:  # messages start with the option's name: add the file and line it came from
        key = str(e).split("=", 1)[0].split(":", 1)[0]
        if key in origin:
            raise type(e)(f"{origin[key]}: {e}") from None
        raise


def check_output_dir(path: str) -> None:
    """Refuse an `output_dir` that cannot become a writable directory: an existing file, a path below a file, or
    a directory (or its nearest existing parent) this process cannot write. Raises ValueError naming it."""
    p = Path(path)
    for q in (p, *p.parents):
        if not q.exists():
            continue
        if not q.is_dir():
            raise ValueError(f"output_dir={path}: {q} is not a directory")
        if not os.access(q, os.W_OK | os.X_OK):
            raise ValueError(f"output_dir={path}: {q} is not writable")
        return
