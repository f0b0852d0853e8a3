"""Chat completions over an onnxruntime-genai model folder: the engine inside the pyfunc model.

No torch, no transformers: the prompt comes from the model's own chat template through
onnxruntime-genai's tokenizer, and text is decoded incrementally as tokens arrive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from hf2mlflow.chat_engine import ChatEngine
from hf2mlflow.chat_schema import ChatRequest


class GenAIChatEngine(ChatEngine):
    def __init__(self, model_dir: Path, model_name: str):
        import onnxruntime_genai as og

        self._og = og
        self.model_name = model_name
        self.model = og.Model(str(model_dir))
        self.tokenizer = og.Tokenizer(self.model)
        config = json.loads((Path(model_dir) / "genai_config.json").read_text())
        self.context_length = int(config["model"]["context_length"])
        self.eos_ids = {int(i) for i in self.tokenizer.eos_token_ids}

    def _encode(self, messages: list[dict]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(i) for i in self.tokenizer.encode(prompt)]

    def _tokens(self, prompt_ids: list[int], request: ChatRequest, seed: int | None, max_length: int) -> Iterator[int]:
        params = self._og.GeneratorParams(self.model)
        options = {"max_length": max_length, "do_sample": request.do_sample}
        if request.do_sample:
            options.update(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
            if seed is not None:
                options["random_seed"] = seed
        params.set_search_options(**options)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def _text_decoder(self) -> Callable[[int], str]:
        return self.tokenizer.create_stream().decode
