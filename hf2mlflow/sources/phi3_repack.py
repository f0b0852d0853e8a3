"""The same trained weights as a Phi-3 model: a Llama checkpoint repacked as `Phi3ForCausalLM`.

Phi-3's decoder is Llama's with two projections fused: `qkv_proj` is q, k and v stacked, and `gate_up_proj` is
gate and up stacked. So a trained Llama (SmolLM2, for one, which installs from the package registry) repacked
this way computes the same logits in PyTorch, and runs through the builder's Phi-3 path: the way to check that
path on trained weights without downloading Phi-3.

    python -m hf2mlflow.sources.phi3_repack SOURCE_FOLDER OUTPUT_FOLDER
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from hf2mlflow.errors import StepError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def llama_as_phi3(source: Path, output: Path) -> Path:
    """Write `source` (a LlamaForCausalLM folder) as a Phi3ForCausalLM folder in `output`."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Phi3Config

    config = json.loads((source / "config.json").read_text())
    if config.get("architectures") != ["LlamaForCausalLM"]:
        raise StepError(f"{source}: architectures {config.get('architectures')}; only LlamaForCausalLM repacks")
    unsupported = {k: config[k] for k in ("attention_bias", "mlp_bias") if config.get(k)}
    if config.get("rope_scaling"):
        unsupported["rope_scaling"] = config["rope_scaling"]
    heads = config["num_attention_heads"]
    if config.get("head_dim", config["hidden_size"] // heads) * heads != config["hidden_size"]:
        unsupported["head_dim"] = config["head_dim"]  # Phi-3 derives head_dim from hidden_size
    if unsupported:
        raise StepError(f"{source}: Phi-3 has no equivalent of {unsupported}")
    phi3 = Phi3Config(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=config["num_key_value_heads"],
        hidden_act=config["hidden_act"], max_position_embeddings=config["max_position_embeddings"],
        # Equal to max_position_embeddings: plain RoPE, no LongRoPE scaling (the builder's Phi-3-mini-4k graph).
        original_max_position_embeddings=config["max_position_embeddings"], rms_norm_eps=config["rms_norm_eps"],
        rope_theta=config["rope_theta"], tie_word_embeddings=config.get("tie_word_embeddings", False),
        bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"), sliding_window=None, dtype="float32")
    phi3.architectures = ["Phi3ForCausalLM"]

    weights = {}
    for file in sorted(source.glob("*.safetensors")):
        weights.update(load_file(file))
    packed = {}
    for name, tensor in weights.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name or ".mlp.up_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            prefix = name.split(".self_attn.q_proj.")[0]
            packed[f"{prefix}.self_attn.qkv_proj.weight"] = torch.cat(
                [tensor, weights[f"{prefix}.self_attn.k_proj.weight"], weights[f"{prefix}.self_attn.v_proj.weight"]])
        elif ".mlp.gate_proj." in name:
            prefix = name.split(".mlp.gate_proj.")[0]
            packed[f"{prefix}.mlp.gate_up_proj.weight"] = torch.cat([tensor, weights[f"{prefix}.mlp.up_proj.weight"]])
        else:
            packed[name] = tensor
    model = AutoModelForCausalLM.from_config(phi3, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(packed, strict=False)
    missing = [m for m in missing if not (phi3.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise StepError(f"{source}: repacking left weights missing {missing[:4]} or unused {unexpected[:4]}")
    model.tie_weights()
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a LlamaForCausalLM Hugging Face folder")
    parser.add_argument("output", type=Path, help="where the Phi3ForCausalLM folder is written")
    args = parser.parse_args(argv)
    print(f"wrote {llama_as_phi3(args.source, args.output)}")


if __name__ == "__main__":
    main()
