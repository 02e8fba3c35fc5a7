"""Print each flavor's parameter count and what each of its technique switches adds.

    python tools/param_count.py                 # every flavor
    python tools/param_count.py neollm_135m
"""

from __future__ import annotations

import argparse

import neollm  # noqa: F401
from neollm.model.args import FLAVORS
from neollm.model.params import flavor_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flavors", nargs="*", help=f"default: all of {sorted(FLAVORS)}")
    names = parser.parse_args(argv).flavors or sorted(FLAVORS)
    unknown = sorted(set(names) - set(FLAVORS))
    if unknown:
        parser.error(f"unknown flavor(s) {unknown}: choose from {sorted(FLAVORS)}")
    for name in names:
        print(flavor_report(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
