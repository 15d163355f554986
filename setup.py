from setuptools import setup

setup(cffi_modules=["quorumblk/_build.py:ffibuilder"])
