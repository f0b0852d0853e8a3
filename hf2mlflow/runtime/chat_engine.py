"""What every chat engine inside the pyfunc model shares: choices, stop strings, streaming, usage.

An engine (slot_chat.SlotChatEngine, genai_chat.GenAIChatEngine, ort_chat.OrtChatEngine) only says how to turn
messages into prompt token ids, how to generate tokens one at a time, and how to decode them incrementally; this
class turns that into the same responses and chunks, so callers cannot tell the engines apart except by speed.
Pure Python: it ships with the logged pyfunc model.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterator

from hf2mlflow.runtime.batching import concurrently
from hf2mlflow.runtime.chat_schema import ChatRequest, ChatRequestError, ChatResponse, Completion, chunk


class ChatEngine:
    model_name: str
    context_length: int
    eos_ids: set[int]

    def _encode(self, messages: list[dict]) -> list[int]:
        """Prompt token ids from the model's own chat template, with the generation prompt."""
        raise NotImplementedError

    def _encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of raw text, as the tokenizer encodes any text (no chat template)."""
        raise NotImplementedError

    def _tokens(self, prompt_ids: list[int], request: ChatRequest, seed: int | None, max_length: int) -> Iterator[int]:
        """New tokens one at a time (greedy, or sampled as the request says, from `seed`), until EOS or until
        the sequence holds `max_length` tokens."""
        raise NotImplementedError

    def _text_decoder(self) -> Callable[[int], str]:
        """A fresh incremental decoder: token -> the text it completes ('' while a character is incomplete)."""
        raise NotImplementedError

    def admit(self, sequences: int):
        """A context in which one request's `sequences` run: room held for them where the engine queues
        (SlotChatEngine); nothing to hold where it does not."""
        return nullcontext()

    def encode(self, request: ChatRequest) -> list[int]:
        """The request's prompt ids: its raw prompt as it is, or its messages through the chat template."""
        ids = self._encode_prompt(request.prompt) if request.prompt is not None else self._encode(request.messages)
        if len(ids) >= self.context_length:
            raise ChatRequestError(f"the prompt is {len(ids)} tokens; this model's context length is "
                                   f"{self.context_length}, which must also leave room for the answer")
        return ids

    def _choice_tokens(self, prompt_ids: list[int], request: ChatRequest, index: int) -> Iterator[int]:
        """The tokens of choice `index` (its seed is the request's seed + index)."""
        seed = None if request.seed is None else request.seed + index
        return self._tokens(prompt_ids, request, seed, min(len(prompt_ids) + request.max_tokens, self.context_length))

    def _deltas(self, tokens: Iterator[int], request: ChatRequest, done: Completion) -> Iterator[str]:
        """Yield text as `tokens` are decoded; fill `done` with the finish reason and token count."""
        try:
            yield from self._decode(tokens, request, done)
        finally:
            _close(tokens)

    def _decode(self, tokens: Iterator[int], request: ChatRequest, done: Completion) -> Iterator[str]:
        decode = self._text_decoder()
        pending = ""  # decoded text held back while it could be the start of a stop string
        hold = max((len(s) for s in request.stop), default=1) - 1
        for token in tokens:
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
        prompt_ids = self.encode(request)
        response = ChatResponse(self.model_name, len(prompt_ids))

        def choice(index: int) -> Completion:
            completion = Completion()
            tokens = self._choice_tokens(prompt_ids, request, index)
            completion.text = "".join(self._deltas(tokens, request, completion))
            return completion

        # The choices generate together where the engine batches (greedy ones, or sampled without a seed).
        response.choices.extend(concurrently(choice, list(range(request.n)), request.n))
        return response.to_dict()

    def stream(self, request: ChatRequest) -> Iterator[dict]:
        """Chunks of each choice in turn; the last one carries the usage of the whole answer."""
        prompt_ids = self.encode(request)
        head = ChatResponse(self.model_name, len(prompt_ids))
        for index in range(request.n):
            completion = Completion()
            tokens = self._choice_tokens(prompt_ids, request, index)  # queued now: a full queue fails here
            try:
                yield chunk(head.id, head.created, self.model_name, index, {"role": "assistant", "content": ""})
                for text in self._deltas(tokens, request, completion):
                    yield chunk(head.id, head.created, self.model_name, index, {"content": text})
            finally:
                _close(tokens)  # closed at the role chunk, before _deltas began, it must still cancel the sequence
            head.choices.append(completion)
            last = chunk(head.id, head.created, self.model_name, index, {}, completion.finish_reason)
            if index == request.n - 1:
                last["usage"] = head.to_dict()["usage"]
            yield last


def _close(tokens: Iterator[int]) -> None:
    """Stop generating `tokens`: a batched sequence leaves its row at the next step."""
    close = getattr(tokens, "close", None)
    if close:
        close()
