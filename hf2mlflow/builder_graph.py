"""What the onnxruntime-genai builder's decoder graph does that the engine serving it must know (read with onnx at
conversion and logging time; the served runtime has no onnx)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import json


def long_rope_threshold(model_dir: Path) -> Optional[int]:
    """The attention-mask width above which the decoder graph switches to its long rotary cos/sin cache (LongRoPE
    graphs on CPU and CUDA: `If(Greater(Shape(attention_mask)[1], N))`), or None for a graph with one cache."""
    import onnx
    from onnx import numpy_helper

    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    graph = onnx.load(str(Path(model_dir) / decoder["filename"]), load_external_data=False).graph
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    producers = {out: n for n in graph.node for out in n.output}
    for node in graph.node:
        if node.op_type != "If" or node.input[0] not in producers:
            continue
        greater = producers[node.input[0]]
        if greater.op_type != "Greater" or greater.input[1] not in constants:
            continue
        if not _reads_mask_width(greater.input[0], producers, decoder["inputs"]["attention_mask"]):
            continue
        return int(numpy_helper.to_array(constants[greater.input[1]]).reshape(-1)[0])
    return None


def _reads_mask_width(value: str, producers: dict, mask: str) -> bool:
    """Whether `value` is Gather(Shape(attention_mask), 1), however the builder spells the Shape's input."""
    gather = producers.get(value)
    if gather is None or gather.op_type != "Gather":
        return False
    shape = producers.get(gather.input[0])
    return shape is not None and shape.op_type == "Shape" and shape.input[0] == mask
