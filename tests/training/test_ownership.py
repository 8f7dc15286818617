"""One ledger per set of trained weights: shared layers and copied weights, attacked and measured.

Each test trains the same weights through two private models and compares what the ledger then
reports with dp-accounting called directly on every step those weights took.
"""

import keras
import numpy as np
import pytest

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import get_ledger, make_private
from tests.dp_reference import epsilon as reference_epsilon

RNG = np.random.default_rng(6)
N, B, SIGMA = 200, 10, 1.1
X = RNG.normal(size=(N, 5)).astype("float32")
Y = (X[:, 0] > 0).astype("int32")


def _private(model):
    model.compile(
        optimizer=DPSGD(learning_rate=0.05, l2_norm_clip=1.0, noise_multiplier=SIGMA),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return make_private(model)


def _train(model, epochs=1):
    model.fit(X, Y, batch_size=B, epochs=epochs, verbose=0)
    return get_ledger(model)


def _truth(steps):
    return reference_epsilon(SIGMA, B / N, steps, 1e-5)


def test_two_models_sharing_a_layer_charge_one_ledger():
    shared = keras.layers.Dense(4, activation="relu")
    first = _private(keras.Sequential([keras.Input((5,)), shared, keras.layers.Dense(2)]))
    second = _private(keras.Sequential([keras.Input((5,)), shared, keras.layers.Dense(2)]))
    steps = _train(first).steps
    ledger = _train(second)
    assert ledger is get_ledger(first)
    assert ledger.steps == 2 * steps
    assert ledger.epsilon(1e-5) == pytest.approx(_truth(2 * steps), rel=1e-9)
    # Each model alone would have reported the epsilon of half the steps: the attack's gap.
    assert _truth(steps) < ledger.epsilon(1e-5) - 0.1


def test_a_shared_layer_answers_to_its_ledger_even_before_its_weights_move():
    from keras_safe.privacy import dp_gradients

    shared = keras.layers.Dense(4)
    first = _private(keras.Sequential([keras.Input((5,)), shared, keras.layers.Dense(2)]))
    second = _private(keras.Sequential([keras.Input((5,)), shared, keras.layers.Dense(2)]))
    first.optimizer.num_examples, first.optimizer.batch_size = N, B
    dp_gradients(first, X[:B], Y[:B])  # a release computed (and charged), never applied
    assert get_ledger(first).steps == 1
    assert _train(second) is get_ledger(first)


def test_weights_copied_into_a_clone_continue_the_original_ledger():
    original = _private(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    steps = _train(original).steps
    clone = _private(keras.models.clone_model(original))
    clone.set_weights(original.get_weights())
    ledger = _train(clone)
    assert ledger.steps == 2 * steps
    assert ledger.epsilon(1e-5) == pytest.approx(_truth(2 * steps), rel=1e-9)


def test_a_fresh_model_with_the_same_architecture_keeps_its_own_ledger():
    trained = _private(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    _train(trained)
    fresh = _private(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    ledger = _train(fresh)
    assert ledger is not get_ledger(trained)
    assert ledger.steps == get_ledger(trained).steps


def test_variables_trained_under_two_ledgers_are_refused():
    a, c = keras.layers.Dense(3), keras.layers.Dense(3)
    _train(_private(keras.Sequential([keras.Input((5,)), a, keras.layers.Dense(2)])))
    _train(_private(keras.Sequential([keras.Input((5,)), c, keras.layers.Dense(2)])))
    inputs = keras.Input((5,))
    both = _private(
        keras.Model(
            inputs, keras.layers.Dense(2)(keras.layers.Concatenate()([a(inputs), c(inputs)]))
        )
    )
    before = [np.array(v) for v in both.trainable_weights]
    with pytest.raises(PrivacyError, match="both ledgers have spent"):
        both.fit(X, Y, batch_size=B, verbose=0)
    for b, v in zip(before, both.trainable_weights):
        np.testing.assert_array_equal(b, np.array(v))


def test_a_layer_answers_to_its_ledger_after_its_model_is_collected():
    # The first model is dropped and collected: its layer's variables still carry what they
    # spent, and a second model that trained already may not take them over.
    import gc

    shared = keras.layers.Dense(3)
    _train(_private(keras.Sequential([keras.Input((5,)), shared, keras.layers.Dense(2)])))
    gc.collect()
    other = _private(
        keras.Sequential([keras.Input((5,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    )
    _train(other)
    inputs = keras.Input((5,))
    both = _private(keras.Model(inputs, other.layers[-1](shared(inputs))))
    gc.collect()
    with pytest.raises(PrivacyError, match="both ledgers have spent"):
        both.fit(X, Y, batch_size=B, verbose=0)


# -- statistics of the training data held by the model (preprocessing layers) ---------------------


def _with(layer):
    return _private(keras.Sequential([keras.Input((5,)), layer, keras.layers.Dense(2)]))


def test_exact_statistics_of_the_training_data_are_refused_and_public_ones_accepted():
    from keras_safe.preprocessing import RobustNormalization

    exact = RobustNormalization()
    exact.adapt(X)
    # The attack is real: the layer holds the training data's exact medians.
    np.testing.assert_allclose(np.array(exact.center), np.median(X, axis=0), rtol=1e-6)
    model = _with(exact)
    before = [np.array(v) for v in model.trainable_weights]
    with pytest.raises(PrivacyError, match="exact statistics.*public=True"):
        model.fit(X, Y, batch_size=B, verbose=0)
    for b, v in zip(before, model.trainable_weights):
        np.testing.assert_array_equal(b, np.array(v))
    assert get_ledger(model).steps == 0
    declared = RobustNormalization()
    declared.adapt(RNG.normal(size=(50, 5)), public=True)
    assert _train(_with(declared)).steps > 0


def test_dp_statistics_join_the_ledger_once_per_adapt():
    from keras_safe.preprocessing import RobustNormalization

    layer = RobustNormalization(dp_epsilon=0.5, dp_bounds=(-4.0, 4.0))
    layer.adapt(X)
    model = _with(layer)
    steps = _train(model).steps
    ledger = _train(model)  # a second fit: the same release, recorded once
    assert ledger.statistics_epsilon == pytest.approx(0.5)
    truth = _truth(2 * steps) + 0.5  # basic composition of the pure release with DP-SGD
    assert ledger.epsilon(1e-5) == pytest.approx(truth, rel=1e-9)
    assert "of which 0.5000 for statistics" in ledger.statement(delta=1e-5)
    layer.adapt(X)  # a new release of the same data
    _train(model)
    assert ledger.statistics_epsilon == pytest.approx(1.0)


def test_keras_layers_adapted_on_the_data_are_refused():
    adapted = keras.layers.Normalization()
    adapted.adapt(X)
    with pytest.raises(PrivacyError, match="mean= and variance="):
        _with(adapted).fit(X, Y, batch_size=B, verbose=0)
    given = keras.layers.Normalization(mean=np.zeros(5), variance=np.ones(5))
    assert _train(_with(given)).steps > 0
    words = np.array([["a", "b"], ["b", "c"]])
    lookup = keras.layers.StringLookup()
    lookup.adapt(words)
    inputs = keras.Input((2,), dtype="string")
    outputs = keras.layers.Dense(2)(keras.layers.Embedding(8, 3)(lookup(inputs))[:, 0])
    model = _private(keras.Model(inputs, outputs))
    with pytest.raises(PrivacyError, match="vocabulary="):
        model.fit(words, np.array([0, 1]), batch_size=1, verbose=0)
    # Quantiles of the training data: Discretization's bin boundaries from adapt.
    binned = keras.layers.Discretization(num_bins=4, output_mode="one_hot")
    binned.adapt(X[:, 0])
    inputs = keras.Input((1,))
    model = _private(keras.Model(inputs, keras.layers.Dense(2)(binned(inputs))))
    with pytest.raises(PrivacyError, match="bin_boundaries="):
        model.fit(X[:, :1], Y, batch_size=B, verbose=0)
    given = keras.layers.Discretization(bin_boundaries=[-1.0, 0.0, 1.0], output_mode="one_hot")
    model = _private(keras.Model(inputs, keras.layers.Dense(2)(given(inputs))))
    model.fit(X[:, :1], Y, batch_size=B, verbose=0)
    assert get_ledger(model).steps > 0


def test_weights_copied_into_a_model_that_trained_already_are_refused():
    # Both models spent privacy; the copy's ledger alone would state only its own steps. The
    # copy comes after the second model's step was traced, so the check runs at every call.
    original = _private(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    _train(original)
    other = _private(keras.models.clone_model(original))
    other_steps = _train(other).steps
    other.set_weights(original.get_weights())
    before = [np.array(v) for v in other.trainable_weights]
    for call in (
        lambda: other.fit(X, Y, batch_size=B, verbose=0),
        lambda: other.train_on_batch(X[:B], Y[:B]),
        lambda: keras_safe.privacy.dp_gradients(other, X[:B], Y[:B]),
    ):
        with pytest.raises(PrivacyError, match="both ledgers have spent"):
            call()
        for b, v in zip(before, other.trainable_weights):
            np.testing.assert_array_equal(b, np.array(v))
        assert get_ledger(other).steps == other_steps


def test_weights_copied_between_models_whose_ledgers_spent_alike_are_refused():
    # Two ledgers with equal histories (same steps, segments and rows) are still two ledgers:
    # only a snapshot of the model's own ledger (saved and loaded) may hold the same weights.
    def batches(model, calls=3):
        model.optimizer.num_examples, model.optimizer.batch_size = N, B
        for i in range(calls):
            model.train_on_batch(X[i * B : (i + 1) * B], Y[i * B : (i + 1) * B])
        return get_ledger(model)

    original = _private(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    other = _private(keras.models.clone_model(original))
    first, second = batches(original), batches(other)
    assert first.segments() == second.segments() and first.lineage != second.lineage
    other.set_weights(original.get_weights())
    with pytest.raises(PrivacyError, match="both ledgers have spent"):
        other.train_on_batch(X[:B], Y[:B])
    assert get_ledger(other).steps == 3
    second.reset()
    assert second.lineage != first.lineage  # a reset ledger keeps its own lineage


def test_a_model_saved_and_loaded_in_this_process_trains_on_under_its_ledger(tmp_path):
    model = _private(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    steps = _train(model).steps
    model.save(tmp_path / "m.keras")
    loaded = make_private(keras.saving.load_model(tmp_path / "m.keras"))
    assert get_ledger(loaded).lineage == get_ledger(model).lineage
    ledger = _train(loaded)
    assert ledger is not get_ledger(model) and ledger.steps == 2 * steps
