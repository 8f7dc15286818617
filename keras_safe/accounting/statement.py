"""A plain-language statement of a DP-SGD guarantee: the figures, the unit and the assumptions."""

import math
import textwrap

from keras_safe.accounting.accountants import check_accountant, epsilon_of
from keras_safe.accounting.compute import check_noise, resolve_delta, resolve_schedule

__all__ = ["privacy_statement"]


def _fill(text):
    return textwrap.fill(" ".join(text.split()), width=88)


def privacy_statement(
    num_examples=None,
    batch_size=None,
    epochs=None,
    noise_multiplier=None,
    delta=None,
    accountant="rdp",
    steps=None,
    sampling_rate=None,
):
    """Writes a plain-language report of the privacy guarantee of DP-SGD settings.

    The report states the settings, epsilon under Poisson sampling (the figure usually
    quoted), epsilon under the conservative assumption that each example is used once per
    epoch in an arbitrary order (no amplification by sampling), what changes when batches come
    from a shuffled pass over the data instead of Poisson sampling, the unit of privacy (one
    training example) and the assumptions the figures rest on.

    Args:
        num_examples: number of training examples.
        batch_size: expected batch size.
        epochs: number of passes over the data; may be fractional.
        noise_multiplier: ratio of the noise standard deviation to the clipping norm.
        delta: target delta in (0, 1). Defaults to `default_delta(num_examples)` (stated).
        accountant: `"rdp"` or `"pld"`.
        steps: number of noisy updates (with `sampling_rate`, instead of batch size/epochs).
        sampling_rate: probability that an example joins a given batch, in (0, 1].

    Returns:
        A multi-paragraph string ending with a newline.

    Raises:
        ValueError: for out-of-range arguments, as `compute_epsilon`.

    Example:
        >>> from keras_safe.privacy import privacy_statement
        >>> text = privacy_statement(60000, 256, 15, noise_multiplier=1.1, delta=1e-5)
        >>> "Poisson sampling" in text and "1.281" in text
        True
    """
    given_delta = delta
    steps, sampling_rate, num_examples = resolve_schedule(
        num_examples, batch_size, epochs, steps, sampling_rate
    )
    noise_multiplier = check_noise(noise_multiplier)
    delta = resolve_delta(delta, num_examples)
    accountant = check_accountant(accountant)

    passes = float(epochs) if epochs is not None else steps * sampling_rate
    eps_poisson = epsilon_of([(noise_multiplier, sampling_rate, steps)], delta, accountant)
    eps_once_per_epoch = epsilon_of(
        [(noise_multiplier, 1.0, math.ceil(passes - 1e-9))], delta, accountant
    )
    method = "Renyi DP (RDP)" if accountant == "rdp" else "privacy loss distribution (PLD)"

    if batch_size is not None:
        settings = (
            f"DP-SGD over {num_examples} examples with an expected {batch_size} examples per "
            f"step (sampling rate {sampling_rate:.6g}), noise multiplier {noise_multiplier:g}, "
            f"for {epochs:g} epochs ({steps} noisy steps)."
        )
    else:
        over = f" over {num_examples} examples" if num_examples is not None else ""
        settings = (
            f"DP-SGD{over} with {steps} noisy steps at sampling rate {sampling_rate:.6g} "
            f"(about {passes:.4g} epochs), noise multiplier {noise_multiplier:g}."
        )
    delta_note = ""
    if given_delta is None:
        delta_note = (
            f" delta was not given, so the default rule delta = 1/n^1.1 with n = "
            f"{num_examples} was used."
        )
    paragraphs = [
        _fill(settings),
        _fill(
            f"Example-level differential privacy, add-or-remove-one-example adjacency, at "
            f"delta = {delta:.3g}, computed with {method} accounting.{delta_note}"
        )
        + "\n"
        + f"    epsilon assuming Poisson sampling (*):                 {eps_poisson:12.3f}\n"
        + f"    epsilon with each example used once per epoch (**):   {eps_once_per_epoch:12.3f}",
        _fill(
            "Unit of privacy: one training example (one row of a batch). The guarantee bounds "
            "how much any single example can change the distribution of everything training "
            "releases, including every intermediate model and checkpoint, not only the final "
            "one. It says nothing about a person who contributes several examples unless "
            "each person has one example: a person with k examples is protected only at "
            "roughly k times this epsilon (group privacy)."
        ),
        _fill(
            "(*) Poisson sampling: every example joins each step's batch independently with "
            "probability equal to the sampling rate, so batch sizes vary. This is the setting "
            "the usual DP-SGD figure assumes."
        ),
        _fill(
            "(**) Shuffled batches: most pipelines shuffle the data and cut it into fixed-size "
            "batches instead. Then every example is used exactly once per epoch, and without "
            "extra assumptions only the second figure (the composition of one Gaussian "
            "mechanism per epoch, with no amplification by sampling) is proven. With a random "
            "shuffle kept secret, the true epsilon is believed to be close to the Poisson "
            "figure, but that is not a proof: use Poisson sampling where the guarantee must "
            "be exact."
        ),
        _fill(
            "Assumptions: each example's gradient is clipped to the L2 norm bound before "
            "averaging, with no microbatching of several examples together (which doubles "
            "the sensitivity); the Gaussian noise has standard deviation noise_multiplier x "
            "clipping norm; no other step reads the training data (data-dependent "
            "preprocessing, hyperparameter tuning on the same data or repeated runs are not "
            "counted); and the random numbers are unpredictable to an attacker."
        ),
    ]
    return "\n\n".join(paragraphs) + "\n"
