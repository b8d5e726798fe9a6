"""Mesh construction, logical-axis rules and the one-line errors for layouts that cannot work."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lexvla_jax import sharding


def test_mesh_infers_one_axis_with_auto_axis_types():
    mesh = sharding.make_mesh((2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, -1, 1), "3 does not divide the 8 devices"),
        ((2, 2, 1), "has 4 devices but 8 are available"),
        ((-1, -1, 1), "at most one -1"),
        ((8, 1), "needs 3 sizes"),
    ],
)
def test_bad_mesh_shapes_fail_in_one_line(shape, message):
    with pytest.raises(sharding.MeshError, match=message) as info:
        sharding.make_mesh(shape)
    assert "\n" not in str(info.value)


def test_batch_must_divide_data_parallelism_and_micro_batches():
    mesh = sharding.make_mesh((2, 4, 1))
    sharding.check_batch_size(16, mesh, sharding.DEFAULT_RULES, num_micro_batches=2)
    with pytest.raises(sharding.MeshError, match="global batch 12 is not divisible by data-parallel size 8"):
        sharding.check_batch_size(12, mesh, sharding.DEFAULT_RULES)
    with pytest.raises(sharding.MeshError, match="use a multiple of 32"):
        sharding.check_batch_size(16, mesh, sharding.DEFAULT_RULES, num_micro_batches=4)


def test_rules_map_logical_names_and_drop_axes_that_do_not_divide():
    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("layers", "embed", "mlp"), rules, mesh, (4, 8, 16)) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length"), rules, mesh, (8, 5)) == P(("data", "fsdp"), None)
    # 17,149 words do not split in two: the vocabulary axis stays whole, the embedding is still split.
    assert sharding.logical_to_spec(("vocab", "embed"), rules, mesh, (17149, 64)) == P(None, "fsdp")
    # A mesh axis is used once per array: the second claimant gets nothing.
    custom = (("embed", "fsdp"), ("mlp", ("fsdp", "tensor")))
    assert sharding.logical_to_spec(("embed", "mlp"), custom, mesh, (8, 8)) == P("fsdp", "tensor")


def test_constrain_is_a_no_op_outside_a_mesh_context():
    x = jax.numpy.ones((8, 4))
    assert sharding.constrain(x, ("batch", None)) is x
    mesh = sharding.make_mesh((8, 1, 1))
    with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", None)))(x)
    assert y.sharding.spec[0] in ("data", ("data", "fsdp"))  # fsdp has size 1 here
    assert len(y.sharding.device_set) == 8
