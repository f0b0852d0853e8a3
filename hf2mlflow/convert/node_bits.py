"""onnxruntime-genai's model builder with a bit width per weight matrix:
`python -m hf2mlflow.convert.node_bits FILE [--low_memory] <builder arguments>`.

FILE is JSON, `{"nodes": {"/model/layers.0/mlp/down_proj/MatMul": 8, ...}, "every": null}`: the named MatMuls
(as the builder names them before quantizing) take those bits; `"every": 8` gives 8 bits to every MatMul the
builder quantizes but its output layer, whose bits `matmul_mixed_precision`'s `last_matmul` decides. The builder's
own per-node mechanism (`customized_weight_config` of onnxruntime's k_quant and RTN quantizers) applies them, so
each matrix is rounded exactly as the builder rounds it at that width.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

BUILDER_MODULE = "onnxruntime_genai.models.builder"
OUTPUT_LAYER = "/lm_head/MatMul"


def quantizable_matmuls(builder) -> list[str]:
    """The MatMuls of the builder's float graph that its quantizer takes (a constant weight, not excluded)."""
    excluded = set(builder.quant_attrs["nodes_to_exclude"])
    return [n.name for n in builder.model.graph if n.op_type == "MatMul" and n.name not in excluded
            and any(v is not None and v.const_value is not None for v in n.inputs)]


def placement(builder, spec: dict) -> dict[str, int]:
    """Node name -> bits from `spec` (the FILE's content), checked against the builder's graph."""
    names = quantizable_matmuls(builder)
    bits = {name: int(spec["every"]) for name in names if name != OUTPUT_LAYER} if spec.get("every") else {}
    unknown = sorted(set(spec.get("nodes", {})) - set(names))
    if unknown:
        raise SystemExit(f"node bits: {', '.join(unknown[:5])} are not MatMuls the builder quantizes in this model "
                         f"(it quantizes {', '.join(names[:3])}, ...)")
    bits.update({name: int(b) for name, b in spec.get("nodes", {}).items()})
    return bits


def patch_builder(spec: dict) -> None:
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)
    from builders import base

    to_nbits = base.Model.to_nbits

    def with_node_bits(self):
        config = dict(getattr(self, "int4_customized_weight_config", None) or {})
        config.update({name: {"bits": bits} for name, bits in placement(self, spec).items()})
        self.int4_customized_weight_config = config
        # k_quant and RTN read the placement from the algo config made at the builder's start: make it again.
        self.quant_attrs["algo_config"] = self.make_algo_config(self.quantization_algo, config)
        print(f"[node bits] {sum(c['bits'] == 8 for c in config.values())} MatMuls at 8 bits", flush=True)
        return to_nbits(self)

    base.Model.to_nbits = with_node_bits


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    rest = argv[1:]
    if rest[:1] == ["--low_memory"]:
        from hf2mlflow.convert import lowmem_builder

        lowmem_builder.patch_builder()
        rest = rest[1:]
    patch_builder(spec)  # after the low-memory patch, which leaves per-node bit widths to the builder's own pass
    sys.argv = [BUILDER_MODULE, *rest]
    runpy.run_module(BUILDER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
