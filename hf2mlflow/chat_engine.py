"""What every chat engine inside the pyfunc model shares: choices, stop strings, streaming, usage.

An engine (genai_chat.GenAIChatEngine, ort_chat.OrtChatEngine) only says how to turn messages into prompt
token ids, how to generate tokens one at a time, and how to decode them incrementally; this class turns that
into the same responses and chunks, so callers cannot tell the engines apart except by speed.
Pure Python: it ships with the logged pyfunc model.
"""

from __future__ import annotations

from typing import Callable, Iterator

from hf2mlflow.chat_schema import ChatRequest, ChatRequestError, ChatResponse, Completion, chunk


class ChatEngine:
    model_name: str
    context_length: int
    eos_ids: set[int]

    def _encode(self, messages: list[dict]) -> list[int]:
        """Prompt token ids from the model's own chat template, with the generation prompt."""
        raise NotImplementedError

    def _tokens(self, prompt_ids: list[int], request: ChatRequest, seed: int | None, max_length: int) -> Iterator[int]:
        """New tokens one at a time (greedy, or sampled as the request says, from `seed`), until EOS or until
        the sequence holds `max_length` tokens."""
        raise NotImplementedError

    def _text_decoder(self) -> Callable[[int], str]:
        """A fresh incremental decoder: token -> the text it completes ('' while a character is incomplete)."""
        raise NotImplementedError

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self._encode(messages)
        if len(ids) >= self.context_length:
            raise ChatRequestError(f"the prompt is {len(ids)} tokens; this model's context length is "
                                   f"{self.context_length}, which must also leave room for the answer")
        return ids

    def _deltas(self, prompt_ids: list[int], request: ChatRequest, seed_offset: int, done: Completion) -> Iterator[str]:
        """Yield text as it is decoded; fill `done` with the finish reason and token count."""
        seed = None if request.seed is None else request.seed + seed_offset
        max_length = min(len(prompt_ids) + request.max_tokens, self.context_length)
        decode = self._text_decoder()
        pending = ""  # decoded text held back while it could be the start of a stop string
        hold = max((len(s) for s in request.stop), default=1) - 1
        for token in self._tokens(prompt_ids, request, seed, max_length):
            done.completion_tokens += 1
            if token in self.eos_ids:
                done.finish_reason = "stop"
                break
            pending += decode(token)
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
