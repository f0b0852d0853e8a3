"""python -m hf2mlflow.azureml deploy --model-uri models:/NAME@ALIAS --endpoint NAME --out FOLDER [options]"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf2mlflow.azureml.specs import BASE_IMAGE, Spec
from hf2mlflow.errors import failures_reported


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m hf2mlflow.azureml",
                                   description="Azure Machine Learning specs for a registered hf2mlflow model")
    commands = root.add_subparsers(dest="command", required=True)
    deploy = commands.add_parser("deploy", help="download a registered pyfunc and write validated az ml specs")
    deploy.add_argument("--model-uri", required=True,
                        help="the model at the current tracking URI (MLFLOW_TRACKING_URI), e.g. models:/NAME@ALIAS")
    deploy.add_argument("--endpoint", required=True,
                        help="endpoint name: 3-32 letters, digits and hyphens, starting with a letter; unique in "
                             "the Azure region")
    deploy.add_argument("--out", required=True, type=Path,
                        help="folder to write (new, or one this command wrote); under build/ it stays out of the "
                             "job's code upload")
    deploy.add_argument("--deployment", default="blue", help="deployment name (same rules as the endpoint's)")
    deploy.add_argument("--instance-type", default="Standard_DS3_v2", help="Azure VM size of each instance")
    deploy.add_argument("--instance-count", default=1, type=int, help="instances behind the endpoint, 1 or more")
    deploy.add_argument("--base-image", default=BASE_IMAGE, help="docker image the deployment's conda env builds on")
    deploy.add_argument("--compute", default="cpu-cluster", help="compute cluster for job.yml")
    deploy.add_argument("--experiment", default="hf2mlflow", help="experiment name for job.yml")
    deploy.add_argument("--job-model", default="",
                        help="job.yml's model config; default: the one the registered model was built from")
    deploy.add_argument("--job-target", default="",
                        help="job.yml's target; default: the one the registered model was built for")
    deploy.add_argument("--eval-limit", default=5, type=int, help="job.yml: evaluate the first N examples; 0: all")
    return root


def main(argv=None) -> Path:
    args = parser().parse_args(argv)
    spec = Spec(endpoint=args.endpoint, deployment=args.deployment, instance_type=args.instance_type,
                instance_count=args.instance_count, base_image=args.base_image, compute=args.compute,
                experiment=args.experiment, job_model=args.job_model, job_target=args.job_target,
                eval_limit=args.eval_limit)
    from hf2mlflow.azureml.deploy import deploy

    with failures_reported("azureml"):
        return deploy(args.model_uri, spec, args.out)


if __name__ == "__main__":
    main()
