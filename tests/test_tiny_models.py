import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf2mlflow.runtime.manifest import build_manifest
from hf2mlflow.sources.tiny import RECIPES, build_tiny_model, tiny_model_path

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, wörld!"}]


def test_builds_are_byte_identical(tmp_path):
    first = build_manifest(build_tiny_model("tiny-phi3", tmp_path / "a"))
    second = build_manifest(build_tiny_model("tiny-phi3", tmp_path / "b"))
    assert first == second
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(first["files"])


@pytest.mark.parametrize("name, architecture, prompt", [
    ("tiny-phi3", "Phi3ForCausalLM",
     "<|system|>\nBe brief.<|end|>\n<|user|>\nHello, wörld!<|end|>\n<|assistant|>\n"),
    ("tiny-qwen2", "Qwen2ForCausalLM",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello, wörld!<|im_end|>\n<|im_start|>assistant\n"),
    ("tiny-gpt2", "GPT2LMHeadModel",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello, wörld!<|im_end|>\n<|im_start|>assistant\n"),
])
def test_tiny_model_chats_with_its_familys_template(name, architecture, prompt):
    path = tiny_model_path(name)
    assert tiny_model_path(name) == path  # cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.architectures == [architecture]
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == prompt
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    # Special tokens are single tokens, and byte-level BPE round-trips any text.
    for special in RECIPES[name].special_tokens:
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.decode(ids[0]) == prompt
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    again = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1] and torch.equal(out, again)
    end_of_turn = tokenizer.convert_tokens_to_ids(RECIPES[name].end_of_turn)
    assert end_of_turn in model.generation_config.eos_token_id
