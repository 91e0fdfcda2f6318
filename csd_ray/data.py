"""Prompt datasets: built-in arithmetic, jsonl/json/parquet files, hub datasets.

Prompts are tokenized once on the driver (with the chat template unless disabled); prompts
longer than ``max_prompt_tokens`` are dropped and counted, never silently.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from csd_ray.config import DataConfig


class DataError(ValueError):
    """A dataset could not be read; the message names the file, line or field."""


@dataclass
class Example:
    prompt: Any
    """Prompt text, or a list of chat messages."""
    response: Optional[str] = None
    """Reference response (supervised KD source, evaluation)."""
    answer: Optional[str] = None
    """Exact answer for accuracy."""
    where: str = ""
    """Where the row came from ('file:line', 'file row n'), for error messages."""


@dataclass
class EncodedExample:
    index: int
    prompt_ids: list[int]
    response_ids: Optional[list[int]]
    answer: Optional[str]
    prompt_text: str


@dataclass
class PromptSet:
    train: list[EncodedExample]
    eval: list[EncodedExample]
    dropped_too_long: int = 0
    stats: dict = field(default_factory=dict)


def arithmetic_examples(n: int, seed: int) -> list[Example]:
    """Two-operand questions with exact answers: offline, deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op = rng.choice(["+", "-", "*"])
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(1, 99), rng.randint(1, 99))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append(Example(prompt=f"What is {a} {op} {b}? Answer with the number.", response=f"{a} {op} {b} = {value}.",
                           answer=str(value), where=f"arithmetic[{len(out)}]"))
    return out


def _records_from_file(path: Path) -> list[tuple[str, dict]]:
    """(where, record) pairs; where is 'file:line' for jsonl."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                records.append((f"{path}:{number}", record))
        return records
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of objects (or {{'data': [...]}}), got {type(data).__name__}")
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for broken files
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        return [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]
    raise DataError(f"{path}: unsupported data file type '{suffix}' (expected .jsonl, .json or .parquet)")


def _records_from_hub(name: str, split: str) -> list[tuple[str, dict]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(
            f"could not load hub dataset '{name}' (split '{split}'): {str(exc).splitlines()[0]} -- offline machines "
            "need a local .jsonl/.json/.parquet file"
        ) from None
    return [(f"{name}[{split}] row {i}", r) for i, r in enumerate(ds)]


def parse_answer(text: Optional[str]) -> Optional[str]:
    """GSM8K's '... #### 42' -> '42'; plain answers pass through."""
    if text is None:
        return None
    text = str(text)
    if "####" in text:
        text = text.split("####")[-1]
    return text.strip().replace(",", "")


def read_examples(cfg: DataConfig) -> list[Example]:
    if cfg.source == "arithmetic":
        return arithmetic_examples(cfg.num_examples, seed=12345)
    path = Path(cfg.source).expanduser()
    looks_local = cfg.source.endswith((".jsonl", ".json", ".parquet")) or path.exists()
    records = _records_from_file(path) if looks_local else _records_from_hub(cfg.source, cfg.split)
    examples = []
    for where, record in records:
        if cfg.prompt_field not in record:
            raise DataError(f"{where}: no field '{cfg.prompt_field}' (data.prompt_field); fields: {', '.join(record)}")
        for name in (cfg.response_field, cfg.answer_field):
            if name and name not in record:
                raise DataError(f"{where}: no field '{name}'; fields: {', '.join(record)}")
        response = record[cfg.response_field] if cfg.response_field else None
        answer = parse_answer(record[cfg.answer_field]) if cfg.answer_field else None
        prompt = record[cfg.prompt_field]
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
            # A conversation that ends with the answer: the answer is the reference response,
            # never prompt text (it would be followed by a fresh assistant header).
            response = prompt[-1].get("content") if response is None else response
            prompt = prompt[:-1]
        _check_prompt(prompt, where, cfg.prompt_field)
        examples.append(Example(prompt=prompt, response=response, answer=answer, where=where))
    if not examples:
        raise DataError(f"{cfg.source}: the dataset is empty")
    return examples


