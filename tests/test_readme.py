"""The README's config reference is the generated one (so it stays true as the config changes)."""

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
