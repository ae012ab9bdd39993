"""Orbax checkpoints: resume on another mesh, params-only restore, keep-N, no half saves."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest
from conftest import skip_if_not_enough_devices
from helpers import assert_params_close, build, random_batches, run_steps, tiny_config

from jaxllm.checkpoint import Checkpointer
from jaxllm.errors import ConfigError
from jaxllm.model import LanguageModel
from jaxllm.state import abstract_with_shardings


def abstract_like(state, shardings):
    return abstract_with_shardings(jax.eval_shape(lambda: state), shardings)


@skip_if_not_enough_devices(8)
def test_save_on_one_mesh_restore_on_another_and_continue(tmp_path):
    cfg = tiny_config()
    batches = random_batches(5)
    _, _, state, _, step = build(cfg, (8, 1, 1))
    checkpointer = Checkpointer(tmp_path / "ckpt")
    state, first = run_steps(step, state, batches[:2])
    checkpointer.save(state, {"data_position": 2})
    state, rest = run_steps(step, state, batches[2:])
    checkpointer.close()

    _, _, fresh, shardings, other_step = build(cfg, (1, 4, 2))
    reopened = Checkpointer(tmp_path / "ckpt")
    restored, meta = reopened.restore(abstract_like(fresh, shardings))
    assert meta == {"data_position": 2}
    assert int(restored.step) == 2
    assert (
        restored.params["blocks"]["mlp"]["w_up_df"].sharding
        == (shardings.params["blocks"]["mlp"]["w_up_df"])
    )
    restored, resumed = run_steps(other_step, restored, batches[2:])
    np.testing.assert_allclose(resumed, rest, rtol=1e-6)
    assert_params_close(restored.params, state.params, rtol=1e-5)


def test_params_only_restore_into_a_state_with_a_value_head(tmp_path):
    cfg = tiny_config()
    _, _, state, _, step = build(cfg, (1, 1, 1))
    state, _ = run_steps(step, state, random_batches(2))
    saved_params = jax.device_get(state.params)
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(state)
    checkpointer.wait()

    value_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, scalar_heads=["value"])
    )
    value_model = LanguageModel(value_cfg.model)
    _, _, fresh, shardings, _ = build(
        dataclasses.replace(value_cfg, train=dataclasses.replace(cfg.train, seed=7)),
        (1, 1, 1),
        value_model,
    )
    fresh_head = jax.device_get(fresh.params["heads"])
    params = checkpointer.restore_params(
        abstract_with_shardings(value_model.abstract_params, shardings.params), fresh.params
    )
    params = jax.device_get(params)
    jax.tree.map(np.testing.assert_array_equal, params["heads"], fresh_head)
    del params["heads"]
    jax.tree.map(np.testing.assert_array_equal, params, saved_params)
    # The new stage's optimizer is fresh: its step counter starts at zero.
    assert int(fresh.step) == 0


def test_params_only_restore_refuses_a_different_model(tmp_path):
    cfg = tiny_config()
    _, _, state, _, _ = build(cfg, (1, 1, 1))
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(state)
    checkpointer.wait()
    wider = LanguageModel(dataclasses.replace(cfg.model, mlp_dim=256))
    params = wider.init(jax.random.key(0))
    with pytest.raises(
        ConfigError, match=r"has shape \(2, 192, 64\) but the new model expects \(2, 256, 64\)"
    ):
        checkpointer.restore_params(wider.abstract_params, params)


def test_keeps_the_newest_n_and_ignores_unfinished_saves(tmp_path):
    cfg = tiny_config()
    _, _, state, shardings, step = build(cfg, (1, 1, 1))
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    for batch in random_batches(4):
        state, _ = step(state, batch)
        checkpointer.save(state)
    checkpointer.close()
    assert sorted(Checkpointer(tmp_path / "ckpt").all_steps()) == [3, 4]

    # A process killed mid-save leaves Orbax's temporary folder; it is never a checkpoint.
    shutil.copytree(tmp_path / "ckpt" / "4", tmp_path / "ckpt" / "9.orbax-checkpoint-tmp-1")
    reopened = Checkpointer(tmp_path / "ckpt", keep=2)
    assert reopened.latest_step() == 4
    restored, _ = reopened.restore(abstract_like(state, shardings))
    assert int(restored.step) == 4
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 9"):
        reopened.restore(abstract_like(state, shardings), step=9)
