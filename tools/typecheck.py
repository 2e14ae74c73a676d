"""mypy on src/ against a baseline that only shrinks (`make lint` runs this).

    python tools/typecheck.py            # fails on an error not in tools/mypy-baseline.txt, and on a baseline
                                         # entry that no longer occurs (the file must shrink with the fix)
    python tools/typecheck.py --shrink   # drop the baseline entries that no longer occur (never adds one)
    python tools/typecheck.py --reseed   # after code moved between files or a tree-wide rewrite changed the
                                         # messages: rewrite the baseline from this run, if it is not longer

An entry is `path: error: message  [code]` without the line number, so edits elsewhere in a file do not
move it; an error that occurs twice is listed twice.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tools" / "mypy-baseline.txt"
ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<rest>.*)$")


def current() -> tuple[Counter, dict]:
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode not in (0, 1) or "error: " in out.stderr:
        sys.exit(f"mypy did not run: {out.stderr.strip() or out.stdout.strip()}")
    found, where = Counter(), {}
    for line in out.stdout.splitlines():
        m = ERROR.match(line)
        if m:
            key = f"{m['path']}: error: {m['rest']}"
            found[key] += 1
            where.setdefault(key, []).append(f"{m['path']}:{m['line']}")
    return found, where


def main(argv: list[str]) -> int:
    found, where = current()
    base = Counter(ln for ln in BASELINE.read_text().splitlines() if ln.strip()) if BASELINE.exists() else Counter()
    new, fixed = found - base, base - found
    if "--reseed" in argv:
        if sum(found.values()) > sum(base.values()):
            print(f"refused: {sum(found.values())} errors now, {sum(base.values())} in the baseline (it only shrinks)")
            return 1
        BASELINE.write_text("".join(f"{k}\n" * n for k, n in sorted(found.items())))
        print(f"baseline reseeded: {sum(base.values())} -> {sum(found.values())} entries")
        return 0
    if "--shrink" in argv:
        kept = base - fixed
        BASELINE.write_text("".join(f"{k}\n" * n for k, n in sorted(kept.items())))
        print(f"baseline: {sum(base.values())} -> {sum(kept.values())} entries")
        return 1 if new else 0
    for key in sorted(new):
        print(f"{', '.join(where[key][-new[key]:])}: {key.split(': error: ', 1)[1]}")
    if new:
        print(f"\n{sum(new.values())} new type error(s): fix them (the baseline only shrinks)")
    if fixed:
        print(f"{sum(fixed.values())} baseline entr(y/ies) no longer occur: run `python tools/typecheck.py --shrink`")
    if not new and not fixed:
        print(f"mypy: no new errors ({sum(base.values())} in the baseline)")
    return 1 if new or fixed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
