"""Every generated block of docs/performance.md is its benchmark's committed results file, word for word: a
results file rewritten without the page (or the page edited by hand) fails here."""

import re

import pytest

from hf2mlflow import PROJECT_ROOT

PAGE = PROJECT_ROOT / "docs" / "performance.md"
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
# block -> the results file its benchmark writes beside the block
BLOCKS = {"benchmarks": "suite.md", "batching": "batching.md", "quantization": "quantization_sweep.md",
          "sweep": "sweep.md", "served_speed": "served_speed.md", "llama_cpp_peer": "llama_cpp_peer.md",
          "op_profile": "op_profile.md"}


def test_every_generated_block_has_a_results_file():
    from benchmarks.docs_blocks import SECTIONS

    assert set(SECTIONS) == set(BLOCKS)


@pytest.mark.parametrize("block, results", BLOCKS.items())
def test_a_generated_block_matches_its_results_file(block, results):
    found = re.search(rf"<!-- {block}:begin -->\n(.*?)<!-- {block}:end -->", PAGE.read_text(), re.S)
    assert found, f"docs/performance.md has no {block} block"
    assert found.group(1) == (RESULTS / results).read_text(), (
        f"the {block} block of docs/performance.md is not benchmarks/results/{results}: rerun its benchmark with "
        f"--update-docs, or restore the file")
