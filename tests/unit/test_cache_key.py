"""main's step cache (hf2mlflow/workflow/main.py): a step runs again exactly when something that goes into its key
changed (entry point, parameters as MLflow stores them, upstream run IDs, code version, config digest), minus
the parameters the step leaves out of its key. Chain.step runs against a fake store: no run is launched."""

import re
from types import SimpleNamespace

import pytest

from hf2mlflow.config import config_file
from hf2mlflow.workflow import main as workflow
from hf2mlflow.workflow.main import CACHE_TAG, MainArgs, _model_digest, _sha256

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

    monkeypatch.setattr(workflow, "_reusable_run", reusable_run)
    monkeypatch.setattr(workflow, "_launch", launch)
    monkeypatch.setattr(workflow.mlflow, "MlflowClient",
                        lambda: SimpleNamespace(get_run=lambda run_id: SimpleNamespace(data=SimpleNamespace(tags={}))))
    monkeypatch.setattr(workflow.mlflow, "set_tag", lambda name, value: None)

    def step(entry_point, params, upstream, configs, code, not_in_key=(), args=None):
        monkeypatch.setattr(workflow, "code_version", lambda: code)
        chain = workflow.Chain("0", workflow.rerun_steps(args or MainArgs()))
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
    assert _sha256(b"ab", b"c") != _sha256(b"a", b"bc") != _sha256(b"abc")
    assert _sha256(b"ab", b"c") == _sha256(b"ab", b"c")


def test_a_models_digest_is_its_config_or_its_files_names_sizes_and_times(tmp_path):
    assert _model_digest("tiny-phi3") == config_file("models", "tiny-phi3").read_bytes()
    assert _model_digest("microsoft/Phi-3-mini-4k-instruct") == b"microsoft/Phi-3-mini-4k-instruct"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = _model_digest(str(folder))
    assert _model_digest(str(folder)) == first and b"config.json 2 " in first
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    second = _model_digest(str(folder))
    assert second != first and b"model.safetensors 8 " in second
    (folder / "config.json").write_text('{"a": 1}')
    assert _model_digest(str(folder)) not in (first, second)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert _model_digest(str(gguf)).startswith(b"m.gguf 4 ")
