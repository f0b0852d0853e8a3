"""Evaluation datasets: JSONL lines of {"id"?, "messages", "reference"}, validated line by line up front."""

from __future__ import annotations

import json
from dataclasses import dataclass

from hf2mlflow.runtime.chat_schema import ChatRequestError, parse_request
from hf2mlflow.config import DatasetConfig, load_dataset_config
from hf2mlflow.errors import ConfigError

LINE_KEYS = ("id", "messages", "reference")


@dataclass(frozen=True)
class Example:
    id: str
    messages: list[dict]
    reference: str


def _example(path, number: int, line: str) -> Example:
    where = f"{path}: line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected an object with {', '.join(LINE_KEYS)}, got {type(row).__name__}")
    unknown = sorted(set(row) - set(LINE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(LINE_KEYS)}")
    if "messages" not in row:
        raise ConfigError(f"{where}: 'messages' is missing: a list of {{role, content}} chat messages")
    try:
        messages = parse_request({"messages": row["messages"]}, {"max_new_tokens": 1, "temperature": 0.0,
                                                                 "top_p": 1.0, "top_k": 0}).messages
    except ChatRequestError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if messages[-1]["role"] != "user":
        raise ConfigError(f"{where}: the last message must be the user's question, got role '{messages[-1]['role']}'")
    reference = row.get("reference")
    if not isinstance(reference, str) or not reference.strip():
        raise ConfigError(f"{where}: 'reference' must be a non-empty string (the expected answer), got {reference!r}")
    return Example(str(row.get("id", f"line{number}")), messages, reference)


def load_examples(config: DatasetConfig) -> list[Example]:
    if not config.path.is_file():
        raise ConfigError(f"dataset '{config.name}': key 'path': file not found: {config.path}; give a JSONL file "
                          f"next to the YAML file")
    try:
        text = config.path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"dataset '{config.name}': {config.path} is not UTF-8 text (byte {exc.start})") from None
    examples = [_example(config.path, n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not examples:
        raise ConfigError(f"dataset '{config.name}': {config.path} has no examples; each line is a JSON object "
                          f"with 'messages' and 'reference'")
    ids = [e.id for e in examples]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"dataset '{config.name}': duplicate id(s) {', '.join(duplicates)} in {config.path}")
    return examples


def load_dataset(name_or_path: str) -> tuple[DatasetConfig, list[Example]]:
    config = load_dataset_config(name_or_path)
    return config, load_examples(config)
