"""keras_safe.preprocessing: clean, normalise and split data without leaking it.

Layers (Keras preprocessing layers with `adapt`, statistics saved as weights, optional
differentially private statistics via `dp_epsilon`):
    Imputer, OutlierClipper, RobustNormalization, InputGuard, PreprocessingStack.

Utilities:
    train_val_test_split, drop_cross_duplicates, RowCleaner, drop_rows.

The layers share one adapt loop (`AdaptableFeatureLayer` in `_base.py`: each layer supplies its
per-feature statistics, exact and DP); `fences` holds the outlier fences and quantile sets they
use, `_dp_stats` the DP mechanisms.
"""

from keras_safe.preprocessing.cleaning import RowCleaner, drop_rows
from keras_safe.preprocessing.imputer import Imputer
from keras_safe.preprocessing.input_guard import InputGuard
from keras_safe.preprocessing.outlier_clipper import OutlierClipper
from keras_safe.preprocessing.robust_normalization import RobustNormalization
from keras_safe.preprocessing.split import drop_cross_duplicates, train_val_test_split
from keras_safe.preprocessing.stack import PreprocessingStack

__all__ = [
    "Imputer",
    "InputGuard",
    "OutlierClipper",
    "PreprocessingStack",
    "RobustNormalization",
    "RowCleaner",
    "drop_cross_duplicates",
    "drop_rows",
    "train_val_test_split",
]
