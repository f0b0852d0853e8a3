"""Conversion parity: a logged model's greedy tokens and next-token logits against its source Hugging Face
model in PyTorch (float32, CPU), on the same prompt token ids (so tokenization differences do not count)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass
class PromptParity:
    reference_tokens: list[int]
    tokens: list[int]
    logits_max_abs_diff: Optional[float] = None
    # Whether the model's own tokenizer turns the chat prompt into the source tokenizer's ids (the tokens
    # above are compared on the source's ids, so a tokenizer that disagrees shows only here).
    tokenizer_agrees: Optional[bool] = None
    # The served engine's answer to the same ids as one row of a full batch (None: the engine does not batch).
    batch_tokens: Optional[list[int]] = None
    # onnxruntime-genai's answer over the same files (None: not compared).
    genai_tokens: Optional[list[int]] = None

    @property
    def identical(self) -> bool:
        """The reference's tokens, alone and, where the engine batches, as a row of a batch."""
        return self.first_divergence is None and self.batch_tokens in (None, self.reference_tokens)

    @property
    def first_divergence(self) -> Optional[int]:
        """Index of the first new token that differs (a shorter sequence differs where it ends); None if equal."""
        for i, (a, b) in enumerate(zip(self.reference_tokens, self.tokens)):
            if a != b:
                return i
        if len(self.reference_tokens) != len(self.tokens):
            return min(len(self.reference_tokens), len(self.tokens))
        return None

    @property
    def matched_share(self) -> float:
        """Share of the reference's tokens produced before the first divergence."""
        first = self.first_divergence
        return 1.0 if first is None else first / max(len(self.reference_tokens), 1)


def without_eos(tokens: list[int], eos_ids) -> list[int]:
    """New tokens up to the first end-of-sequence token, which is left out: one runtime returns it and another
    does not, and it is no part of the answer."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i]
    return tokens


def _eos_ids(value) -> set[int]:
    return set(value if isinstance(value, list) else [] if value is None else [value])


class TorchModel:
    """A causal LM in PyTorch: the source model (reference) or a logged transformers model."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer

    @classmethod
    def from_folder(cls, path: Path, trust_remote_code: bool = False) -> "TorchModel":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer)

    @property
    def runtime(self) -> dict:
        """What its logits depend on besides the weights and the ids: the libraries, and the dtype and attention
        implementation the loaded model runs with."""
        return {"torch": version("torch"), "transformers": version("transformers"), "dtype": str(self.model.dtype),
                "attn_implementation": self.model.config._attn_implementation}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def prompt_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    @property
    def eos_ids(self) -> set[int]:
        return _eos_ids(self.model.generation_config.eos_token_id) | _eos_ids(self.tokenizer.eos_token_id)

    @property
    def bos_id(self):
        """The id the tokenizer puts before every text it encodes with special tokens (Gemma's <bos>), or None
        where it puts none (SmolLM2)."""
        bos = self.tokenizer.bos_token_id
        ids = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return bos if bos is not None and ids and ids[0] == bos else None

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids], device=self.model.device), max_new_tokens=max_new_tokens,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                device=self.model.device),
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id or 0)
        return without_eos(out[0, len(ids):].tolist(), self.eos_ids)

    def _logits(self, ids: list[int]):
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([ids], device=self.model.device)).logits[0]

    def next_logits(self, ids: list[int]) -> np.ndarray:
        return self._logits(ids)[-1].float().cpu().numpy()  # one row: a long prompt's [n, vocab] stays in torch

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids`, [len(ids), vocab] (hf2mlflow.quality)."""
        return self._logits(ids).float().cpu().numpy()


def genai_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy answer to prompt `ids`: the new tokens, EOS included when it came."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


class GenAIModel:
    """An onnxruntime-genai model folder (the ONNX artifacts of a logged pyfunc)."""

    engine_name = "onnxruntime-genai"

    def __init__(self, path: Path):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(path))
        self._tokenizer = None
        self.eos_ids = _eos_ids(json.loads((path / "genai_config.json").read_text())["model"]["eos_token_id"])

    @property
    def tokenizer(self):
        """onnxruntime-genai's tokenizer, loaded when first used: teacher-forced logits need only token ids."""
        if self._tokenizer is None:
            self._tokenizer = self.og.Tokenizer(self.model)
        return self._tokenizer

    def _generator(self, ids: list[int], max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return generator

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return without_eos(genai_greedy(self.model, ids, max_new_tokens), self.eos_ids)

    def next_logits(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self._generator(ids, len(ids) + 1).get_logits(), dtype=np.float32).reshape(-1)

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids`, [len(ids), vocab]: the prompt pass's own output (hf2mlflow.quality)."""
        logits = np.asarray(self._generator(ids, len(ids) + 1).get_output("logits"), dtype=np.float32)
        return logits.reshape(len(ids), -1)


