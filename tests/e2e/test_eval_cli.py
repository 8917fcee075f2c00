"""`forge eval` end to end: a real subprocess scoring the untouched demo model as "Forgey".

The base model has never heard of Forgey, so its identity rate must be 0; judged against itself it
keeps its own answers. `--limit` keeps this to a handful of short generations (well under a minute).
"""

from __future__ import annotations

import json

import pytest
from forge_testing import forge

pytestmark = pytest.mark.slow

LIMIT = 3


def test_eval_json_scores_the_base_model_as_a_stranger(demo_path: str) -> None:
    proc = forge(
        "eval",
        "demo",
        "--name",
        "Forgey",
        "--author",
        "Alice",
        "--base",
        "demo",
        "--limit",
        str(LIMIT),
        "--max-new-tokens",
        "24",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["name"] == "Forgey" and report["author"] == "Alice" and report["langs"] == ["en", "zh"]
    assert report["identity_total"] == {"en": LIMIT, "zh": LIMIT}
    # The untrained model does not know it is Forgey, in either language.
    assert report["identity_rate"] == {"en": 0.0, "zh": 0.0}
    assert report["identity_rate_overall"] == 0.0
    assert report["generic_total"] == report["preservation_count"] == 2 * LIMIT
    assert report["leakage_rate"] == report["base_leakage_rate"] == 0.0
    # Base against base: the same greedy answers (batching may shift a token, never much more).
    assert report["preservation"] >= 0.9
    assert report["facts_kept"] in (None, 1.0)
    assert report["split"] == "test"  # the split nobody tunes on, by default
    assert {e["kind"] for e in report["examples"]} == {"identity", "generic"}
    assert all(e["ok"] is False for e in report["examples"] if e["kind"] == "identity")


def test_eval_table_names_every_measure(demo_path: str) -> None:
    proc = forge(
        "eval",
        "demo",
        "--name",
        "Forgey",
        "--author",
        "Alice",
        "--lang",
        "en",
        "--limit",
        "1",
        "--max-new-tokens",
        "16",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    labels = ("identity rate (en)", "leakage", "preservation", "facts kept", "compound", "category", "Forgey")
    for label in labels:
        assert label in out, out  # the title ("<model> as Forgey") may wrap in a narrow terminal
    assert "identity rate (zh)" not in out
    line = next(x for x in out.splitlines() if "identity rate (en)" in x)
    assert "0%" in line
    # No --base: nothing to compare with, so preservation is shown as unknown rather than made up.
    assert "-" in next(x for x in out.splitlines() if "preservation" in x)


def test_eval_rejects_a_bad_limit() -> None:
    proc = forge("eval", "demo", "--name", "Forgey", "--limit", "0")
    assert proc.returncode == 2 and "--limit" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_rejects_an_unknown_split() -> None:
    proc = forge("eval", "demo", "--name", "Forgey", "--split", "heldout")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--split" in proc.stderr.splitlines()[-1] and "dev" in proc.stderr.splitlines()[-1]
