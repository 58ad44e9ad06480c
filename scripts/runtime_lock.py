"""Print the part of requirements.lock an installed wheel needs: its runtime dependencies, hashes included.

requirements.lock pins the runtime, dev and bench dependencies together (``make lock``).
The wheel check installs the wheel the way a user would, without the test tools; this
keeps exactly the lock's pins and hashes of the packages reachable from the wheel's own
``Requires-Dist`` (no extras), following the lock's ``# via`` lines. pip, run with
``--require-hashes`` on the result, refuses it if anything were missing.

Usage: python scripts/runtime_lock.py WHEEL requirements.lock > runtime.lock
"""

from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(wheel: str) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(z.read(metadata).decode())
    names = set()
    for requirement in message.get_all("Requires-Dist") or []:
        if "extra ==" in requirement:
            continue
        names.add(normalize(re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0]))
    return names


def parse_lock(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """(package -> its block of lines, package -> the packages it is required via)."""
    blocks: dict[str, str] = {}
    via: dict[str, set[str]] = {}
    current: str | None = None
    for line in text.splitlines(keepends=True):
        start = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==", line)
        if start:
            current = normalize(start[1])
            blocks[current], via[current] = line, set()
            continue
        if current is None:
            continue
        blocks[current] += line
        parents = re.match(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9_.-]*)(?:\s|$)", line)
        if parents and parents[1] != "via":
            via[current].add(normalize(parents[1]))
    return blocks, via


def main() -> int:
    wheel, lock = sys.argv[1], sys.argv[2]
    with open(lock, encoding="utf-8") as f:
        blocks, via = parse_lock(f.read())
    needed = runtime_requirements(wheel)
    missing = sorted(needed - blocks.keys())
    if missing:
        print(f"the lock does not pin: {', '.join(missing)} (run make lock)", file=sys.stderr)
        return 1
    changed = True
    while changed:  # everything required via a needed package is needed
        changed = False
        for name, parents in via.items():
            if name not in needed and parents & needed:
                needed.add(name)
                changed = True
    sys.stdout.write("".join(blocks[name] for name in blocks if name in needed))
    print(f"{len(needed)} of {len(blocks)} locked packages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
