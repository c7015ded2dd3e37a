"""Check an sdist and a wheel against the source tree: every module and every shipped recipe is in
both, found by walking the tree (not by a list), and nothing importable as a top-level `kernels` or
`evals` package is shipped.

    python .ci/check_dist.py REPO SDIST.tar.gz WHEEL.whl
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

# repo folder -> where it lives inside the installed package
PACKAGED = {"qtulu": "qtulu", "kernels": "qtulu/kernels", "evals": "qtulu/evals", "recipes": "qtulu/builtin_recipes"}


def expected(repo: Path) -> set[str]:
    out = set()
    for folder, dest in PACKAGED.items():
        for p in (repo / folder).rglob("*"):
            if p.is_symlink() or "__pycache__" in p.parts or not p.is_file() or p.suffix not in (".py", ".yaml"):
                continue
            rel = p.relative_to(repo / folder).as_posix()
            out.add(f"{dest}/{rel}")
    return out


def main(repo: str, sdist: str, wheel: str) -> int:
    want = expected(Path(repo))
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        in_sdist = {n[len(top) + 1:] for n in t.getnames()}
    bad = []
    for label, names in (("wheel", in_wheel), ("sdist", in_sdist)):
        missing = sorted(want - names)
        if missing:
            bad.append(f"{label} lacks {len(missing)} file(s): {', '.join(missing[:10])}")
    shadows = sorted(n for n in in_wheel if n.split("/")[0] in ("kernels", "evals", "recipes", "tests"))
    if shadows:
        bad.append(f"wheel ships top-level folders: {', '.join(shadows[:5])}")
    for line in bad:
        print(f"check_dist: {line}", file=sys.stderr)
    if not bad:
        print(f"check_dist: wheel and sdist hold all {len(want)} modules and recipes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
