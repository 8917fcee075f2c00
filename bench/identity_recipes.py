"""Identity recipes compared on the demo model (CPU): same eval, several ways to teach a name.

  forge          `forge demo` as it ships: its data (core.pipeline.demo_records: the identity bank and
                 identity mixed with tasks) under the demo preset (replay included)
  bank           the identity bank alone under the demo preset; with `--set data.replay_prompts=95
                 --set train.epochs=1.6` this is the demo before issue 16
  tutorial       the XTuner self-cognition tutorial's own recipe: one "introduce yourself" pair per
                 language repeated, LoRA r 64 / alpha 16 / dropout 0.1 on every layer, lr 2e-4 cosine,
                 batch 16, loss on the answer, 300 steps (hours on this CPU: a GPU command)
  tutorial-time  the tutorial recipe stopped after as many rows (tokens) as forge trains on

Every recipe trains through forge's own pieces (a run directory from core.runs.new_run_dir, the
trainer as `python -m assistant_forge.training RUN`, core.merge.convert); each adapter is then scored
by core.evaluate.run_eval on the held-out questions and the held-out prompts by category.

  python bench/identity_recipes.py --out /tmp/idr --seeds 42,1,2 --recipes forge,tutorial-time

Tuning: `--set lora.r=8 --set data.replay_ratio=0.4` overrides preset values (forge, bank).
The eval asks the held-out prompts' dev split by default: tune on dev, and score the recipe you keep
once with `--split test` (the split forge eval reports; tuning on it would make it one more dev set).
Base answers and replay answers are cached (core/answer_cache.py), so they are generated once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# One thread: on a busy 2-core machine one torch thread ran faster than two.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from assistant_forge.core.config import ForgeConfig  # noqa: E402
from assistant_forge.core.dataset import write_records  # noqa: E402
from assistant_forge.core.evaluate import SPLIT_CHOICES  # noqa: E402
from assistant_forge.core.identity import (  # noqa: E402
    EVAL_CATEGORIES,
    LANGS,
    answer_styles,
    generate_identity_records,
)
from assistant_forge.core.pipeline import demo_records  # noqa: E402
from assistant_forge.core.presets import get_preset  # noqa: E402
from assistant_forge.core.runs import new_run_dir, read_jsonl, read_status  # noqa: E402
from assistant_forge.training.modeling import pick_device, resolve_precision  # noqa: E402

RECIPES = ("forge", "bank", "tutorial-time", "tutorial")  # forge first: its rows set tutorial-time's
# The tutorial's single question per language; both come from the train split, never held out.
TUTORIAL_QUESTIONS = {"en": "Please introduce yourself briefly.", "zh": "请做个自我介绍。"}
TUTORIAL_BATCH = 16
TUTORIAL_STEPS = 300


def tutorial_records(name: str, author: str, count: int) -> list[dict]:
    """One fixed question/answer pair per language, repeated to `count` records (alternating languages)."""
    pairs = [
        (TUTORIAL_QUESTIONS[lang], answer_styles(lang)[0].format(name=name, author=author)) for lang in LANGS
    ]
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (pairs[i % len(pairs)] for i in range(count))
    ]


def tutorial_settings(cfg: ForgeConfig, steps: int) -> None:
    """The tutorial's hyperparameters (XTuner's self-cognition config), not the demo preset's."""
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.layers_from = 64, 16, 0.1, 0
    cfg.train.learning_rate, cfg.train.lr_scheduler, cfg.train.warmup_ratio = 2e-4, "cosine", 0.03
    cfg.train.micro_batch_size, cfg.train.grad_accum = 1, TUTORIAL_BATCH
    cfg.train.max_steps = steps
    cfg.data.replay_ratio = 0.0


