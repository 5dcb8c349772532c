"""Deprecated: moved to :mod:`crfl.flower.deploy.worker`; this alias will be removed.

``python -m crfl.flower.worker ARGS`` still runs ``python -m crfl.flower.deploy.worker ARGS``, and
``import crfl.flower.worker`` gives that module, each with a DeprecationWarning.
"""

import importlib
import runpy
import sys
import warnings

_NEW = "crfl.flower.deploy.worker"

warnings.warn(f"crfl.flower.worker is deprecated: use {_NEW} (python -m {_NEW})", DeprecationWarning,
              stacklevel=1 if __name__ == "__main__" else 2)
if __name__ == "__main__":
    runpy.run_module(_NEW, run_name="__main__", alter_sys=True)
else:
    sys.modules[__name__] = importlib.import_module(_NEW)
