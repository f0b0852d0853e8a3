import textwrap

import pytest

from hf2mlflow import CONFIGS_DIR, PROJECT_ROOT
from hf2mlflow.config import VALID_PRECISIONS, load_model, load_target, shipped
from hf2mlflow.errors import ConfigError
from tests.support import write_target


@pytest.mark.parametrize("name", shipped("targets"))
def test_every_shipped_target_loads(name):
    target = load_target(name)
    assert target.name == name
    assert target.precision in VALID_PRECISIONS[target.execution_provider]


@pytest.mark.parametrize("name", shipped("models"))
def test_every_shipped_model_loads(name):
    assert load_model(name).name == name


@pytest.mark.parametrize("name", shipped("datasets"))
def test_every_shipped_dataset_loads_with_all_its_examples(name):
    from hf2mlflow.datasets import load_dataset

    config, examples = load_dataset(name)
    assert config.name == name and len(examples) >= 20
    assert len({e.id for e in examples}) == len(examples)


def test_the_configs_sit_at_the_top_level_and_every_doc_names_real_ones():
    """configs/ stands beside MLproject (the shape the project promises), and every configs/... path that the
    README and docs name exists there."""
    import re

    assert CONFIGS_DIR == PROJECT_ROOT / "configs" and (PROJECT_ROOT / "MLproject").is_file()
    pages = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    named = {(page.name, path) for page in pages
             for path in re.findall(r"(?<![\w/.-])configs/[\w.*/-]*[\w*]", page.read_text())}
    assert {p for _, p in named} >= {"configs/targets/*.yaml", "configs/models/*.yaml"}
    missing = [(page, path) for page, path in named if not list(PROJECT_ROOT.glob(path))]
    assert not missing, missing


def test_the_required_targets_and_models_are_shipped():
    assert {"cpu-int4", "cpu-int8", "cpu-fp32", "cuda-fp16", "cuda-int4", "dml-int4", "webgpu-int4"} <= set(
        shipped("targets"))
    assert {"phi3-mini-4k-instruct", "phi3-mini-128k-instruct", "phi3.5-mini-instruct", "phi4-mini-instruct",
            "tiny-phi3", "tiny-qwen2", "tiny-gpt2"} <= set(shipped("models"))


def test_cpu_int4_is_the_recipe_the_teacher_forced_measure_chose():
    t = load_target("cpu-int4")
    assert (t.execution_provider, t.precision) == ("cpu", "int4")
    assert t.builder_options.as_cli() == ["block_size=32", "accuracy_level=4", "algo_config=k_quant",
                                          "matmul_mixed_precision=last_matmul:int8"]
    assert t.precision_budget.extra_bits_per_weight == 0.8 and t.precision_budget.bits_per_weight is None
    assert t.quality_floor.max_mean_kld == 0.3
    published = load_target(str(PROJECT_ROOT / "benchmarks" / "int4_recipes" / "published-phi3-build.yaml"))
    assert published.builder_options.as_cli() == ["block_size=32", "accuracy_level=4", "algo_config=default"]


