"""Which weight matrices of an int4 model keep 8 bits under a size budget, chosen by the quality each one keeps.

A matrix's sensitivity is measured, not guessed: the builder makes the model twice with the target's options,
every matrix at 4 bits (`base`) and every matrix at 8 bits (`upgraded`); for each matrix, the base graph with that
one matrix taken from the upgraded graph is run on the calibration text through the served engine's decoder
(runtime/kv_slots.py), and its teacher-forced KL divergence from the source model in PyTorch float32 is set
against the base's. The saving per byte ranks the matrices; 8 bits go down that ranking until the budget is
spent (`allocate`). The table is kept on disk, keyed by what it depends on, so a model is measured once.
Tables measured for the models that come from the package registry ship in `sensitivity_tables/`, under the
same key: one is used only where every input it depends on is the same (the cache folder takes precedence).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

CALIBRATION_TEXT = "sources/data/calibration_english.txt"  # its source and license: sources/data/README.md
CALIBRATION_WINDOW = 256
SKIPPED_POSITIONS = 16  # the first positions of a window see too little context to say much
SENSITIVITY_ARTIFACT = "sensitivity.json"
TABLE_VERSION = 1  # part of every table's key: raise it when what `measure` computes changes
SHIPPED_TABLES = "convert/sensitivity_tables"  # in the package
_QUANTIZED_SUFFIX = re.compile(r"_Q\d+$")


@dataclass
class Matrix:
    """One quantized weight matrix: its builder name, its weights, its stored bytes at 4 and at 8 bits
    (scales and zero points included), and the mean KL divergence it saves at 8 bits."""

    name: str
    params: int
    bytes_4bit: int
    bytes_8bit: int
    kld_saved: float = float("nan")

    @property
    def extra_bytes(self) -> int:
        return self.bytes_8bit - self.bytes_4bit


def node_key(name: str) -> str:
    """The builder's name of a MatMul (what node_bits.py takes) from its quantized node's name."""
    return _QUANTIZED_SUFFIX.sub("", name)


def _tensor_bytes(tensor) -> int:
    from onnx import helper

    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def quantized_matrices(model) -> dict[str, tuple[int, int, int]]:
    """MatMulNBits nodes of an onnx.ModelProto: builder name -> (weights, stored bytes, bits)."""
    from onnx import helper

    sizes = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        stored = sum(sizes.get(name, 0) for name in node.input[1:])
        found[node_key(node.name)] = (int(attrs["K"]) * int(attrs["N"]), stored, int(attrs["bits"]))
    return found


def graft(base, upgraded, names: set[str]):
    """A copy of `base` (onnx.ModelProto) whose MatMulNBits `names` (builder names) are `upgraded`'s nodes, with
    their weights; the base's weights they replace are left out."""
    from onnx import ModelProto

    nodes = {node_key(n.name): n for n in upgraded.graph.node if n.op_type == "MatMulNBits"}
    upgraded_inits = {t.name: t for t in upgraded.graph.initializer}
    out = ModelProto()
    out.CopyFrom(base)
    del out.graph.node[:]
    added, others = [], set()
    for node in base.graph.node:
        if node.op_type == "MatMulNBits" and node_key(node.name) in names:
            node = nodes[node_key(node.name)]
            added.extend(name for name in node.input[1:] if name)
        else:
            others.update(node.input)
        out.graph.node.append(node)
    # Each matrix has weights of its own, named alike at both widths (its scales, its zero points).
    shared = sorted(others.intersection(added))
    if shared:
        raise ValueError(f"cannot upgrade {sorted(names)}: weights {shared} are shared with other nodes")
    del out.graph.initializer[:]
    out.graph.initializer.extend(t for t in base.graph.initializer if t.name in others)
    out.graph.initializer.extend(upgraded_inits[name] for name in dict.fromkeys(added))
    return out


def calibration_ids(encode: Callable[[str], list[int]], tokens: int) -> list[int]:
    from importlib import resources

    text = resources.files("hf2mlflow").joinpath(CALIBRATION_TEXT).read_text(encoding="utf-8")
    return encode(text)[:tokens]


def _windows(ids: list[int], bos: Optional[int]) -> list[list[int]]:
    chunks = [ids[i:i + CALIBRATION_WINDOW] for i in range(0, len(ids), CALIBRATION_WINDOW)]
    chunks = [c for c in chunks if len(c) > SKIPPED_POSITIONS + 1]
    return [[bos, *c[1:]] if bos is not None else c for c in chunks]


