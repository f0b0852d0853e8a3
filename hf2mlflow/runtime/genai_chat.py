"""Chat completions over an onnxruntime-genai model folder: the engine inside the pyfunc model.

No torch, no transformers: the prompt comes from the model's own chat template through
onnxruntime-genai's tokenizer, and text is decoded incrementally as tokens arrive. Concurrent generations
run together in right-padded `Generator` batches (batching.BatchScheduler); `og.Engine` gives the same
tokens but batches at most 4 sequences on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Hashable, Iterator, Optional

from hf2mlflow.runtime.batching import BatchLimits, BatchScheduler, Sequence
from hf2mlflow.runtime.chat_engine import ChatEngine
from hf2mlflow.runtime.chat_schema import ChatRequest


def open_model(model_dir: Path, session_options: Optional[dict] = None):
    """`og.Model` of the folder, its decoder's session options overlaid with `session_options` (the target's
    `session_options`: intra_op_num_threads, allow_spinning; unset ones keep genai_config.json's)."""
    import onnxruntime_genai as og

    overlay = genai_session_options(session_options or {})
    if not overlay:
        return og.Model(str(model_dir))
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": overlay}}}))
    return og.Model(config)


def genai_session_options(settings: dict) -> dict:
    """The target's session options as genai_config.json spells them (other keys become session config
    entries there, so spinning is onnxruntime's own key)."""
    out = {}
    if settings.get("intra_op_num_threads") is not None:
        out["intra_op_num_threads"] = int(settings["intra_op_num_threads"])
    if settings.get("allow_spinning") is not None:
        out["session.intra_op.allow_spinning"] = "1" if settings["allow_spinning"] else "0"
    return out


class GenAIChatEngine(ChatEngine):
    def __init__(self, model_dir: Path, model_name: str, limits: BatchLimits = BatchLimits(),
                 batch_invariant: bool = True, session_options: Optional[dict] = None):
        import numpy as np
        import onnxruntime_genai as og

        self._np, self._og = np, og
        self.model_name = model_name
        self.model = open_model(model_dir, session_options)
        self.tokenizer = og.Tokenizer(self.model)
        config = json.loads((Path(model_dir) / "genai_config.json").read_text())
        self.context_length = int(config["model"]["context_length"])
        self.eos_ids = {int(i) for i in self.tokenizer.eos_token_ids}
        self.pad_id = int(config["model"].get("pad_token_id", 0))
        # onnxruntime's int4/int8 CPU kernels (accuracy_level 4) round one row differently from several
        # rows, which agree with each other; decoding a lone sequence beside a copy of itself keeps every
        # answer the same under any load.
        self.batch_invariant = batch_invariant
        self.scheduler = BatchScheduler(self._run_batch, limits, self.context_length, name=f"batching {model_name}")

    @staticmethod
    def _group(request: ChatRequest, seed: Optional[int]) -> Hashable:
        if not request.do_sample:
            return ("greedy",)
        if seed is None:
            return ("sample", request.temperature, request.top_p, request.top_k)
        return None  # one random stream per seed: alone

    def _encode(self, messages: list[dict]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(i) for i in self.tokenizer.encode(prompt)]

    def _tokens(self, prompt_ids: list[int], request: ChatRequest, seed: int | None, max_length: int) -> Iterator[int]:
        options = {"do_sample": request.do_sample}
        if request.do_sample:
            options.update(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
            if seed is not None:
                options["random_seed"] = seed
        group = self._group(request, seed)
        return self.scheduler.generate(prompt_ids, max_length - len(prompt_ids), group, options)

    def _run_batch(self, batch: list[Sequence]) -> None:
        """Generate every sequence of `batch` in one right-padded Generator batch, routing each row's tokens to
        its sequence until it ends or is no longer wanted. onnxruntime-genai masks the pad tokens at the end
        of each row (and only there, as it does for a lone prompt), so rows of any length keep their answers."""
        rows = [s.prompt_ids for s in batch]
        if len(batch) == 1 and self.batch_invariant and batch[0].group is not None and \
                self.scheduler.limits.max_batch > 1:
            rows = rows * 2
        width = max(len(r) for r in rows)
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(batch_size=len(rows), max_length=width + max(s.max_new_tokens for s in batch),
                                  **batch[0].options)
        generator = self._og.Generator(self.model, params)
        if len(rows) == 1:
            generator.append_tokens(rows[0])
        else:
            generator.append_tokens(self._np.array([r + [self.pad_id] * (width - len(r)) for r in rows],
                                                   dtype=self._np.int32))
        produced = [0] * len(batch)
        active = set(range(len(batch)))
        while active and not generator.is_done():
            generator.generate_next_token()
            tokens = generator.get_next_tokens()
            for row in sorted(active):
                sequence = batch[row]
                if sequence.cancelled:
                    active.discard(row)
                    continue
                token = int(tokens[row])
                sequence.emit(token)
                produced[row] += 1
                if token in self.eos_ids or produced[row] >= sequence.max_new_tokens:
                    active.discard(row)

    def _text_decoder(self) -> Callable[[int], str]:
        return self.tokenizer.create_stream().decode
