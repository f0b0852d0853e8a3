"""Chat completions over an onnxruntime-genai model folder: the engine inside the pyfunc model.

No torch, no transformers: the prompt comes from the model's own chat template through
onnxruntime-genai's tokenizer, and text is decoded incrementally as tokens arrive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from hf2mlflow.chat_schema import ChatRequest, ChatRequestError, ChatResponse, Completion, chunk


class GenAIChatEngine:
    def __init__(self, model_dir: Path, model_name: str):
        import onnxruntime_genai as og

        self._og = og
        self.model_name = model_name
        self.model = og.Model(str(model_dir))
        self.tokenizer = og.Tokenizer(self.model)
        config = json.loads((Path(model_dir) / "genai_config.json").read_text())
        self.context_length = int(config["model"]["context_length"])
        self.eos_ids = {int(i) for i in self.tokenizer.eos_token_ids}

    def encode_chat(self, messages: list[dict]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        ids = [int(i) for i in self.tokenizer.encode(prompt)]
        if len(ids) >= self.context_length:
            raise ChatRequestError(f"the prompt is {len(ids)} tokens; this model's context length is "
                                   f"{self.context_length}, which must also leave room for the answer")
        return ids

    def _deltas(self, prompt_ids: list[int], request: ChatRequest, seed_offset: int, done: Completion) -> Iterator[str]:
        """Yield text as it is decoded; fill `done` with the finish reason and token count."""
        params = self._og.GeneratorParams(self.model)
        options = {"max_length": min(len(prompt_ids) + request.max_tokens, self.context_length),
                   "do_sample": request.do_sample}
        if request.do_sample:
            options.update(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
            if request.seed is not None:
                options["random_seed"] = request.seed + seed_offset
        params.set_search_options(**options)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)
        stream = self.tokenizer.create_stream()
        pending = ""  # decoded text held back while it could be the start of a stop string
        hold = max((len(s) for s in request.stop), default=1) - 1
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            done.completion_tokens += 1
            if token in self.eos_ids:
                done.finish_reason = "stop"
                break
            pending += stream.decode(token)
            cut = min((i for i in (pending.find(s) for s in request.stop) if i >= 0), default=-1)
            if cut >= 0:
                done.finish_reason = "stop"
                if pending[:cut]:
                    yield pending[:cut]
                return
            if len(pending) > hold:
                yield pending[:len(pending) - hold]
                pending = pending[len(pending) - hold:]
        if pending:
            yield pending

    def chat(self, request: ChatRequest) -> dict:
        prompt_ids = self.encode_chat(request.messages)
        response = ChatResponse(self.model_name, len(prompt_ids))
        for index in range(request.n):
            completion = Completion()
            completion.text = "".join(self._deltas(prompt_ids, request, index, completion))
            response.choices.append(completion)
        return response.to_dict()

    def stream(self, request: ChatRequest) -> Iterator[dict]:
        prompt_ids = self.encode_chat(request.messages)
        head = ChatResponse(self.model_name, len(prompt_ids))
        for index in range(request.n):
            completion = Completion()
            yield chunk(head.id, head.created, self.model_name, index, {"role": "assistant", "content": ""})
            for text in self._deltas(prompt_ids, request, index, completion):
                yield chunk(head.id, head.created, self.model_name, index, {"content": text})
            yield chunk(head.id, head.created, self.model_name, index, {}, completion.finish_reason)
