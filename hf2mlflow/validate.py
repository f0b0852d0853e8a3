"""Check a converted model the way a user will use it: load, chat template, generate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

VALIDATION_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True)
class ValidationResult:
    prompt: str
    prompt_tokens: int
    tokenizer_matches_transformers: bool
    new_tokens: list[int]
    text: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def validate_genai_model(model_dir: Path, max_new_tokens: int = 8) -> ValidationResult:
    """Greedy-generate a few tokens from a chat prompt made with the tokenizer's own chat template."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    start = time.perf_counter()
    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not hf_tokenizer.chat_template:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template, so the model cannot chat")
    prompt = hf_tokenizer.apply_chat_template(VALIDATION_MESSAGES, add_generation_prompt=True, tokenize=False)
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    ids = [int(i) for i in tokenizer.encode(prompt)]
    if not ids:
        raise ValueError(f"{model_dir}: onnxruntime-genai's tokenizer encoded the prompt to no tokens")
    reference = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    new_tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        new_tokens.append(int(generator.get_next_tokens()[0]))
    if not new_tokens:
        raise ValueError(f"{model_dir}: the model generated no tokens")
    return ValidationResult(prompt, len(ids), reference == ids, new_tokens, tokenizer.decode(new_tokens),
                            time.perf_counter() - start)
