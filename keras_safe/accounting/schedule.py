"""The DP-SGD schedule: how one training run enters the accountant, written once.

Every consumer (the DP optimizer's calibration, the train step that charges the ledger,
`PrivacyBudget`, the canary audit, the command line) builds a `DPSchedule` and asks it; the rules
below exist nowhere else.

- One *accounted step* per batch that draws noise. The sampling rate is
  `batch_size / num_examples` (Poisson sampling at the expected batch size).
- Microbatches (`num_microbatches` smaller than the batch): a microbatch's mean gradient is
  clipped, and one example joining or leaving moves it by up to twice the clipping norm, so the
  accountant sees half the noise multiplier (as TF Privacy accounts microbatching; Ponomareva et
  al. 2023, "How to DP-fy ML", Sec. 5.6). This assumes an example's microbatch does not depend on
  the others in the batch.
- Gradient accumulation over `k` batches: each batch is sampled on its own and adds `1/sqrt(k)`
  of the update's noise, so each batch is an accounted step at `noise_multiplier / sqrt(k)` (an
  example may appear in several batches of one update; releasing every batch's noisy sum would
  reveal at least as much, so this is safe by post-processing).
- A `fit` over arrays runs `ceil(num_examples / batch_size)` batches per epoch (the last one
  partial); `poisson_batches` yields the same number per epoch.
"""

import dataclasses
import math

from keras_safe._validation import check_number, fail
from keras_safe.accounting.accountants import check_accountant, epsilon_of
from keras_safe.accounting.compute import calibrate, check_delta, check_target

__all__ = ["DPSchedule"]


@dataclasses.dataclass(frozen=True)
class DPSchedule:
    """How a DP-SGD run is accounted: one value object, built from an optimizer and the data.

    Attributes:
        noise_multiplier: the noise standard deviation of one update over the clipping norm.
        num_examples: training examples `n` (None when unknown).
        batch_size: expected examples per batch `B` (None when unknown).
        num_microbatches: microbatches per batch, or None for per-example clipping.
        accumulation_steps: batches averaged into one update (gradient accumulation `k`).
        steps_per_epoch: batches per epoch; defaults to `ceil(n / B)`.

    Example:
        >>> s = DPSchedule(noise_multiplier=1.1, num_examples=60000, batch_size=256)
        >>> s.sampling_rate, s.accounted_noise, s.batches_for_epochs(15)
        (0.004266666666666667, 1.1, 3525)
        >>> round(s.epsilon(3525, delta=1e-5), 3)
        1.283
    """

    noise_multiplier: float
    num_examples: int = None
    batch_size: int = None
    num_microbatches: int = None
    accumulation_steps: int = 1
    steps_per_epoch: int = None

    @classmethod
    def from_optimizer(cls, optimizer, num_examples=None, batch_size=None, steps_per_epoch=None):
        """The schedule of a DP optimizer, with the data's `num_examples` and `batch_size`.

        Values the optimizer declares (`num_examples`, `batch_size`) must agree with the
        values given here (what `fit` actually does); either side alone is used as it is.

        Raises:
            ArgumentError: naming the argument when a declared value differs from the data.
        """
        declared = {
            "num_examples": getattr(optimizer, "num_examples", None),
            "batch_size": getattr(optimizer, "batch_size", None),
        }
        actual = {"num_examples": num_examples, "batch_size": batch_size}
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
        )

    # -- the rules -------------------------------------------------------------------------------

    @property
    def known(self):
        """Whether the sampling rate is known (both `num_examples` and `batch_size`)."""
        return self.num_examples is not None and self.batch_size is not None

    @property
    def sampling_rate(self):
        """`batch_size / num_examples` (capped at 1), or None when unknown."""
        if not self.known:
            return None
        return min(1.0, self.batch_size / self.num_examples)

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

    @property
    def batch_noise_stddev_factor(self):
        """The share of the update's noise each batch draws: `1 / sqrt(accumulation_steps)`."""
        return 1.0 / math.sqrt(self.accumulation_steps)

    def batches_per_epoch(self):
        """Batches `fit` runs per epoch: `steps_per_epoch`, else `ceil(n / B)`."""
        if self.steps_per_epoch is not None:
            return int(self.steps_per_epoch)
        self._require_known("batches_per_epoch")
        return math.ceil(self.num_examples / self.batch_size)

    def batches_for_epochs(self, epochs):
        """Accounted steps of `epochs` epochs: `ceil(epochs * batches_per_epoch)`."""
        epochs = check_number("epochs", epochs, low=0.0)
        return math.ceil(epochs * self.batches_per_epoch() - 1e-9)

    def segment(self, batches, noise_multiplier=None):
        """`(accounted noise, sampling rate, batches)`: one segment for an accountant."""
        self._require_known("segment")
        noise = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return (self.accounted_noise_for(noise), self.sampling_rate, int(batches))

    def epsilon(self, batches, delta, accountant="rdp", prior=()):
        """Epsilon after `prior` segments and `batches` accounted steps of this schedule."""
        delta = check_delta(delta)
        return epsilon_of([*prior, self.segment(batches)], delta, check_accountant(accountant))

    def calibrate(self, target_epsilon, batches, delta, accountant="rdp", prior=()):
        """The smallest update noise multiplier meeting `target_epsilon` after `batches` steps.

        Returns the noise of one *update* (before the microbatch and accumulation rules), so
        the optimizer can use it as its `noise_multiplier`.
        """
        self._require_known("calibrate")
        target = check_target(target_epsilon)
        accounted = calibrate(
            target,
            self.sampling_rate,
            int(batches),
            check_delta(delta),
            check_accountant(accountant),
            prior,
        )
        return accounted / self.accounted_noise_for(1.0)

    def _require_known(self, what):
        if not self.known:
            missing = "num_examples" if self.num_examples is None else "batch_size"
            fail(
                missing,
                None,
                f"known to compute {what}",
                f"pass {missing}=... to the DP optimizer, or train with `fit` on arrays or "
                "`keras_safe.privacy.poisson_batches`, from which keras_safe reads it.",
            )
