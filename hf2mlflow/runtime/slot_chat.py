"""Chat completions over an onnxruntime-genai builder's CPU model folder: the engine inside the pyfunc model for
CPU targets.

onnxruntime runs the decoder graph (kv_slots.SlotDecoder) with continuous batching (batching.BatchScheduler);
the prompt comes from the model's own chat template and tokenizer.json (chat_tokenizer.ChatTokenizer), and text
is decoded incrementally as tokens arrive. No torch, no transformers, no onnxruntime-genai.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional

from hf2mlflow.runtime.batching import BatchLimits, BatchScheduler
from hf2mlflow.runtime.chat_engine import ChatEngine
from hf2mlflow.runtime.chat_schema import ChatRequest
from hf2mlflow.runtime.chat_tokenizer import ChatTokenizer
from hf2mlflow.runtime.kv_slots import SlotDecoder
from hf2mlflow.runtime.sampling import chooser


def eos_ids(genai_config: dict) -> set[int]:
    configured = genai_config["model"]["eos_token_id"]
    return {int(i) for i in (configured if isinstance(configured, list) else [configured])}


class SlotChatEngine(ChatEngine):
    def __init__(self, model_dir: Path, model_name: str, limits: BatchLimits = BatchLimits(),
                 session_options: Optional[dict] = None, long_rope_threshold: Optional[int] = None):
        config = json.loads((Path(model_dir) / "genai_config.json").read_text())
        self.model_name = model_name
        self.context_length = int(config["model"]["context_length"])
        self.eos_ids = eos_ids(config)
        self.tokenizer = ChatTokenizer(Path(model_dir))
        self.decoder = SlotDecoder(Path(model_dir), session_options, long_rope_threshold)
        self.scheduler = BatchScheduler(self.decoder, limits, self.context_length, self.eos_ids,
                                        name=f"batching {model_name}")

    def admit(self, sequences: int):
        return self.scheduler.admit(sequences)

    def _encode(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    def _encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode_text(prompt)

    def _tokens(self, prompt_ids: list[int], request: ChatRequest, seed: Optional[int], max_length: int
                ) -> Iterator[int]:
        return self.scheduler.generate(prompt_ids, max_length - len(prompt_ids), chooser(request, seed))

    def _text_decoder(self) -> Callable[[int], str]:
        return self.tokenizer.text_decoder()
