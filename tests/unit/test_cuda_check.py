"""The CUDA check's pure logic: fp16's tolerance against float32, and the pack that carries the check's packages
to a GPU machine without network (what goes in it, how it is cut, and how the parts come together there)."""

import io
import json
import tarfile

import numpy as np
import pytest

from benchmarks.cuda_check import fp16_logits_tolerance, judge_fp16, top2_margin
from benchmarks.cuda_check_pack import carried, chunk_sizes, main as pack_main, requirements, write_parts


def test_fp16_may_part_from_fp32_only_at_a_near_tie():
    tolerance = fp16_logits_tolerance(np.array([-20.0, 5.0, 30.0]))
    assert tolerance == pytest.approx(0.01 + 0.02 * 30)
    assert judge_fp16(None, None, tolerance) == (True, "greedy tokens equal")
    ok, why = judge_fp16(7, 0.3, tolerance)
    assert ok and "near tie" in why and "token 7" in why
    ok, why = judge_fp16(3, 2.5, tolerance)
    assert not ok and "part at token 3" in why and "2.5" in why
    assert top2_margin([1.0, 4.0, 3.5, -2.0]) == pytest.approx(0.5)


def test_the_pack_asks_for_the_cuda_builds_and_leaves_out_what_the_cuda_paths_or_the_image_do_not_need():
    pins = ["mlflow==3.17.2", "onnxruntime-genai==0.15.2", "onnxruntime==1.31.1", "torch==2.13.0", "pyspark==4.3.0",
            "transformers==4.57.6", "numpy==2.4.6", "accelerate==1.15.0", "Optimum==2.1.0"]
    assert requirements(pins) == ["mlflow==3.17.2", "onnxruntime-genai-cuda==0.15.2", "onnxruntime-gpu==1.31.1",
                                  "transformers==4.57.6"]
    wheels = ["numpy-2.5.5-cp312-cp312-manylinux_2_28_x86_64.whl", "mlflow_skinny-3.17.2-py3-none-any.whl",
              "transformers-4.57.6-py3-none-any.whl", "typing_extensions-4.15.0-py3-none-any.whl"]
    assert carried(wheels) == ["mlflow_skinny-3.17.2-py3-none-any.whl", "transformers-4.57.6-py3-none-any.whl"]


def test_chunks_cover_the_archive_and_none_is_over_the_limit():
    assert chunk_sizes(10, 4) == [4, 4, 2]
    assert chunk_sizes(8, 4) == [4, 4]
    assert chunk_sizes(3, 4) == [3]
    with pytest.raises(ValueError):
        chunk_sizes(0, 4)


def _pack(tmp_path):
    """A small pack made as `pack` makes one: a tar.xz of site/ and home/, cut into three parts."""
    archive = tmp_path / "pack.tar.xz"
    files = {"site/demo/__init__.py": b"VALUE = 42\n", "home/packages/ab/model.gguf": bytes(range(256)) * 40}
    with tarfile.open(archive, "w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    parts = tmp_path / "parts"
    manifest = write_parts(archive, parts, archive.stat().st_size // 3 + 1, ["demo-1.0-py3-none-any.whl"],
                           "packages/ab/model.gguf")
    return parts, manifest, files


def test_the_parts_come_together_on_the_gpu_machine_one_call_at_a_time(tmp_path, capsys):
    parts, manifest, files = _pack(tmp_path)
    assert len(manifest["chunks"]) == 3 and sorted(p.name for p in parts.iterdir()) == ["part-1", "part-2", "part-3"]
    into = tmp_path / "stage"
    for k, expected in ((1, 3), (2, 3), (3, 0)):
        carried_now = tmp_path / f"call-{k}"  # what one call carries: its own part alone
        (carried_now / f"part-{k}").mkdir(parents=True)
        for f in (parts / f"part-{k}").iterdir():
            (carried_now / f"part-{k}" / f.name).write_bytes(f.read_bytes())
        assert pack_main(["stage", "--into", str(into), "--parts", str(carried_now)]) == expected
    said = capsys.readouterr().out
    assert "1 of 3 chunks staged" in said and "still to come: chunk-02, chunk-03" in said
    assert "unpacked 1 packages" in said and "packages/ab/model.gguf" in said
    for name, data in files.items():
        assert (into / name).read_bytes() == data
    # Once unpacked, the same pack is not unpacked again.
    assert pack_main(["stage", "--into", str(into), "--parts", str(tmp_path / "call-3")]) == 0
    assert "already unpacked" in capsys.readouterr().out


def test_a_damaged_chunk_or_no_part_is_refused_by_name(tmp_path):
    parts, manifest, _ = _pack(tmp_path)
    (parts / "part-2" / "chunk-02").write_bytes(b"not the chunk")
    with pytest.raises(SystemExit, match="chunk-02 does not match the manifest"):
        pack_main(["stage", "--into", str(tmp_path / "stage"), "--parts", str(parts)])
    with pytest.raises(SystemExit, match="no part under"):
        pack_main(["stage", "--into", str(tmp_path / "other"), "--parts", str(tmp_path / "empty")])


def test_a_new_pack_replaces_the_chunks_of_an_old_one(tmp_path):
    parts, manifest, _ = _pack(tmp_path)
    into = tmp_path / "stage"
    (into / "chunks").mkdir(parents=True)
    (into / "manifest.json").write_text(json.dumps({**manifest, "pack": "older"}))
    (into / "chunks" / "chunk-02").write_bytes(b"from the older pack")
    only_first = tmp_path / "first"
    (only_first / "part-1").mkdir(parents=True)
    for f in (parts / "part-1").iterdir():
        (only_first / "part-1" / f.name).write_bytes(f.read_bytes())
    assert pack_main(["stage", "--into", str(into), "--parts", str(only_first)]) == 3
    assert not (into / "chunks" / "chunk-02").exists()
