"""Attacks on the fail-closed properties, through the public API, with measured results.

Each test tries a way to train without clipping and noise, or to under-report epsilon, and
measures what happened: the weights did not move, the update norm stays within lr * C, or the
reported epsilon equals an independent computation (dp_accounting composed by hand).
"""

import json
import os
import subprocess
import sys
import textwrap

import dp_accounting
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe._validation import ArgumentError, PrivacyError
from keras_safe.callbacks import PrivacyBudget
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import get_ledger, make_private
from tests.testing import REPO_ROOT, CarryOver

RNG = np.random.default_rng(5)
N, B = 120, 20


def _data(n=N, features=4):
    x = RNG.normal(size=(n, features)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def _model(optimizer=None, **dp):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    settings = dict(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1)
    settings.update(dp)
    model.compile(optimizer=optimizer or DPSGD(**settings), loss="sparse_categorical_crossentropy")
    return model


def _weights(model):
    return [np.array(v) for v in model.trainable_variables]


def _assert_unchanged(before, model):
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v))


def _independent_epsilon(segments, delta):
    """Heterogeneous composition computed directly with dp_accounting (no keras_safe code)."""
    accountant = dp_accounting.rdp.RdpAccountant(
        [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
    )
    for noise, rate, steps in segments:
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)),
                steps,
            )
        )
    return accountant.get_epsilon(delta)


# -- item 2: the guard follows the data, not a flag ---------------------------------------------


def test_an_eager_dp_gradients_call_does_not_arm_a_later_plain_fit():
    x, y = _data()
    model = _model(num_examples=N, batch_size=B)
    grads = keras_safe.privacy.dp_gradients(model, x[:B], y[:B])  # eager call, never applied
    assert len(grads) == 2
    before = _weights(model)
    with pytest.raises(RuntimeError, match="not the DP release"):
        model.fit(x, y, batch_size=B, verbose=0)  # Keras's default step: no clipping, no noise
    _assert_unchanged(before, model)


def test_a_custom_loop_that_failed_after_dp_gradients_cannot_apply_other_gradients():
    x, y = _data()
    model = make_private(_model(num_examples=N, batch_size=B))
    try:
        keras_safe.privacy.dp_gradients(model, x[:B], y[:B])
        raise KeyboardInterrupt  # the loop dies between computing and applying
    except KeyboardInterrupt:
        pass
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x[:B], y=y[:B], y_pred=model(x[:B]))
    plain = tape.gradient(loss, model.trainable_variables)
    before = _weights(model)
    with pytest.raises(RuntimeError, match="not the DP release"):
        model.optimizer.apply(plain, model.trainable_variables)
    _assert_unchanged(before, model)
    # Arithmetic on a release is not a release either.
    grads = keras_safe.privacy.dp_gradients(model, x[:B], y[:B])
    with pytest.raises(RuntimeError, match="not the DP release"):
        model.optimizer.apply([g * 100 for g in grads], model.trainable_variables)
    _assert_unchanged(before, model)
    model.optimizer.apply(grads, model.trainable_variables)
    assert any(
        not np.array_equal(b, np.array(v)) for b, v in zip(before, model.trainable_variables)
    )


# -- item 4: a loss must have one value per example, from that example alone ---------------------


def _custom_loop_model(layers):
    """A private model of `layers` then Dense(2), verified for a custom loop: `(model, x, y,
    its weights)`."""
    model = keras.Sequential([keras.Input((4,)), *layers, keras.layers.Dense(2)])
    model.compile(
        optimizer=DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.1, num_examples=N, batch_size=B),
        loss="sparse_categorical_crossentropy",
    )
    make_private(model)
    x, y = _data()
    keras_safe.training.verify_model(model, x[:8], y[:8])
    return model, x, y, _weights(model)


def test_a_layer_carrying_one_steps_rows_into_the_next_in_one_graph_is_refused():
    # Two dp_gradients calls in one tf.function (a custom loop): the second step's losses
    # would depend on every example of the first batch through a tensor the layer kept, which
    # the proof took for a constant; the first step's own tensors count as data now.
    model, x, y, before = _custom_loop_model([CarryOver()])

    @tf.function
    def two_steps(x1, y1, x2, y2):
        first = keras_safe.privacy.dp_gradients(model, x1, y1)
        return first, keras_safe.privacy.dp_gradients(model, x2, y2)

    with pytest.raises(PrivacyError, match="kept from an earlier call"):
        two_steps(x[:B], y[:B], x[B : 2 * B], y[B : 2 * B])
    assert get_ledger(model).steps == 0
    _assert_unchanged(before, model)


