"""Built-in tiny chat models, made on demand, offline, in seconds, deterministically.

Random weights (seeded) give gibberish text, but every mechanism is real: the
architectures are the ones the Phi-3, Qwen2 and GPT-2 checkpoints use, the tokenizer is
a byte-level BPE trained on text this project ships, and the chat templates are
the families' own formats (GPT-2 has none: it gets ChatML). tiny-gpt2 is an architecture
the onnxruntime-genai builder does not support: the optimum route's test model.
Models are cached under `$HF2MLFLOW_HOME/builtin`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# Bump when a recipe changes, so cached copies are rebuilt.
RECIPE_VERSION = 1
SEED = 1234
VOCAB_SIZE = 1024

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyRecipe:
    architecture: str
    special_tokens: tuple[str, ...]
    bos: str
    eos: str
    end_of_turn: str
    chat_template: str


RECIPES = {
    "tiny-phi3": TinyRecipe("Phi3ForCausalLM",
                            ("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                            bos="<s>", eos="<|endoftext|>", end_of_turn="<|end|>", chat_template=PHI3_TEMPLATE),
    "tiny-qwen2": TinyRecipe("Qwen2ForCausalLM", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                             bos="<|endoftext|>", eos="<|endoftext|>", end_of_turn="<|im_end|>",
                             chat_template=CHATML_TEMPLATE),
    "tiny-gpt2": TinyRecipe("GPT2LMHeadModel", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                            bos="<|endoftext|>", eos="<|endoftext|>", end_of_turn="<|im_end|>",
                            chat_template=CHATML_TEMPLATE),
}


def home() -> Path:
    return Path(os.environ.get("HF2MLFLOW_HOME", Path.home() / ".cache" / "hf2mlflow"))


def tiny_model_path(name: str) -> Path:
    """The folder of built-in model `name`, built first if it is not cached yet."""
    if name not in RECIPES:
        raise ValueError(f"unknown built-in model '{name}'; built-in models: {', '.join(RECIPES)}")
    return cached_folder(home() / "builtin" / f"{name}-v{RECIPE_VERSION}", lambda out: build_tiny_model(name, out))


def phi3_mini_shape_path(layers: int = 4, dtype: str = "bfloat16") -> Path:
    """A random-weight model with Phi-3-mini's exact width (hidden 3072, intermediate 8192, 32 heads, vocab
    32064) and `layers` layers (32: the full 3.8 B model), stored in `dtype` as the published checkpoint is
    (bf16), with tiny-phi3's tokenizer and chat template: realistic per-token and per-byte costs, no download.
    Built on first use (a minute and 7.6 GB of disk for 32 layers), then cached."""
    if layers < 1 or dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"layers must be >= 1 and dtype one of bfloat16, float16, float32 (got {layers}, {dtype})")
    return cached_folder(home() / "builtin" / f"phi3-mini-shape-{layers}l-{dtype}-v{RECIPE_VERSION}",
                   lambda out: _build_phi3_mini_shape(out, layers, dtype))


def cached_folder(target: Path, build) -> Path:
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: a killed build never leaves a half model behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _train_tokenizer(recipe: TinyRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("hf2mlflow").joinpath("sources/data/tiny_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(recipe.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=recipe.bos, eos_token=recipe.eos,
                                   pad_token=recipe.eos, chat_template=recipe.chat_template,
                                   model_max_length=2048)


def build_tiny_model(name: str, out_dir: Path) -> Path:
    """Write a Hugging Face model folder (config, safetensors, tokenizer) for built-in `name`."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, Phi3Config, Qwen2Config

    recipe = RECIPES[name]
    tokenizer = _train_tokenizer(recipe)
    ids = tokenizer.convert_tokens_to_ids
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 bos_token_id=ids(recipe.bos), eos_token_id=[ids(recipe.eos), ids(recipe.end_of_turn)],
                 pad_token_id=ids(recipe.eos), tie_word_embeddings=False, dtype="float32")
    if recipe.architecture == "Phi3ForCausalLM":
        # Equal context lengths select the plain-RoPE Phi-3-mini (4k) graph in the builder.
        config = Phi3Config(original_max_position_embeddings=2048, **shape)
    elif recipe.architecture == "GPT2LMHeadModel":
        # GPT-2's own names for the same shape; no grouped-query attention, and the output layer is tied to
        # the embeddings (as in its checkpoints). With tied weights at GPT-2's default init (0.02) every greedy
        # answer is one token repeated, which exercises nothing (stop strings, streaming); 0.2 gives varied text.
        config = GPT2Config(initializer_range=0.2, vocab_size=shape["vocab_size"], n_embd=shape["hidden_size"],
                            n_inner=shape["intermediate_size"], n_layer=shape["num_hidden_layers"],
                            n_head=shape["num_attention_heads"], n_positions=shape["max_position_embeddings"],
                            bos_token_id=shape["bos_token_id"], eos_token_id=shape["eos_token_id"],
                            pad_token_id=shape["pad_token_id"], dtype="float32")
    else:
        config = Qwen2Config(**shape)
    config.architectures = [recipe.architecture]
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = shape["eos_token_id"]
    model.generation_config.pad_token_id = shape["pad_token_id"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _build_phi3_mini_shape(out_dir: Path, layers: int, dtype: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    recipe = RECIPES["tiny-phi3"]
    tokenizer = _train_tokenizer(recipe)
    ids = tokenizer.convert_tokens_to_ids
    # microsoft/Phi-3-mini-4k-instruct's config.json, but for the layer count and the special token ids.
    config = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                        bos_token_id=ids(recipe.bos), eos_token_id=[ids(recipe.eos), ids(recipe.end_of_turn)],
                        pad_token_id=ids(recipe.eos), tie_word_embeddings=False, dtype=dtype)
    config.architectures = ["Phi3ForCausalLM"]
    torch.manual_seed(SEED)
    print(f"[model] building a random {layers}-layer Phi-3-mini-shaped model in {dtype} (once; cached)", flush=True)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
