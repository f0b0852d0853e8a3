"""The chain's step cache (hf2mlflow/workflow/chain.py): a step runs again exactly when something that goes into its
key changed (entry point, parameters as MLflow stores them, upstream run IDs, code version, config digest), minus
the parameters the step leaves out of its key. Chain.step runs against a fake store: no run is launched. The
model's part of the key: its config, the content of its local files, its hub commit."""

import os
import re
from types import SimpleNamespace

import pytest

from hf2mlflow.config import config_file
from hf2mlflow.workflow import chain as engine
from hf2mlflow.workflow.chain import CACHE_TAG, ChainModel, configs_digest
from hf2mlflow.workflow.main import MainArgs, rerun_steps

BASE = {"entry_point": "evaluate", "params": {"models": "run-a,run-b", "dataset": "capitals-and-facts", "limit": 0},
        "upstream": {"log_pyfunc": "run-a", "log_transformers": "run-b"}, "configs": "digest-1", "code": "commit-1"}


@pytest.fixture
def chain(monkeypatch):
    """step(**inputs): what Chain.step looked up and launched for those inputs, in a store holding `finished`
    ({cache key: run ID}) as its FINISHED runs."""
    state = SimpleNamespace(finished={}, lookups=[], launched=[])

    def reusable_run(experiment_id, key):
        state.lookups.append(key)
        return SimpleNamespace(info=SimpleNamespace(run_id=state.finished[key])) if key in state.finished else None

    def launch(entry_point, params, tags, experiment_id):
        state.launched.append({"entry_point": entry_point, "params": params, "tags": tags})
        return f"new-run-{len(state.launched)}"

    monkeypatch.setattr(engine, "_reusable_run", reusable_run)
    monkeypatch.setattr(engine, "_launch", launch)
    monkeypatch.setattr(engine.mlflow, "MlflowClient",
                        lambda: SimpleNamespace(get_run=lambda run_id: SimpleNamespace(data=SimpleNamespace(tags={}))))
    monkeypatch.setattr(engine.mlflow, "set_tag", lambda name, value: None)

    def step(entry_point, params, upstream, configs, code, not_in_key=(), args=None):
        monkeypatch.setattr(engine, "code_version", lambda: code)
        chain = engine.Chain("0", "main", rerun_steps(args or MainArgs()))
        return chain.step(entry_point, params, upstream, configs, not_in_key)

    state.step = step
    return state


def key_of(chain, **changes):
    chain.step(**{**BASE, **changes})
    return chain.lookups[-1]


def test_the_same_inputs_give_the_same_key_and_the_launched_run_carries_it(chain):
    first = key_of(chain)
    assert re.fullmatch(r"[0-9a-f]{64}", first)  # safe inside the tag filter string
    assert key_of(chain) == first
    # Order does not count, and parameters count as MLflow stores them: as strings.
    reordered = {"limit": "0", "dataset": "capitals-and-facts", "models": "run-a,run-b"}
    assert key_of(chain, params=reordered, upstream=dict(reversed(BASE["upstream"].items()))) == first
    launched = chain.launched[0]
    assert launched["tags"][CACHE_TAG] == first and launched["params"]["limit"] == "0"
    assert launched["tags"]["code_version"] == "commit-1" and launched["tags"]["config_digest"] == "digest-1"
    assert launched["tags"]["upstream.log_pyfunc"] == "run-a"


@pytest.mark.parametrize("changes", [
    {"entry_point": "log_pyfunc"},
    {"params": {**BASE["params"], "limit": 2}},
    {"params": {**BASE["params"], "dataset": "other"}},
    {"params": {**BASE["params"], "extra": ""}},  # a parameter more, even empty
    {"params": {k: v for k, v in BASE["params"].items() if k != "limit"}},
    {"upstream": {**BASE["upstream"], "log_pyfunc": "run-c"}},
    {"upstream": {"log_pyfunc": "run-a"}},
    {"code": "commit-2"},
    {"configs": "digest-2"},
], ids=lambda changes: "-".join(changes))
def test_any_changed_input_changes_the_key(chain, changes):
    assert key_of(chain, **changes) != key_of(chain)


