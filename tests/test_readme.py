"""The README's layout section points to the file of every concern."""

import os
import re

from helpers import ROOT


def test_the_readme_layout_names_every_module():
    readme = open(os.path.join(ROOT, "README.md")).read()
    layout = readme[readme.index("```\ndpflow/\n"):]
    layout = layout[:layout.index("```\n", 4)]
    modules = sorted(name for name in os.listdir(os.path.join(ROOT, "dpflow")) if name.endswith(".py"))
    missing = [name for name in modules if not re.search(rf"(^|\s){re.escape(name)}\b", layout, re.M)]
    assert not missing, f"README's layout section has no line for {missing}"
