"""Training on any mesh gives the single-device result; bad layouts fail clearly."""

import jax
import numpy as np
import pytest
from conftest import skip_if_not_enough_devices
from helpers import assert_params_close, build, random_batches, run_steps, tiny_config

from jaxllm.config import MeshConfig
from jaxllm.errors import ConfigError
from jaxllm.model import LanguageModel
from jaxllm.sharding import DEFAULT_RULES, ShardingRules, check_batch_fits, make_mesh
from jaxllm.state import create_train_state, make_optimizer


@pytest.fixture(scope="module")
def single_device_run():
    cfg = tiny_config()
    _, _, state, _, step = build(cfg, (1, 1, 1))
    state, losses = run_steps(step, state, random_batches(5))
    return losses, jax.device_get(state.params)


@skip_if_not_enough_devices(8)
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_five_steps_on_a_mesh_match_one_device(single_device_run, mesh_shape):
    expected_losses, expected_params = single_device_run
    _, mesh, state, _, step = build(tiny_config(), mesh_shape)
    w_up = state.params["blocks"]["mlp"]["w_up_df"]
    assert w_up.sharding.mesh.shape == dict(
        zip(("data", "fsdp", "tensor"), mesh_shape, strict=True)
    )
    state, losses = run_steps(step, state, random_batches(5))

    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_params_close(state.params, expected_params, rtol=1e-5)


def test_gradient_accumulation_matches_the_full_batch(single_device_run):
    expected_losses, expected_params = single_device_run
    _, _, state, _, step = build(tiny_config("train.grad_accum=4"), (1, 1, 1))
    state, losses = run_steps(step, state, random_batches(5))
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_params_close(state.params, expected_params, rtol=1e-5)


@skip_if_not_enough_devices(8)
def test_state_is_created_sharded_not_whole_on_one_device():
    _, _, state, _, _ = build(tiny_config(), (1, 8, 1))
    embedding = state.params["token_embedding_vd"]  # (vocab, embed) with embed on fsdp
    assert {shard.data.shape for shard in embedding.addressable_shards} == {(320, 8)}
    adam_mu = state.opt_state[1][0].mu["token_embedding_vd"]
    assert adam_mu.sharding == embedding.sharding


def test_mesh_that_needs_more_devices_than_exist():
    with pytest.raises(ConfigError, match=r"needs 16 devices but 8 exist"):
        make_mesh(MeshConfig(data=4, fsdp=4, tensor=1), jax.devices()[:8])
    with pytest.raises(ConfigError, match=r"cannot fill 8 devices: 3 does not divide"):
        make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1), jax.devices()[:8])


def test_minus_one_takes_the_remaining_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2), jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_rules_mapping_two_axes_of_one_array_to_one_mesh_axis_fail():
    colliding = ShardingRules(
        tuple((name, "fsdp" if name == "mlp" else target) for name, target in DEFAULT_RULES.rules)
    )
    model = LanguageModel(tiny_config().model, colliding)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    expected = r"axes '\w+' and '\w+' of \['blocks'\]\['mlp'\]\['w_\w+'\] both to mesh axis 'fsdp'"
    with pytest.raises(ConfigError, match=expected):
        create_train_state(model, make_optimizer(tiny_config().optimizer, model, 5), mesh, 0)


def test_dimension_that_does_not_divide_over_the_mesh_fails():
    model = LanguageModel(tiny_config().model)  # 2 kv heads cannot split 8 ways
    mesh = make_mesh(MeshConfig(1, 1, 8), jax.devices()[:8])
    with pytest.raises(ConfigError, match=r"'kv_heads' of size 2 does not divide over mesh"):
        create_train_state(model, make_optimizer(tiny_config().optimizer, model, 5), mesh, 0)


def test_batch_that_does_not_split_over_data_parallelism_fails():
    mesh = make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    with pytest.raises(ConfigError, match=r"train.batch_size=6 does not divide over 4"):
        check_batch_fits(mesh, 6)
