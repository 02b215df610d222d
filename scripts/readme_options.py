#!/usr/bin/env python3
"""Write the README's table of `dpflow train` flags from the settings in dpflow/config.py.

    python scripts/readme_options.py            # rewrite the table in README.md
    python scripts/readme_options.py --check    # exit 1 if README.md's table is stale

tests/test_options.py runs the check, so a new setting cannot be missing from the README.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BEGIN = "<!-- flags: generated from dpflow/config.py by scripts/readme_options.py -->\n"
END = "<!-- end of flags -->\n"


def with_table(text, table):
    """`text` with the block between the markers replaced by `table`."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN.strip()} ... {END.strip()} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + table + END + tail


def main(argv):
    sys.path.insert(0, ROOT)
    from dpflow.config import options_markdown

    with open(README) as handle:
        text = handle.read()
    updated = with_table(text, options_markdown())
    if "--check" in argv:
        if updated != text:
            print("README.md's table of flags is stale: run python scripts/readme_options.py", file=sys.stderr)
            return 1
        return 0
    with open(README, "w") as handle:
        handle.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