def write(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


TARGET = """\
execution_provider: cpu
precision: int4
transformers: {device: cpu, dtype: float32}
"""


@pytest.mark.parametrize("text, key, expected", [
    ("precission: int4\nexecution_provider: cpu\ntransformers: {device: cpu, dtype: float32}\n",
     "precission", ["unknown key", "allowed keys:", "did you mean 'precision'"]),
    (TARGET + "builder_options: {blocksize: 32}\n", "builder_options.blocksize",
     ["unknown key", "block_size", "accuracy_level"]),
    (TARGET.replace("cpu\nprecision", "tpu\nprecision"), "execution_provider",
     ["'cpu'", "'cuda'", "'dml'", "'webgpu'"]),
    (TARGET.replace("int4", "fp16"), "(top level)",
     ["precision 'fp16'", "execution_provider 'cpu'", "allowed precisions for cpu: fp32, int8, int4"]),
    (TARGET + "builder_options: {block_size: big}\n", "builder_options.block_size", ["16", "256", "'big'"]),
    (TARGET.replace("int4", "fp32") + "builder_options: {block_size: 32}\n", "(top level)",
     ["block_size only apply to precision int4 or int8"]),
    (TARGET.replace("float32", "float16"), "transformers", ["'float16' needs device 'cuda'"]),
    ("execution_provider: cpu\nprecision: int4\ntransformers: {device: cpu}\n", "transformers.dtype",
     ["required key is missing"]),
    (TARGET + "generation: {temperature: -1}\n", "generation.temperature", ["greater than or equal to 0"]),
    (TARGET + "builder_options: {accuracy_level: 4}\nprecision_budget: {}\n", "precision_budget",
     ["exactly one of bits_per_weight and extra_bits_per_weight"]),
    (TARGET + "builder_options: {accuracy_level: 4}\n"
     "precision_budget: {bits_per_weight: 7, extra_bits_per_weight: 1}\n", "precision_budget",
     ["exactly one of bits_per_weight and extra_bits_per_weight"]),
    (TARGET + "precision_budget: {bits_per_weight: 7}\n", "(top level)", ["accuracy_level 4"]),
    (TARGET.replace("int4", "int8") + "precision_budget: {bits_per_weight: 7}\n", "(top level)",
     ["an int4 model for the cpu provider"]),
])
def test_bad_target_names_file_key_and_allowed(tmp_path, text, key, expected):
    path = write(tmp_path, "bad-target", text)
    with pytest.raises(ConfigError) as err:
        load_target(path)
    message = str(err.value)
    assert path in message and f"key '{key}'" in message
    for part in expected:
        assert part in message


def test_name_must_match_file(tmp_path):
    with pytest.raises(ConfigError, match="key 'name': 'other' must match the file name 'mine'"):
        load_target(write(tmp_path, "mine", "name: other\n" + TARGET))


def test_unknown_target_lists_shipped():
    with pytest.raises(ConfigError, match="unknown target 'cpu-int3'; shipped targets: cpu-fp32, cpu-int4"):
        load_target("cpu-int3")


def test_missing_target_file():
    with pytest.raises(ConfigError, match="target config file not found: /nope/t.yaml"):
        load_target("/nope/t.yaml")


@pytest.mark.parametrize("text, expected", [
    ("hub_id: a/b\nbuiltin: tiny-phi3\n",
     "set exactly one of hub_id, local_path, builtin, gguf_file, package, package_parts (got: hub_id, builtin)"),
    ("revision: main\n", "got: none"),
    ("hub_id: not a repo\n", "is not a Hugging Face repo id"),
    ("builtin: tiny-gpt9\n", "'tiny-phi3', 'tiny-qwen2' or 'tiny-gpt2'"),
    ("hub_id: a/b\ntrust_remote_code: maybe\n", "key 'trust_remote_code'"),
])
def test_bad_model_config(tmp_path, text, expected):
    path = write(tmp_path, "bad-model", text)
    with pytest.raises(ConfigError) as err:
        load_model(path)
    assert path in str(err.value) and expected in str(err.value)


def test_model_argument_forms(tmp_path):
    assert load_model("tiny-phi3").builtin == "tiny-phi3"
    hub = load_model("microsoft/Phi-3-mini-4k-instruct")
    assert (hub.source, hub.hub_id, hub.revision) == ("hub", "microsoft/Phi-3-mini-4k-instruct", "main")
    local = load_model(str(tmp_path))
    assert (local.source, local.local_path) == ("local", tmp_path)
    with pytest.raises(ConfigError, match="model folder not found: .*/no/such/folder"):
        load_model(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(ConfigError, match="unknown model 'phi-7'; shipped models: .*tiny-phi3"):
        load_model("phi-7")


@pytest.mark.parametrize("text, expected", [
    ("exporter: onnx\nexecution_provider: cpu\nprecision: fp32\n", ["key 'exporter'", "'genai-builder'", "'optimum'"]),
    ("exporter: optimum\nexecution_provider: cpu\nprecision: int8\n",
     ["key '(top level)'", "does not build precision 'int8'", "optimum builds cpu: fp32, fp16"]),
    ("exporter: optimum\nexecution_provider: dml\nprecision: fp16\n", ["for execution_provider 'dml'"]),
    ("exporter: optimum\nexecution_provider: cuda\nprecision: fp16\nbuilder_options: {enable_cuda_graph: true}\n",
     ["builder_options enable_cuda_graph are options of the genai-builder exporter"]),
])
def test_target_config_exporter_is_validated(tmp_path, text, expected):
    path = write_target(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_target(path)
    assert path in str(err.value)
    for part in expected:
        assert part in str(err.value)


def test_target_config_can_choose_optimum(tmp_path):
    # fp16 on the CPU is an optimum-only combination (checked: it exports and runs on onnxruntime's CPU provider).
    target = load_target(write_target(tmp_path, "exporter: optimum\nexecution_provider: cpu\nprecision: fp16\n"))
    assert target.with_exporter("").exporter == "optimum"
    assert load_target("cpu-fp32").with_exporter("").exporter == "genai-builder"


def test_session_options_are_checked_and_reach_genai_config_as_onnxruntime_spells_them(tmp_path):
    from hf2mlflow.runtime.genai_chat import genai_session_options

    path = write(tmp_path, "threads", "execution_provider: cpu\nprecision: int4\n"
                                      "session_options: {intra_op_num_threads: 1, allow_spinning: false}\n")
    options = load_target(path).session_options.model_dump(exclude_none=True)
    assert genai_session_options(options) == {"intra_op_num_threads": 1, "session.intra_op.allow_spinning": "0"}
    assert genai_session_options({}) == {} and load_target("cpu-int4").session_options.model_dump(
        exclude_none=True) == {}
    bad = write(tmp_path, "bad-threads", "execution_provider: cpu\nprecision: int4\nsession_options: {threads: 2}\n")
    with pytest.raises(ConfigError, match="key 'session_options.threads': unknown key; allowed keys: "
                                          "intra_op_num_threads, allow_spinning"):
        load_target(bad)


@pytest.mark.parametrize("name", shipped("gates"))
def test_every_shipped_gate_loads_with_a_valid_alias(name):
    from hf2mlflow.config import load_gate
    from hf2mlflow.tracking import check_alias

    gate = load_gate(name)
    assert gate.name == name and gate.precisions
    check_alias(gate.alias)


def test_a_gate_waives_only_checks_it_knows_naming_the_allowed_ones(tmp_path):
    from hf2mlflow.config import GateConfig, load_gate

    assert GateConfig(name="g", waive=["max_mean_kld"]).waive == ["max_mean_kld"]
    path = tmp_path / "my-gate.yaml"
    path.write_text("waive: [max_mean_kld, max_kld]\n")
    with pytest.raises(ConfigError) as err:
        load_gate(str(path))
    message = str(err.value)
    assert "my-gate.yaml" in message and "waive" in message and "max_kld" in message
    for allowed in ("min_tokenizer_agreement", "max_mean_kld", "min_top1_agreement", "min_parity_identical_rate",
                    "max_prompts_lost"):
        assert allowed in message
