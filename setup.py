"""Build hook: compiles the native relay (cffi, API mode) as uproxy._native.

Everything else about the package lives in pyproject.toml.
"""

from setuptools import setup

setup(cffi_modules=["uproxy/_native_build.py:ffibuilder"])
