"""LoRA: a fresh adapter changes nothing, merged weights equal the adapters, only the
adapters (and heads) train, the reference policy is the base, and a LoRA run trains, resumes
after kill -9, agrees across meshes, continues another run's adapters and refuses bad
settings in one line each."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    cpu_environment,
    finished_checkpoints,
    kill_9_after_first_checkpoint,
    tiny_config,
    tiny_sft_run,
)
from test_dpo import dpo_argv, write_preferences
from test_grpo import grpo_argv
from test_ppo import ppo_argv, reward_argv

from jaxllm.checkpoint import Checkpointer
from jaxllm.cli import main as cli_main
from jaxllm.config import LoraConfig, load_config
from jaxllm.errors import ConfigError
from jaxllm.lora import adapters_of, strip_adapters
from jaxllm.metrics import read_metrics
from jaxllm.model import LanguageModel
from jaxllm.sharding import DEFAULT_RULES
from jaxllm.stages.common import load_run
from jaxllm.state import fresh_state, learning_rate_schedule, make_optimizer
from jaxllm.steps import causal_lm_loss, loss_and_gradients, train_step

MOE = ["model.num_experts=4", "model.experts_per_token=2", "model.expert_mlp_dim=32"]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 12)), jnp.int32)
BATCH = {
    "tokens": TOKENS,
    "targets": jnp.roll(TOKENS, -1, 1),
    "loss_mask": jnp.ones_like(TOKENS, jnp.float32),
    "positions": jnp.broadcast_to(jnp.arange(12), TOKENS.shape),
    "segment_ids": jnp.ones_like(TOKENS),
}


def lora_model(*overrides: str, rank: int = 4, **lora) -> LanguageModel:
    return LanguageModel(tiny_config(*overrides).model, lora=LoraConfig(rank=rank, **lora))


def with_random_b(params, seed: int = 1):
    """Every adapter's B drawn at random (a fresh one is zero and changes nothing)."""
    key = iter(jax.random.split(jax.random.key(seed), 64))

    def draw(path, leaf):
        names = [getattr(k, "key", "") for k in path]
        if any(n.endswith("_lora") for n in names) and names[-1] == "b":
            return 0.05 * jax.random.normal(next(key), leaf.shape)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, params)


@pytest.mark.parametrize("overrides", [[], MOE], ids=["dense", "moe"])
def test_a_fresh_adapter_is_the_base_model_bitwise(overrides):
    model = lora_model(*overrides)
    params = model.init(jax.random.key(0))
    adapters = adapters_of(params)
    assert set(adapters["blocks"]["attention"]) == {"q_lora", "k_lora", "v_lora", "o_lora"}
    assert set(adapters["blocks"]["mlp"]) == {"gate_lora", "up_lora", "down_lora"}
    for leaf in jax.tree.leaves(jax.tree.map(lambda a: a, adapters)):
        assert leaf.dtype == jnp.float32
    base_logits = model.base.logits(strip_adapters(params), TOKENS)
    np.testing.assert_array_equal(model.logits(params, TOKENS), base_logits)


@pytest.mark.parametrize(
    ("overrides", "lora"),
    [([], {}), (MOE, {}), ([], {"rslora": True, "targets": ["q", "down"]})],
    ids=["dense", "moe", "rslora_q_down"],
)
def test_merged_weights_give_the_adapter_forward_to_1e_5(overrides, lora):
    model = lora_model(*overrides, **lora)
    params = with_random_b(model.init(jax.random.key(0)))
    adapted = model.logits(params, TOKENS)
    merged = model.base.logits(model.merged_params(params), TOKENS)
    base = model.base.logits(model.base_params(params), TOKENS)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2  # the adapters do something
    np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)


def test_the_scale_is_alpha_over_rank_or_its_root():
    assert LoraConfig(rank=16, alpha=32).scale == 2.0
    assert LoraConfig(rank=16, alpha=32, rslora=True).scale == 8.0
    model = lora_model(rank=2, alpha=6.0, targets=["q"])
    params = with_random_b(model.init(jax.random.key(0)))
    adapter = params["blocks"]["attention"]["q_lora"]
    delta = (
        model.merged_params(params)["blocks"]["attention"]["wq_dnh"]
        - (params["blocks"]["attention"]["wq_dnh"])
    )
    expected = 3.0 * jnp.einsum("ldr,lrnh->ldnh", adapter["a"], adapter["b"])
    np.testing.assert_allclose(delta, expected, rtol=1e-6, atol=1e-7)