def test_parameters_left_out_of_the_key_do_not_change_it_but_still_reach_the_step(chain):
    step = {"entry_point": "log_transformers", "upstream": {}, "configs": "digest-1", "code": "commit-1",
            "not_in_key": ("target",)}
    chain.step(params={"model": "tiny-phi3", "target": "cpu-fp32"}, **step)
    chain.step(params={"model": "tiny-phi3", "target": "cpu-int4"}, **step)
    chain.step(params={"model": "tiny-qwen2", "target": "cpu-fp32"}, **step)
    assert chain.lookups[0] == chain.lookups[1] != chain.lookups[2]
    assert [run["params"]["target"] for run in chain.launched] == ["cpu-fp32", "cpu-int4", "cpu-fp32"]
    chain.step(params={"model": "tiny-phi3", "target": "cpu-int4"}, **{**step, "not_in_key": ()})
    assert chain.lookups[3] != chain.lookups[1]


def test_a_finished_run_with_the_key_is_reused_unless_a_rerun_is_asked_for(chain):
    chain.finished[key_of(chain)] = "old-run"
    reused = chain.step(**BASE)
    assert (reused.run_id, reused.reused) == ("old-run", True) and len(chain.launched) == 1
    for args in (MainArgs(rerun_from="log_transformers"), MainArgs(force=True)):
        lookups = len(chain.lookups)
        rerun = chain.step(**BASE, args=args)
        assert not rerun.reused and rerun.run_id.startswith("new-run-") and len(chain.lookups) == lookups
    # rerun_from still reuses the steps before the one it names.
    chain.finished[key_of(chain, entry_point="log_pyfunc")] = "old-pyfunc"
    assert chain.step(**{**BASE, "entry_point": "log_pyfunc"}, args=MainArgs(rerun_from="evaluate")).reused
    assert not chain.step(**BASE, args=MainArgs(rerun_from="evaluate")).reused


def test_config_digests_keep_their_parts_apart():
    assert configs_digest(b"ab", b"c") != configs_digest(b"a", b"bc") != configs_digest(b"abc")
    assert configs_digest(b"ab", b"c") == configs_digest(b"ab", b"c")


def model_digest(name_or_path):
    return ChainModel.resolve(str(name_or_path), "test").digest


def test_a_model_is_keyed_by_its_config_its_files_content_and_its_hub_commit(tmp_path, monkeypatch):
    builtin = ChainModel.resolve("tiny-phi3", "test")
    assert builtin.digest == configs_digest(config_file("models", "tiny-phi3").read_bytes())
    assert builtin.spec.builtin == "tiny-phi3" and builtin.source_params == {}
    monkeypatch.setattr("hf2mlflow.sources.resolve.hub_commit", lambda hub_id, revision: "c" * 40)
    hub = ChainModel.resolve("microsoft/Phi-3-mini-4k-instruct", "test")
    assert hub.digest == configs_digest(b"microsoft/Phi-3-mini-4k-instruct")
    assert hub.source_params == {"revision": "c" * 40}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = model_digest(folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    assert model_digest(folder) != first
    # A model config naming a local folder: the folder's content counts too, not only the YAML.
    config = tmp_path / "local.yaml"
    config.write_text(f"local_path: {folder}\n")
    before = model_digest(config)
    (folder / "model.safetensors").write_bytes(b"\1" * 8)
    assert model_digest(config) != before


def _rewrite_keeping_mtime(path, text):
    """A same-size edit that keeps the file's mtime, as `cp -p` or `rsync -t` leave it."""
    before = path.stat()
    assert len(text) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("edited", ["model/config.json", "model/tokenizer/tokenizer.json", "m.gguf"])
def test_a_same_size_edit_that_keeps_the_mtime_changes_a_local_models_digest(tmp_path, edited):
    """In a folder's top level, in a subfolder, or a GGUF file."""
    (tmp_path / "model" / "tokenizer").mkdir(parents=True)
    (tmp_path / "model" / "config.json").write_text('{"layers": 2}')
    (tmp_path / "model" / "tokenizer" / "tokenizer.json").write_text('{"merges": "ab"}')
    (tmp_path / "m.gguf").write_text("GGUF-2")
    model = tmp_path / edited.split("/")[0]
    first = model_digest(model)
    assert model_digest(model) == first
    path = tmp_path / edited
    _rewrite_keeping_mtime(path, path.read_text().replace("2", "3").replace("ab", "ba"))
    assert model_digest(model) != first