def _check_prompt(prompt: Any, where: str, field_name: str) -> None:
    """Refuse prompts a model cannot be asked: empty text, or messages with no user content."""
    if isinstance(prompt, list):
        bad = [i for i, m in enumerate(prompt) if not isinstance(m, dict) or "role" not in m or "content" not in m]
        if bad:
            raise DataError(f"{where}: chat message {bad[0]} of '{field_name}' needs 'role' and 'content' keys")
        if not any(str(m["content"]).strip() for m in prompt):
            raise DataError(f"{where}: '{field_name}' has no non-empty message to prompt with")
    elif prompt is None or not str(prompt).strip():
        raise DataError(f"{where}: '{field_name}' is empty; every row needs a prompt")


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer itself puts before any text (a BOS for Llama/Gemma; [] for Qwen/SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def encode_prompt(prompt: Any, tokenizer, chat_template: bool = True) -> tuple[list[int], str]:
    """Token ids and text of a prompt (text or chat messages), with the chat template when asked and present.

    The ids start exactly as the tokenizer starts a text (its BOS, if it adds one), once: a chat
    template that writes the BOS itself does not get a second one."""
    if isinstance(prompt, list):  # chat messages
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    elif chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": str(prompt)}], tokenize=False, add_generation_prompt=True)
    else:
        text = str(prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = special_prefix(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids, text


def load_prompts(cfg: DataConfig, tokenizer, seed: int = 0, end_id: Optional[int] = None) -> PromptSet:
    """Tokenize, drop (and count) over-long prompts, split off a held-out set (shuffled by
    ``cfg.split_seed``, else ``seed``).

    Reference responses end with ``end_id`` (the id that closes an assistant turn, from the
    generation contract; default the tokenizer's eos)."""
    examples = read_examples(cfg)
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    encoded, dropped = [], 0
    for i, ex in enumerate(examples):
        ids, text = encode_prompt(ex.prompt, tokenizer, cfg.chat_template)
        if len(ids) > cfg.max_prompt_tokens:
            dropped += 1
            continue
        response_ids = None
        if ex.response is not None:
            response_ids = tokenizer(str(ex.response), add_special_tokens=False)["input_ids"] + [end_id]
        encoded.append(EncodedExample(i, ids, response_ids, ex.answer, text))
    if not encoded:
        raise DataError(
            f"{cfg.source}: all {len(examples)} prompts are longer than data.max_prompt_tokens={cfg.max_prompt_tokens}"
        )
    rng = random.Random(seed if cfg.split_seed is None else cfg.split_seed)
    rng.shuffle(encoded)
    n_eval = min(cfg.eval_size, len(encoded) - 1)
    return PromptSet(
        train=encoded[n_eval:],
        eval=encoded[:n_eval],
        dropped_too_long=dropped,
        stats={"examples": len(examples), "kept": len(encoded), "dropped_too_long": dropped},
    )


class PromptStream:
    """Endless shuffled batches over the training prompts; its position is checkpointable."""

    def __init__(self, examples: list[EncodedExample], seed: int) -> None:
        self.examples, self.seed = examples, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[EncodedExample]:
        batch = []
        while len(batch) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.examples[self._order[self.cursor]])
            self.cursor += 1
        return batch

    def peek(self, n: int) -> list[EncodedExample]:
        """The next ``n`` examples ``next_batch`` would return, without moving the stream."""
        state = self.state()
        try:
            return self.next_batch(n)
        finally:
            self.load_state(state)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._shuffled(self.epoch)


ANSWER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> Optional[str]:
    """The last number in a generated answer (GSM8K convention), commas removed."""
    if "####" in text:
        text = text.split("####")[-1]
    found = ANSWER_RE.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None
