"""The teacher-forced measure on real conversions (the session's tiny-phi3 models): fp32 ONNX reads the text as
PyTorch float32 does, int4 departs from it; all-position logits agree with the next-token logits parity uses."""

from importlib import resources
from pathlib import Path

import mlflow
import numpy as np
import pytest

from hf2mlflow.parity import GenAIModel, TorchModel
from hf2mlflow.quality import teacher_forced
from hf2mlflow.sources.tiny import tiny_model_path
from tests.support import local_store


@pytest.fixture(scope="module")
def models(converted, shared_store, tmp_path_factory):
    runs = {target: converted("tiny-phi3", target) for target in ("cpu-fp32", "cpu-int4")}
    out = tmp_path_factory.mktemp("quality")
    with local_store(shared_store["root"]):
        folders = {t: Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/onnx", dst_path=str(out / t)))
                   for t, run_id in runs.items()}
    reference = TorchModel.from_folder(tiny_model_path("tiny-phi3"))
    text = resources.files("hf2mlflow").joinpath("sources/data/tiny_corpus.txt").read_text(encoding="utf-8")
    return reference, {t: GenAIModel(folder) for t, folder in folders.items()}, reference.encode(text)


def test_all_position_logits_end_with_the_next_token_logits(models):
    reference, onnx, ids = models
    head = ids[:40]
    for model in (reference, onnx["cpu-fp32"]):
        logits = model.all_logits(head)
        assert logits.shape[0] == 40 and np.allclose(logits[-1], model.next_logits(head), atol=1e-5)


def test_fp32_onnx_reads_the_text_as_pytorch_and_int4_departs(models):
    reference, onnx, ids = models
    fp32 = teacher_forced(reference, onnx["cpu-fp32"], ids, window=128)
    int4 = teacher_forced(reference, onnx["cpu-int4"], ids, window=128)
    assert fp32["positions"] == int4["positions"] >= 4 * 63
    assert fp32["mean_kld"] < 1e-3 and fp32["top1_agreement"] >= 0.99
    assert fp32["perplexity"] == pytest.approx(fp32["reference_perplexity"], rel=1e-3)
    assert int4["mean_kld"] > 10 * max(fp32["mean_kld"], 1e-9)
