"""README.md renders as meant: every table row has its header's columns (a bare | inside a cell splits it), the
pictures it shows exist, and its example outputs are ignored by git."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def cells(row: str) -> int:
    """Columns of a Markdown table row: pipes that are not escaped, outside the outer two."""
    return len(re.findall(r"(?<!\\)\|", row)) - 1


def test_table_rows_have_their_headers_columns():
    tables, current = [], []
    for line in README.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert len(tables) >= 5
    for table in tables:
        for row in table[1:]:
            assert cells(row) == cells(table[0]), row


def test_pictures_exist():
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert "docs/truck_cutout.jpg" in pictures
    for picture in pictures:
        assert (ROOT / picture).is_file(), picture
        assert (ROOT / picture).stat().st_size < 150_000, f"{picture} is not small"


def test_example_outputs_are_ignored():
    for path in ("out/truck_mask0.png", "truck.tokens.safetensors", "model.safetensors", "sam-mlx-export/coco.json",
                 "tokens/a.parquet", "masks/a.parquet"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False).returncode == 0, path