def _enclosing_graphs(t):
    graph = getattr(getattr(t, "graph", None), "outer_graph", None)
    while graph is not None:
        yield graph
        graph = getattr(graph, "outer_graph", None)


class _ReadsTheBatchFromAnEnclosingGraph(keras.layers.Layer):
    """Adds the mean of the batch as the graph enclosing the step pulled it (under `fit`)."""

    def call(self, t):
        for graph in _enclosing_graphs(t):
            for op in graph.get_operations():
                if op.type in ("IteratorGetNext", "OptionalGetValue"):
                    pulled = [o for o in op.outputs if o.dtype == t.dtype and o.shape.rank == 2]
                    if pulled:
                        return t + tf.reduce_mean(pulled[0])
        return t


class _PullsTheNextBatch(keras.layers.Layer):
    """Adds the mean of the next batch, pulled from the iterator that feeds `fit`."""

    def call(self, t):
        for graph in _enclosing_graphs(t):
            for handle in getattr(graph, "inputs", []):
                if handle.dtype == tf.resource and handle.op.type == "Placeholder":
                    try:
                        pulled = tf.raw_ops.IteratorGetNext(
                            iterator=handle,
                            output_types=[tf.float32, tf.int32],
                            output_shapes=[[None, 4], [None]],
                        )
                    except (TypeError, ValueError):
                        continue
                    return t + tf.reduce_mean(pulled[0])
        return t


@pytest.mark.parametrize(
    "layer, physical, match",
    [
        (_ReadsTheBatchFromAnEnclosingGraph, None, "enclosing graph"),
        (_ReadsTheBatchFromAnEnclosingGraph, 5, "enclosing graph"),
        (_PullsTheNextBatch, None, "IteratorGetNext"),
    ],
    ids=["batch_pulled_outside_the_step", "same_in_chunks", "next_batch_from_the_iterator"],
)
def test_a_layer_reaching_fits_batches_outside_the_step_is_refused(layer, physical, match):
    # Under fit, the step's graph is nested in the one that pulls the batch. A tensor captured
    # from there entered the forward pass as a fresh placeholder, and a stateful op reading no
    # data (the iterator's next batch) returned values: the proof took both for constants, so
    # the layer mixed the batch (or the next one) into every example's loss, unrefused.
    model = keras.Sequential([keras.Input((4,)), layer(), keras.layers.Dense(2)])
    model.compile(
        optimizer=DPSGD(
            0.1, l2_norm_clip=1.0, noise_multiplier=1.1, sampling="shuffle",
            physical_batch_size=physical,
        ),
        loss="sparse_categorical_crossentropy",
    )  # fmt: skip
    make_private(model)
    before = _weights(model)
    x, y = _data()
    with pytest.raises(PrivacyError, match=match):
        model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    assert get_ledger(model).steps == 0
    _assert_unchanged(before, model)


class _KeepsTheBatchMean(keras.layers.Layer):
    """Writes the mean of its rows into a variable, in any mode, and passes them on unchanged."""

    def build(self, input_shape):
        self.mean = self.add_weight(shape=input_shape[1:], initializer="zeros", trainable=False)

    def call(self, t):
        self.mean.assign(tf.reduce_mean(t, axis=0))
        return t


class _Subclassed(keras.Model):
    def __init__(self, keeps):
        super().__init__(name="subclassed")
        self.keeps, self.dense = keeps, keras.layers.Dense(2)

    def call(self, x):
        return self.dense(self.keeps(x))


