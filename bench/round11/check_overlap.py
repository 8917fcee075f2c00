"""Round 11: are the new replay prompts apart from every held-out prompt (dev, test), the replay prompts
already shipped and the written tasks? Same rule as tests/core/test_identity.py (case and punctuation
folded; one contains the other, or difflib ratio >= 0.8).

  python bench/round11/check_overlap.py bench/round11/new_prompts.txt
"""

from __future__ import annotations

import re
import sys
from difflib import SequenceMatcher
from pathlib import Path

from assistant_forge.core import identity
from assistant_forge.core.identity import generic_prompts


def key(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.casefold())


def ratio(a: str, b: str) -> float:
    ka, kb = key(a), key(b)
    return 1.0 if ka in kb or kb in ka else SequenceMatcher(None, ka, kb).ratio()


def main(path: str) -> int:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    new = [line.split(" ", 2)[2].strip() for line in lines if line.strip()]
    against = {
        "dev": generic_prompts("dev"),
        "test": generic_prompts("test"),
        "replay": generic_prompts("replay"),
        "tasks": identity.task_prompts(),
        "new (each other)": new,
    }
    bad = 0
    for name, others in against.items():
        best = []
        for p in new:
            scores = [(ratio(p, o), o) for o in others if o != p]
            top = max(scores, default=(0.0, ""))
            best.append(top[0])
            if top[0] >= 0.8:
                bad += 1
                print(f"  NEAR {name}: {p!r} ~ {top[1]!r} ({top[0]:.2f})")
        print(f"{name}: {len(others)} prompts, {sum(b >= 0.8 for b in best)} near, max ratio {max(best):.2f}")
    print(f"{len(new)} new prompts, {bad} near pairs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
