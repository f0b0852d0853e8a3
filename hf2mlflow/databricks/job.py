"""The task file of the databricks_spark_job route (Databricks Runtime 13 and newer).

MLflow 3.17.2 submits this file's code as a Databricks spark_python_task. In front of it MLflow puts code that
unpacks the project and changes into its folder; as the task's parameters it passes the entry point's command
line split on single spaces, so shell quoting stays in the pieces (an empty value arrives as the two
characters ''). Joining the pieces with spaces gives back the command line MLflow built, and shlex splits it
the way a shell would; then the step script runs as `python steps/<step>.py ...` would run it.
No `from __future__` import here: MLflow appends this code after its own, and those must come first.
"""

import os
import runpy
import shlex
import sys


def main(pieces):
    args = shlex.split(" ".join(pieces))
    if not args:
        sys.exit("hf2mlflow/databricks/job.py: no step given; expected: STEP [--param value ...]")
    step, rest = args[0], args[1:]
    script = os.path.join("steps", f"{step}.py")
    if not os.path.isfile(script):
        sys.exit(f"hf2mlflow/databricks/job.py: no step script {script} under {os.getcwd()} "
                 f"(the unpacked project folder)")
    sys.path.insert(0, os.getcwd())
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
