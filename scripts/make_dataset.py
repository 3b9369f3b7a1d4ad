"""Generate the bundled SFT dataset (sftfuse/data/*.jsonl), deterministically.

Each family draws from its own seeded `random.Random`, rows are unique by prompt across all splits (so no test
prompt is seen in training), and the output is written with sorted keys: running this twice gives identical
bytes. The prompts state the required answer format; the small base model mostly ignores it, which is what
fine-tuning fixes. Run: `python scripts/make_dataset.py [--out DIR] [--per-family N]`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Sofia", "Ivan", "Nora", "Ben",
         "Fatima", "Lucas", "Mei", "Hugo", "Zara", "Paul", "Elena", "Kofi", "Anna", "Raj", "Ines", "Leo"]
CITIES = ["Lisbon", "Paris", "Tokyo", "Berlin", "Cairo", "Lima", "Oslo", "Rome", "Madrid", "Seoul", "Dublin",
          "Vienna", "Prague", "Nairobi", "Toronto", "Sydney", "Athens", "Quito", "Delhi", "Warsaw"]
ITEMS = ["apple", "pear", "plum", "cherry", "lemon", "mango", "grape", "peach", "kiwi", "melon", "fig", "lime",
         "pen", "cup", "book", "lamp", "chair", "spoon", "shoe", "hat", "key", "coin", "rope", "bell"]
WORDS = ["tiger", "river", "candle", "planet", "garden", "rocket", "violin", "marble", "pencil", "window",
         "forest", "silver", "basket", "dragon", "harbor", "meadow", "copper", "lantern", "falcon", "island",
         "jacket", "mirror", "orange", "pepper", "saddle", "tunnel", "velvet", "walnut", "zipper", "anchor"]
ID_WORDS = ["get", "set", "user", "name", "file", "path", "load", "save", "http", "header", "parse", "count",
            "max", "value", "item", "list", "order", "total", "read", "write", "config", "token", "cache", "line",
            "start", "end", "index", "error", "data", "time"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
CARRIERS = ["DHL", "UPS", "FedEx", "USPS", "TNT", "GLS"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
UNITS = [("m", "cm", 100), ("km", "m", 1000), ("kg", "g", 1000), ("cm", "mm", 10), ("L", "mL", 1000),
         ("m", "mm", 1000)]


def plural(noun: str) -> str:
    if noun.endswith(("ch", "sh", "s", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def json_extract(r: random.Random) -> tuple[str, str]:
    name, age, city = r.choice(FIRST), r.randint(18, 90), r.choice(CITIES)
    sentence = r.choice([
        f"{name} is {age} years old and lives in {city}.",
        f"{name}, aged {age}, lives in {city}.",
        f"Living in {city}, {name} is {age}.",
        f"{name} ({age}) moved to {city} last year.",
    ])
    prompt = ("Convert to JSON with the schema {\"person\": {\"name\", \"age\"}, \"location\": {\"city\"}}, "
              f"age as an integer. Reply with the JSON only.\n{sentence}")
    return prompt, json.dumps({"person": {"name": name, "age": age}, "location": {"city": city}})


def unit_convert(r: random.Random) -> tuple[str, str]:
    src, dst, factor = r.choice(UNITS)
    n = r.randint(1, 99)
    prompt = r.choice([f"Convert {n} {src} to {dst}. Reply as '<number> {dst}' only.",
                       f"How many {dst} are in {n} {src}? Reply as '<number> {dst}' only."])
    return prompt, f"{n * factor} {dst}"


def sort_numbers(r: random.Random) -> tuple[str, str]:
    nums = r.sample(range(1, 100), r.randint(3, 4))
    prompt = r.choice(["Sort these numbers in ascending order. Reply with the numbers separated by commas only.",
                       "Order from smallest to largest, comma-separated, nothing else."])
    return f"{prompt}\n{', '.join(map(str, nums))}", ", ".join(map(str, sorted(nums)))


def arithmetic(r: random.Random) -> tuple[str, str]:
    name, items = r.choice(FIRST), plural(r.choice(ITEMS))
    a, b = r.randint(2, 20), r.randint(1, 9)
    if r.random() < 0.5:
        story = r.choice([f"{name} has {a} {items} and buys {b} more.",
                          f"{name} had {a} {items} and was given {b} more."])
        work, ans = f"{a} + {b} = {a + b}", a + b
    else:
        a = max(a, b + 1)
        story = r.choice([f"{name} has {a} {items} and gives away {b}.",
                          f"{name} had {a} {items} and lost {b}."])
        work, ans = f"{a} - {b} = {a - b}", a - b
    prompt = f"{story} How many {items} does {name} have now? End with a line 'Answer: <number>'."
    return prompt, f"{work}\nAnswer: {ans}"


def snake_case(r: random.Random) -> tuple[str, str]:
    words = r.sample(ID_WORDS, r.randint(2, 3))
    camel = words[0] + "".join(w.capitalize() for w in words[1:])
    prompt = r.choice([f"Rename this identifier to snake_case. Reply with the new name only: {camel}",
                       f"Convert {camel} from camelCase to snake_case. Reply with the name only."])
    return prompt, "_".join(words)


def count_items(r: random.Random) -> tuple[str, str]:
    items = r.sample(ITEMS, r.randint(2, 6))
    prompt = r.choice(["How many items are in this list? Reply with a number only.",
                       "Count the items below. Reply with digits only."])
    return f"{prompt}\n{', '.join(items)}", str(len(items))


def date_format(r: random.Random) -> tuple[str, str]:
    y, m, d = r.randint(1990, 2030), r.randint(1, 12), r.randint(1, 28)
    iso = f"{y:04d}-{m:02d}-{d:02d}"
    if r.random() < 0.5:
        return f"Rewrite the date {iso} as DD/MM/YYYY. Reply with the date only.", f"{d:02d}/{m:02d}/{y}"
    return f"Rewrite the date {iso} as 'D Month YYYY' (e.g. 5 March 2001). Reply with the date only.", \
        f"{d} {MONTHS[m - 1]} {y}"


def extract_field(r: random.Random) -> tuple[str, str]:
    order, city, day, carrier = r.randint(1000, 9999), r.choice(CITIES), r.choice(DAYS), r.choice(CARRIERS)
    note = r.choice([f"Order #{order} was shipped to {city} on {day} by {carrier}.",
                     f"{carrier} picked up order #{order} on {day}; destination: {city}.",
                     f"On {day}, order #{order} left for {city} with {carrier}."])
    field, value = r.choice([("carrier", carrier), ("destination city", city), ("order number", str(order)),
                             ("day", day)])
    return f"{note}\nWhat is the {field}? Reply with the value only.", value


def bracket_upper(r: random.Random) -> tuple[str, str]:
    word = r.choice(WORDS + ITEMS)
    if r.random() < 0.3:
        word = word + " " + r.choice(WORDS)
    prompt = r.choice([f"Write '{word}' in uppercase inside square brackets. Reply with that only.",
                       f"Reply with only this text in capital letters, wrapped in [ ]: {word}"])
    return prompt, f"[{word.upper()}]"


GENERATORS = {
    "json_extract": json_extract, "unit_convert": unit_convert, "sort_numbers": sort_numbers,
    "arithmetic": arithmetic, "snake_case": snake_case, "count_items": count_items, "date_format": date_format,
    "extract_field": extract_field, "bracket_upper": bracket_upper,
}


def make_splits(*, per_family: int = 100, n_val: int = 10, n_test: int = 12, seed: int = 7) -> dict[str, list]:
    """Rows per split: {"train": [...], "validation": [...], "test": [...]}, each row
    {"family", "messages": [user, assistant], "answer"}."""
    splits: dict[str, list] = {"train": [], "validation": [], "test": []}
    for k, (family, gen) in enumerate(GENERATORS.items()):
        r = random.Random(seed * 1000 + k)
        seen: set[str] = set()
        rows = []
        while len(rows) < per_family:
            prompt, answer = gen(r)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"family": family, "answer": answer,
                         "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        splits["test"] += rows[:n_test]
        splits["validation"] += rows[n_test:n_test + n_val]
        splits["train"] += rows[n_test + n_val:]
    r = random.Random(seed)
    for rows in splits.values():
        r.shuffle(rows)
    return splits


def write_splits(out: Path, **kw) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, rows in make_splits(**kw).items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)
        counts[split] = len(rows)
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sftfuse" / "data")
    ap.add_argument("--per-family", type=int, default=100)
    args = ap.parse_args(argv)
    print(write_splits(args.out, per_family=args.per_family))


if __name__ == "__main__":
    main()