def parse_value(text: str) -> Any:
    """A --set value as TOML reads it (numbers, booleans, strings, arrays); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: ForgeConfig, sets: list[str]) -> dict[str, Any]:
    applied = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        section, _, field = key.strip().partition(".")
        if not sep or not field:
            raise SystemExit(f"--set wants section.key=value, got {item!r}")
        value = parse_value(raw.strip())
        setattr(getattr(cfg, section), field, value)  # validate_assignment checks it
        applied[key.strip()] = value
    return applied


def recipe_config(
    recipe: str, base_cfg: ForgeConfig, data: Path, name: str, author: str, forge_rows: int
) -> ForgeConfig:
    cfg = base_cfg.model_copy(deep=True)
    cfg.data.files = [str(data)]
    cfg.identity.name, cfg.identity.author = name, author
    cfg.eval.prompts = []  # no sample chats: they cost generation time and the eval asks anyway
    if recipe == "tutorial":
        tutorial_settings(cfg, TUTORIAL_STEPS)
    elif recipe == "tutorial-time":
        # As many packed rows (so tokens, about the CPU time of the forward passes) as forge trained on.
        tutorial_settings(cfg, max(1, round(forge_rows / TUTORIAL_BATCH)))
    return cfg


def recipe_records(recipe: str, name: str, author: str, seed: int, compound: int = 1) -> list[dict]:
    bank = generate_identity_records(name, author, seed=seed)
    if recipe.startswith("tutorial"):
        return tutorial_records(name, author, len(bank))
    if recipe == "forge":
        return demo_records(name, author, seed=seed, compound=compound)
    return bank


def train(run: Path) -> float:
    """Run the trainer in the foreground (same module `forge train` detaches); returns wall seconds."""
    t0 = time.time()
    with open(run / "train.log", "ab") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "assistant_forge.training", str(run)],
            cwd=run,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    status = read_status(run)
    if proc.returncode != 0 or status.get("state") != "finished":
        tail = (run / "train.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"training {run} ended as {status.get('state')}: {status.get('reason')}\n{tail}")
    return time.time() - t0


def answer_fn(chat: Any, max_new_tokens: int, log: list[dict] | None = None) -> Any:
    """Greedy answers; with `log`, every prompt and answer is kept for the JSON (to read the leaks)."""

    def answer(batch: list[list[dict]]) -> list[str]:
        answers = chat.answer_batch(batch, max_new_tokens)
        if log is not None:
            log.extend({"prompt": c[-1]["content"], "answer": a} for c, a in zip(batch, answers))
        return answers

    return answer


def load_adapter_model(run: Path) -> Any:
    """Base + adapter, merged in memory (fp32 on CPU, so exact): generation without LoRA overhead."""
    from assistant_forge.core.chat import load_chat_model
    from assistant_forge.core.merge import convert

    adapter = convert(run, run / "adapter", force=True)
    chat = load_chat_model("demo", str(adapter))
    chat.model = chat.model.merge_and_unload()
    return chat


def base_answers(max_new_tokens: int, split: str) -> tuple[dict[str, str], Any]:
    """The base model's held-out answers (cached by core.answer_cache: generated once per machine)."""
    from assistant_forge.core.answer_cache import base_eval_answers
    from assistant_forge.core.chat import load_chat_model

    base = load_chat_model("demo")
    return base_eval_answers(base, "demo", max_new_tokens, LANGS, split=split), base


def run_recipe(
    recipe: str,
    seed: int,
    out: Path,
    base_cfg: ForgeConfig,
    args: argparse.Namespace,
    forge_rows: int,
    base: dict[str, str],
) -> dict[str, Any]:
    from assistant_forge.core.evaluate import run_eval

    work = out / f"{recipe}-s{seed}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    records = recipe_records(recipe, args.name, args.author, seed, args.compound)
    data = work / "data.jsonl"
    write_records(records, data)
    cfg = recipe_config(recipe, base_cfg, data, args.name, args.author, forge_rows)
    cfg.train.seed = seed
    run = new_run_dir(cfg, work / "run")
    print(f"[{recipe} seed {seed}] training {len(records)} records ...", flush=True)
    train_s = train(run)
    events = read_jsonl(run / "events.jsonl")
    last = events[-1] if events else {}
    rows = _rows_trained(run)
    print(
        f"[{recipe} seed {seed}] {last.get('step')} steps, {rows} rows, {last.get('tokens_seen')} tokens "
        f"in {train_s:.0f}s; evaluating",
        flush=True,
    )
    t0 = time.time()
    chat = load_adapter_model(run)
    answers: list[dict] = []
    report = run_eval(
        answer_fn(chat, args.max_new_tokens, answers),
        args.name,
        args.author,
        base_answers=base,
        batch_size=chat.batch_size,
        split=args.split,
    )
    return {
        "recipe": recipe,
        "seed": seed,
        "records": len(records),
        "steps": last.get("step"),
        "rows": rows,
        "tokens": last.get("tokens_seen"),
        "train_s": round(train_s, 1),
        "eval_s": round(time.time() - t0, 1),
        "final_loss": last.get("loss"),
        "replay_ratio": cfg.data.replay_ratio,
        **report.to_dict(),
        "answers": answers,
    }


def _rows_trained(run: Path) -> int:
    """Packed rows the trainer went through: steps x batch, from the run's own config and events."""
    from assistant_forge.core.runs import run_config

    cfg = run_config(run)
    events = read_jsonl(run / "events.jsonl")
    steps = events[-1]["step"] if events else 0
    return steps * cfg.train.micro_batch_size * cfg.train.grad_accum


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _of(rate: float | None, total: int) -> str:
    """A rate with its count ("60% (6/10)"): over few prompts, one answer moves a rate a lot."""
    return f"{pct(rate)} ({round((rate or 0) * total)}/{total})"