@pytest.mark.parametrize("built", [True, False], ids=["sequential", "subclassed_unbuilt"])
def test_what_a_layer_writes_while_the_model_is_verified_is_undone(built):
    # Verification runs the model on a few real examples before the first step (and an unbuilt
    # model was built on them); the step then refuses the write, but the variable kept those
    # examples' mean, saved with the model.
    keeps = _KeepsTheBatchMean(name="keeps")
    if built:
        model = keras.Sequential([keras.Input((4,)), keeps, keras.layers.Dense(2)])
    else:
        model = _Subclassed(keeps)
    model.compile(
        optimizer=DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.1),
        loss="sparse_categorical_crossentropy",
    )
    make_private(model)
    x, y = _data()
    with pytest.raises(PrivacyError, match="writes a variable"):
        model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    np.testing.assert_array_equal(np.array(keeps.mean), np.zeros(4, "float32"))
    assert get_ledger(model).steps == 0


class _CentresInTraining(keras.layers.Layer):
    def call(self, t, training=False):
        return t - tf.reduce_mean(t, axis=0) if training else t


@pytest.mark.parametrize("mixing", [True, False])
def test_a_step_traced_in_a_loops_body_reads_its_data_as_rows(mixing):
    # In a custom loop's tf.while_loop, the step reads the caller's batch through captures:
    # the proof took the batch for the outer tensors, so a layer centring the batch in training
    # trained, and data made in the body beside captured targets was refused.
    layers = [keras.layers.Dense(3)] + ([_CentresInTraining()] if mixing else [])
    model, x, y, before = _custom_loop_model(layers)

    @tf.function(autograph=False)
    def two_steps(x, y):
        def body(i):
            # (the batch as captured, or data made in the body beside captured targets)
            grads = keras_safe.privacy.dp_gradients(model, x if mixing else x * 1.0, y)
            model.optimizer.apply(grads, model.trainable_variables)
            return i + 1

        return tf.while_loop(lambda i: i < 2, body, [tf.constant(0)])

    if mixing:
        with pytest.raises(PrivacyError, match="stay apart"):
            two_steps(x[:B], y[:B])
        assert get_ledger(model).steps == 0
        _assert_unchanged(before, model)
    else:
        two_steps(x[:B], y[:B])
        assert get_ledger(model).steps == 2


def test_a_loss_that_averages_over_the_batch_is_refused():
    x = RNG.normal(size=(B, 4)).astype("float32")
    y = RNG.normal(size=(B, B)).astype("float32")

    def batch_mean_squared_error(y_true, y_pred):
        # One value per output unit (B of them), averaged over the batch: not per example.
        return tf.reduce_mean(tf.square(y_true - y_pred), axis=0)

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(B)])
    model.compile(
        optimizer=DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=0.0), loss=batch_mean_squared_error
    )
    make_private(model)
    before = _weights(model)
    with pytest.raises(PrivacyError, match="batch_mean_squared_error"):
        model.fit(x, y, batch_size=B, verbose=0)
    _assert_unchanged(before, model)


def test_removing_one_example_moves_a_custom_loss_update_by_at_most_lr_c_over_b():
    def per_example_huber(y_true, y_pred):
        return keras.losses.huber(y_true, y_pred, delta=0.5)

    x = RNG.normal(size=(B, 4)).astype("float32") * 30
    y = RNG.normal(size=(B, 3)).astype("float32") * 30
    lr, clip = 1.0, 0.3
    updates = []
    for weights in (np.ones(B), np.r_[0.0, np.ones(B - 1)]):  # example 0 present / removed
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(
            optimizer=DPSGD(lr, l2_norm_clip=clip, noise_multiplier=0.0), loss=per_example_huber
        )
        make_private(model)
        before = _weights(model)
        model.fit(x, y, sample_weight=weights, batch_size=B, shuffle=False, verbose=0)
        updates.append(np.concatenate([(b - a).ravel() for b, a in zip(before, _weights(model))]))
    sensitivity = np.linalg.norm(updates[0] - updates[1])
    assert 0.5 * lr * clip / B < sensitivity <= lr * clip / B * (1 + 1e-5)


# -- item 5: declared settings are checked against fit; undeclared ones come from the data ------


@pytest.mark.parametrize(
    "declared, fit_batch, name",
    [({"num_examples": 2000}, B, "num_examples"), ({"batch_size": 20}, 100, "batch_size")],
)
def test_declared_settings_that_do_not_match_fit_are_refused(declared, fit_batch, name):
    x, y = _data(200)
    model = make_private(_model(**declared))
    before = _weights(model)
    with pytest.raises(ArgumentError, match=name):
        model.fit(x, y, batch_size=fit_batch, verbose=0)
    _assert_unchanged(before, model)
    assert get_ledger(model).steps == 0


