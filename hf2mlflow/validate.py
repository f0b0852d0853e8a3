"""Check a converted model the way a user will use it: load, chat template, generate."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

VALIDATION_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def check_genai_files(model_dir: Path, execution_provider: str) -> None:
    """Without running it: genai_config.json names this provider, and the graph has the inputs,
    outputs and per-layer KV cache that genai_config.json promises."""
    import onnx

    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    providers = [name for opts in decoder.get("session_options", {}).get("provider_options", []) for name in opts]
    if execution_provider != "cpu" and execution_provider not in providers:
        raise ValueError(f"{model_dir}/genai_config.json: provider_options name {providers or 'no provider'}, "
                         f"expected '{execution_provider}'")
    graph = onnx.load(str(model_dir / decoder["filename"]), load_external_data=False).graph
    have = {v.name for v in graph.input} | {v.name for v in graph.output}
    layers = range(decoder["num_hidden_layers"])
    wanted = [decoder["inputs"]["input_ids"], decoder["outputs"]["logits"]]
    for key in ("past_key_names", "past_value_names"):
        wanted += [decoder["inputs"][key] % i for i in layers]
    for key in ("present_key_names", "present_value_names"):
        wanted += [decoder["outputs"][key] % i for i in layers]
    missing = [name for name in wanted if name not in have]
    if missing:
        raise ValueError(f"{model_dir}/{decoder['filename']}: graph lacks {', '.join(missing[:6])} "
                         f"that genai_config.json names")


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


def validate_optimum_model(model_dir: Path, source_dir: Path, max_new_tokens: int = 8) -> ValidationResult:
    """The same check for an optimum export, run as the pyfunc runs it (onnxruntime through optimum's
    ORTModelForCausalLM, on the CPU). Its tokenizer is a copy of the source model's, so
    `tokenizer_matches_transformers` says whether the copy encodes the prompt as the source tokenizer does."""
    from transformers import AutoTokenizer

    from hf2mlflow.ort_chat import eos_token_ids, generate_tokens, greedy, load_ort_model

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template, so the model cannot chat")
    prompt = tokenizer.apply_chat_template(VALIDATION_MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{model_dir}: the tokenizer encoded the prompt to no tokens")
    reference = AutoTokenizer.from_pretrained(source_dir)(prompt, add_special_tokens=False)["input_ids"]
    model = load_ort_model(model_dir)
    eos = eos_token_ids(model, tokenizer)
    new_tokens: list[int] = []
    for token in generate_tokens(model, ids, len(ids) + max_new_tokens, greedy):
        new_tokens.append(token)
        if token in eos:
            break
    return ValidationResult(prompt, len(ids), reference == ids, new_tokens,
                            tokenizer.decode(new_tokens, skip_special_tokens=True), time.perf_counter() - start)
