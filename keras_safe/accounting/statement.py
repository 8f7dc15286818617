"""A plain-language statement of a DP-SGD guarantee: the figures, the unit and the assumptions.

From settings (`privacy_statement(num_examples, batch_size, epochs, noise_multiplier=...)`) or
from what a model really spent (`privacy_statement(ledger=keras_safe.privacy.get_ledger(model))`,
which quotes the ledger's steps and epsilon exactly). The figures come from `DPSchedule` and the
registered accountants, as `compute_epsilon`'s do.
"""

import math
import textwrap

from keras_safe._validation import check_number, fail
from keras_safe.accounting.accountants import check_accountant, epsilon_of
from keras_safe.accounting.checks import check_noise, resolve_delta
from keras_safe.accounting.group import MAX_GROUP_SIZE, group_epsilon_of_segments
from keras_safe.accounting.schedule import DPSchedule, check_privacy_unit, check_sampling

__all__ = ["privacy_statement"]

_METHODS = {"rdp": "Renyi DP (RDP)", "pld": "privacy loss distribution (PLD)"}


def _fill(text):
    return textwrap.fill(" ".join(text.split()), width=88)


def _method(accountant):
    return _METHODS.get(accountant, f"the registered {accountant!r}")


_UNIT = (
    "Unit of privacy: one training example (one row of a batch). The guarantee bounds how much "
    "any single example can change the distribution of everything training releases, including "
    "every intermediate model and checkpoint, not only the final one. It says nothing about a "
    "person who contributes several examples unless each person has one example: a person with "
    "k examples is protected only by group privacy, at a larger epsilon and delta (give the "
    "user ids to fit, users=..., for that figure from the RDP curve), or train with "
    "privacy_unit='user' for a guarantee that covers each user with all of their examples."
)
_USER_UNIT = (
    "Unit of privacy: one user (all of their examples). Each step sampled users, not rows, "
    "and clipped the sum of each sampled user's per-example gradients (at most "
    "examples_per_user of their examples) to the clipping norm as one vector, so the guarantee "
    "bounds how much any single user, with every example they contributed, can change the "
    "distribution of everything training releases. It holds only if the user ids given with "
    "the data tell people apart: one person under two ids counts as two users."
)
_GROUP_NOTE = (
    "User-level epsilon of this example-level training by group privacy, for a user with up "
    "to {k} examples ({source}): {eps:.4f} at delta = "
    "{delta:.3g}, from the RDP curve of the whole run (Mironov 2017, 'Renyi Differential "
    "Privacy', Proposition 2, for a group of {power}). Train with privacy_unit='user' for a "
    "user-level guarantee at the first epsilon."
)
_POISSON_NOTE = (
    "(*) Poisson sampling: every example joins each step's batch independently with "
    "probability equal to the sampling rate, so batch sizes vary. This is the setting the usual "
    "DP-SGD figure assumes, and what keras_safe's fit on arrays and poisson_batches do."
)
_USER_POISSON_NOTE = (
    "(*) Poisson sampling of users: every user joins each step's batch independently with "
    "probability equal to the sampling rate (with at most examples_per_user of their "
    "examples, drawn afresh), so the number of users per step varies; what keras_safe's fit "
    "with users=... and poisson_batches(..., users=...) do."
)
_USER_ASSUMPTIONS = (
    "Assumptions: each sampled user's summed gradient is clipped to the L2 norm bound before "
    "averaging, the batch checks in the step holding each user's examples in one slot; the "
    "Gaussian noise has standard deviation noise_multiplier x clipping norm; no other step "
    "reads the training data (data-dependent preprocessing, hyperparameter tuning on the same "
    "data or repeated runs are not counted); the user ids tell people apart; and the random "
    "numbers are unpredictable to an attacker."
)
_SHUFFLE_NOTE = (
    "(**) Shuffled batches: most pipelines shuffle the data and cut it into fixed-size batches "
    "instead. Then every example is used exactly once per epoch, and without extra assumptions "
    "only the second figure is proven: with the number of examples public and zero-out "
    "adjacency (one example replaced by one that contributes nothing; Kairouz et al. 2021), "
    "each epoch begun is one Gaussian mechanism, with no amplification by sampling. The Poisson "
    "figure is not a proof for shuffled batches (Chua et al. 2024, 'How Private are DP-SGD "
    "Implementations?'): in keras_safe they are an explicit opt-in (sampling='shuffle' on the "
    "DP optimizer, or shuffle=False given to fit), reported with the second figure, counting "
    "every epoch begun (a partial epoch is a whole mechanism)."
)
_ASSUMPTIONS = (
    "Assumptions: each example's gradient is clipped to the L2 norm bound before averaging "
    "(microbatches of several examples double the sensitivity, which the figures above "
    "account for when they were used); the Gaussian noise has standard deviation "
    "noise_multiplier x clipping norm; no other step reads the training data (data-dependent "
    "preprocessing, hyperparameter tuning on the same data or repeated runs are not counted); "
    "and the random numbers are unpredictable to an attacker."
)


