"""Chat completions over an onnxruntime-genai model folder through onnxruntime-genai itself: the engine inside the
pyfunc model for GPU targets.

No torch, no transformers: the prompt comes from the model's own chat template through
onnxruntime-genai's tokenizer, and text is decoded incrementally as tokens arrive. Concurrent generations
run one at a time.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

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
    """For GPU targets (cuda, dml, webgpu), where the KV cache lives on the device: onnxruntime-genai generates
    one sequence at a time (its Generator cannot take rows while it runs). CPU targets use slot_chat."""

    def __init__(self, model_dir: Path, model_name: str, session_options: Optional[dict] = None):
        import onnxruntime_genai as og

        self._og = og
        self.model_name = model_name
        self.model = open_model(model_dir, session_options)
        self.tokenizer = og.Tokenizer(self.model)
        config = json.loads((Path(model_dir) / "genai_config.json").read_text())
        self.context_length = int(config["model"]["context_length"])
        self.eos_ids = {int(i) for i in self.tokenizer.eos_token_ids}
        self._one_at_a_time = threading.Lock()

    def _encode(self, messages: list[dict]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return self._encode_prompt(prompt)

    def _encode_prompt(self, prompt: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(prompt)]

    def _tokens(self, prompt_ids: list[int], request: ChatRequest, seed: int | None, max_length: int) -> Iterator[int]:
        options = {"do_sample": request.do_sample, "max_length": max_length}
        if request.do_sample:
            options.update(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
            if seed is not None:
                options["random_seed"] = seed
        with self._one_at_a_time:
            params = self._og.GeneratorParams(self.model)
            params.set_search_options(**options)
            generator = self._og.Generator(self.model, params)
            generator.append_tokens(prompt_ids)
            while not generator.is_done():
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])

    def _text_decoder(self) -> Callable[[int], str]:
        return self.tokenizer.create_stream().decode
