"""Setuptools shim for tools that still call setup.py; pyproject.toml holds all project metadata."""
from setuptools import setup

setup()
