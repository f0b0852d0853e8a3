"""onnxruntime-genai's model builder with less memory: `python -m hf2mlflow.convert.lowmem_builder <builder arguments>`.

Where the builder's memory goes (0.15.2, measured on a Phi-3-mini-shaped model, see benchmarks/convert_memory.py):
1. it loads the Hugging Face model in float32 whatever the checkpoint's dtype (twice a bf16 checkpoint) and
   keeps it for the whole build;
2. for int4/int8 it hands onnxruntime's quantizer the whole float32 graph as one protobuf (`ir.to_proto`), a
   second full float32 copy, before anything is written.
This runs the same builder, with the same arguments, changed at exactly those two places:
1. weights load in the checkpoint's own dtype (`dtype="auto"`); the builder already casts each weight to the
   graph's dtype lazily, when it is quantized or written, so the values it sees are the same;
2. quantization goes node by node: each weight is materialised alone, quantized by the same onnxruntime
   quantizer with the same settings, spliced into the graph, and its float weight released, so the float model
   shrinks as the quantized one grows.
The graph, the quantized bytes and the files written are the builder's own (tests/test_lowmem_builder.py
compares them with the standard builder's). Where the node-by-node pass does not apply (per-node bit widths,
CUDA weight prepacking) the builder's own quantization runs, and says so.
"""

from __future__ import annotations

import gc
import runpy
import sys

import onnx
import onnx_ir as ir
from onnx import helper

BUILDER_MODULE = "onnxruntime_genai.models.builder"


def _load_in_checkpoint_dtype(auto_class):
    """`auto_class` whose from_pretrained keeps the checkpoint's dtype unless the builder names one."""

    class CheckpointDtype(auto_class):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            if "dtype" not in kwargs and "torch_dtype" not in kwargs:
                kwargs["dtype"] = "auto"
            return auto_class.from_pretrained(*args, **kwargs)

    return CheckpointDtype


def _mini_model(node: ir.Node, model: ir.Model) -> onnx.ModelProto:
    """A model of `node` alone: its constant inputs as initializers (materialised here, one node's worth)."""
    inputs, initializers = [], []
    for value in node.inputs:
        if value is None:
            continue
        if value.const_value is not None:
            initializers.append(ir.serde.serialize_tensor(value.const_value))
        else:
            inputs.append(helper.make_tensor_value_info(value.name, int(value.dtype), None))
    outputs = [helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in node.outputs]
    graph = helper.make_graph([ir.serde.serialize_node(node)], "node", inputs, outputs, initializers)
    opsets = [helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)


def _splice(graph: ir.Graph, model: ir.Model, old: ir.Node, quantized: onnx.ModelProto) -> None:
    """Replace `old` by the nodes of `quantized` (a quantized `_mini_model(old)`), then drop weights now unused."""
    mini = ir.from_proto(quantized)
    for domain, version in mini.opset_imports.items():
        model.opset_imports.setdefault(domain, version)
    model.ir_version = max(model.ir_version, mini.ir_version)
    outer = {v.name: v for v in old.inputs if v is not None and v.const_value is None}
    new_nodes = list(mini.graph)
    produced = {v.name: v for n in new_nodes for v in n.outputs}
    new_outputs = [produced[v.name] for v in old.outputs]
    mini.graph.outputs.clear()
    mini.graph.remove(new_nodes, safe=False)
    for node in new_nodes:
        for index, value in enumerate(node.inputs):
            if value is None or value.name in produced:
                continue
            if value.name in outer:
                node.replace_input_with(index, outer[value.name])
            elif value.name in mini.graph.initializers:
                tensor = mini.graph.initializers.pop(value.name)
                if tensor.name in graph.initializers:
                    raise ValueError(f"quantizing {old.name}: initializer {tensor.name} exists already")
                # A tensor read from a protobuf keeps the whole message (with the float weight) alive: copy out.
                tensor.const_value = ir.Tensor(tensor.const_value.numpy().copy(), dtype=tensor.const_value.dtype,
                                               name=tensor.name)
                graph.register_initializer(tensor)
    weights = [v for v in old.inputs if v is not None and v.const_value is not None]
    ir.convenience.replace_nodes_and_values(graph, old, [old], new_nodes, list(old.outputs), new_outputs)
    for value in weights:
        if not value.uses() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
            # The builder's lazy cast keeps the cast copy inside the tensor: drop it (and the torch storage
            # behind it) now, not when the last reference to the replaced node goes.
            value.const_value = None


def quantize_node_by_node(builder, standard_to_nbits) -> ir.Model:
    """The builder's `to_nbits`, one node at a time (same quantizer, same settings)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    q = builder.quant_attrs
    if getattr(builder, "int4_customized_weight_config", None) or (
            builder.ep == "cuda" and getattr(builder, "matmulnbits_weights_prepacked", 0) > 0):
        print("[lowmem] per-node bit widths or CUDA weight prepacking: using the builder's own quantization")
        return standard_to_nbits(builder)
    # The Hugging Face model: from here its weights live only in the graph, and go as they are quantized.
    builder.weights = None
    gc.collect()
    model, graph = builder.model, builder.model.graph
    kinds = set(q["op_types_to_quantize"] or ("MatMul",))
    excluded = set(q["nodes_to_exclude"])
    todo = [n for n in graph if n.op_type in kinds and n.name not in excluded
            and any(v is not None and v.const_value is not None for v in n.inputs)]
    total = len(todo)
    for done in range(1, total + 1):
        node = todo.pop(0)
        quantizer = MatMulNBitsQuantizer(
            model=_mini_model(node, model),
            bits=q["bits"],
            block_size=q["qdq_block_size"],
            is_symmetric=q["is_symmetric"],
            accuracy_level=q["accuracy_level"],
            nodes_to_exclude=[],
            quant_format=QuantFormat.QDQ if q["use_qdq"] else QuantFormat.QOperator,
            op_types_to_quantize=q["op_types_to_quantize"],
            algo_config=q["algo_config"],
        )
        quantizer.process()
        result = quantizer.model.model
        # A node the quantizer leaves as it is (a shape it does not take) stays as the builder made it.
        if [(n.op_type, n.domain) for n in result.graph.node] != [(node.op_type, node.domain)]:
            _splice(graph, model, node, result)
        del result
        del node, quantizer
        gc.collect()  # the mini graph is full of reference cycles: free its float weight now, not in 16 nodes
        if done % 16 == 0 or done == total:
            print(f"[lowmem] quantized {done}/{total} weights", flush=True)
    return model


def patch_builder() -> None:
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)
    # The builder imports its classes as the top-level package `builders`, not through onnxruntime_genai.
    from builders import base

    base.AutoModelForCausalLM = _load_in_checkpoint_dtype(base.AutoModelForCausalLM)
    standard_to_nbits = base.Model.to_nbits
    base.Model.to_nbits = lambda self: quantize_node_by_node(self, standard_to_nbits)


def main(argv: list[str]) -> None:
    patch_builder()
    sys.argv = [BUILDER_MODULE, *argv]
    runpy.run_module(BUILDER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
