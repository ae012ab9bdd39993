"""What every stage shares: the mesh (checked against the batch), the tokenizer the config
names, params from another run (or the whole run, to sample from), and the line that says
what a run will do."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.chat_templates import CHAT_TEMPLATES
from jaxllm.checkpoint import load_run_params
from jaxllm.config import Config, LoraConfig, MeshConfig, load_run_config
from jaxllm.errors import ConfigError, UserError
from jaxllm.hf.tokenizer import HFTokenizer, hf_tokenizer_file
from jaxllm.lora import partition, split_trainable
from jaxllm.model import LanguageModel, Params
from jaxllm.quant import float_abstract, holds_quantized, is_quantized, stored_like
from jaxllm.run_inputs import newest_step
from jaxllm.sharding import check_batch_fits, make_mesh, tree_shardings
from jaxllm.state import TrainState, abstract_with_shardings
from jaxllm.tokenizer import Tokenizer, load_tokenizer
from jaxllm.trainer import PARAM_SHAPE_KEYS


def configured_mesh(cfg: Config) -> Mesh:
    """The mesh of `cfg.mesh`, checked to split every micro-batch evenly over its rows."""
    mesh = make_mesh(cfg.mesh)
    check_batch_fits(mesh, cfg.train.batch_size, cfg.train.grad_accum)
    return mesh


def load_configured_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer `data.tokenizer` names, checked against the model's vocabulary: a
    Hugging Face tokenizer.json or the folder holding one (`HFTokenizer`, writing messages
    in the model's own template or a .jinja file's, as `chat.template` says), else `bytes`,
    a tiktoken encoding or a .tiktoken file (jaxllm's own, writing messages in the
    `chat.template` format)."""
    hf_file = hf_tokenizer_file(cfg.data.tokenizer)
    try:
        if hf_file is not None:
            tokenizer = HFTokenizer(hf_file, cfg.chat.template, cfg.chat.enable_thinking)
        elif cfg.chat.template not in CHAT_TEMPLATES:
            raise ConfigError(
                f"chat.template={cfg.chat.template} is a model's Jinja template; "
                f"data.tokenizer={cfg.data.tokenizer} is jaxllm's own, which writes "
                f"{' or '.join(CHAT_TEMPLATES)}: set chat.template to one of them"
            )
        else:
            tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.chat.template)
    except UserError:
        raise
    except (ValueError, OSError) as error:
        raise ConfigError(f"data.tokenizer: {error}") from None
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} "
            f"ids of tokenizer '{tokenizer.name}'; raise model.vocab_size to at least "
            f"{tokenizer.vocab_size} (a multiple of 64 is fastest)"
        )
    return tokenizer


