"""A pytest plugin (``-p flashhead_mlx.testing.pytest_openblas``, set in pyproject.toml) that
re-executes pytest with the commands' fast OpenBLAS preloaded (:mod:`flashhead_mlx.blas`),
before pytest captures any output."""

import sys

from flashhead_mlx.blas import reexec_with_openblas

reexec_with_openblas(["-m", "pytest", *sys.argv[1:]])
