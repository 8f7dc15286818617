"""`python -m keras_safe demo | epsilon`: see `keras_safe.cli`."""

import sys

from keras_safe.cli import main

if __name__ == "__main__":
    sys.exit(main())