def lora_run_config(run_dir: str | Path) -> Config | None:
    """The config of the run in `run_dir` when it trained adapters (`lora.rank` > 0), else
    None (no adapters, or no config.yaml)."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return None
    run_cfg = load_run_config(config)
    return run_cfg if run_cfg.lora.rank > 0 else None


def read_run_params(
    run_dir: str | Path, abstract: Params, fresh_params: Params | None, from_key: str
) -> Params:
    """`load_run_params` for any run: a LoRA run's params are read whole (its base and
    adapters) and its adapters merged into the weights (`LanguageModel.merged_params`), so
    a LoRA run starts, scores or rewards like the model it has become. The run is read as
    float32 and its leaves stored as `abstract` says (`fit_params`: a QLoRA base quantised
    here, `jaxllm.quant`)."""
    run_cfg = lora_run_config(run_dir)
    if run_cfg is None and not holds_quantized(abstract):
        return load_run_params(run_dir, abstract, fresh_params, from_key)
    if run_cfg is None:
        # Read in float32, the leaves this model adds (adapters, new heads) left abstract.
        as_float = float_abstract(abstract)
        loaded = load_run_params(run_dir, as_float, as_float, from_key)
        read, _ = partition(loaded, lambda _, leaf: not isinstance(leaf, jax.ShapeDtypeStruct))
        return fit_params(read, abstract, fresh_params, f"{from_key}={run_dir}")
    run_model = LanguageModel(run_cfg.model, lora=run_cfg.lora)
    mesh = jax.tree.leaves(abstract)[0].sharding.mesh
    run_abstract = abstract_with_shardings(
        run_model.abstract_params,
        tree_shardings(mesh, run_model.abstract_params, run_model.logical_axes, run_model.rules),
    )
    params = load_run_params(run_dir, run_abstract, None, from_key)
    with jax.set_mesh(mesh):
        merged = jax.jit(run_model.merged_params)(params)
    return fit_params(merged, abstract, fresh_params, f"{from_key}={run_dir}")


def fit_params(params: Params, abstract: Params, fresh_params: Params | None, what: str) -> Params:
    """`params` laid out as `abstract` (shape, dtype and sharding of each leaf): every leaf
    must have a place of its shape there; the leaves only `abstract` has come from
    `fresh_params` (new heads, fresh adapters), or are refused without them. A float leaf
    whose place holds a quantised weight (a QLoRA base) is quantised (`jaxllm.quant`)."""
    placed = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        target = _leaf_at(abstract, path)
        if target is None or tuple(target.shape) != tuple(leaf.shape):
            raise ConfigError(
                f"{what}: param {name} {tuple(leaf.shape)} has no place of that shape in this "
                "model; the model config must match the run's (only new heads may be added)"
            )
        if is_quantized(target):
            store = functools.partial(stored_like, name=path[-1].key, target=target)
            shardings = jax.tree.map(lambda part: part.sharding, target)
            placed[path] = jax.jit(store, out_shardings=shardings)(leaf)
        else:
            placed[path] = jax.device_put(leaf.astype(target.dtype), target.sharding)
    paths = jax.tree_util.tree_leaves_with_path(abstract, is_leaf=is_quantized)
    missing = [p for p, _ in paths if p not in placed]
    if missing and fresh_params is None:
        names = ", ".join(jax.tree_util.keystr(p) for p in missing)
        raise ConfigError(f"{what} has no {names}; the model config adds them")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: placed.get(path, leaf),
        fresh_params if fresh_params is not None else abstract,
        is_leaf=is_quantized,
    )


def _leaf_at(tree: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key.key not in tree:
            return None
        tree = tree[key.key]
    return None if isinstance(tree, dict) else tree


def params_from_run(
    run_dir: str, from_key: str, lora: LoraConfig | None = None
) -> Callable[[Params, Any], Params]:
    """A Stage.initial_params that loads the newest params of the run in `run_dir` (heads
    it lacks stay fresh; a LoRA run's adapters merged in). `from_key` is the setting that
    named the run (`sft.init_from`).

    With `lora.init_from` (a LoRA run trained on the same base), its adapters replace the
    fresh ones: the run goes on from that run's adapters. That run's base (what its
    checkpoint holds beside the adapters) must equal the base loaded here, or `run_dir`
    must be that run itself."""
    adapters_from = lora.init_from if lora is not None and lora.rank > 0 else None

    def load(fresh_params: Params, shardings: Any) -> Params:
        abstract = abstract_with_shardings(jax.eval_shape(lambda: fresh_params), shardings)
        if adapters_from is None:
            return read_run_params(run_dir, abstract, fresh_params, from_key)
        return continue_adapters(run_dir, from_key, lora, abstract, fresh_params)

    return load


def continue_adapters(
    run_dir: str, from_key: str, lora: LoraConfig, abstract: Params, fresh_params: Params
) -> Params:
    """Params that carry on the adapters of the LoRA run `lora.init_from` on its own base,
    checked to be the base `run_dir` gives (or `run_dir` is that run)."""
    source = lora.init_from
    source_cfg = lora_run_config(source)
    if source_cfg is None:
        raise ConfigError(
            f"lora.init_from={source} is not a LoRA run (its lora.rank is 0 or it has no "
            "config.yaml); point it at the out_dir of a run trained with lora.rank > 0"
        )
    source_lora = source_cfg.lora
    if (source_lora.rank, sorted(source_lora.targets)) != (lora.rank, sorted(lora.targets)):
        raise ConfigError(
            f"lora.init_from={source} has adapters of rank {source_lora.rank} on "
            f"{','.join(source_lora.targets)}, this run rank {lora.rank} on "
            f"{','.join(lora.targets)}; set lora.rank and lora.targets as that run's"
        )
    if source_lora.base_dtype != lora.base_dtype:
        raise ConfigError(
            f"lora.init_from={source} stored its base as {source_lora.base_dtype}, this run "
            f"as lora.base_dtype={lora.base_dtype}; set lora.base_dtype={source_lora.base_dtype}"
        )
    saved = load_run_params(source, abstract, None, "lora.init_from")
    if Path(run_dir).resolve() != Path(source).resolve():
        base = read_run_params(run_dir, abstract, fresh_params, from_key)
        _, saved_frozen = split_trainable(saved, lora)
        _, base_frozen = split_trainable(base, lora)
        same = jax.tree.map(lambda a, b: jnp.array_equal(a, b), saved_frozen, base_frozen)
        if not all(bool(equal) for equal in jax.tree.leaves(same)):
            raise ConfigError(
                f"lora.init_from={source} trained its adapters on another base than "
                f"{from_key}={run_dir} gives; start from the run that one started from, or "
                "drop lora.init_from"
            )
    return saved


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
    cfg = load_run_config(run_dir / "config.yaml")
    tokenizer = load_configured_tokenizer(cfg)
    model = LanguageModel(cfg.model, lora=cfg.lora)
    mesh = mesh if mesh is not None else make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    shardings = tree_shardings(mesh, model.abstract_params, model.logical_axes, model.rules)
    abstract = abstract_with_shardings(model.abstract_params, shardings)
    return LoadedRun(cfg, tokenizer, model, load_run_params(run_dir, abstract, None, from_key))


REWARD_MODEL_FILE = "reward_model.json"  # a started RL run's copy of its reward statistics
SCORES_FILE = "reward_scores.json"  # what `jaxllm reward` writes
# Model keys a reward model must share with the policy: the params' shapes, less the heads.
REWARD_PARAM_KEYS = tuple(key for key in PARAM_SHAPE_KEYS if key != "scalar_heads")


def reward_run_dirs(value: str | None, key: str) -> list[str]:
    """The reward runs the setting `key` names: one out_dir, or several separated by commas
    (an ensemble)."""
    runs = [part.strip() for part in (value or "").split(",") if part.strip()]
    if not runs:
        raise ConfigError(f"{key} is not set; pass the out_dir of a `jaxllm reward` run")
    resolved = [Path(run).resolve() for run in runs]
    twice = sorted(
        {run for run, path in zip(runs, resolved, strict=True) if resolved.count(path) > 1}
    )
    if twice:
        raise ConfigError(
            f"{key} names {', '.join(twice)} more than once; an ensemble's members are "
            "different reward runs (name each once)"
        )
    return runs


def reward_ensemble_statistics(
    cfg: Config, run_dirs: list[str], key: str, normalize: bool
) -> list[dict]:
    """Per reward run of `run_dirs` (named by setting `key`), `reward_run_statistics`. A
    run that has saved a checkpoint reads the copy it kept in out_dir instead: the
    statistics of the reward models its checkpoint holds (it resumes without the reward
    runs, and a resume allowed to name other ones, `resume.allow_changed_inputs`, still
    scores with the models it holds)."""
    kept = Path(cfg.out_dir) / REWARD_MODEL_FILE
    if kept.is_file() and newest_step(Path(cfg.out_dir)) is not None:
        return json.loads(kept.read_text())["members"]
    return [reward_run_statistics(cfg, run_dir, key, normalize) for run_dir in run_dirs]


def reward_run_statistics(cfg: Config, run_dir: str, key: str, normalize: bool) -> dict:
    """The reward run `run_dir` (named by setting `key`) checked to fit the policy of `cfg`
    (a `reward` head, the policy's shape and tokenizer), and its score statistics for
    normalising (mean 0, std 1 when not `normalize`)."""
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(
            f"{key}={run_dir} has no config.yaml; point it at the out_dir of a `jaxllm reward` run"
        )
    reward_cfg = load_run_config(Path(run_dir) / "config.yaml")
    if "reward" not in reward_cfg.model.scalar_heads:
        raise ConfigError(
            f"{key}={run_dir} is not a reward run (its model has no 'reward' head); train one "
            "with `jaxllm reward`"
        )
    differing = [
        f"model.{name} {getattr(reward_cfg.model, name)!r} vs {getattr(cfg.model, name)!r}"
        for name in REWARD_PARAM_KEYS
        if getattr(reward_cfg.model, name) != getattr(cfg.model, name)
    ]
    if differing:
        raise ConfigError(
            f"{key}={run_dir} has another model shape than the policy ("
            + "; ".join(differing)
            + "); train the reward model from the same SFT run"
        )
    if reward_cfg.data.tokenizer != cfg.data.tokenizer:
        raise ConfigError(
            f"{key}={run_dir} reads tokenizer '{reward_cfg.data.tokenizer}' but the policy "
            f"'{cfg.data.tokenizer}'; they must share one"
        )
    if reward_cfg.chat.template != cfg.chat.template:
        raise ConfigError(
            f"{key}={run_dir} writes chats as chat.template={reward_cfg.chat.template} but the "
            f"policy as {cfg.chat.template}; they must share one"
        )
    statistics = {"reward_from": str(run_dir), "score_mean": 0.0, "score_std": 1.0}
    if normalize:
        scores = Path(run_dir) / SCORES_FILE
        if not scores.is_file():
            raise ConfigError(
                f"{key}={run_dir} has no {SCORES_FILE} (a finished reward run writes it); let "
                "the run finish, or turn reward normalisation off"
            )
        recorded = json.loads(scores.read_text())
        statistics.update(score_mean=recorded["mean"], score_std=max(recorded["std"], 1e-6))
    return statistics


def reward_params_loader(
    cfg: Config, reward_model: LanguageModel, key: str, statistics: list[dict]
) -> Callable[[TrainState, TrainState], TrainState]:
    """A fresh RL run's `Stage.initial_state`: the params of each reward run of
    `statistics` (one per ensemble member) into the list `reward_params` of the state's
    extras, laid out as their shardings say; keeps `statistics` in out_dir for a resume
    without the runs."""

    def load(state: TrainState, shardings: TrainState) -> TrainState:
        members = []
        for member, member_shardings in zip(
            statistics, shardings.extras["reward_params"], strict=True
        ):
            abstract = abstract_with_shardings(reward_model.abstract_params, member_shardings)
            members.append(read_run_params(member["reward_from"], abstract, None, key))
        if jax.process_index() == 0:
            kept = Path(cfg.out_dir) / REWARD_MODEL_FILE
            partial = kept.with_name(kept.name + ".partial")
            partial.write_text(json.dumps({"members": statistics}, indent=1))
            os.replace(partial, kept)
        return state.with_extras(reward_params=members)

    return load


def announce(stage: str, text: str) -> None:
    """Print what the run will do, once (process 0)."""
    if jax.process_index() == 0:
        print(f"{stage}: {text}", flush=True)
