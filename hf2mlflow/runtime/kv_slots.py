"""The onnxruntime-genai builder's decoder graph, run by onnxruntime directly, with a KV cache of rows (slots)
that sequences take and leave while others decode: what continuous batching needs and onnxruntime-genai 0.15's
`Generator` cannot do on CPU (its batch is fixed when it starts).

The graph's GroupQueryAttention reads each row's length from the attention mask and writes the new keys and
values in place when past and present are one buffer (genai_config.json's past_present_share_buffer), so rows
of different lengths decode together: row r holds its first `lengths[r]` positions, right-padded. A prompt is
prefilled in a run of its own, so its first token never depends on what else is running.

Graphs with two rotary regimes (LongRoPE: Phi-3 128k, Phi-3.5, Phi-4-mini) pick the long or short cos/sin cache
for the whole batch by the attention mask's width (`width > long_rope_threshold`). A row decoded alone sees the
width of its own length; so rows are decoded in groups of one regime each, and a row's answer never depends on
the lengths of its neighbours.
Pure numpy and onnxruntime: it ships with the logged pyfunc model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

# The cache grows in steps of this many positions (np.zeros does not touch the pages until they are written).
_CHUNK = 256
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(settings: dict):
    """onnxruntime SessionOptions from the target's `session_options` (intra_op_num_threads, allow_spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if settings.get("intra_op_num_threads") is not None:
        options.intra_op_num_threads = int(settings["intra_op_num_threads"])
    if settings.get("allow_spinning") is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings["allow_spinning"] else "0")
    return options


class SlotDecoder:
    """`prefill(row, ids)` puts a prompt into cache row `row`; `decode(tokens, lengths)` adds one token to each of
    rows 0..len(tokens)-1; both return next-token logits. `move` compacts rows as sequences leave.
    `all_logits(ids)` is a prefill into a cache of its own that returns every position's logits (the
    teacher-forced measure of the served engine). `long_rope_threshold`: the mask width above which the graph
    uses its long rotary factors (None: one regime); hf2mlflow/builder_graph.py reads it from the graph.
    `model_bytes`: a serialized graph to run instead of the folder's (a variant of it, with its weights inside)."""

    def __init__(self, model_dir: Path, settings: Optional[dict] = None, long_rope_threshold: Optional[int] = None,
                 model_bytes: Optional[bytes] = None):
        import onnxruntime as ort

        self._ort = ort
        decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
        names, layers = decoder["inputs"], int(decoder["num_hidden_layers"])
        graph = model_bytes if model_bytes is not None else str(Path(model_dir) / decoder["filename"])
        self.session = ort.InferenceSession(graph, session_options(settings or {}), providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._ids, self._mask = names["input_ids"], names["attention_mask"]
        extra = set(inputs) - {self._ids, self._mask} - {names["past_key_names"] % i for i in range(layers)} \
            - {names["past_value_names"] % i for i in range(layers)}
        if extra:
            raise ValueError(f"{model_dir}: the decoder graph has inputs this engine does not feed: {sorted(extra)}")
        outputs = decoder["outputs"]
        self._logits = outputs["logits"]
        self._pairs = [(names[f"past_{kind}_names"] % i, outputs[f"present_{kind}_names"] % i)
                       for i in range(layers) for kind in ("key", "value")]
        first = inputs[self._pairs[0][0]]
        self._dtype = _NUMPY_TYPES[first.type]
        self._row_shape = (int(decoder["num_key_value_heads"]), int(decoder["head_size"]))
        self._cache: dict[str, np.ndarray] = {}
        self.rows = self.positions = 0
        self.long_rope_threshold = long_rope_threshold

    def reserve(self, rows: int, positions: int, lengths: list[int]) -> None:
        """Room for `rows` rows of `positions` positions each, keeping the first `lengths[r]` positions of row r."""
        if rows <= self.rows and positions <= self.positions:
            return
        rows, positions = max(rows, self.rows), -(-max(positions, self.positions) // _CHUNK) * _CHUNK
        heads, head_size = self._row_shape
        for past, _ in self._pairs:
            grown = np.zeros((rows, heads, positions, head_size), dtype=self._dtype)
            if past in self._cache:
                for row, length in enumerate(lengths):
                    grown[row, :, :length] = self._cache[past][row, :, :length]
            self._cache[past] = grown
        self.rows, self.positions = rows, positions

    def release(self) -> None:
        """Drop the cache (nothing is running)."""
        self._cache, self.rows, self.positions = {}, 0, 0

    def move(self, source: int, target: int, length: int) -> None:
        for past, _ in self._pairs:
            self._cache[past][target, :, :length] = self._cache[past][source, :, :length]

    def _run(self, caches: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One pass of the graph over `caches` (past name -> [rows, heads, positions, head_size], contiguous);
        the logits, [rows, tokens, vocab]."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._ids, ids)
        binding.bind_cpu_input(self._mask, mask)
        for past, present in self._pairs:
            buffer = self._ort.OrtValue.ortvalue_from_numpy(caches[past])
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)  # the same memory: written in place
        binding.bind_output(self._logits)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()

    def _rows(self, first: int, count: int) -> dict[str, np.ndarray]:
        rows = slice(first, first + count)  # contiguous: the row axis comes first
        return {past: self._cache[past][rows] for past, _ in self._pairs}

    def prefill(self, row: int, prompt_ids: list[int]) -> np.ndarray:
        """The prompt's keys and values into row `row` (reserved); the logits after its last token."""
        ids = np.array([prompt_ids], dtype=np.int64)
        return self._run(self._rows(row, 1), ids, np.ones_like(ids))[0, -1]

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """The logits at every position of `ids`, [len(ids), vocab]: a prefill, into a cache of its own."""
        heads, head_size = self._row_shape
        positions = -(-len(ids) // _CHUNK) * _CHUNK
        scratch = {past: np.zeros((1, heads, positions, head_size), dtype=self._dtype) for past, _ in self._pairs}
        batch = np.array([ids], dtype=np.int64)
        return self._run(scratch, batch, np.ones_like(batch))[0]

    def _long(self, length: int) -> bool:
        """Whether a row holding `length` positions decodes its next token with the long rotary factors."""
        return self.long_rope_threshold is not None and length + 1 > self.long_rope_threshold

    def decode(self, tokens: list[int], lengths: list[int]) -> np.ndarray:
        """One new token for each of rows 0..len(tokens)-1, whose caches hold `lengths` positions; [rows, vocab].
        Each run of neighbouring rows in one rotary regime is one pass of the graph."""
        out, first = [], 0
        while first < len(tokens):
            end = first + 1
            while end < len(tokens) and self._long(lengths[end]) == self._long(lengths[first]):
                end += 1
            group = lengths[first:end]
            mask = np.zeros((len(group), max(group) + 1), dtype=np.int64)
            for row, length in enumerate(group):
                mask[row, :length + 1] = 1
            ids = np.array(tokens[first:end], dtype=np.int64)[:, None]
            out.append(self._run(self._rows(first, len(group)), ids, mask)[:, -1])
            first = end
        return out[0] if len(out) == 1 else np.concatenate(out)