def privacy_statement(
    num_examples=None,
    batch_size=None,
    epochs=None,
    noise_multiplier=None,
    delta=None,
    accountant=None,
    steps=None,
    sampling_rate=None,
    sampling="poisson",
    ledger=None,
    privacy_unit="example",
    examples_per_user=None,
):
    """Writes a plain-language report of the privacy guarantee of DP-SGD settings or a ledger.

    From settings, the report states them, epsilon under Poisson sampling (the figure usually
    quoted), epsilon under the conservative assumption that each example is used once per
    epoch in an arbitrary order (no amplification by sampling), which of the two applies
    (`sampling`), the unit of privacy (one training example) and the assumptions the figures
    rest on.

    From a model's privacy ledger (`ledger=keras_safe.privacy.get_ledger(model)`, and no
    settings), it states what the model really spent: every segment of steps with its noise,
    sampling and number of examples, the ledger's steps and its epsilon (the same figure as
    `ledger.epsilon(delta, accountant)`), and the model's budget.

    Args:
        num_examples: number of training examples.
        batch_size: expected batch size.
        epochs: number of passes over the data; may be fractional. An epoch is
            `ceil(num_examples / batch_size)` steps, as `fit` takes.
        noise_multiplier: ratio of the noise standard deviation to the clipping norm.
        delta: target delta in (0, 1/num_examples). Defaults to `default_delta(num_examples)`
            (stated), or for a ledger to its budget's delta.
        accountant: `"rdp"` (default) or `"pld"`; for a ledger, its budget's accountant.
        steps: number of noisy updates (with `sampling_rate`, instead of batch size/epochs).
        sampling_rate: probability that an example joins a given batch, in (0, 1].
        sampling: `"poisson"` (default) or `"shuffle"`: which figure is this run's.
        ledger: a `keras_safe.privacy.PrivacyLedger`, to state what a model spent (its unit
            and, for example-level training with user ids given to `fit`, the user-level
            epsilon by group privacy, come from the ledger).
        privacy_unit: `"example"` (default) or `"user"`: then `num_examples` and `batch_size`
            count users, and the statement is the user-level one.
        examples_per_user: with `"example"`, the most examples one user has: the statement
            adds the user-level epsilon by group privacy (from the RDP curve).

    Returns:
        A multi-paragraph string ending with a newline.

    Raises:
        ValueError: for out-of-range arguments, as `compute_epsilon`.

    Example:
        >>> from keras_safe.accounting import privacy_statement
        >>> text = privacy_statement(60000, 256, 15, noise_multiplier=1.1, delta=1e-5)
        >>> "Poisson sampling" in text and "1.283" in text and "3525 noisy steps" in text
        True
    """
    if ledger is not None:
        given = {
            "num_examples": num_examples,
            "batch_size": batch_size,
            "epochs": epochs,
            "noise_multiplier": noise_multiplier,
            "steps": steps,
            "sampling_rate": sampling_rate,
            "examples_per_user": examples_per_user,
        }
        for name, value in given.items():
            if value is not None:
                fail(
                    name,
                    value,
                    "left out with `ledger` (the ledger holds the settings it spent at)",
                    "pass either the settings or a ledger.",
                )
        return _ledger_statement(ledger, delta, accountant)

    sampling = check_sampling(sampling)
    user = check_privacy_unit(privacy_unit) == "user"
    if user and sampling != "poisson":
        fail(
            "sampling",
            sampling,
            "'poisson' with privacy_unit='user' (keras_safe samples users by Poisson sampling)",
            "leave sampling out.",
        )
    if user and examples_per_user is not None:
        fail(
            "examples_per_user",
            examples_per_user,
            "left out with privacy_unit='user' (the guarantee covers all of a user's examples)",
            "leave it out; it gives the group-privacy figure of example-level training.",
        )
    noise_multiplier = check_noise(noise_multiplier)
    schedule, steps = DPSchedule.from_arguments(
        num_examples, batch_size, epochs, steps, sampling_rate, noise_multiplier, sampling
    )
    num_examples = schedule.num_examples
    given_delta = delta
    delta = resolve_delta(delta, num_examples)
    accountant = check_accountant(accountant or "rdp")

    rate = schedule.sampling_rate
    passes = float(epochs) if epochs is not None else steps * rate
    poisson = DPSchedule(noise_multiplier, num_examples, batch_size, rate=rate)
    eps_poisson = poisson.epsilon(steps, delta, accountant)
    eps_once_per_epoch = epsilon_of(
        [(noise_multiplier, 1.0, math.ceil(passes - 1e-9))], delta, accountant
    )
    eps_run = schedule.epsilon(steps, delta, accountant)

    units = "users" if user else "examples"
    if batch_size is not None:
        settings = (
            f"DP-SGD over {num_examples} {units} with an expected {batch_size} {units} per "
            f"step (sampling rate {rate:.6g}), noise multiplier {noise_multiplier:g}, "
            f"for {epochs:g} epochs ({steps} noisy steps; an epoch is "
            f"{schedule.batches_per_epoch()} steps)."
        )
    else:
        over = f" over {num_examples} {units}" if num_examples is not None else ""
        settings = (
            f"DP-SGD{over} with {steps} noisy steps at sampling rate {rate:.6g} "
            f"(about {passes:.4g} epochs), noise multiplier {noise_multiplier:g}."
        )
    delta_note = ""
    if given_delta is None:
        delta_note = (
            f" delta was not given, so the default rule delta = 1/n^1.1 with n = "
            f"{num_examples} was used."
        )
    this_run = f"    epsilon of this run ({schedule.label}): {eps_run:.3f}"
    eps_once = eps_once_per_epoch
    paragraphs = [
        _fill(settings),
        _fill(
            f"{'User' if user else 'Example'}-level differential privacy, add-or-remove-one-"
            f"{'user' if user else 'example'} adjacency, at delta = {delta:.3g}, computed with "
            f"{_method(accountant)} accounting.{delta_note}"
        )
        + "\n"
        + (_user_figures(eps_poisson) if user else _figures(eps_poisson, eps_once, this_run)),
        _fill(_USER_UNIT if user else _UNIT),
    ]
    if examples_per_user is not None:
        paragraphs.append(
            _fill(_group_note(examples_per_user, [poisson.segment(steps)], delta, "given"))
        )
    if user:
        paragraphs += [_fill(_USER_POISSON_NOTE), _fill(_USER_ASSUMPTIONS)]
    else:
        paragraphs += [_fill(_POISSON_NOTE), _fill(_SHUFFLE_NOTE), _fill(_ASSUMPTIONS)]
    return "\n\n".join(paragraphs) + "\n"