def test_privacy_budget_alone_reads_the_data_and_matches_an_independent_epsilon():
    x, y = _data(200)
    model = make_private(_model())
    budget = PrivacyBudget(target_epsilon=3.0, delta=1e-3, verbose=0)
    model.fit(x, y, batch_size=64, epochs=200, callbacks=[budget], verbose=0)
    steps = get_ledger(model).steps
    assert steps == int(model.optimizer.iterations) > 0
    eps = _independent_epsilon([(1.1, 64 / 200, steps)], 1e-3)
    assert budget.epsilon == pytest.approx(eps, rel=1e-9)
    assert eps <= 3.0 < _independent_epsilon([(1.1, 64 / 200, steps + 1)], 1e-3)


def test_a_dataset_with_bigger_batches_than_declared_is_refused_in_the_step():
    x, y = _data(200)
    model = make_private(_model(num_examples=200, batch_size=10))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(50)  # 50, not 10, per batch
    before = _weights(model)
    with pytest.raises(PrivacyError, match="holds more examples than the accounting allows"):
        model.fit(data, epochs=1, verbose=0)
    _assert_unchanged(before, model)
    assert get_ledger(model).steps == 0


# -- item 6: the ledger belongs to the model --------------------------------------------------


def test_ledger_survives_recompile_with_another_noise_and_batch_size():
    x, y = _data()
    model = make_private(_model())
    model.fit(x, y, batch_size=20, epochs=5, verbose=0)  # 30 steps at sigma 1.1, q = 1/6
    model.compile(
        optimizer=DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.5),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(x, y, batch_size=40, epochs=10, verbose=0)  # 30 steps at sigma 1.5, q = 1/3
    assert get_ledger(model).steps == 60
    expected = _independent_epsilon([(1.1, 20 / N, 30), (1.5, 40 / N, 30)], 1e-4)
    assert get_ledger(model).epsilon(1e-4) == pytest.approx(expected, rel=1e-9)
    # A fresh count of only the last optimizer's steps would under-report.
    assert expected > _independent_epsilon([(1.5, 40 / N, 30)], 1e-4) + 0.1