class ServedModel:
    """A CPU builder model folder as the logged pyfunc serves it (runtime/slot_chat.py): the chat template and
    tokenizer it renders with, the decoder graph as it runs it, and the scheduler that batches rows. Its greedy
    answers and logits are the served engine's; `greedy_together` decodes prompts as rows of one batch."""

    engine_name = "the served engine"

    def __init__(self, engine):
        self.engine = engine
        self.eos_ids = engine.eos_ids
        self.max_batch = engine.scheduler.limits.max_batch

    @classmethod
    def from_folder(cls, path: Path, session_options: Optional[dict] = None, max_batch: int = 8) -> "ServedModel":
        from hf2mlflow.builder_graph import long_rope_threshold
        from hf2mlflow.runtime.batching import BatchLimits
        from hf2mlflow.runtime.slot_chat import SlotChatEngine

        return cls(SlotChatEngine(Path(path), Path(path).name, BatchLimits(max_batch=max_batch),
                                  session_options or {}, long_rope_threshold(Path(path))))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat prompt's ids as the served model renders and tokenizes it."""
        return self.engine.tokenizer.encode_chat(messages)

    def decode(self, ids: list[int]) -> str:
        """Text as the served model streams it: its incremental decoder, token by token."""
        decode = self.engine.tokenizer.text_decoder()
        return "".join(decode(int(i)) for i in ids)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return self.greedy_together([ids], max_new_tokens)[0]

    def greedy_together(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers to `prompts`, up to max_batch of them queued at once so that they start in one step and
        decode as rows of one batch."""
        from hf2mlflow.runtime.sampling import greedy

        answers = []
        for start in range(0, len(prompts), self.max_batch):
            streams = self.engine.scheduler.generate_together(
                [(list(ids), max_new_tokens, greedy) for ids in prompts[start:start + self.max_batch]])
            answers += [without_eos(list(stream), self.eos_ids) for stream in streams]
        return answers

    def next_logits(self, ids: list[int]) -> np.ndarray:
        return self.all_logits(ids)[-1]

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids`, [len(ids), vocab]: the served prefill (hf2mlflow.quality)."""
        return np.asarray(self.engine.decoder.all_logits([int(i) for i in ids]), dtype=np.float32)


class OptimumModel:
    """An optimum ONNX export (the ONNX artifacts of a logged optimum pyfunc), decoded as the pyfunc decodes it."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        from hf2mlflow.runtime.ort_chat import eos_token_ids, load_ort_model

        self.model = load_ort_model(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        from hf2mlflow.runtime.ort_chat import generate_tokens
        from hf2mlflow.runtime.sampling import greedy

        tokens = []
        for token in generate_tokens(self.model, ids, len(ids) + max_new_tokens, greedy):
            if token in self.eos_ids:
                break
            tokens.append(token)
        return tokens

    def next_logits(self, ids: list[int]) -> np.ndarray:
        from hf2mlflow.runtime.ort_chat import next_token_logits

        return next_token_logits(self.model, ids)

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids`, [len(ids), vocab], from one pass without a cache
        (hf2mlflow.quality)."""
        import torch

        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long),
                         attention_mask=torch.ones((1, len(ids)), dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()


def _tokenizer_agrees(reference: TorchModel, candidate, messages: list[dict]) -> bool:
    if hasattr(candidate, "prompt_ids"):  # it renders the chat template itself, as it serves
        return candidate.prompt_ids(messages) == reference.prompt_ids(messages)
    text = reference.prompt_text(messages)
    return candidate.encode(text) == reference.encode(text)


def compare(reference: TorchModel, candidate, prompts: list[list[dict]], max_new_tokens: int,
            with_logits: bool, genai: Optional[GenAIModel] = None) -> list[PromptParity]:
    """Greedy answers to each prompt's ids (the source tokenizer's): the reference's, the candidate's alone and,
    where the candidate batches (ServedModel), as rows of full batches; with `genai`, onnxruntime-genai's over
    the same files too."""
    all_ids = [reference.prompt_ids(messages) for messages in prompts]
    together = (candidate.greedy_together(all_ids, max_new_tokens) if hasattr(candidate, "greedy_together")
                else [None] * len(all_ids))
    results = []
    for messages, ids, batch_tokens in zip(prompts, all_ids, together):
        result = PromptParity(reference.greedy(ids, max_new_tokens), candidate.greedy(ids, max_new_tokens),
                              tokenizer_agrees=_tokenizer_agrees(reference, candidate, messages),
                              batch_tokens=batch_tokens,
                              genai_tokens=genai.greedy(ids, max_new_tokens) if genai else None)
        if with_logits:
            result.logits_max_abs_diff = float(np.max(np.abs(reference.next_logits(ids) - candidate.next_logits(ids))))
        results.append(result)
    return results


def summarize(results: list[PromptParity]) -> dict:
    divergences = [r.first_divergence for r in results]
    summary = {
        # alone and, where the engine batches, in a batch: what the gate's min_parity_identical_rate reads
        "parity_identical_rate": sum(r.identical for r in results) / len(results),
        "parity_identical_rate_alone": sum(d is None for d in divergences) / len(results),
        "parity_matched_share": float(np.mean([r.matched_share for r in results])),
        "parity_first_divergence_min": float(min((d for d in divergences if d is not None), default=-1)),
        "tokenizer_agreement_rate": sum(bool(r.tokenizer_agrees) for r in results) / len(results),
    }
    if all(r.batch_tokens is not None for r in results):
        summary["parity_identical_rate_batched"] = (sum(r.batch_tokens == r.reference_tokens for r in results)
                                                    / len(results))
        summary["batch_equals_alone_rate"] = sum(r.batch_tokens == r.tokens for r in results) / len(results)
    if all(r.genai_tokens is not None for r in results):
        summary["genai_agreement_rate"] = sum(r.genai_tokens == r.tokens for r in results) / len(results)
    logits = [r.logits_max_abs_diff for r in results if r.logits_max_abs_diff is not None]
    if logits:
        summary["parity_logits_max_abs_diff"] = float(max(logits))
    return summary
