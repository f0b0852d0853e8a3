"""Chat completions over an optimum ONNX export (text-generation-with-past): the engine inside the pyfunc
model for architectures the onnxruntime-genai builder does not know.

ONNX Runtime runs the graph through optimum's ORTModelForCausalLM (which knows each architecture's KV-cache
layout); the prompt comes from the Hugging Face tokenizer's own chat template; this module decodes token by
token (greedy or sampled) so that stop strings, streaming and usage work exactly as in the GenAI engine.
ORTModelForCausalLM speaks torch tensors, so this engine needs torch (the GenAI engine does not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from hf2mlflow.runtime.chat_engine import ChatEngine
from hf2mlflow.runtime.chat_schema import ChatRequest
from hf2mlflow.runtime.sampling import chooser

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def load_ort_model(model_dir: Path, execution_provider: str = "cpu"):
    """optimum's ORTModelForCausalLM for an exported folder, safe to call from many threads at once."""
    from optimum.onnxruntime import ORTModelForCausalLM

    if execution_provider not in PROVIDERS:
        raise ValueError(f"execution_provider '{execution_provider}' is not served by the optimum engine; "
                         f"allowed: {', '.join(PROVIDERS)}")
    # IO binding keeps one binding object per model: concurrent requests would overwrite each other's buffers.
    model = ORTModelForCausalLM.from_pretrained(Path(model_dir), provider=PROVIDERS[execution_provider],
                                                use_io_binding=False, local_files_only=True)
    if not model.can_use_cache:
        raise ValueError(f"{model_dir}: the ONNX model has no KV-cache inputs; export it with task "
                         f"text-generation-with-past")
    # optimum-onnx 0.1.0 sizes the first step's empty KV cache with num_attention_heads for model types it does
    # not list (phi3 among them), which breaks grouped-query attention (Phi-4-mini, tiny-phi3). The graph
    # itself says how many KV heads it has: (batch, kv_heads, past_sequence, head_dim).
    shape = model.input_shapes[model.key_value_input_names[0]]
    if len(shape) == 4 and isinstance(shape[1], int):
        model.num_key_value_heads = shape[1]
    return model


def context_length(config) -> int:
    """The model's context window from its Hugging Face config (GPT-2's n_positions maps to this name too)."""
    length = getattr(config, "max_position_embeddings", None)
    if not length:
        raise ValueError(f"config.json of model type '{config.model_type}' has no max_position_embeddings "
                         f"(or n_positions): the context length is unknown")
    return int(length)


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: generation_config.json's eos_token_id (a list for chat models, which end a
    turn with their own token) and the tokenizer's EOS."""
    configured = (model.generation_config or model.config).eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}


def next_token_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    out = model(input_ids=torch.tensor([ids], dtype=torch.long), attention_mask=torch.ones((1, len(ids)),
                dtype=torch.long), use_cache=False)
    return out.logits[0, -1].float().numpy()


def generate_tokens(model, prompt_ids: list[int], max_length: int, choose: Callable[[np.ndarray], int]
                    ) -> Iterator[int]:
    """New tokens one at a time, each chosen from the next-token logits, until the sequence holds max_length
    tokens (the caller stops at EOS); the KV cache carries over from step to step."""
    import torch

    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    past, length = None, len(prompt_ids)
    while length < max_length:
        out = model(input_ids=input_ids, attention_mask=torch.ones((1, length), dtype=torch.long),
                    past_key_values=past, use_cache=True)
        token = choose(out.logits[0, -1].float().numpy())
        yield token
        past, input_ids, length = out.past_key_values, torch.tensor([[token]], dtype=torch.long), length + 1


class OrtChatEngine(ChatEngine):
    def __init__(self, model_dir: Path, model_name: str, execution_provider: str = "cpu"):
        from tokenizers.decoders import DecodeStream
        from transformers import AutoTokenizer

        self.model_name = model_name
        self.tokenizer = AutoTokenizer.from_pretrained(Path(model_dir))
        if not self.tokenizer.chat_template:
            raise ValueError(f"{model_dir}: the tokenizer has no chat template, so the model cannot chat")
        if not self.tokenizer.is_fast:
            raise ValueError(f"{model_dir}: incremental decoding needs a fast tokenizer (tokenizer.json)")
        self._decode_stream = DecodeStream
        self.model = load_ort_model(model_dir, execution_provider)
        self.context_length = context_length(self.model.config)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)

    def _encode(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return [int(i) for i in (ids["input_ids"] if isinstance(ids, dict) else ids)]

    def _encode_prompt(self, prompt: str) -> list[int]:
        return [int(i) for i in self.tokenizer(prompt)["input_ids"]]

    def _tokens(self, prompt_ids: list[int], request: ChatRequest, seed: Optional[int], max_length: int
                ) -> Iterator[int]:
        return generate_tokens(self.model, prompt_ids, max_length, chooser(request, seed))

    def _text_decoder(self) -> Callable[[int], str]:
        # Special tokens are left out of the text, as onnxruntime-genai's stream decoder does.
        stream = self._decode_stream(skip_special_tokens=True)
        backend = self.tokenizer.backend_tokenizer
        return lambda token: stream.step(backend, token) or ""