_RELOAD = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import keras_safe
    path, n = sys.argv[1], int(sys.argv[2])
    model = keras.saving.load_model(path, compile=False)
    restored = keras_safe.privacy.get_ledger(model).steps
    model.compile(optimizer=keras_safe.optimizers.DPSGD(
        0.1, l2_norm_clip=1.0, noise_multiplier=2.0), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model.fit(x, y, batch_size=30, epochs=2, verbose=0)  # make_private is not needed again
    ledger = keras_safe.privacy.get_ledger(model)
    print(json.dumps({"restored": restored, "steps": ledger.steps,
                      "epsilon": ledger.epsilon(1e-4), "class": type(model).__name__}))
    """
)


def test_ledger_survives_save_and_load_without_compile_in_a_fresh_process(tmp_path):
    x, y = _data()
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))  # functional
    model.compile(
        optimizer=DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.1),
        loss="sparse_categorical_crossentropy",
    )
    make_private(model).fit(x, y, batch_size=20, epochs=2, verbose=0)  # 12 steps
    path = str(tmp_path / "private.keras")
    model.save(path)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, path, str(N)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["class"] == "SafeFunctional"
    assert out["restored"] == 12 and out["steps"] == 12 + 8
    expected = _independent_epsilon([(1.1, 20 / N, 12), (2.0, 30 / N, 8)], 1e-4)
    assert out["epsilon"] == pytest.approx(expected, rel=1e-9)


def test_only_the_named_reset_clears_the_ledger():
    x, y = _data()
    model = make_private(_model())
    model.fit(x, y, batch_size=B, verbose=0)
    make_private(model)
    model.compile(
        optimizer=DPSGD(0.1, noise_multiplier=1.0), loss="sparse_categorical_crossentropy"
    )
    assert get_ledger(model).steps == N // B
    get_ledger(model).reset()
    assert get_ledger(model).steps == 0 and get_ledger(model).epsilon(1e-5) == 0.0


# -- item 7: calibration plans the steps that run ------------------------------------------------


def test_target_epsilon_is_calibrated_for_the_steps_fit_runs():
    # The README's digits example: 1797 examples, batch 64, 30 epochs. fit on arrays runs
    # 30 * ceil(1797 / 64) = 870 steps, not ceil(30 * 1797 / 64) = 843.
    n = 1797
    x = RNG.normal(size=(n, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = make_private(_model(noise_multiplier=None, target_epsilon=3.0, delta=1e-4))
    model.fit(x, y, batch_size=64, epochs=30, verbose=0)
    ledger = get_ledger(model)
    assert ledger.steps == 870
    spent = _independent_epsilon([(model.optimizer.noise_multiplier, 64 / n, 870)], 1e-4)
    assert 2.99 < spent <= 3.0


def test_a_declared_plan_that_fit_overruns_is_refused():
    x, y = _data()
    optimizer = DPSGD(0.1, target_epsilon=2.0, num_examples=N, batch_size=B, epochs=2, delta=1e-4)
    model = make_private(_model(optimizer=optimizer))
    with pytest.raises(ArgumentError, match="target_epsilon=2.0"):
        model.fit(x, y, batch_size=B, epochs=5, verbose=0)  # 5 epochs, not the 2 planned
    assert get_ledger(model).steps == 0


# -- item 8: Poisson batches are never truncated ---------------------------------------------


def test_poisson_batches_refuse_a_padded_size_that_would_truncate():
    x, y = _data(1000)
    with pytest.raises(ArgumentError, match="max_batch_size"):
        keras_safe.privacy.poisson_batches(x, y, batch_size=100, max_batch_size=100)


def test_poisson_batches_include_the_last_rows_at_rate_q():
    n, batch, epochs = 500, 50, 40
    x = np.arange(n, dtype="float32")[:, None]
    data = keras_safe.privacy.poisson_batches(x, np.zeros(n), batch_size=batch, epochs=epochs)
    counts = np.zeros(n)
    steps = 0
    for bx, _, bw in data:
        counts[bx.numpy()[bw.numpy() > 0, 0].astype(int)] += 1
        steps += 1
    q = batch / n
    # The last 10% of the rows (where truncation would bite) are included at rate q.
    last = counts[-n // 10 :].sum() / (steps * n // 10)
    assert abs(last - q) < 5 * np.sqrt(q * (1 - q) / (steps * n // 10))


# -- item 10: the smaller paths ---------------------------------------------------------------


def test_train_on_batch_refuses_a_step_past_the_budget():
    x, y = _data()
    model = make_private(_model(noise_multiplier=2.0))  # about 30 steps fit in epsilon 2
    model.fit(
        x, y, batch_size=B, epochs=100, verbose=0,
        callbacks=[PrivacyBudget(target_epsilon=2.0, delta=1e-4, verbose=0)],
    )  # fmt: skip
    spent = get_ledger(model).epsilon(1e-4)
    assert get_ledger(model).steps > 20
    before = _weights(model)
    with pytest.raises(PrivacyError, match="already spent"):
        model.train_on_batch(x[:B], y[:B])
    _assert_unchanged(before, model)
    assert get_ledger(model).epsilon(1e-4) == spent <= 2.0


def test_indivisible_microbatches_give_a_clear_error():
    # Fixed-size batches (the opt-in): 30 and the last batch of 10 are not divisible by 4.
    x, y = _data(100)
    model = make_private(_model(num_microbatches=4))
    with pytest.raises(PrivacyError, match="num_microbatches=4"):
        model.fit(x, y, batch_size=30, shuffle=False, verbose=0)
    assert get_ledger(model).steps == 0
    # Poisson batches (the default) are padded to a multiple of the microbatches.
    model.fit(x, y, batch_size=30, verbose=0)
    assert get_ledger(model).steps == 4


def test_seeded_noise_is_marked_in_the_ledger():
    x, y = _data()
    model = make_private(_model(seed=3))
    model.fit(x, y, batch_size=B, verbose=0)
    assert get_ledger(model).seeded
    fresh = make_private(_model())
    fresh.fit(x, y, batch_size=B, verbose=0)
    assert not get_ledger(fresh).seeded
