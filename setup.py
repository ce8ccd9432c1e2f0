# Metadata lives in pyproject.toml. This file maps the top-level kernels/ folder to the subpackage
# lofit_fast.kernels, so the import name `kernels` (another PyPI package's) is never claimed.
from setuptools import setup

setup(
    packages=["lofit_fast", "lofit_fast.kernels"],
    package_dir={"lofit_fast": "lofit_fast", "lofit_fast.kernels": "kernels"},
)
