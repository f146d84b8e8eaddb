"""The README's config reference is the generated one (so it stays true as the config changes)."""

import json
import re
from pathlib import Path

from sakd.config.reference import reference_markdown

README = Path(__file__).parents[1] / "README.md"


def test_readme_config_reference_is_current():
    text = README.read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*)<!-- config-reference:end -->", text, re.S)
    assert m, "README lost its config-reference markers"
    assert m.group(1) == reference_markdown(), "README config reference is stale: run `make readme`"


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (README.parent / ".ci" / "run").read_text()


def test_readme_compatibility_table_is_current():
    from sakd.commands.compat_table import table_markdown

    text = README.read_text()
    m = re.search(r"<!-- compat-table:start -->\n(.*)<!-- compat-table:end -->", text, re.S)
    assert m, "README lost its compat-table markers"
    assert m.group(1) == table_markdown(), "README compatibility table is stale: run `make readme`"


def test_every_test_the_table_names_exists():
    from sakd.commands.compat_table import compatibility

    named = {c.test for c in compatibility().values() if c.test}
    for test in named:
        path, name = test.split("::")
        assert f"def {name}(" in (README.parent / path).read_text(), test


def test_the_readmes_loss_term_example_trains(tiny_run_config, make_distiller, tmp_path, monkeypatch):
    """The "Adding a loss term" example, registered as its second block says: the run loads the teacher for
    it, logs its sum, ramps it in with the curriculum, and a teacher cache is refused for it."""
    import copy
    import importlib.util
    import math

    import pytest

    from sakd.commands.compat_table import CACHE
    from sakd.config import load_config
    from sakd.errors import ConfigError
    from sakd.objective import terms
    from sakd.objective.compose import check_composition

    section = README.read_text().split("### Adding a loss term", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    (tmp_path / "hidden_norm.py").write_text(code)
    spec = importlib.util.spec_from_file_location("hidden_norm", tmp_path / "hidden_norm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(terms, "COMPONENTS", (*terms.COMPONENTS, module.HiddenNorm(weight=0.1)))
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["loss"]["alpha"] = 0.0  # the term alone asks for the teacher
    raw["distillation"]["curriculum"] = {"phases": True, "structure_start": 0.0}
    d = make_distiller(raw, max_steps=2)
    assert d.teacher is not None
    d.train()
    steps = [json.loads(x) for x in (d.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(
        math.isfinite(r["hidden_norm"]) and r["hidden_norm"] > 0 and "mult_hidden_norm" in r for r in steps
    )
    cfg, _ = load_config(raw)
    with pytest.raises(ConfigError, match="distillation.hidden_norm needs the teacher's hidden states"):
        check_composition(cfg, CACHE)
