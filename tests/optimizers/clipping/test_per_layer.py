"""Per-layer clipping (each variable, or each layer, on its own) against a numpy reference."""

import math

import keras
import numpy as np
import pytest

from keras_safe.optimizers import GradientClip
from keras_safe.optimizers.clipping import PerLayerClip
from tests.optimizers.clipping.reference import ReferenceRule, assert_matches_reference, norm

# Variables of the reference model: hidden/kernel, hidden/bias, out/kernel, out/bias.
GROUPS = {"variable": [[0], [1], [2], [3]], "layer": [[0, 1], [2, 3]]}


class PerLayerReference(ReferenceRule):
    def __init__(self, clip_norm, group):
        super().__init__()
        self.clip_norm, self.groups = clip_norm, GROUPS[group]

    def rule(self, grads, weights):
        out, any_clipped = list(grads), False
        for group in self.groups:
            n = math.sqrt(sum(norm(grads[i]) ** 2 for i in group))
            if n > self.clip_norm:
                any_clipped = True
                for i in group:
                    out[i] = grads[i] * (self.clip_norm / n)
        return out, any_clipped


@pytest.mark.parametrize("group", ["variable", "layer"])
def test_matches_numpy_reference(group):
    kwargs = {"clip_norm": 8.0} if group == "variable" else {"clip_norm": 8.0, "group": group}
    optimizer = assert_matches_reference("per_layer", kwargs, lambda: PerLayerReference(8.0, group))
    assert isinstance(optimizer.rule, PerLayerClip) and optimizer.rule.group == group


def test_layer_groups_follow_variable_paths():
    # Two variables of layer "a" (norms 3 and 4: together 5) and one of layer "b" (norm 1).
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, name="a"), keras.layers.Dense(1, name="b")]
    )
    before = [np.array(v) for v in model.trainable_variables]
    grads = [np.full((1, 1), 3.0), np.full((1,), 4.0), np.full((1, 1), 1.0), np.zeros((1,))]
    optimizer = GradientClip(keras.optimizers.SGD(1.0), mode="per_layer", group="layer")
    variables = model.trainable_variables
    optimizer.apply([keras.ops.convert_to_tensor(g, "float32") for g in grads], variables)
    moved = [b - np.array(v) for b, v in zip(before, model.trainable_variables, strict=True)]
    np.testing.assert_allclose([float(m.sum()) for m in moved], [0.6, 0.8, 1.0, 0.0], rtol=1e-6)


def test_defaults():
    assert GradientClip("sgd", mode="per_layer").rule.get_config() == {
        "clip_norm": 1.0,
        "group": "variable",
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group": "block"}, "`group` must be one of 'variable', 'layer'"),
        ({"clip_norm": 0.0}, "`clip_norm` must be .*> 0"),
        ({"clip_norm": "auto"}, "`clip_norm`"),
        ({"target_quantile": 0.5}, "`target_quantile` .*mode='per_layer'"),
        ({"epsilon": 1e-3}, "`epsilon` .*mode='per_layer'"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        GradientClip(keras.optimizers.SGD(), mode="per_layer", **kwargs)
    assert "Fix:" in str(error.value)
