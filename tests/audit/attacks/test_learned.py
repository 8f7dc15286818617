"""The learned attack: scored out of fold, so it cannot memorise membership labels."""

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import roc_auc_score

from keras_safe.audit.attacks.learned import learned_scores


def _auc(s_in, s_out):
    labels = np.concatenate([np.ones(len(s_in)), np.zeros(len(s_out))])
    return roc_auc_score(labels, np.concatenate([s_in, s_out]))


def test_noise_features_give_chance_out_of_fold():
    rng = np.random.default_rng(0)
    f_in, f_out = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    s_in, s_out = learned_scores(f_in, f_out, learner="gradient_boosting", cv_folds=5, seed=0)
    null_sd = np.sqrt((601) / (12.0 * 300 * 300))
    assert abs(_auc(s_in, s_out) - 0.5) < 4 * null_sd
    # The same learner scored in sample memorises the labels: out-of-fold scoring is what keeps
    # the attack honest.
    x = np.concatenate([f_in, f_out])
    labels = np.concatenate([np.ones(300), np.zeros(300)])
    in_sample = GradientBoostingClassifier(random_state=0).fit(x, labels).predict_proba(x)[:, 1]
    assert _auc(in_sample[:300], in_sample[300:]) > 0.9


def test_informative_feature_is_found_and_learners_are_interchangeable():
    rng = np.random.default_rng(1)
    f_in = np.column_stack([rng.normal(1.0, 1.0, 200), rng.normal(size=200)])
    f_out = np.column_stack([rng.normal(0.0, 1.0, 200), rng.normal(size=200)])
    # One informative feature with a unit shift: the Bayes-optimal AUC is Phi(1 / sqrt(2)).
    for learner in ("logistic", GradientBoostingClassifier(max_depth=1, random_state=0)):
        s_in, s_out = learned_scores(f_in, f_out, learner=learner, cv_folds=4)
        assert 0.68 < _auc(s_in, s_out) < 0.82, learner
        assert s_in.shape == (200,) and np.all((0 <= s_in) & (s_in <= 1))


def test_bad_arguments():
    f = np.zeros((10, 2))
    with pytest.raises(ValueError, match="`cv_folds` must be"):
        learned_scores(f, f, cv_folds=1)
    with pytest.raises(ValueError, match=r"`cv_folds` must be at most the number of members \(3\)"):
        learned_scores(f[:3], f, cv_folds=5)
    with pytest.raises(ValueError, match="`learned_attack_model` must be 'logistic'"):
        learned_scores(f, f, learner="svm")
