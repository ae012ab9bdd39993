"""The gated MLP's element-wise core, act(gate) * up (SwiGLU, GeGLU), with a backward
that keeps only the two matmul outputs."""

from __future__ import annotations

import functools

import jax

MLP_ACTIVATIONS = {
    "silu": jax.nn.silu,  # SwiGLU
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GeGLU (Gemma)
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(activation: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """act(gate) * up, `activation` naming act in `MLP_ACTIVATIONS`. Its backward keeps
    only the two matmul outputs and recomputes act and act' from the gate, in one pass:
    d gate = dh * up * act'(gate), d up = dh * act(gate). Autodiff's would keep act's
    intermediates too and take a pass over each (on the CPU, separate element-wise ops
    over the (tokens, mlp_dim) activations)."""
    return MLP_ACTIVATIONS[activation](gate) * up


def _gated_forward(activation, gate, up):
    return gated(activation, gate, up), (gate, up)


def _gated_backward(activation, residuals, d_hidden):
    gate, up = residuals
    activated, activation_vjp = jax.vjp(MLP_ACTIVATIONS[activation], gate)
    (d_gate,) = activation_vjp(d_hidden * up)
    return d_gate, d_hidden * activated


gated.defvjp(_gated_forward, _gated_backward)
