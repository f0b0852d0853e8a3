"""The generated blocks of docs/performance.md: each benchmark's `--update-docs` rewrites its own.

    <!-- benchmarks:begin --> ... <!-- benchmarks:end -->      benchmarks/suite.py
    <!-- batching:begin --> ... <!-- batching:end -->          benchmarks/batching.py
    <!-- quantization:begin --> ... <!-- quantization:end -->  benchmarks/quantization_sweep.py
    <!-- sweep:begin --> ... <!-- sweep:end -->                benchmarks/sweep_report.py (a `sweep` run)
    <!-- served_speed:begin --> ... <!-- served_speed:end -->  benchmarks/served_speed.py
    <!-- llama_cpp_peer:begin --> ... <!-- llama_cpp_peer:end -->  benchmarks/llama_cpp_peer.py
    <!-- op_profile:begin --> ... <!-- op_profile:end -->      benchmarks/op_profile.py

Only the text between a block's markers changes; the prose around it is written by hand.
"""

from __future__ import annotations

from pathlib import Path

PERFORMANCE_DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
SECTIONS = ("benchmarks", "batching", "quantization", "sweep", "served_speed", "llama_cpp_peer", "op_profile")


def update_docs(table: str, section: str = "benchmarks", path: Path = PERFORMANCE_DOC) -> None:
    """Rewrite the generated block between `<!-- SECTION:begin -->` and `<!-- SECTION:end -->` of
    docs/performance.md (or `path`)."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path.name} has no {begin} ... {end} section to rewrite")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table}{end}{tail}")
