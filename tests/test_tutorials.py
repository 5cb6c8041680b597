"""Every tutorial executes end to end in its small "smoke" setting, so none of them rot."""
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("[0-9]*.py"))


@pytest.mark.parametrize("source", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_in_smoke_mode(source, tmp_path):
    from latentgp.notebooks import execute

    target = execute(source, out=tmp_path, smoke=True, timeout=600)
    import nbformat

    nb = nbformat.read(target, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
