"""Layer policies by role: data, printable, rule lists for any ported model."""

import jax
import jax.numpy as jnp
import pytest
from _pipeline_util import CONFIG, DIT, FLUX

from jquant import models
from jquant import policy as P
from jquant.qarray import QArray
from jquant.rules import flatten_with_paths, quantize_params


def _roles(cfg):
    return models.layer_roles(cfg, models.param_shapes(cfg))


def test_policy_plans_on_every_port():
    wan, flux, dit = _roles(CONFIG), _roles(FLUX), _roles(DIT)
    p = P.VIDEO_MIXED.plan(wan)
    assert p["blocks_0/attn1/to_q/kernel"] == "int8" and p["blocks_0/attn2/to_k/kernel"] == "int8"  # temporal, cross
    assert p["blocks_0/ffn/net_2/kernel"] == "int4/g64" and p["condition_embedder/time_proj/kernel"] is None
    f = P.VIDEO_MIXED.plan(flux)
    assert f["transformer_blocks_0/attn/to_q/kernel"] == "int8"  # double stream
    assert f["single_transformer_blocks_0/proj_mlp/kernel"] == "int4/g64"
    assert (
        f["transformer_blocks_0/norm1/linear/kernel"] is None and f["norm_out/linear/kernel"] is None
    )  # modulation first
    d = P.TEMPORAL_INT8.plan(dit)
    assert set(d.values()) == {None, "int4/g32"}  # an image model: nothing temporal
    assert P.get("uniform-nf4/g64").default == "nf4/g64" and P.get("video-mixed") is P.VIDEO_MIXED
    with pytest.raises(KeyError, match="unknown policy"):
        P.get("mixed")
    with pytest.raises(ValueError, match="unknown format"):
        P.Policy("x", (), "int5")


def test_rules_quantize_by_role_and_print():
    params = models.init_params(CONFIG, jax.random.key(0))
    roles = models.layer_roles(CONFIG, params)
    q, _ = quantize_params(params, P.TEMPORAL_INT8.rules(roles))
    leaves = dict(flatten_with_paths(q))
    assert str(leaves["blocks_0/attn1/to_v/kernel"].spec) == "int8/c"
    assert str(leaves["blocks_0/attn2/to_v/kernel"].spec) == "int4/g32"
    assert not isinstance(leaves["proj_out/kernel"], QArray) and not isinstance(
        leaves["blocks_0/scale_shift_table"], QArray
    )
    text = str(P.TEMPORAL_INT8)
    assert "temporal, double_stream" in text and "int4/g32" in text and "float (kept)" in text
    table = P.TEMPORAL_INT8.table(roles, params)
    assert "blocks_0/attn1/to_q/kernel" in table and "16,384" in table
    cast = P.BF16_KEEP.cast(params, roles)
    leaves = dict(flatten_with_paths(cast))
    assert leaves["proj_out/kernel"].dtype == jnp.bfloat16 and leaves["proj_out/bias"].dtype == jnp.bfloat16
    assert leaves["blocks_0/attn1/to_q/kernel"].dtype == jnp.float32
    q2, _ = quantize_params(params, P.BF16_KEEP.rules(roles))  # bf16 layers are not quantized
    assert not isinstance(dict(flatten_with_paths(q2))["proj_out/kernel"], QArray)