class Reference:
    """The reference's next-token distributions at the measured positions, kept as what KL(p || q) needs of p:
    p itself and its entropy, so a candidate costs one log-softmax."""

    def __init__(self, logits: list[np.ndarray]):
        from hf2mlflow.quality import log_softmax

        logs = [log_softmax(window[SKIPPED_POSITIONS:]) for window in logits]
        self.probs = [np.exp(lp).astype(np.float32) for lp in logs]
        self.neg_entropy = [(np.exp(lp) * lp).sum(-1) for lp in logs]

    def mean_kld(self, candidate_logits: list[np.ndarray]) -> float:
        """Mean KL(reference || candidate) over every position past the first SKIPPED_POSITIONS of each window."""
        klds = []
        for p, neg_entropy, logits in zip(self.probs, self.neg_entropy, candidate_logits):
            logits = np.asarray(logits[SKIPPED_POSITIONS:], np.float32)
            top = logits.max(-1, keepdims=True)
            log_q = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            klds.append(np.maximum(neg_entropy - (p * log_q).sum(-1, dtype=np.float64), 0.0))
        return float(np.concatenate(klds).mean())


def measure(base_dir: Path, upgraded_dir: Path, reference, ids: list[int], session_settings: dict,
            log=print) -> dict:
    """The sensitivity table: each matrix's stored sizes and the mean KL divergence it saves at 8 bits, measured
    on `ids` against `reference` (a parity.TorchModel of the source model)."""
    import onnx

    from hf2mlflow.measure import cpu_name
    from hf2mlflow.runtime.kv_slots import SlotDecoder

    windows = _windows(ids, reference.bos_id)
    expected = Reference([np.asarray(reference.all_logits(w), np.float32) for w in windows])
    base, upgraded = onnx.load(str(base_dir / "model.onnx")), onnx.load(str(upgraded_dir / "model.onnx"))

    def kld_of(model) -> float:
        decoder = SlotDecoder(base_dir, session_settings, model_bytes=model.SerializeToString())
        return expected.mean_kld([decoder.all_logits(w) for w in windows])

    at_4, at_8 = quantized_matrices(base), quantized_matrices(upgraded)
    candidates = [name for name, (_, _, bits) in at_4.items() if bits == 4 and at_8.get(name, (0, 0, 0))[2] == 8]
    base_kld = kld_of(base)
    log(f"[sensitivity] all {len(candidates)} 4-bit matrices: mean KLD {base_kld:.4g} on "
        f"{sum(len(w) - SKIPPED_POSITIONS for w in windows)} positions of the calibration text; measuring each "
        f"at 8 bits")
    matrices, start = [], time.perf_counter()
    for done, name in enumerate(candidates, 1):
        kld = kld_of(graft(base, upgraded, {name}))
        matrices.append(Matrix(name, at_4[name][0], at_4[name][1], at_8[name][1], base_kld - kld))
        if done % 10 == 0 or done == len(candidates):
            left = (time.perf_counter() - start) / done * (len(candidates) - done)
            log(f"[sensitivity] {done}/{len(candidates)} matrices measured, about {left:.0f} s left")
    fixed = sum(b for name, (_, b, _) in at_4.items() if name not in candidates)
    fixed_params = sum(p for name, (p, _, _) in at_4.items() if name not in candidates)
    # The CPU's int8 kernels decide the last digits of each figure.
    return {"measured": {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {cpu_name()}"},
            "base_mean_kld": base_kld, "calibration_tokens": len(ids), "fixed_bytes": fixed,
            "fixed_params": fixed_params, "matrices": [asdict(m) for m in matrices]}


def allocate(table: dict, budget) -> tuple[list[str], dict]:
    """The matrices to upgrade to 8 bits: by KL divergence saved per extra byte, best first, each taken if it
    still fits `budget` (config.PrecisionBudget); and what the choice comes to."""
    matrices = [Matrix(**m) for m in table["matrices"]]
    params = table["fixed_params"] + sum(m.params for m in matrices)
    spent = table["fixed_bytes"] + sum(m.bytes_4bit for m in matrices)
    limit = budget.bits_per_weight if budget.bits_per_weight is not None \
        else spent * 8 / params + budget.extra_bits_per_weight
    chosen, saved = [], 0.0
    for m in sorted(matrices, key=lambda m: m.kld_saved / m.extra_bytes, reverse=True):
        if m.kld_saved > 0 and (spent + m.extra_bytes) * 8 / params <= limit:
            chosen.append(m.name)
            spent += m.extra_bytes
            saved += m.kld_saved
    return chosen, {"bits_per_weight": spent * 8 / params, "budget_bits_per_weight": limit,
                    "upgraded_matrices": len(chosen), "quantized_matrices": len(matrices),
                    "calibration_mean_kld_4bit": table["base_mean_kld"],
                    # Savings measured one matrix at a time do not add up exactly: a forecast, not a figure.
                    "calibration_mean_kld_forecast": table["base_mean_kld"] - saved}


def table_key(source_digest: str, reference_runtime: dict, builder: str, options: list[str], ids: list[int]) -> str:
    """What a table depends on: the source model's files, how the reference runs, the builder and its options,
    the calibration token ids, and how the table is measured."""
    key = json.dumps({"source": source_digest, "reference": reference_runtime, "builder": builder,
                      "options": sorted(options), "window": CALIBRATION_WINDOW, "skipped": SKIPPED_POSITIONS,
                      "version": TABLE_VERSION}, sort_keys=True).encode() + np.asarray(ids, np.int64).tobytes()
    return hashlib.sha256(key).hexdigest()[:32]


def cached_table(folder: Path, key: str, make: Callable[[], dict]) -> tuple[dict, str]:
    """The table under folder/<key>.json, else the one shipped under that key, else made by `make` and written
    whole or not at all, so a killed run leaves nothing half-made to reuse. Returns the table and where it came
    from: 'reused from the cache', 'shipped with hf2mlflow' or 'measured'."""
    from importlib import resources

    path = folder / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text()), "reused from the cache"
    shipped = resources.files("hf2mlflow").joinpath(f"{SHIPPED_TABLES}/{key}.json")
    if shipped.is_file():
        return json.loads(shipped.read_text()), "shipped with hf2mlflow"
    table = make()
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(table, indent=1))
    partial.replace(path)
    return table, "measured"


