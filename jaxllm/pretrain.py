"""Pre-training: a causal LM on a text corpus, on the shared training loop."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxllm.config import Config
from jaxllm.data.loader import LMBatches, eval_batches
from jaxllm.data.tokens import prepare_token_streams
from jaxllm.errors import ConfigError
from jaxllm.model import LanguageModel
from jaxllm.sharding import check_batch_fits, make_mesh
from jaxllm.tokenizer import Tokenizer, load_tokenizer
from jaxllm.trainer import RunResult, Stage, make_text_sampler, run_training


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


def pretrain(cfg: Config) -> RunResult:
    """Build the mesh, data and model from `cfg` and train (or resume) in `cfg.out_dir`."""
    mesh = make_mesh(cfg.mesh)
    check_batch_fits(mesh, cfg.train.batch_size)
    tokenizer = load_configured_tokenizer(cfg)
    cache_dir = cfg.data.cache_dir or Path(cfg.out_dir) / "data"
    train_stream, val_stream = prepare_token_streams(cfg.data, tokenizer, cache_dir)
    batch_size, seq_len = cfg.train.batch_size, cfg.train.seq_len
    model = LanguageModel(cfg.model)
    stage = Stage(
        name="pretrain",
        model=model,
        train_batches=LMBatches(train_stream, seq_len, batch_size, mesh, seed=cfg.train.seed),
        tokens_per_step=batch_size * seq_len,
        eval_batches=eval_batches(val_stream, seq_len, batch_size, cfg.train.eval_batches, mesh),
        sample=make_text_sampler(model, tokenizer, cfg.train.samples, cfg.train.sample_tokens),
    )
    if jax.process_index() == 0:
        print(
            f"pretrain: {model.param_count() / 1e6:.2f}M params, {len(train_stream):,} train "
            f"and {len(val_stream):,} val tokens, mesh {dict(mesh.shape)}, out_dir {cfg.out_dir}"
        )
    return run_training(cfg, stage, mesh)
