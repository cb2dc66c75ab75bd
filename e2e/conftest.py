"""Lets e2e tests import the harness modules beside them (pytest runs with --import-mode=importlib,
which puts no test folder on sys.path)."""

from __future__ import annotations

import pathlib
import sys

E2E_DIR = str(pathlib.Path(__file__).resolve().parent)
if E2E_DIR not in sys.path:
    sys.path.insert(0, E2E_DIR)
