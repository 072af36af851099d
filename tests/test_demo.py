"""The demo's in-process part writes both contact sheets (the streaming part is covered by the pipeline tests)."""

from pathlib import Path

import cv2

from edge_runtime.cli import main


def test_demo_writes_contact_sheets(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path), "--no-stream"]) == 0
    for name in ("contact_sheet_sources.png", "contact_sheet_results.png"):
        img = cv2.imread(str(tmp_path / name))
        assert img is not None and img.shape[0] >= 320 and img.std() > 10
