"""Packages (the rest of the metadata is in pyproject.toml): hf2mlflow, and the project's top-level configs/
folder, which a wheel carries inside the package as hf2mlflow/configs (hf2mlflow.CONFIGS_DIR)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["hf2mlflow*"]), "hf2mlflow.configs"],
      package_dir={"hf2mlflow.configs": "configs"})
