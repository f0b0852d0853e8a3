"""Check a converted model the way a user will use it: load, chat template, generate."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from hf2mlflow.errors import StepError

VALIDATION_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
WHERE = "the converted model"  # the folder is scratch space, gone when the step ends


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


class ValidationError(StepError):
    """The converted model does not behave as its source does: the step fails rather than log it."""


# Texts whose ids both runtimes must turn back into the same text: spaces (byte-level), digits, accents,
# CJK, emoji, tabs and blank lines.
DECODE_PROBES = (" Paris is nice", "3.14159 and 1,000 apples", "Ünïcødé — “quotes” 日本語 🙂",
                 "don't\n\n  indented\tdone")


@dataclass(frozen=True)
class ValidationResult:
    prompt: str
    prompt_tokens: int
    tokenizer_matches_transformers: bool
    new_tokens: list[int]
    text: str
    seconds: float
    # fp32 targets: the source model's greedy tokens in PyTorch on the same prompt ids (asserted equal).
    reference_tokens: Optional[list[int]] = None
    engine: str = "onnxruntime-genai"  # the engine the logged model serves with, which was validated
    batch_rows: int = 1  # rows of the batch whose answers were checked against their lone answers
    # The served engine's greedy answer equals onnxruntime-genai's over the same files (None: not the served engine)
    genai_agrees: Optional[bool] = None

    def to_dict(self) -> dict:
        return asdict(self)


def fp32_logits_tolerance(reference) -> float:
    """What float32 rounding explains between two implementations of the same graph: measured differences of
    correct conversions here are 1e-6 to 4e-5 (logits up to about 30)."""
    return 1e-3 + 1e-4 * float(np.max(np.abs(reference)))


def check_prompt_ids(ids: list[int], reference: list[int], vocab_size: int, decode, where: str,
                     engine: str = "onnxruntime-genai") -> None:
    """Fail, naming the first offending token, when `engine`'s ids for the prompt fall outside the vocabulary or
    differ from transformers'."""
    outside = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size]
    if outside:
        position, token = outside[0]
        raise ValidationError(f"{where}: {engine}'s tokenizer gives id {token} at position {position} "
                              f"of the validation chat prompt, outside the vocabulary (0..{vocab_size - 1}); "
                              f"{len(outside)} of {len(ids)} ids are outside. Its tokenizer files are not ones "
                              f"{engine} reads as transformers does")
    if ids != reference:
        raise ValidationError(f"{where}: {engine}'s tokenizer disagrees with transformers' on the "
                              f"validation chat prompt: "
                              f"{first_difference(reference, ids, decode, 'transformers', engine)}")


def first_difference(expected: list[int], got: list[int], decode, expected_name: str, got_name: str) -> str:
    """Where two token sequences part, with the tokens' text, in words."""
    for i, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            return (f"first differing token at position {i}: {expected_name} {a} ({decode([a])!r}), "
                    f"{got_name} {b} ({decode([b])!r})")
    longer, name = (expected, expected_name) if len(expected) > len(got) else (got, got_name)
    i = min(len(expected), len(got))
    return (f"the sequences agree for {i} tokens, then only {name} goes on: "
            f"{longer[i]} ({decode([longer[i]])!r}); lengths {len(expected)} and {len(got)}")


def _cannot_load(engine: str, exc: Exception) -> ValidationError:
    return ValidationError(f"{engine} cannot load the model the builder wrote ({exc}). For an int8 output layer "
                           f"(precision int8, or matmul_mixed_precision last_matmul:int8) on a model with tied "
                           f"embeddings, set builder_options.shared_embeddings: false in the target; otherwise try "
                           f"another precision or -P exporter=optimum")


def _open_genai(model_dir: Path):
    from hf2mlflow.parity import GenAIModel

    try:
        return GenAIModel(model_dir)
    except RuntimeError as exc:
        raise _cannot_load("onnxruntime-genai", exc) from None


def builder_candidate(model_dir: Path, execution_provider: str = "cpu", session_options: Optional[dict] = None):
    """The builder's model as the logged pyfunc serves it: on CPU the served engine (parity.ServedModel: our
    template rendering, tokenizer, decode loop and batching), on GPUs onnxruntime-genai (parity.GenAIModel)."""
    if execution_provider != "cpu":
        return _open_genai(model_dir)
    from hf2mlflow.parity import ServedModel

    try:
        return ServedModel.from_folder(model_dir, session_options)
    except Exception as exc:  # the tokenizer, the template or the graph: any of them stops serving
        raise _cannot_load("the served engine (onnxruntime)", exc) from None


