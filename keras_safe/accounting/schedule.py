"""The DP-SGD schedule: how one training run enters the accountant, written once.

Every consumer (`compute_epsilon`, `noise_multiplier_for_epsilon`, `privacy_statement`, the
command line, the DP optimizer's calibration, the train step that divides the noisy sum and
charges the ledger, `PrivacyBudget`) builds a `DPSchedule` and asks it; the rules below exist
nowhere else.

- **An epoch** is `ceil(num_examples / batch_size)` steps (or the `steps_per_epoch` `fit` is
  given), as many as `fit` on arrays takes; `epochs` epochs are `ceil(epochs * steps per epoch)`
  steps, for `poisson_batches`, calibration, `compute_epsilon`, the statement and the command
  line alike.
- **Poisson sampling** (the default): every example joins each step's batch independently with
  probability `q = batch_size / num_examples`; each step is one Poisson-subsampled Gaussian
  mechanism at rate `q` (add-or-remove-one-example adjacency).
- **Shuffled batches** (`sampling="shuffle"`, an explicit opt-in): fixed-size batches cut from a
  pass over the data. No amplification by sampling is claimed. Under zero-out adjacency (one
  example replaced by one that contributes nothing, with the number of examples public; Kairouz
  et al. 2021, "Practical and Private (Deep) Learning without Sampling or Shuffling"), an
  example is in at most one batch of an epoch that passes over the data once (`fit` on arrays),
  so each epoch begun is one Gaussian mechanism (sampling rate 1); where keras_safe cannot see
  such passes (custom loops, `train_on_batch`, other pipelines) every step is one.
- **Microbatches** (`num_microbatches` smaller than the batch): a microbatch's mean gradient is
  clipped, and one example joining, leaving or being zeroed out moves it by up to twice the
  clipping norm, so the accountant sees half the noise multiplier (as TF Privacy accounts
  microbatching; Ponomareva et al. 2023, "How to DP-fy ML", Sec. 5.6). Microbatches are
  consecutive rows of the batch: with Poisson batches (padded to a multiple of the microbatch
  count) this holds under zero-out adjacency, where an example's row does not depend on the
  others.
- **Gradient accumulation** over `k` batches: each batch is sampled on its own and adds
  `1/sqrt(k)` of the update's noise, so each batch is an accounted step at
  `noise_multiplier / sqrt(k)`.
- **Users as the unit** (`privacy_unit="user"`): `num_examples` and `batch_size` count users;
  each step samples users independently at rate `batch_size / num_examples` and clips the sum
  of each sampled user's gradients (at most `examples_per_user` of their examples) to the
  clipping norm as one vector, so adding or removing one user (all of their examples) moves
  the sum by at most the clipping norm: the accountant sees the same Poisson-subsampled
  Gaussian mechanism, over users (Charles et al. 2024, "Fine-Tuning Large Language Models with
  User-Level Differential Privacy"; Chua et al. 2024, "Mind the Privacy Unit!").
- **The release** of one batch: the clipped sum plus Gaussian noise of standard deviation
  `l2_norm_clip * noise_multiplier / sqrt(k)`, divided by the expected batch size (or the
  number of microbatches).
"""

import dataclasses
import math

from keras_safe._validation import check_choice, check_number, check_probability, fail
from keras_safe.accounting.accountants import calibrate_noise, check_accountant, epsilon_of
from keras_safe.accounting.checks import check_delta, check_noise, check_target

__all__ = ["PRIVACY_UNITS", "SAMPLINGS", "DPSchedule", "check_privacy_unit"]

SAMPLINGS = ("poisson", "shuffle")
"""How the batches of a run are drawn: Poisson sampling, or shuffled fixed-size batches."""

PRIVACY_UNITS = ("example", "user")
"""What one guarantee protects: one training example, or one user with all of their examples."""


def check_privacy_unit(privacy_unit, name="privacy_unit"):
    """Checks a privacy unit name and returns it."""
    return check_choice(
        name,
        privacy_unit,
        PRIVACY_UNITS,
        "use 'example' (the default: the guarantee covers one training example) or 'user' "
        "(it covers one user with all of their examples; give user ids with the data).",
    )


def check_sampling(sampling, name="sampling"):
    """Checks a sampling name and returns it."""
    return check_choice(
        name,
        sampling,
        SAMPLINGS,
        "use 'poisson' (the default: each example joins each batch independently, the sampling "
        "the usual epsilon assumes) or 'shuffle' (fixed-size batches, accounted without "
        "amplification).",
    )


