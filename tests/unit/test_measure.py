"""The bare runtime opens the graph as the served engine does (hf2mlflow/measure.py `bare_session_options`)."""

import mlflow
import pytest

from hf2mlflow.measure import bare_session_options, logged_session_options
from hf2mlflow.runtime.genai_chat import genai_session_options
from hf2mlflow.runtime.kv_slots import session_options as served_session_options


def test_the_logged_session_options_are_read_where_log_model_writes_them(tmp_path):
    model = mlflow.models.Model()
    mlflow.pyfunc.add_to_model(model, loader_module="unused",
                               model_config={"session_options": {"allow_spinning": False}})
    model.save(str(tmp_path / "MLmodel"))
    assert logged_session_options(tmp_path) == {"allow_spinning": False}
    assert logged_session_options(tmp_path / "no-model-here") == {}


@pytest.mark.parametrize("logged", [{}, {"allow_spinning": False},
                                    {"intra_op_num_threads": 1, "allow_spinning": True}])
def test_bare_and_served_sessions_get_the_same_threads_and_spinning(logged):
    served = served_session_options(logged)
    bare = genai_session_options(bare_session_options(logged))
    # 0: onnxruntime's own default, which an unset served session keeps (onnxruntime-genai's would be its own).
    assert bare["intra_op_num_threads"] == served.intra_op_num_threads
    key = "session.intra_op.allow_spinning"  # unset on both sides: onnxruntime's default (spin)
    served_spinning = served.get_session_config_entry(key) if "allow_spinning" in logged else None
    assert bare.get(key) == served_spinning


def test_a_benchmark_thread_count_replaces_the_logged_one():
    assert bare_session_options({"intra_op_num_threads": 1, "allow_spinning": False}, threads=2) == {
        "intra_op_num_threads": 2, "allow_spinning": False}
    assert bare_session_options({"intra_op_num_threads": None}) == {"intra_op_num_threads": 0}
