"""keras_safe.training: the one train step that owns the gradient path of `fit`.

DP-SGD (per-example clipping, then the DP optimizer's noise), adversarial training and gradient
clipping are stages of this step, so they compose in one `fit`. Its entry points,
`make_private` and `dp_gradients`, are exported by `keras_safe.privacy`; here:

- `TrainingStage`, `set_stages`, `get_stages`: what plugs into the step (adversarial training,
  for example);
- `verify_model(model, x, y)`: the check `fit` runs on a model's first examples, for a compiled
  custom loop;
- `is_private(model)`; `SafeSequential`, `SafeFunctional`: the classes of private Sequential and
  functional models (a subclassed model becomes a keras_safe subclass of its own class).
"""

from keras_safe.training.preflight import verify_model
from keras_safe.training.private_model import SafeFunctional, SafeSequential
from keras_safe.training.stages import TrainingStage, get_stages, set_stages
from keras_safe.training.state import is_private

__all__ = [
    "SafeFunctional",
    "SafeSequential",
    "TrainingStage",
    "get_stages",
    "is_private",
    "set_stages",
    "verify_model",
]