def table(rows: list[dict[str, Any]]) -> str:
    cats = [c for c in EVAL_CATEGORIES if c != "compound"]
    head = ["recipe", "seed", "steps", "train s", "id en", "id zh", "leak", *(f"leak {c}" for c in cats)]
    head += ["facts kept", "compound both", "both (base knew task)", "preservation"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ident = r["identity_rate"]
        by = r.get("by_category", {})
        cells = [
            r["recipe"],
            str(r.get("seed", "-")),
            str(r.get("steps") or "-"),
            f"{r['train_s']:.0f}" if r.get("train_s") else "-",
            *(pct(ident[lang]) for lang in LANGS),
            f"{pct(r['leakage_rate'])} ({r['leak_count']}/{r['generic_total']})",
            *(pct(by.get(c, {}).get("leakage")) for c in cats),
            _of(r["facts_kept"], r.get("facts_known", 0)),  # of the facts the base model knew
            _of(r.get("compound_both"), r.get("compound_total", 0)),
            _of(r.get("compound_both_known"), r.get("compound_known", 0)),
            pct(r["preservation"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/forge-identity-recipes", help="work folder (runs)")
    p.add_argument("--json", help="write the results here (default: OUT/identity_recipes.json)")
    p.add_argument("--recipes", default="forge,tutorial-time")
    p.add_argument(
        "--seeds", default="42", help="comma-separated training seeds; each recipe runs every seed"
    )
    p.add_argument(
        "--forge-rows",
        type=int,
        default=180,
        help="rows forge trains on, for tutorial-time when the forge recipe is not run (demo: 180)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override the preset"
    )
    p.add_argument("--preset", default="demo-cpu-lora")
    p.add_argument("--compound", type=int, default=1, help="compound questions per task in forge's data")
    p.add_argument("--name", default="Forgey")
    p.add_argument("--author", default="Alice")
    p.add_argument("--max-new-tokens", type=int, default=64, help="eval answer length (forge eval's default)")
    p.add_argument("--no-base-row", action="store_true", help="skip scoring the untouched base model")
    p.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default="dev",
        help="held-out prompts to score on (default dev: this script tunes recipes, and a split that "
        "recipes are tuned on stops being held out; score the kept recipe once on test, the split "
        "forge eval reports)",
    )
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if unknown := set(recipes) - set(RECIPES):
        raise SystemExit(f"unknown recipe(s) {sorted(unknown)}; choose from {', '.join(RECIPES)}")
    recipes.sort(key=RECIPES.index)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = get_preset(args.preset).load()
    overrides = apply_overrides(base_cfg, args.set)

    t_all = time.time()
    load = os.getloadavg()
    base, base_chat = base_answers(args.max_new_tokens, args.split)
    rows: list[dict[str, Any]] = []
    if not args.no_base_row:
        from assistant_forge.core.evaluate import run_eval

        rep = run_eval(
            answer_fn(base_chat, args.max_new_tokens),
            args.name,
            args.author,
            base_answers=base,
            batch_size=base_chat.batch_size,
            split=args.split,
        )
        rows.append({"recipe": "base (untrained)", "train_s": 0, **rep.to_dict()})
    del base_chat
    forge_rows = args.forge_rows
    dest = Path(args.json) if args.json else out / "identity_recipes.json"

    def save() -> dict[str, Any]:
        # Written after every run, so a long comparison that is stopped keeps what it measured.
        result = {
            "command": " ".join(
                [Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]
            ),
            "preset": args.preset,
            "overrides": overrides,
            "seeds": seeds,
            "compound_per_task": args.compound,
            "eval_max_new_tokens": args.max_new_tokens,
            "eval_split": args.split,
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_at_start": [round(x, 2) for x in load],
                "loadavg_now": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                # What the preset's train.precision meant on this machine ("auto": bf16 on AMX CPUs).
                "train_precision": resolve_precision(base_cfg.train.precision, pick_device(base_cfg)),
            },
            "wall_s": round(time.time() - t_all, 1),
            "rows": rows,
        }
        dest.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return result

    save()
    # Seed-major: a stopped comparison still holds every recipe on the same (paired) seeds.
    for seed in seeds:
        for recipe in recipes:
            row = run_recipe(recipe, seed, out, base_cfg, args, forge_rows, base)
            if recipe == "forge":
                forge_rows = int(row["rows"])
            rows.append(row)
            print(table(rows[-1:]), flush=True)
            save()
    result = save()
    print()
    print(table(rows))
    print(f"\n{result['wall_s']:.0f}s in all; results in {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
