"""What every stage shares: the mesh (checked against the batch), the tokenizer the config
names, params from another run (or the whole run, to sample from), and the line that says
what a run will do."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from jaxllm.checkpoint import load_run_params
from jaxllm.config import Config, MeshConfig, load_config
from jaxllm.errors import ConfigError
from jaxllm.model import LanguageModel, Params
from jaxllm.sharding import check_batch_fits, make_mesh, tree_shardings
from jaxllm.state import abstract_with_shardings
from jaxllm.tokenizer import Tokenizer, load_tokenizer


def configured_mesh(cfg: Config) -> Mesh:
    """The mesh of `cfg.mesh`, checked to split every micro-batch evenly over its rows."""
    mesh = make_mesh(cfg.mesh)
    check_batch_fits(mesh, cfg.train.batch_size, cfg.train.grad_accum)
    return mesh


def load_configured_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer `data.tokenizer` names, checked against the model's vocabulary."""
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (ValueError, OSError) as error:
        raise ConfigError(f"data.tokenizer: {error}") from None
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} "
            f"ids of tokenizer '{tokenizer.name}'; raise model.vocab_size to at least "
            f"{tokenizer.vocab_size} (a multiple of 64 is fastest)"
        )
    return tokenizer


def params_from_run(run_dir: str, from_key: str) -> Callable[[Params, Any], Params]:
    """A Stage.initial_params that loads the newest params of the run in `run_dir` (heads
    it lacks stay fresh). `from_key` is the setting that named the run (`sft.init_from`)."""

    def load(fresh_params: Params, shardings: Any) -> Params:
        abstract = abstract_with_shardings(jax.eval_shape(lambda: fresh_params), shardings)
        return load_run_params(run_dir, abstract, fresh_params, from_key)

    return load


@dataclass(frozen=True)
class LoadedRun:
    """A finished run's config, tokenizer, model and newest params."""

    cfg: Config
    tokenizer: Tokenizer
    model: LanguageModel
    params: Params


def load_run(run_dir: str | Path, from_key: str = "--checkpoint", mesh: Mesh | None = None):
    """The run in `run_dir` (its config.yaml and newest checkpoint), params laid out on
    `mesh` (default: the first device). `from_key` names the setting that pointed here."""
    run_dir = Path(run_dir)
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{from_key}={run_dir}: no config.yaml there; pass the out_dir of a training run"
        )
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_configured_tokenizer(cfg)
    model = LanguageModel(cfg.model)
    mesh = mesh if mesh is not None else make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    shardings = tree_shardings(mesh, model.abstract_params, model.logical_axes, model.rules)
    abstract = abstract_with_shardings(model.abstract_params, shardings)
    return LoadedRun(cfg, tokenizer, model, load_run_params(run_dir, abstract, None, from_key))


def announce(stage: str, text: str) -> None:
    """Print what the run will do, once (process 0)."""
    if jax.process_index() == 0:
        print(f"{stage}: {text}", flush=True)
