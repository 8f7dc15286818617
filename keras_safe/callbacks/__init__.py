"""keras_safe.callbacks."""

from keras_safe.callbacks.gradient_monitor import GradientMonitor  # noqa: F401
from keras_safe.callbacks.membership_audit import MembershipInferenceAudit  # noqa: F401
from keras_safe.callbacks.privacy_budget import PrivacyBudget  # noqa: F401
from keras_safe.callbacks.robustness_audit import RobustnessAudit  # noqa: F401
