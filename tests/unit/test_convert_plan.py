"""What convert decides before it builds: the architectures the installed builder takes, and the builder path a
memory budget allows (hf2mlflow/convert/memory_plan.py)."""

import pytest

from hf2mlflow.convert.genai_builder import supported_architectures
from hf2mlflow.convert.memory_plan import GIB, CheckpointSize, MemoryBudgetError, estimate, plan

# microsoft/Phi-3-mini-4k-instruct: 3,821,079,552 parameters stored in bf16; the largest tensor 32064 x 3072.
PHI3_MINI = CheckpointSize(3_821_079_552, 2 * 3_821_079_552, 32064 * 3072)


def test_supported_architectures_come_from_the_installed_builder():
    archs = supported_architectures()
    assert {"Phi3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"} <= set(archs)
    assert "GPT2LMHeadModel" not in archs


def test_full_size_phi3_mini_fits_24_gib_only_on_the_low_memory_path():
    standard, low = estimate(PHI3_MINI, "int4")
    assert standard > 24 * GIB and low <= 12 * GIB
    chosen = plan(PHI3_MINI, "int4", "auto", 24)
    assert (chosen.path, chosen.estimated_bytes) == ("low", low)
    with pytest.raises(MemoryBudgetError, match=r"with the standard builder needs about \d+\.\d GiB.*"
                                                r"the low-memory builder \(-P builder_memory=low\) needs about"):
        plan(PHI3_MINI, "int4", "standard", 24)