@dataclasses.dataclass(frozen=True)
class DPSchedule:
    """How a DP-SGD run is accounted: one value object, built from an optimizer and the data.

    Attributes:
        noise_multiplier: the noise standard deviation of one update over the clipping norm.
        num_examples: training examples `n` (None when unknown).
        batch_size: expected examples per batch `B` (None when unknown).
        num_microbatches: microbatches per batch, or None for per-example clipping.
        accumulation_steps: batches averaged into one update (gradient accumulation `k`).
        steps_per_epoch: steps per epoch; defaults to `ceil(n / B)`.
        sampling: `"poisson"` or `"shuffle"` (see the module's description).
        one_pass_epochs: with `"shuffle"`, whether each epoch of `steps_per_epoch` steps is one
            pass over the data (each example in at most one of its batches), as in `fit` on
            arrays; otherwise every step is accounted as one mechanism.
        rate: a sampling rate given directly (instead of `batch_size / num_examples`).
        privacy_unit: `"example"`, or `"user"`: then `num_examples` and `batch_size` count
            users (see the module's description).
        examples_per_user: with `"user"`, the most examples of one user in a step (the rows
            of a user's slot in the batch), when known.

    Example:
        >>> s = DPSchedule(noise_multiplier=1.1, num_examples=60000, batch_size=256)
        >>> s.sampling_rate, s.accounted_noise, s.batches_for_epochs(15)
        (0.004266666666666667, 1.1, 3525)
        >>> round(s.epsilon(3525, delta=1e-5), 3)
        1.283
        >>> shuffled = DPSchedule(1.1, 60000, 256, sampling="shuffle", one_pass_epochs=True)
        >>> shuffled.events_for_steps(3525), shuffled.accounted_rate
        (15, 1.0)
    """

    noise_multiplier: float = None
    num_examples: int = None
    batch_size: int = None
    num_microbatches: int = None
    accumulation_steps: int = 1
    steps_per_epoch: int = None
    sampling: str = "poisson"
    one_pass_epochs: bool = False
    rate: float = None
    privacy_unit: str = "example"
    examples_per_user: int = None

    def __post_init__(self):
        check_sampling(self.sampling)
        check_privacy_unit(self.privacy_unit)
        if self.user_level and self.num_microbatches:
            fail(
                "num_microbatches",
                self.num_microbatches,
                "None with privacy_unit='user' (each user's examples are clipped together)",
                "leave num_microbatches out for user-level privacy.",
            )

    @property
    def user_level(self):
        """Whether the unit of privacy is one user with all of their examples."""
        return self.privacy_unit == "user"

    @property
    def unit_label(self):
        """The unit of privacy, in words."""
        if self.user_level:
            return "one user (all of their examples)"
        return "one training example"

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_arguments(
        cls,
        num_examples=None,
        batch_size=None,
        epochs=None,
        steps=None,
        sampling_rate=None,
        noise_multiplier=None,
        sampling="poisson",
    ):
        """The schedule and the number of steps of either form of the public functions' arguments.

        The first form, `num_examples`, `batch_size`, `epochs`, means `batches_for_epochs(epochs)`
        steps (an epoch is `ceil(num_examples / batch_size)` steps) at rate
        `batch_size / num_examples`. The second form gives `steps` and `sampling_rate` directly
        (`num_examples` optionally, for the default delta).

        Returns:
            `(schedule, steps)`.

        Raises:
            ArgumentError: naming the argument that is missing, out of range or mixes the forms.

        Example:
            >>> s, steps = DPSchedule.from_arguments(1797, 64, 30, noise_multiplier=1.0)
            >>> steps, s.batches_per_epoch()
            (870, 29)
        """
        sampling = check_sampling(sampling)
        noise = None if noise_multiplier is None else check_noise(noise_multiplier)
        if steps is not None or sampling_rate is not None:
            if batch_size is not None or epochs is not None:
                fail(
                    "steps",
                    steps,
                    "given without `batch_size` and `epochs`",
                    "pass either `num_examples`, `batch_size` and `epochs`, or `steps` and "
                    "`sampling_rate`, not both forms.",
                )
            steps = check_number(
                "steps", steps, low=0, integer=True, fix="pass the number of noisy updates taken."
            )
            sampling_rate = check_probability(
                "sampling_rate",
                sampling_rate,
                allow_one=True,
                fix="pass expected batch size / number of training examples.",
            )
            if num_examples is not None:
                num_examples = _whole("num_examples", num_examples, "pass the training set size.")
            schedule = cls(noise, num_examples, sampling=sampling, rate=sampling_rate)
            return schedule, steps

        for name, value in (
            ("num_examples", num_examples),
            ("batch_size", batch_size),
            ("epochs", epochs),
        ):
            if value is None:
                fail(
                    name,
                    value,
                    "given",
                    "pass `num_examples`, `batch_size` and `epochs`, or `steps` and "
                    "`sampling_rate` instead.",
                )
        num_examples = _whole("num_examples", num_examples, "pass the number of training examples.")
        batch_size = _whole("batch_size", batch_size, "pass the expected examples per batch.")
        if batch_size > num_examples:
            fail(
                "batch_size",
                batch_size,
                f"at most num_examples ({num_examples})",
                "use a batch size no larger than the training set.",
            )
        epochs = check_number(
            "epochs",
            epochs,
            low=0.0,
            low_inclusive=False,
            fix="pass the number of passes over the data (it may be fractional).",
        )
        schedule = cls(noise, num_examples, batch_size, sampling=sampling, one_pass_epochs=True)
        return schedule, schedule.batches_for_epochs(epochs)

    @classmethod
    def from_optimizer(
        cls,
        optimizer,
        num_examples=None,
        batch_size=None,
        steps_per_epoch=None,
        sampling=None,
        one_pass_epochs=False,
        examples_per_user=None,
    ):
        """The schedule of a DP optimizer, with the data's `num_examples` and `batch_size`.

        Values the optimizer declares (`num_examples`, `batch_size`) must agree with the
        values given here (what `fit` actually does); either side alone is used as it is.
        `sampling` is what the data is known to be (`poisson_batches`, or `fit` on arrays); None
        takes the optimizer's declared `sampling`.

        Raises:
            ArgumentError: naming the argument when a declared value differs from the data.
        """
        declared = {
            "num_examples": getattr(optimizer, "num_examples", None),
            "batch_size": getattr(optimizer, "batch_size", None),
            "examples_per_user": getattr(optimizer, "examples_per_user", None),
        }
        actual = {
            "num_examples": num_examples,
            "batch_size": batch_size,
            "examples_per_user": examples_per_user,
        }
        for name in declared:
            if declared[name] is not None and actual[name] is not None:
                if int(declared[name]) != int(actual[name]):
                    fail(
                        name,
                        declared[name],
                        f"what training actually uses ({actual[name]})",
                        f"declare {name}={actual[name]} on the DP optimizer, or leave it out "
                        "and keras_safe takes it from the data; a wrong value would misstate "
                        "epsilon.",
                    )
        return cls(
            noise_multiplier=optimizer.noise_multiplier,
            num_examples=actual["num_examples"] or declared["num_examples"],
            batch_size=actual["batch_size"] or declared["batch_size"],
            num_microbatches=getattr(optimizer, "num_microbatches", None),
            accumulation_steps=int(getattr(optimizer, "accumulation_steps", 1) or 1),
            steps_per_epoch=steps_per_epoch,
            sampling=sampling or getattr(optimizer, "sampling", None) or "poisson",
            one_pass_epochs=bool(one_pass_epochs),
            privacy_unit=getattr(optimizer, "privacy_unit", None) or "example",
            examples_per_user=actual["examples_per_user"] or declared["examples_per_user"],
        )

    # -- the rules -------------------------------------------------------------------------------

    @property
    def known(self):
        """Whether the sampling rate is known (`num_examples` and `batch_size`, or `rate`)."""
        return self.rate is not None or (
            self.num_examples is not None and self.batch_size is not None
        )

    @property
    def poisson(self):
        """Whether the batches are Poisson samples (else shuffled fixed-size batches)."""
        return self.sampling == "poisson"

    @property
    def sampling_rate(self):
        """The fraction of the examples in one batch: `batch_size / num_examples` (capped at 1),
        or the rate given; None when unknown."""
        if self.rate is not None:
            return float(self.rate)
        if not self.known:
            return None
        return min(1.0, self.batch_size / self.num_examples)

    @property
    def accounted_rate(self):
        """The sampling rate the accountant composes: `sampling_rate` for Poisson batches, 1 for
        shuffled ones (no amplification)."""
        return self.sampling_rate if self.poisson else 1.0

    @property
    def sensitivity_factor(self):
        """2 for microbatches of several examples, else 1."""
        m = self.num_microbatches
        if m and (self.batch_size is None or m < self.batch_size):
            return 2.0
        return 1.0

    def accounted_noise_for(self, noise_multiplier):
        """The noise multiplier one accounted step (one batch) has for a given update noise."""
        return noise_multiplier / (self.sensitivity_factor * math.sqrt(self.accumulation_steps))

    @property
    def accounted_noise(self):
        """The noise multiplier the accountant sees for one batch."""
        return self.accounted_noise_for(self.noise_multiplier)

    def noise_stddev(self, l2_norm_clip):
        """The standard deviation of the noise each batch adds to its clipped sum:
        `l2_norm_clip * noise_multiplier / sqrt(accumulation_steps)`."""
        return l2_norm_clip * self.noise_multiplier / math.sqrt(self.accumulation_steps)

    @property
    def divisor(self):
        """What the noisy sum of one batch is divided by: the number of microbatches, else the
        expected batch size."""
        if self.num_microbatches:
            return self.num_microbatches
        self._require_known("divisor")
        return self.batch_size

    def batches_per_epoch(self):
        """Steps per epoch: `steps_per_epoch`, else `ceil(n / B)` (the one epoch rule)."""
        if self.steps_per_epoch is not None:
            return int(self.steps_per_epoch)
        if self.num_examples is None or self.batch_size is None:
            self._require_known("batches_per_epoch", both=True)
        return math.ceil(self.num_examples / self.batch_size)

    def batches_for_epochs(self, epochs):
        """Steps of `epochs` epochs: `ceil(epochs * batches_per_epoch)`."""
        epochs = check_number("epochs", epochs, low=0.0)
        return math.ceil(epochs * self.batches_per_epoch() - 1e-9)

    @property
    def epoch_grant(self):
        """Consecutive steps accounted as one mechanism: the steps of an epoch for shuffled
        one-pass epochs, else 1."""
        if self.poisson or not self.one_pass_epochs:
            return 1
        return self.batches_per_epoch()

    def events_for_steps(self, steps):
        """Accounted mechanisms of `steps` steps begun at an epoch's start."""
        steps = int(steps)
        return steps if self.epoch_grant == 1 else math.ceil(steps / self.epoch_grant)

    def accounted_segment(self, events, noise_multiplier=None):
        """`(accounted noise, accounted rate, events)`: one segment for an accountant."""
        self._require_known("segment")
        noise = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return (self.accounted_noise_for(noise), self.accounted_rate, int(events))

    def segment(self, steps, noise_multiplier=None):
        """The accountant's segment of `steps` steps of this schedule (begun at an epoch)."""
        return self.accounted_segment(self.events_for_steps(steps), noise_multiplier)

    def epsilon(self, steps, delta, accountant="rdp", prior=()):
        """Epsilon after `prior` segments and `steps` steps of this schedule."""
        delta = check_delta(delta, self.num_examples)
        return epsilon_of([*prior, self.segment(steps)], delta, check_accountant(accountant))

    def calibrate(self, target_epsilon, steps, delta, accountant="rdp", prior=()):
        """The smallest update noise multiplier meeting `target_epsilon` after `prior` and
        `steps` steps.

        Returns the noise of one *update* (before the microbatch and accumulation rules), so
        the optimizer can use it as its `noise_multiplier`.

        Raises:
            ArgumentError: naming `target_epsilon` when even noise 1000 misses it.
        """
        self._require_known("calibrate")
        target = check_target(target_epsilon)
        accounted = calibrate(
            target,
            self.accounted_rate,
            self.events_for_steps(steps),
            check_delta(delta, self.num_examples),
            check_accountant(accountant),
            prior,
        )
        return accounted / self.accounted_noise_for(1.0)

    @property
    def label(self):
        """How the batches are accounted, in words."""
        if self.poisson:
            rate = self.sampling_rate
            what = "Poisson sampling of users" if self.user_level else "Poisson sampling"
            return what + (f" at rate {rate:.6g}" if rate is not None else "")
        if self.one_pass_epochs:
            return "shuffled batches, each epoch one Gaussian mechanism (no amplification)"
        return "shuffled batches, each step one Gaussian mechanism (no amplification)"

    def _require_known(self, what, both=False):
        if both or not self.known:
            missing = "num_examples" if self.num_examples is None else "batch_size"
            fail(
                missing,
                None,
                f"known to compute {what}",
                f"pass {missing}=... to the DP optimizer, or train with `fit` on arrays or "
                "`keras_safe.privacy.poisson_batches`, from which keras_safe reads it.",
            )


def _whole(name, value, fix):
    return check_number(name, value, low=1, integer=True, fix=fix)


def calibrate(target_epsilon, sampling_rate, steps, delta, accountant, prior=()):
    """`calibrate_noise` with the RDP answer as the upper bracket of a PLD search."""
    upper = None
    if accountant == "pld":
        # PLD is never above RDP, so the RDP noise meets the target under PLD too: it bounds
        # the search from above and keeps the expensive PLD calls on moderate noise levels.
        upper = calibrate_noise(target_epsilon, sampling_rate, steps, delta, "rdp", prior)
        if upper == 0.0:
            return 0.0
    return calibrate_noise(target_epsilon, sampling_rate, steps, delta, accountant, prior, upper)
