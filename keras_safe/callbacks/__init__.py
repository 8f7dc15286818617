"""keras_safe.callbacks: privacy budget, audits and gradient monitoring during `fit`."""

from keras_safe.callbacks.gradient_monitor import GradientMonitor
from keras_safe.callbacks.membership_audit import MembershipInferenceAudit
from keras_safe.callbacks.privacy_budget import PrivacyBudget
from keras_safe.callbacks.robustness_audit import RobustnessAudit

__all__ = ["GradientMonitor", "MembershipInferenceAudit", "PrivacyBudget", "RobustnessAudit"]
