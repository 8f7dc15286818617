"""Convolution rules: plain, grouped, 3D, depthwise, separable and transposed.

Every kind of convolution is checked against the oracle in `test_catalog.py`; here, one `fit`
step of common stacks, and the grouped-convolution attack.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.per_example import reference
from keras_safe.privacy.per_example.rules.conv import ConvRule
from keras_safe.privacy.per_example.rules.conv_kernel import ConvKernelGrad
from tests.privacy.per_example.common import (
    RNG,
    B,
    assert_fit_matches_reference,
    check_with_oracle,
    classifier,
    labels,
)

L = keras.layers

FIT_CASES = {
    "conv2d": lambda: (
        classifier(
            [
                L.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
                L.MaxPool2D(2, 1),
                L.Conv2D(3, 2, dilation_rate=2),
            ],
            (10, 10, 2),
        ),
        RNG.normal(size=(B, 10, 10, 2)),
    ),
    "conv_many_channels": lambda: (
        classifier(
            [
                L.Conv2D(3, 3, strides=2, padding="same"),
                L.Reshape((5, 15)),
                L.Conv1D(2, 3, dilation_rate=2),
            ],
            (9, 9, 9),
        ),
        RNG.normal(size=(B, 9, 9, 9)),
    ),
    "conv1d_causal": lambda: (
        classifier([L.Conv1D(4, 3, padding="causal"), L.Conv1D(2, 2, strides=2)], (12, 3)),
        RNG.normal(size=(B, 12, 3)),
    ),
}


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_step_matches_one_example_loop(case):
    model, x = FIT_CASES[case]()
    assert_fit_matches_reference(model, x, labels())


def _grouped_model():
    return classifier([L.Conv2D(4, 3, groups=2, padding="same", activation="tanh")], (5, 5, 4))


def test_grouped_convolution_attack_sensitivity_within_clip():
    # 0.1.0 sent grouped convolutions to the vectorized Jacobian, which mixes examples: the
    # clipped sum was 56-78% off and removing one example moved it by up to 1.7 C.
    x = RNG.normal(size=(B, 5, 5, 4)) * 3.0
    check = check_with_oracle(_grouped_model(), x, labels(), l2_norm_clip=0.05)
    assert check.max_error < 1e-4
    assert check.max_sensitivity <= 1 + 1e-5
    assert check.max_sensitivity > 0.5  # every example is clipped: the bound is reached


def test_the_vectorized_jacobian_is_what_got_grouped_convolutions_wrong():
    # Why the fallback is verified: pfor's per-example gradients of a grouped convolution
    # differ from the one-example-at-a-time gradients.
    model = _grouped_model()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = RNG.normal(size=(4, 5, 5, 4)).astype("float32"), labels(count=4)
    variables = model.trainable_variables
    loss_fn = PerExampleLoss(model)

    @tf.function
    def norms(use_rules):
        def forward():
            pred = model(x, training=True)
            return loss_fn(y, pred), pred

        return keras_safe.privacy.per_example.clipping.clipped_gradient_sum(
            model, variables, forward, 1e6, use_rules=use_rules
        )[3]

    def unit_loss(xu, yu, _):
        return tf.reduce_mean(loss_fn(yu, model(xu, training=True)))

    grads, _ = reference.gradients_alone(model, variables, unit_loss, x, y)
    exact = np.array([np.sqrt(sum(np.sum(g**2) for g in unit)) for unit in grads])
    np.testing.assert_allclose(norms(True), exact, rtol=1e-5)
    assert np.max(np.abs(np.asarray(norms(False)) - exact) / exact) > 1e-2


def test_verify_picks_the_loop_for_a_grouped_convolution_without_a_rule():
    class MyConv(L.Conv2D):  # overrides call: no built-in rule applies
        def call(self, inputs):
            return super().call(inputs)

    model = classifier([MyConv(4, 3, groups=2, padding="same")], (5, 5, 4))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = RNG.normal(size=(4, 5, 5, 4)), labels(count=4)
    found = keras_safe.privacy.per_example.verification.verify(model, PerExampleLoss(model), x, y)
    assert found.fallback == "loop"
    assert any("my_conv" in path for path in found.fallback_variables)
    check = keras_safe.testing.assert_dp_matches_reference(model, x, y)
    assert check.fallback == "loop" and check.max_sensitivity <= 1 + 1e-5


GROUPED_PATH_CASES = {
    # (layer, input shape): many output positions per input channel, so the kernel gradients
    # come from one convolution with the examples as groups.
    "same_stride_1": (lambda: L.Conv2D(5, 3, padding="same"), (9, 9, 3)),
    "valid_strided": (lambda: L.Conv2D(4, (3, 2), strides=(2, 1), padding="valid"), (11, 9, 2)),
    "dilated": (lambda: L.Conv2D(3, 3, dilation_rate=2, use_bias=False), (12, 12, 2)),
    "same_strided_odd": (lambda: L.Conv2D(4, 3, strides=2, padding="same"), (9, 7, 2)),
    "conv1d_causal": (lambda: L.Conv1D(4, 3, padding="causal", dilation_rate=2), (20, 3)),
    "conv1d_strided": (lambda: L.Conv1D(3, 4, strides=3), (25, 2)),
}


@pytest.mark.parametrize("case", sorted(GROUPED_PATH_CASES))
def test_kernel_gradients_with_the_examples_as_groups_match_the_loop(case):
    make_layer, shape = GROUPED_PATH_CASES[case]
    layer = make_layer()
    model = classifier([layer], shape)
    x = RNG.normal(size=(B, *shape)).astype("float32")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    y = labels()
    inputs = x if layer.padding != "causal" else np.pad(x, [(0, 0), (4, 0), (0, 0)])
    dz = RNG.normal(size=(B, *layer.compute_output_shape((B, *shape))[1:])).astype("float32")
    form = ConvRule.forms(layer, tf.constant(inputs), tf.constant(dz))[0]
    assert isinstance(form, ConvKernelGrad) and form._method() == "outer"
    t, channels = form.g.shape[1], shape[-1]
    assert t >= ConvKernelGrad.GROUPED_MIN_POSITIONS * channels  # the grouped path is taken
    rows, _ = form.materialise()
    # Independent: each example's kernel gradient from tf.GradientTape on the layer alone.
    for i in range(B):
        with tf.GradientTape() as tape:
            out = layer(tf.constant(x[i : i + 1]))
            target = tf.reduce_sum(out * dz[i : i + 1])
        expected = tape.gradient(target, layer.kernel)
        np.testing.assert_allclose(rows[i], expected, rtol=1e-4, atol=1e-4)
    # And the whole DP step against the one-example-at-a-time loop.
    check = check_with_oracle(model, x, y, l2_norm_clip=0.5)
    assert check.max_error < 1e-4 and check.max_sensitivity <= 1 + 1e-5


@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: L.Conv2D(16, 3, padding="same"), (4, 4, 8)),
        (lambda: L.Conv2D(12, 2, strides=2, padding="same"), (5, 5, 16)),
        (lambda: L.Conv1D(24, 3, padding="causal"), (6, 12)),
        (lambda: L.Conv1D(12, 3, strides=2, use_bias=False), (9, 10)),
    ],
    ids=["same", "same_strided", "conv1d_causal", "conv1d_strided"],
)
@pytest.mark.parametrize("per_block", [None, 1, 3], ids=["one_block", "blocks_of_1", "blocks_of_3"])
def test_large_kernels_recompute_the_clipped_sum_from_scaled_output_gradients(
    layer, shape, per_block, monkeypatch
):
    # Per-example kernel gradients larger than the layer's activations serve the norms only
    # (computed a block of examples at a time, the last block padded); the clipped sum is the
    # kernel gradient of the scaled output gradients.
    layer = layer()
    model = classifier([layer], shape)
    x = RNG.normal(size=(B, *shape)).astype("float32") * 2.0
    dz = RNG.normal(size=(B, *layer.compute_output_shape((B, *shape))[1:])).astype("float32")
    inputs = x if layer.padding != "causal" else np.pad(x, [(0, 0), (2, 0), (0, 0)])
    form = ConvRule.forms(layer, tf.constant(inputs), tf.constant(dz))[0]
    assert form._sums_from_outputs()
    if per_block is not None:
        assert B % per_block != 0 or per_block == 1  # blocks of 3 leave a padded last block
        values = per_block * int(np.prod(layer.kernel.shape))
        monkeypatch.setattr(ConvKernelGrad, "BLOCK_VALUES", values)
    # The norms (from rows in any order) against each example's gradient from the tape.
    bounds = np.sqrt(np.asarray(form.norm_bounds()[0]))
    for i in range(B):
        with tf.GradientTape() as tape:
            target = tf.reduce_sum(layer(tf.constant(x[i : i + 1])) * dz[i : i + 1])
        exact = np.linalg.norm(np.asarray(tape.gradient(target, layer.kernel), "float64"))
        assert exact * (1 - 1e-5) <= bounds[i] <= exact * (1 + 1e-4)
    if per_block is not None:
        return  # the whole step against the one-example loop runs once per layer
    check = check_with_oracle(model, x, labels(), l2_norm_clip=0.3)
    assert check.max_error < 1e-4 and check.max_sensitivity <= 1 + 1e-5
    assert check.max_sensitivity > 0.5  # examples are clipped


@pytest.mark.parametrize("case", ["conv2d", "conv_many_channels"])
def test_fit_step_matches_one_example_loop_where_the_kernel_refuses_groups_and_dilations(
    case, monkeypatch
):
    # TensorFlow's own CPU kernel (oneDNN off) computes neither grouped nor dilated filter
    # gradients: the kernel gradients then come from the patches and tf.nn.convolution.
    from keras_safe.privacy.per_example.rules import conv_kernel

    monkeypatch.setattr(conv_kernel, "_SUPPORT", {"groups": False, "dilations": False})
    model, x = FIT_CASES[case]()
    assert_fit_matches_reference(model, x, labels())


def test_a_private_fit_of_a_dilated_convolution_runs_with_onednn_off():
    # The probe finds what the process's kernel does: with oneDNN off, a grouped or dilated
    # Conv2DBackpropFilter fails ("filter_size does not have enough elements", "do not yet
    # support dilation rates larger than 1"), and the step must not call it.
    import os
    import pathlib
    import subprocess
    import sys

    code = (
        "from keras_safe.privacy.per_example.rules.conv_kernel import kernel_support\n"
        "assert not kernel_support('groups') and not kernel_support('dilations')\n"
        "from tests.privacy.per_example.test_conv import FIT_CASES, assert_fit_matches_reference\n"
        "from tests.privacy.per_example.common import labels\n"
        "model, x = FIT_CASES['conv2d']()\n"
        "assert_fit_matches_reference(model, x, labels())\n"
        "print('ok')\n"
    )
    root = pathlib.Path(__file__).resolve().parents[3]
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