def validate_genai_model(model_dir: Path, max_new_tokens: int = 16, source_dir: Optional[Path] = None,
                         compare_greedy: bool = False, candidate=None) -> ValidationResult:
    """Greedy-generate from a chat prompt made with the tokenizer's own chat template, through `candidate`
    (default: builder_candidate, the engine the pyfunc serves with on CPU). Fails (ValidationError) when the model
    cannot load, when the engine turns the chat prompt into other ids than transformers' tokenizer and template
    of `source_dir` (default: the model folder's) or gives ids outside the vocabulary, when it decodes ids to
    other text, and, with `compare_greedy` (fp32), when its greedy answer or next-token logits differ from the
    source model's in PyTorch. The served engine also answers the prompt as one row of a full batch, which must
    give its lone answer, and beside onnxruntime-genai over the same files: a difference fails fp32 and is
    reported for other precisions (`genai_agrees`)."""
    from transformers import AutoTokenizer

    from hf2mlflow.parity import ServedModel

    start = time.perf_counter()
    hf_tokenizer = AutoTokenizer.from_pretrained(source_dir or model_dir)
    if not hf_tokenizer.chat_template:
        raise ValueError(f"{source_dir or model_dir}: the tokenizer has no chat template, so the model cannot chat")
    prompt = hf_tokenizer.apply_chat_template(VALIDATION_MESSAGES, add_generation_prompt=True, tokenize=False)
    candidate = candidate or builder_candidate(model_dir)
    engine = candidate.engine_name
    served = isinstance(candidate, ServedModel)
    reference = list(hf_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    decode = hf_tokenizer.decode
    if served:
        ids = candidate.prompt_ids(VALIDATION_MESSAGES)  # its own template rendering, as it serves
    else:
        ids = _genai_prompt_ids(candidate, model_dir, prompt)
    if not ids:
        raise ValidationError(f"{WHERE}: {engine}'s tokenizer encoded the prompt to no tokens")
    genai = json.loads((model_dir / "genai_config.json").read_text())["model"]
    check_prompt_ids(ids, reference, int(genai["vocab_size"]), decode, WHERE, engine)
    for text in DECODE_PROBES:
        probe = list(hf_tokenizer(text, add_special_tokens=False)["input_ids"])
        theirs, ours = hf_tokenizer.decode(probe, skip_special_tokens=True), candidate.decode(probe)
        if theirs != ours:
            raise ValidationError(f"{WHERE}: {engine} decodes the ids of {text!r} as {ours!r}, "
                                  f"transformers as {theirs!r}")
    # End of sequence left out: an answer that ends at once is empty, and right where PyTorch's is too.
    new_tokens = candidate.greedy(ids, max_new_tokens)
    batch_rows, genai_agrees = 1, None
    if served:
        batch_rows = _check_batch(candidate, ids, new_tokens, max_new_tokens, decode)
        genai_tokens = _open_genai(model_dir).greedy(ids, max_new_tokens)
        genai_agrees = genai_tokens == new_tokens
        if compare_greedy and not genai_agrees:
            raise ValidationError(
                f"{WHERE}: the served engine's fp32 greedy answer differs from onnxruntime-genai's over the same "
                f"files: {first_difference(genai_tokens, new_tokens, decode, 'onnxruntime-genai', engine)}")
    reference_tokens = None
    if compare_greedy:
        from hf2mlflow.parity import TorchModel

        torch_model = TorchModel.from_folder(source_dir or model_dir)
        reference_tokens = torch_model.greedy(ids, max_new_tokens)
        if new_tokens != reference_tokens:
            raise ValidationError(
                f"{WHERE}: the fp32 ONNX model's greedy answer through {engine} differs from PyTorch's on the same "
                f"prompt ids: {first_difference(reference_tokens, new_tokens, decode, 'PyTorch', 'ONNX')} "
                f"(PyTorch: {decode(reference_tokens)!r}, ONNX: {decode(new_tokens)!r})")
        # Equal greedy tokens can hide a wrong graph (a small model's logits are close together or far apart
        # by chance); fp32 logits agree to float rounding when the graph computes what PyTorch does.
        expected, got = torch_model.next_logits(ids), candidate.next_logits(ids)
        diff, allowed = float(np.max(np.abs(expected - got))), fp32_logits_tolerance(expected)
        if not diff <= allowed:  # NaN fails too
            worst = int(np.nanargmax(np.abs(expected - got))) if np.isfinite(got).any() else 0
            raise ValidationError(
                f"{WHERE}: the fp32 ONNX model's next-token logits differ from PyTorch's by up to {diff:.3g} "
                f"through {engine} (allowed {allowed:.3g}; worst at token {worst} ({decode([worst])!r}): PyTorch "
                f"{expected[worst]:.4f}, ONNX {got[worst]:.4f}). The ONNX graph does not compute what the "
                f"model's config.json asks of PyTorch; check settings the builder may not support "
                f"(rope_scaling, sliding_window, biases)")
    return ValidationResult(prompt, len(ids), True, new_tokens, decode(new_tokens, skip_special_tokens=True),
                            time.perf_counter() - start, reference_tokens, engine, batch_rows, genai_agrees)


def _genai_prompt_ids(candidate, model_dir: Path, prompt: str) -> list[int]:
    try:
        tokenizer = candidate.tokenizer
    except RuntimeError as exc:
        tokenizer_json = model_dir / "tokenizer.json"
        kind = (json.loads(tokenizer_json.read_text()).get("model", {}).get("type", "?")
                if tokenizer_json.is_file() else "none")
        raise ValidationError(f"onnxruntime-genai's tokenizer cannot read the tokenizer the builder copied "
                              f"(tokenizer.json, a {kind} model: {exc}), so the model cannot be served with "
                              f"onnxruntime-genai. Convert with -P exporter=optimum (onnxruntime with the "
                              f"transformers tokenizer), or give the model a tokenizer.json that "
                              f"onnxruntime-extensions reads (BPE)") from None
    return [int(i) for i in tokenizer.encode(prompt)]


# The other rows of the validation batch: prompts of other lengths, so rows hold different positions.
BATCH_MESSAGES = [[{"role": "user", "content": text}] for text in (
    "Hi", "Name three primary colours.", "Translate 'good morning' into French, please.", "What is 12 times 12?",
    "Write one sentence about the sea, the wind and the long grey coast in winter.", "Why is the sky blue?",
    "List the planets of the solar system in order from the sun.")]


def _check_batch(candidate, ids: list[int], lone: list[int], max_new_tokens: int, decode) -> int:
    """The validation prompt as one row of a full batch of the served engine: every row's answer must be its lone
    answer (a row never changes another's). Returns the number of rows."""
    prompts = [ids] + [candidate.prompt_ids(m) for m in BATCH_MESSAGES][:candidate.max_batch - 1]
    together = candidate.greedy_together(prompts, max_new_tokens)
    for row, (prompt, answer) in enumerate(zip(prompts, together)):
        alone = lone if row == 0 else candidate.greedy(prompt, max_new_tokens)
        if answer != alone:
            raise ValidationError(
                f"{WHERE}: the served engine's greedy answer to prompt {row} of a batch of {len(prompts)} differs "
                f"from its answer alone: {first_difference(alone, answer, decode, 'alone', 'in the batch')}")
    return len(prompts)


def validate_optimum_model(model_dir: Path, source_dir: Path, max_new_tokens: int = 8) -> ValidationResult:
    """The same check for an optimum export, run as the pyfunc runs it (onnxruntime through optimum's
    ORTModelForCausalLM, on the CPU). Its tokenizer is a copy of the source model's; the step fails when the
    copy encodes the prompt otherwise than the source tokenizer does."""
    from transformers import AutoTokenizer

    from hf2mlflow.runtime.ort_chat import eos_token_ids, generate_tokens, load_ort_model
    from hf2mlflow.runtime.sampling import greedy

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template, so the model cannot chat")
    prompt = tokenizer.apply_chat_template(VALIDATION_MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"{model_dir}: the tokenizer encoded the prompt to no tokens")
    reference = list(AutoTokenizer.from_pretrained(source_dir)(prompt, add_special_tokens=False)["input_ids"])
    model = load_ort_model(model_dir)
    eos = eos_token_ids(model, tokenizer)
    new_tokens: list[int] = []
    for token in generate_tokens(model, ids, len(ids) + max_new_tokens, greedy):
        new_tokens.append(token)
        if token in eos:
            break
    check_prompt_ids(ids, reference, int(model.config.vocab_size), tokenizer.decode, str(model_dir))
    return ValidationResult(prompt, len(ids), True, new_tokens,
                            tokenizer.decode(new_tokens, skip_special_tokens=True), time.perf_counter() - start)


def check_quality(candidate, source_dir: Path, floor, trust_remote_code: bool = False, reference=None) -> dict:
    """Teacher-forced quality of `candidate` (parity.ServedModel, GenAIModel or OptimumModel) against the source
    model in PyTorch float32 on the first tokens of the held-out text (hf2mlflow/quality.py); ValidationError, with
    the figures, when it falls below the target's quality floor."""
    from hf2mlflow.parity import TorchModel
    from hf2mlflow.quality import SLICE_TOKENS, SLICE_WINDOW, floor_problems, held_out_ids, logits_cache, \
        teacher_forced

    reference = reference or TorchModel.from_folder(source_dir, trust_remote_code)
    ids = held_out_ids(reference, SLICE_TOKENS)
    summary = teacher_forced(reference, candidate, ids, SLICE_WINDOW,
                             cache=logits_cache(source_dir, reference), bos=reference.bos_id)
    problems = floor_problems(summary, floor.max_mean_kld, floor.min_top1_agreement)
    if problems:
        raise ValidationError(
            f"{WHERE} is below the target's quality_floor: {'; '.join(problems)} (teacher-forced against the "
            f"source model in PyTorch float32 on {summary['positions']} positions of the held-out text; "
            f"perplexity {summary['perplexity']:.2f} against the source's {summary['reference_perplexity']:.2f}). "
            f"Use a recipe that keeps more precision (an 8-bit output layer, a larger precision_budget, a smaller "
            f"block), or lower the floor in the target file")
    return summary
