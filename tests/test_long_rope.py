"""LongRoPE graphs (Phi-3 128k, Phi-3.5, Phi-4-mini) pick their long or short rotary cache for a whole batch by the
attention mask's width. Served rows must still give their lone answers: a tiny Phi-3 with LongRoPE and an
original context of 32 positions, its attention made peaky (tiny random models attend almost uniformly, and a
change of rotary factors then moves nothing), and its end-of-sequence rows zeroed so every answer runs to its
length."""

from pathlib import Path

import mlflow
import pytest

from hf2mlflow.convert.step import ConvertArgs, convert
from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
from hf2mlflow.parity import GenAIModel, ServedModel
from tests.support import local_store
from tests.test_validation import _variant

ORIGINAL_CONTEXT = 32
SHORT = [{"role": "user", "content": "Hi"}]
LONG = [{"role": "user", "content": "The capital of France has a long history of kings."}]


def _peaky_without_eos(state):
    for name in state:
        if "qkv_proj" in name:
            state[name] = state[name] * 12
    state["lm_head.weight"][[2, 6]] = 0  # tiny-phi3's <|endoftext|> and <|end|>
    return state


@pytest.fixture(scope="module")
def long_rope(tmp_path_factory):
    """The LongRoPE variant converted to cpu-fp32 (validated against PyTorch) and logged: the served engine as
    the pyfunc loads it, and onnxruntime-genai over the same files."""
    root = tmp_path_factory.mktemp("long-rope")
    half = 64 // 4 // 2  # tiny-phi3: hidden 64, 4 heads
    folder = _variant("tiny-phi3", root / "phi3-longrope", {
        "original_max_position_embeddings": ORIGINAL_CONTEXT, "max_position_embeddings": 256,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * half,
                         "long_factor": [1.0 + 3 * i for i in range(half)]}}, _peaky_without_eos)
    with local_store(root):
        run_id = convert(ConvertArgs(model=str(folder), target="cpu-fp32"))
        uri = log_pyfunc(LogPyfuncArgs(convert_run_id=run_id))
        pyfunc = mlflow.pyfunc.load_model(uri)
        onnx = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="onnx", dst_path=str(root))
    return ServedModel(pyfunc.unwrap_python_model().engine), GenAIModel(Path(onnx))


def test_the_threshold_is_read_from_the_graph_into_the_served_engine(long_rope):
    served, _ = long_rope
    assert served.engine.decoder.long_rope_threshold == ORIGINAL_CONTEXT


def test_a_short_row_beside_one_that_crosses_the_threshold_keeps_its_lone_answer(long_rope):
    served, genai = long_rope
    short, long = served.prompt_ids(SHORT), served.prompt_ids(LONG)
    short_tokens = ORIGINAL_CONTEXT - 1 - len(short)  # stays short: its mask never grows wider than 32
    assert len(long) < ORIGINAL_CONTEXT < len(long) + 40
    lone_short, lone_long = served.greedy(short, short_tokens), served.greedy(long, 40)
    together_short, together_long = served.greedy_together([short, long], 40)
    assert len(together_long) == 40  # no end-of-sequence: the long row crosses the threshold
    # The short row decodes while the long one is past the threshold for most of its answer.
    assert together_short[:short_tokens] == lone_short
    assert together_long == lone_long == genai.greedy(long, 40)
