"""A model folder's tokenizer and chat template, as transformers applies them, without transformers: the
Hugging Face `tokenizers` library reads tokenizer.json, and Jinja renders the chat template in a sandbox with
the same settings and helpers transformers gives it. The prompt's ids are those of
`AutoTokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`.
Pure Python over tokenizers and jinja2: it ships with the logged pyfunc model.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Callable

from hf2mlflow.runtime.chat_schema import ChatRequestError


def _template_source(model_dir: Path, config: dict) -> str:
    separate = model_dir / "chat_template.jinja"
    if separate.is_file():
        return separate.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one chats
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise ValueError(f"{model_dir}: no chat template (chat_template.jinja, or chat_template in "
                         f"tokenizer_config.json), so the model cannot chat")
    return template


def _special_tokens(config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... as the template sees them (tokenizer_config.json may give {"content": ...})."""
    tokens = {}
    for key, value in config.items():
        if key.endswith("_token"):
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[key] = value
    return tokens


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


class ChatTokenizer:
    def __init__(self, model_dir: Path):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, \
            sort_keys=False: json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                        sort_keys=sort_keys)
        environment.globals.update(raise_exception=_raise_exception,
                                   strftime_now=lambda format: datetime.now().strftime(format))
        self.template = environment.from_string(_template_source(model_dir, config))
        self.special_tokens = _special_tokens(config)

    def render(self, messages: list[dict]) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except TemplateError as exc:  # the template refuses this conversation (say, roles out of turn)
            raise ChatRequestError(f"the model's chat template refuses these messages: {exc}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template writes the special tokens itself, as transformers' apply_chat_template assumes.
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Raw text as `tokenizer(text)` encodes it (with the special tokens tokenizer.json adds, if any)."""
        return self.tokenizer.encode(text).ids

    def text_decoder(self) -> Callable[[int], str]:
        """A fresh incremental decoder; special tokens are left out of the text."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        return lambda token: stream.step(self.tokenizer, token) or ""
