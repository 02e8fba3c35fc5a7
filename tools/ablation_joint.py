"""A leave-one-out and an add-one grid of one config read together: each technique alone and in the stack.

    python tools/ablation_joint.py --leave-one-out docs/ablations/leave_one_out_10m \\
        --add-one docs/ablations/add_one_10m --out docs/ablations/joint_10m.md

Reads each grid's results.json (neollm/ablation/joint.py); writes the markdown table (and, beside it,
the same rows as JSON) or prints it without --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neollm.ablation import joint
from neollm.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--leave-one-out", required=True, type=Path, help="folder of a finished --leave-one-out grid")
    p.add_argument("--add-one", required=True, type=Path, help="folder of a finished --add-one grid")
    p.add_argument("--out", type=Path, help="markdown file to write (the JSON goes beside it)")
    opts = p.parse_args(argv)
    try:
        result = joint.joint(opts.leave_one_out, opts.add_one)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = joint.markdown(result)
    if opts.out:
        opts.out.write_text(text)
        opts.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        print(opts.out)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
