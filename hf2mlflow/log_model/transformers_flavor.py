"""The log_transformers step: a Hugging Face model -> registered MLflow transformers model (task llm/v1/chat).

The seed's first path, done right: the target's device and dtype, the tokenizer's own chat template,
generation defaults from the target config, explicit and installable requirements, a registry alias.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

import mlflow

from hf2mlflow.config import Target, load_model, load_transformers_target
from hf2mlflow.contract import LOG_TRANSFORMERS_STEP, TORCH_CPU_INDEX, TRANSFORMERS_TASK, transformers_registered_name
from hf2mlflow.errors import ConfigError, StepError
from hf2mlflow.sources.resolve import resolve_model, source_params, source_tags
from hf2mlflow.tracking import check_alias, log_params_once, print_model_summary, set_alias, step_run
from hf2mlflow.step_args import LogTransformersArgs

STEP = LOG_TRANSFORMERS_STEP
TASK = TRANSFORMERS_TASK
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}


def requirements(device: str) -> list[str]:
    """Pinned to what this environment runs, without torchvision (a text model never imports it) and
    without torch's local version label (`2.13.0+cpu` is not on any index)."""
    version = importlib.metadata.version
    torch = f"torch=={version('torch').split('+')[0]}"
    pins = [f"mlflow=={version('mlflow')}", f"transformers=={version('transformers')}",
            f"tokenizers=={version('tokenizers')}", f"safetensors=={version('safetensors')}", torch]
    return ([TORCH_CPU_INDEX] if device == "cpu" else []) + pins


def model_config(target: Target) -> dict:
    """Generation defaults for MLflow's pipeline wrapper. It samples only when do_sample is set at log time:
    per-request temperature/top_p then tune the sampling, but cannot turn it on."""
    gen = target.generation
    config = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.temperature > 0}
    if config["do_sample"]:
        config.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    return config


def _load_pipeline(resolved, spec, target: Target, device: str, cache_dir: str):
    """The text-generation pipeline; the tokenizer (and its chat template) is checked before any weights load."""
    import torch
    import transformers

    # Hub models load by repo id so MLflow records where they came from (and can reference them).
    source = spec.hub_id if spec.source == "hub" else str(resolved.path)
    hub_kwargs = {"revision": resolved.revision or spec.revision, "cache_dir": cache_dir or None} \
        if spec.source == "hub" else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code,
                                                           **hub_kwargs)
    if not tokenizer.chat_template:
        raise StepError(f"model '{spec.name}': its tokenizer has no chat template (no 'chat_template' in "
                        f"tokenizer_config.json, no chat_template.jinja); MLflow's {TASK} task formats messages "
                        f"with it. Use the model's instruct/chat variant or add a template to the tokenizer.")
    print(f"[{STEP}] loading {source} in {target.transformers.dtype} on {device}")
    return transformers.pipeline(
        "text-generation", model=source, tokenizer=tokenizer, device=device,
        dtype=getattr(torch, target.transformers.dtype), trust_remote_code=spec.trust_remote_code,
        model_kwargs=hub_kwargs)


def log_transformers(args: LogTransformersArgs) -> str:
    """Log and register the transformers model; returns the `models:/name@alias` URI."""
    target = load_transformers_target(args.target)
    check_alias(args.alias)
    spec = load_model(args.model).with_overrides(args.revision, args.trust_remote_code)
    if not args.save_pretrained and spec.source != "hub":
        raise ConfigError(f"save_pretrained=false logs a reference to a Hugging Face hub checkpoint; model "
                          f"'{spec.name}' is {spec.source}, so its weights must be saved (save_pretrained=true)")
    settings = target.transformers
    registered = args.registered_model_name or \
        transformers_registered_name(spec.name, settings.device, settings.dtype)

    import torch
    device = settings.device
    if device == "cuda" and not torch.cuda.is_available():
        # Logging needs no GPU: MLflow records the dtype and picks the GPU at load time where one exists.
        print(f"[{STEP}] no CUDA device here: building the pipeline on cpu in {settings.dtype} to log it")
        device = "cpu"

    tags = {"model": spec.name, "target": target.name, "flavor": "transformers", "device": settings.device,
            "dtype": settings.dtype}
    params = dataclasses.asdict(args)
    with step_run(STEP, f"{STEP}-{registered}", tags, params) as run:
        print(f"[{STEP}] 1/2 resolving model '{spec.name}' ({spec.source}) and building the pipeline")
        resolved = resolve_model(spec, args.cache_dir)
        log_params_once(source_params(resolved))
        mlflow.set_tags(source_tags(resolved))
        pipeline = _load_pipeline(resolved, spec, target, device, args.cache_dir)
        print(f"[{STEP}] 2/2 logging the transformers model ({TASK}, save_pretrained={args.save_pretrained}) "
              f"and registering '{registered}'")
        info = mlflow.transformers.log_model(
            transformers_model=pipeline,
            name="model",
            task=TASK,
            model_config=model_config(target),
            torch_dtype=getattr(torch, settings.dtype),
            save_pretrained=args.save_pretrained,
            input_example=CHAT_EXAMPLE,
            pip_requirements=requirements(settings.device),
            metadata={"model": spec.name, "target": target.name, "device": settings.device,
                      "dtype": settings.dtype},
            registered_model_name=registered,
        )
        uri = set_alias(STEP, info, registered, args.alias)
    print_model_summary(STEP, run, info, uri)
    return uri
