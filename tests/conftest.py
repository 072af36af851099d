"""Shared test set-up: the repo root on sys.path so tests run before `pip install -e .`."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
