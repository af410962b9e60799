"""The documentation's code runs and its asserts hold: every ```python block of README.md and
docs/*.md, in order.

Blocks of one file share a namespace (later blocks use earlier names). A block whose first line
is ``# sketch: not run`` is skipped (it needs the reader's own network). Progress bars are off.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import imgdiff

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks(path: Path) -> list[str]:
    return [b for b in BLOCK.findall(path.read_text()) if not b.startswith("# sketch: not run")]


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p)], ids=lambda p: p.name)
def test_doc_code_runs(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each file's python blocks execute without error and their asserts hold (small shapes, no
    progress bars, in a fresh folder: a checkpoint a block writes is not resumed next run)."""
    monkeypatch.chdir(tmp_path)
    original = imgdiff.Sampler.sample

    def quiet(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["progress"] = False
        return original(self, *args, **kwargs)

    monkeypatch.setattr(imgdiff.Sampler, "sample", quiet)
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    for i, block in enumerate(_blocks(path)):
        try:
            exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{path.name} block {i} failed: {exc!r}\n{block}") from exc