def test_only_adapters_and_heads_get_gradients_and_optimizer_slots():
    cfg = tiny_config()
    model = lora_model("model.scalar_heads=[value]")
    tx = make_optimizer(cfg.optimizer, model, 10)
    state = fresh_state(model, tx, 0)
    trainable, frozen = model.split_trainable(state.params)
    assert set(trainable) == {"blocks", "heads"}
    assert "token_embedding_vd" in frozen and "wq_dnh" in frozen["blocks"]["attention"]
    # Adam's two moments (beside its int32 step counts): for the trainable leaves only.
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.dtype == jnp.float32]
    assert len(moments) == 2 * len(jax.tree.leaves(trainable))
    _, _, grads = loss_and_gradients(causal_lm_loss, model, state.params, BATCH)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)

    schedule = learning_rate_schedule(cfg.optimizer, 10)
    new_state, _ = train_step(state, BATCH, model=model, tx=tx, schedule=schedule)
    new_trainable, new_frozen = model.split_trainable(new_state.params)
    for before, after in zip(jax.tree.leaves(frozen), jax.tree.leaves(new_frozen), strict=True):
        np.testing.assert_array_equal(before, after)
    q_before, q_after = (
        trainable["blocks"]["attention"]["q_lora"],
        new_trainable["blocks"]["attention"]["q_lora"],
    )
    # B moves; A's first gradient is s x^T (dy B^T) = 0 while B = 0: only weight decay
    # (lr x 0.1 x A) moves it.
    assert float(jnp.max(jnp.abs(q_after["b"]))) > 0
    np.testing.assert_allclose(q_after["a"], q_before["a"], rtol=1e-3)


def test_adapter_dropout_is_keyed_and_only_in_training():
    model = lora_model(dropout=0.5)
    params = with_random_b(model.init(jax.random.key(0)))

    def loss(key):
        return float(loss_and_gradients(causal_lm_loss, model, params, BATCH, 1, key)[0])

    plain = float(causal_lm_loss(model, params, BATCH)[0])  # eval: no key, no dropout
    assert loss(None) == plain
    first, again, other = loss(jax.random.key(1)), loss(jax.random.key(1)), loss(jax.random.key(2))
    assert first == again and first != plain and first != other
    # without adapter dropout a training copy is the model itself
    assert lora_model(dropout=0.0).with_dropout(jax.random.key(1)).dropout_key is None


def test_adapter_factors_shard_like_their_weights_input_and_output_axes():
    axes = lora_model().logical_axes["blocks"]
    assert axes["attention"]["q_lora"]["a"] == ("layers", "embed", "lora_rank")
    assert axes["attention"]["q_lora"]["b"] == ("layers", "lora_rank", "heads", "head_dim")
    assert axes["attention"]["o_lora"]["a"] == ("layers", "heads", "head_dim", "lora_rank")
    assert axes["mlp"]["down_lora"]["b"] == ("layers", "lora_rank", "embed")
    moe = lora_model(*MOE).logical_axes["blocks"]["mlp"]
    assert moe["gate_lora"]["a"] == ("layers", "expert", "embed", "lora_rank")
    assert DEFAULT_RULES.mesh_axes("lora_rank") == ()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.rank=4", "lora.targets=[q,x]"], "lora.targets='x' is unknown"),
        (["lora.rank=80"], "lora.rank=80 is above the size of projection"),
        (["lora.init_from=/somewhere"], "lora.init_from continues a LoRA run"),
        (["lora.rank=4", "lora.dropout=1.0"], "lora.dropout must lie in [0, 1)"),
    ],
)
def test_bad_lora_settings_are_one_line_each(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["preset=tiny", *overrides])
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1


def test_pretraining_and_a_stage_without_a_start_run_refuse_adapters(tmp_path, capsys):
    assert cli_main(["pretrain", "preset=tiny", "lora.rank=4", f"out_dir={tmp_path}/p"]) == 2
    assert "pretrain trains every parameter from scratch" in capsys.readouterr().err
    assert cli_main(["sft", "preset=tiny", "lora.rank=4", f"out_dir={tmp_path}/s"]) == 2
    assert "set sft.init_from" in capsys.readouterr().err


# --- runs ----------------------------------------------------------------------------------