@dataclass
class Choice:
    """The matrices given 8 bits (builder names), the table they were chosen from, what the choice comes to,
    and where the table came from (cached_table)."""

    upgraded: list[str]
    table: dict
    summary: dict
    source: str

    def node_bits(self) -> dict:
        """The content of hf2mlflow/convert/node_bits.py's FILE."""
        return {"nodes": {name: 8 for name in self.upgraded}}

    def artifact(self) -> dict:
        chosen = set(self.upgraded)
        rows = [{**m, "bits": 8 if m["name"] in chosen else 4} for m in self.table["matrices"]]
        return {**{k: v for k, v in self.table.items() if k != "matrices"}, **self.summary, "matrices": rows}


def table_inputs(source_dir: Path, target, reference) -> tuple[list[int], str]:
    """The calibration ids and the table's key for `target`'s precision_budget; `reference` is the source model
    in PyTorch (parity.TorchModel)."""
    from hf2mlflow.convert.genai_builder import builder_version
    from hf2mlflow.digest import content_digest

    ids = calibration_ids(reference.encode, target.precision_budget.calibration_tokens)
    key = table_key(content_digest(source_dir), reference.runtime, builder_version(),
                    target.builder_options.as_cli(), ids)
    return ids, key


def choose(source_dir: Path, target, reference, trust_remote_code: bool, work: Path, low_memory: bool = False,
           log=print) -> Choice:
    """The 8-bit matrices for `target`'s precision_budget: the sensitivity table from the cache, or measured by
    building the model at 4 and at 8 bits in `work`; then the budget's allocation."""
    import shutil

    from hf2mlflow.convert.genai_builder import run_builder
    from hf2mlflow.sources.tiny import home

    ids, key = table_inputs(source_dir, target, reference)

    def make() -> dict:
        base, upgraded, every = work / "sensitivity-4bit", work / "sensitivity-8bit", work / "every-8bit.json"
        every.write_text(json.dumps({"every": 8}))
        log("[sensitivity] building the model with every matrix at 4 bits, then at 8 bits")
        run_builder(source_dir, base, work / "builder-cache", target, trust_remote_code, low_memory, log)
        run_builder(source_dir, upgraded, work / "builder-cache", target, trust_remote_code, low_memory, log,
                    node_bits=every)
        try:
            # Every core for the measure, whatever the target serves with: the figures do not depend on it.
            settings = {**target.session_options.model_dump(exclude_none=True),
                        "intra_op_num_threads": os.cpu_count() or 1}
            return measure(base, upgraded, reference, ids, settings, log)
        finally:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(upgraded, ignore_errors=True)

    table, source = cached_table(home() / "sensitivity", key, make)
    upgraded, summary = allocate(table, target.precision_budget)
    return Choice(upgraded, table, summary, source)
