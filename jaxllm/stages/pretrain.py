"""Pre-training: a causal LM on a text corpus, on the shared training loop."""

from __future__ import annotations

import functools
from pathlib import Path

from jaxllm.config import Config
from jaxllm.data.loader import LMBatches, eval_batches
from jaxllm.data.tokens import prepare_token_streams
from jaxllm.generate import Generator
from jaxllm.model import LanguageModel
from jaxllm.stages.common import announce, configured_mesh, load_configured_tokenizer
from jaxllm.steps import causal_lm_loss
from jaxllm.tokenizer import Tokenizer
from jaxllm.trainer import RunResult, Stage, by_step, run_training


def make_text_sampler(
    model: LanguageModel, tokenizer: Tokenizer, num_samples: int, num_tokens: int
):
    """A Stage.sample that continues a document's start (`<|start|>`, an imported model's
    BOS, else its eos as a separator) `num_samples` times (temperature 0.8), by at most
    `num_tokens` tokens and never past the context."""
    if num_samples == 0:
        return None
    num_tokens = min(num_tokens, model.cfg.max_seq_len - 1)
    generator = Generator(model, tokenizer.vocab_size, tokenizer.pad_id, num_tokens)
    start = tokenizer.document_start_ids or tokenizer.document_end_ids
    stops = tokenizer.document_end_ids

    def sample(params, key):
        completion = generator(params, [start] * num_samples, key, temperature=0.8, stop_ids=stops)
        return [
            tokenizer.decode(t for t in completion.row(i) if t not in stops)
            for i in range(num_samples)
        ]

    return sample


def pretrain(cfg: Config) -> RunResult:
    """Build the mesh, data and model from `cfg` and train (or resume) in `cfg.out_dir`."""
    mesh = configured_mesh(cfg)
    tokenizer = load_configured_tokenizer(cfg)
    cache_dir = cfg.data.cache_dir or Path(cfg.out_dir) / "data"
    train_stream, val_stream = prepare_token_streams(cfg.data, tokenizer, cache_dir)
    batch_size, seq_len = cfg.train.batch_size, cfg.train.seq_len
    model = LanguageModel(cfg.model)
    stage = Stage(
        name="pretrain",
        model=model,
        batch=by_step(LMBatches(train_stream, seq_len, batch_size, mesh, seed=cfg.train.seed)),
        tokens_per_step=batch_size * seq_len,
        loss_fn=functools.partial(causal_lm_loss, vocab_size=tokenizer.vocab_size),
        eval_batches=eval_batches(val_stream, seq_len, batch_size, cfg.train.eval_batches, mesh),
        sample=make_text_sampler(model, tokenizer, cfg.train.samples, cfg.train.sample_tokens),
    )
    announce(
        "pretrain",
        f"{model.param_count() / 1e6:.2f}M params, {len(train_stream):,} train and "
        f"{len(val_stream):,} val tokens, mesh {dict(mesh.shape)}, out_dir {cfg.out_dir}",
    )
    return run_training(cfg, stage, mesh)