COMMAND = [sys.executable, "-m", "jaxllm.cli"]
LORA = ["lora.rank=8", "lora.alpha=16", "optimizer.lr=1e-2", "optimizer.warmup_steps=0"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tiny_sft_run(root / "sft")
    return root / "sft"


def lora_sft_argv(base, out_dir, *overrides) -> list[str]:
    return [
        "sft",
        f"sft.init_from={base}",
        "data.path=builtin",
        "sft.builtin_examples=64",
        "sft.eval_prompts=0",
        "train.batch_size=8",
        "train.seq_len=64",
        "train.samples=0",
        "train.steps=6",
        "train.eval_every=6",
        "train.eval_at_start=true",
        "checkpoint.every=3",
        f"out_dir={out_dir}",
        *LORA,
        *overrides,
    ]


@pytest.fixture(scope="module")
def lora_run(base_run):
    out_dir = base_run.parent / "lora_1"
    done = subprocess.run(
        [*COMMAND, *lora_sft_argv(base_run, out_dir)],
        env=cpu_environment(1),
        check=True,
        capture_output=True,
        text=True,
    )
    (out_dir / "stdout.txt").write_text(done.stdout)
    return out_dir


def lines(out_dir, split: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == split}


def saved_state(out_dir, step: int) -> dict:
    checkpointer = Checkpointer(out_dir / "checkpoints", read_only=True)
    try:
        return checkpointer.manager.restore(step)["state"]
    finally:
        checkpointer.close()


def test_a_lora_run_trains_its_adapters_on_the_unchanged_base(base_run, lora_run):
    evals = lines(lora_run, "eval")
    assert evals[6]["loss"] < evals[0]["loss"] - 0.05, evals
    state = saved_state(lora_run, 6)
    base = load_run(base_run).params
    for path, saved in jax.tree_util.tree_leaves_with_path(strip_adapters(state["params"])):
        expected = base
        for key in path:
            expected = expected[key.key]
        np.testing.assert_array_equal(saved, expected, err_msg=jax.tree_util.keystr(path))
    b = state["params"]["blocks"]["attention"]["q_lora"]["b"]
    assert "LoRA rank 8 (scale 2) on q,k,v,o,gate,up,down" in (lora_run / "stdout.txt").read_text()
    assert float(np.abs(b).max()) > 0
    # generate loads it like any run (the adapters merged into the sampler's weights)
    argv = ["generate", "--checkpoint", str(lora_run), "--prompt", "hi", "--max-new-tokens", "4"]
    assert cli_main(argv) == 0


def test_a_lora_run_resumes_after_kill_9_and_agrees_across_meshes(base_run, lora_run, tmp_path):
    expected = lines(lora_run, "train")
    killed = tmp_path / "killed"
    kill_9_after_first_checkpoint([*COMMAND, *lora_sft_argv(base_run, killed)], killed)
    assert finished_checkpoints(killed) == [3]
    subprocess.run(
        [*COMMAND, *lora_sft_argv(base_run, killed)],
        env=cpu_environment(1),
        check=True,
        capture_output=True,
    )
    resumed = lines(killed, "train")
    for step in range(1, 7):
        assert resumed[step]["loss"] == expected[step]["loss"], step
    final, resumed_final = saved_state(lora_run, 6), saved_state(killed, 6)
    for a, b in zip(
        jax.tree.leaves(resumed_final["params"]), jax.tree.leaves(final["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    sharded = tmp_path / "sharded"
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "checkpoint.every=6"]
    subprocess.run(
        [*COMMAND, *lora_sft_argv(base_run, sharded, *mesh)],
        env=cpu_environment(8),
        check=True,
        capture_output=True,
    )
    on_8 = lines(sharded, "train")
    for step in range(1, 7):
        assert on_8[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step


def test_lora_init_from_continues_the_adapters_and_refuses_another_base(
    base_run, lora_run, tmp_path, capsys
):
    continued = tmp_path / "continued"
    argv = lora_sft_argv(base_run, continued, f"lora.init_from={lora_run}", "train.steps=2")
    assert cli_main(argv) == 0
    # Step 0 of the continuation is where the first run ended: the same model, same eval set.
    assert lines(continued, "eval")[0]["loss"] == pytest.approx(
        lines(lora_run, "eval")[6]["loss"], rel=1e-6
    )
    # Resumed with other adapters: refused before anything is written.
    argv = lora_sft_argv(base_run, continued, f"lora.init_from={lora_run}", "lora.alpha=8")
    assert cli_main([*argv, "train.steps=3"]) == 2
    assert "lora.alpha: 16.0 -> 8.0" in capsys.readouterr().err
    other_base = tmp_path / "other_base"
    tiny_sft_run(other_base, "train.seed=7")
    argv = lora_sft_argv(other_base, tmp_path / "wrong", f"lora.init_from={lora_run}")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"lora.init_from={lora_run} trained its adapters on another base" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_lora_dpo_scores_against_the_base_and_learns_the_preference(base_run, tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, 240, False)
    out_dir = tmp_path / "dpo"
    argv = dpo_argv(base_run, data, out_dir, "lora.rank=8", "optimizer.lr=1e-2")
    assert cli_main(argv) == 0
    evals = [r for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "eval"]
    # At step 0 the policy is the base, which is the reference: DPO's loss is ln 2 exactly.
    assert evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["margin"] == 0.0
    # Trained against that same reference (had it followed the adapters, the margin would
    # stay 0 and the loss ln 2).
    assert evals[-1]["accuracy"] > 0.8 and evals[-1]["margin"] > 0.3, evals[-1]
    state = saved_state(out_dir, 40)
    assert "ref_params" not in (state.get("extras") or {})  # no second copy of the weights


def test_lora_grpo_keeps_the_base_as_its_reference(base_run, tmp_path):
    out_dir = tmp_path / "grpo"
    overrides = ["grpo.beta=0.1", "grpo.iterations=1", "lora.rank=8", "optimizer.lr=2e-2"]
    argv = grpo_argv(base_run.parent, out_dir, *overrides, "checkpoint.every=4")
    assert cli_main(argv) == 0
    train = lines(out_dir, "train")
    # The first update starts at the base, the reference: KL 0; later ones have moved away.
    assert train[1]["kl"] < 1e-7, train[1]
    assert max(train[step]["kl"] for step in (2, 3, 4)) > 1e-5, train
    state = saved_state(out_dir, 4)
    assert "ref_params" not in (state.get("extras") or {})


def test_lora_ppo_with_a_lora_reward_model(base_run, tmp_path):
    """A reward model trained with adapters is read merged (its score unchanged), and PPO
    with adapters keeps its base as the reference and trains its value head."""
    root = base_run.parent
    overrides = ["lora.rank=4", *LORA[2:], "train.samples=0", "train.eval_every=100"]
    argv = reward_argv(base_run, root / "rm", *overrides, "checkpoint.every=3", "train.steps=3")
    assert cli_main(argv) == 0
    reward_run = load_run(root / "rm")
    merged = reward_run.model.merged_params(reward_run.params)
    assert float(np.abs(reward_run.params["blocks"]["mlp"]["up_lora"]["b"]).max()) > 0

    out_dir = tmp_path / "ppo"
    argv = ppo_argv(root, out_dir, "lora.rank=4", "train.steps=3", "checkpoint.every=3")
    assert cli_main(argv) == 0
    train = lines(out_dir, "train")
    assert train[1]["kl"] == pytest.approx(0.0, abs=1e-7)
    state = saved_state(out_dir, 3)
    assert "ref_params" not in state["extras"]
    for saved, expected in zip(
        jax.tree.leaves(state["extras"]["reward_params"][0]), jax.tree.leaves(merged), strict=True
    ):
        np.testing.assert_allclose(saved, expected, rtol=1e-6, atol=1e-8)  # jit's sum order
    value_head = state["params"]["heads"]["value"]["w_d"]
    assert float(np.abs(value_head).max()) > 0  # starts at 0; it trains


def test_training_flops_count_weight_gradients_only_for_what_trains():
    full = LanguageModel(tiny_config().model)
    model = lora_model()
    attention = 12.0 * full.cfg.num_heads * full.cfg.resolved_head_dim * 64 * full.cfg.num_layers
    n_base = full.param_count()
    n_adapters = model.param_count() - n_base
    assert full.flops_per_token(64) == 6.0 * n_base + attention
    # 4 per weight (forward, backward to the input), 2 more per trained adapter weight
    expected = 4.0 * (n_base + n_adapters) + 2.0 * n_adapters + attention
    assert model.flops_per_token(64) == expected