def _user_figures(eps_poisson):
    return f"    epsilon with Poisson sampling of users (*):            {eps_poisson:12.3f}"


def _figures(eps_poisson, eps_once, this_run):
    return (
        f"    epsilon assuming Poisson sampling (*):                 {eps_poisson:12.3f}\n"
        f"    epsilon with each example used once per epoch (**):   {eps_once:12.3f}\n" + this_run
    )


def _group_note(most, segments, delta, source):
    """The group-privacy paragraph for users with up to `most` examples."""
    most = int(check_number("examples_per_user", most, low=1, integer=True))
    power = 2 ** math.ceil(math.log2(most))
    if most > MAX_GROUP_SIZE:
        return (
            f"A user with up to {most} examples ({source}) is beyond what group privacy from "
            f"RDP covers here (groups up to {MAX_GROUP_SIZE}): train with privacy_unit='user' "
            "for a user-level guarantee."
        )
    eps = group_epsilon_of_segments(segments, most, delta)
    return _GROUP_NOTE.format(k=most, eps=eps, delta=delta, power=power, source=source)


def _ledger_statement(ledger, delta, accountant):
    segments = ledger.segments()
    if delta is None:
        delta = ledger.delta()
    accountant = check_accountant(accountant or ledger.accountant)
    total = ledger.steps
    if not segments:
        return _fill("The privacy ledger holds no noisy step yet: epsilon is 0.") + "\n"
    epsilon = ledger.epsilon(delta, accountant)
    units = "users" if getattr(ledger, "privacy_unit", None) == "user" else "examples"
    lines = []
    for s in segments:
        how = (
            f"Poisson sampling at rate {s['sampling_rate']:.6g}"
            if not s["shuffled"]
            else f"shuffled batches ({s['events']} Gaussian mechanisms, no amplification)"
        )
        seeded = ", seeded noise or sampling (not private)" if s["seeded"] else ""
        lines.append(
            f"  - {s['steps']} steps over {s['num_examples']} {units}, {how}, accounted noise "
            f"multiplier {s['noise_multiplier']:.6g}{seeded}"
        )
    kinds = {"shuffled" if s["shuffled"] else "Poisson" for s in segments}
    budget = ledger.budget()
    budget_line = ""
    if budget is not None:
        budget_line = (
            f"\n    budget (saved with the model): target_epsilon {budget[0]:g} at delta "
            f"{budget[1]:.3g}, {ledger.accountant.upper()} accountant"
        )
    statistics = getattr(ledger, "statistics_epsilon", 0.0)
    statistics_line = (
        f"\n    of which {statistics:.4f} for statistics of the training data released with "
        "DP by preprocessing layers (pure epsilon-DP, added to the DP-SGD epsilon)"
        if statistics
        else ""
    )
    user = getattr(ledger, "privacy_unit", None) == "user"
    unit = "user" if user else "example"
    paragraphs = [
        _fill(
            f"DP-SGD as recorded in the model's privacy ledger: {total} noisy steps in "
            f"{len(segments)} setting(s)."
        )
        + "\n"
        + "\n".join(lines),
        _fill(
            f"{unit.capitalize()}-level differential privacy, "
            + (
                f"add-or-remove-one-{unit} adjacency"
                + (
                    ""
                    if user
                    else " (zero-out adjacency, the number of examples public, for "
                    "steps with microbatches)"
                )
                if kinds == {"Poisson"}
                else f"zero-out adjacency (one {unit} replaced by one that contributes nothing, "
                f"the number of {unit}s public)"
            )
            + f", at delta = {delta:.3g}, computed with {_method(accountant)} accounting over "
            "every segment (heterogeneous composition)."
        )
        + "\n"
        + f"    epsilon spent after {total} steps: {epsilon:.4f}"
        + statistics_line
        + budget_line,
        _fill(_USER_UNIT if user else _UNIT),
    ]
    most = getattr(ledger, "max_user_examples", None)
    if most and not user:
        segments = [(s["noise_multiplier"], s["sampling_rate"], s["events"]) for s in segments]
        source = "the most one user has in the data given to fit"
        paragraphs.append(_fill(_group_note(most, segments, delta, source)))
    if "Poisson" in kinds:
        paragraphs.append(_fill(_USER_POISSON_NOTE if user else _POISSON_NOTE))
    if "shuffled" in kinds:
        paragraphs.append(_fill(_SHUFFLE_NOTE))
    if ledger.seeded:
        paragraphs.append(
            _fill(
                "Some steps drew their noise or their batches from a seed given by the user: "
                "whoever knows it can regenerate the noise or tell which examples each batch "
                "held, so the guarantee does not hold for this model."
            )
        )
    paragraphs.append(_fill(_USER_ASSUMPTIONS if user else _ASSUMPTIONS))
    return "\n\n".join(paragraphs) + "\n"
