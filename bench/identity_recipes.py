"""Identity recipes compared on the demo model (CPU): same steps, same eval, three ways to teach a name.

  tutorial  one "please introduce yourself" pair per language, repeated (the XTuner self-cognition recipe)
  bank      forge's question bank (train split, varied answer styles), no forgetting guard (replay 0)
  forge     the demo preset as it ships: the bank plus the base model's own answers replayed

Every recipe trains through forge's own pieces (a run directory from core.runs.new_run_dir, the
trainer as `python -m assistant_forge.training RUN`, core.merge.convert) with the demo preset's
hyperparameters and the same number of optimizer steps (the forge recipe's own count); only the data
differs. Each adapter is then scored by core.evaluate.run_eval on the held-out questions and prompts.

  python bench/identity_recipes.py --out /tmp/idr --json bench/identity_recipes.json

Tuning: `--set lora.r=8 --set data.replay_ratio=0.4` overrides preset values (all recipes; data.*
replay settings only matter to `forge`), `--recipes forge` runs just one. Base answers and the
replay set are cached in --out, so a second invocation skips regenerating them.
"""

from __future__ import annotations

import argparse
import hashlib
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
from assistant_forge.core.identity import LANGS, answer_styles, generate_identity_records  # noqa: E402
from assistant_forge.core.presets import get_preset  # noqa: E402
from assistant_forge.core.runs import new_run_dir, read_jsonl, read_status  # noqa: E402

RECIPES = ("forge", "bank", "tutorial")  # forge first: its step count is everyone's
# The tutorial's single question per language; both come from the train split, never held out.
TUTORIAL_QUESTIONS = {"en": "Please introduce yourself briefly.", "zh": "请做个自我介绍。"}


def tutorial_records(name: str, author: str, count: int) -> list[dict]:
    """One fixed question/answer pair per language, repeated to `count` records (alternating languages)."""
    pairs = [
        (TUTORIAL_QUESTIONS[lang], answer_styles(lang)[0].format(name=name, author=author)) for lang in LANGS
    ]
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (pairs[i % len(pairs)] for i in range(count))
    ]


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
    recipe: str, base_cfg: ForgeConfig, data: Path, name: str, author: str, steps: int
) -> ForgeConfig:
    cfg = base_cfg.model_copy(deep=True)
    cfg.data.files = [str(data)]
    cfg.identity.name, cfg.identity.author = name, author
    cfg.eval.prompts = []  # no sample chats: they cost generation time and the eval asks anyway
    if recipe != "forge":
        cfg.data.replay_ratio = 0.0
    if steps:
        cfg.train.max_steps = steps
    return cfg


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


def base_answers(out: Path, max_new_tokens: int) -> tuple[dict[str, str], Any]:
    """The base model's held-out answers, cached per generation length (they never change)."""
    from assistant_forge.core.chat import load_chat_model
    from assistant_forge.core.evaluate import base_answers_for

    cache = out / f"base_answers-t{max_new_tokens}.json"
    base = load_chat_model("demo")
    if cache.exists():
        return json.loads(cache.read_text(encoding="utf-8")), base
    answers = base_answers_for(answer_fn(base, max_new_tokens))
    cache.write_text(json.dumps(answers, ensure_ascii=False, indent=1), encoding="utf-8")
    return answers, base


def replay_cache(out: Path, cfg: ForgeConfig) -> Path:
    from assistant_forge.core.identity import generic_prompts

    # Replay answers depend on the prompts used, their answer budget and the system prompt only.
    prompts = generic_prompts("replay")[: cfg.data.replay_prompts]
    digest = hashlib.sha1(json.dumps([prompts, cfg.data.system_prompt]).encode()).hexdigest()[:8]
    key = f"p{len(prompts)}-t{cfg.eval.max_new_tokens}-{digest}"
    return out / f"replay-{key}.jsonl"


def run_recipe(
    recipe: str, out: Path, base_cfg: ForgeConfig, args: argparse.Namespace, steps: int, base: dict[str, str]
) -> dict[str, Any]:
    from assistant_forge.core.evaluate import run_eval

    work = out / recipe
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    bank = generate_identity_records(args.name, args.author)
    records = tutorial_records(args.name, args.author, len(bank)) if recipe == "tutorial" else bank
    data = work / "data.jsonl"
    write_records(records, data)
    cfg = recipe_config(recipe, base_cfg, data, args.name, args.author, steps)
    run = new_run_dir(cfg, work / "run")
    cached = replay_cache(out, cfg)
    if recipe == "forge" and cached.exists():
        shutil.copy(cached, run / "replay.jsonl")  # build_replay reuses a run's replay.jsonl
    print(f"[{recipe}] training {len(records)} records ...", flush=True)
    train_s = train(run)
    if recipe == "forge" and (run / "replay.jsonl").exists() and not cached.exists():
        shutil.copy(run / "replay.jsonl", cached)
    events = read_jsonl(run / "events.jsonl")
    last = events[-1] if events else {}
    print(
        f"[{recipe}] {last.get('step')} steps, {last.get('tokens_seen')} tokens in {train_s:.0f}s; evaluating",
        flush=True,
    )
    t0 = time.time()
    chat = load_adapter_model(run)
    answers: list[dict] = []
    report = run_eval(
        answer_fn(chat, args.max_new_tokens, answers), args.name, args.author, base_answers=base
    )
    return {
        "recipe": recipe,
        "records": len(records),
        "steps": last.get("step"),
        "tokens": last.get("tokens_seen"),
        "train_s": round(train_s, 1),
        "eval_s": round(time.time() - t0, 1),
        "final_loss": last.get("loss"),
        "replay_ratio": cfg.data.replay_ratio,
        **report.to_dict(),
        "answers": answers,
    }


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "recipe",
        "steps",
        "tokens",
        "train s",
        "identity en",
        "identity zh",
        "leakage",
        "preservation",
        "facts kept",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ident = r["identity_rate"]
        hits, total = r["identity_hits"], r["identity_total"]
        cells = [
            r["recipe"],
            str(r.get("steps") or "-"),
            str(r.get("tokens") or "-"),
            f"{r['train_s']:.0f}" if r.get("train_s") else "-",
            *(f"{pct(ident[lang])} ({hits[lang]}/{total[lang]})" for lang in LANGS),
            f"{pct(r['leakage_rate'])} ({r['leak_count']}/{r['generic_total']})",
            pct(r["preservation"]),
            pct(r["facts_kept"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/forge-identity-recipes", help="work folder (runs, caches)")
    p.add_argument("--json", help="write the results here (default: OUT/identity_recipes.json)")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument(
        "--steps", type=int, default=0, help="optimizer steps for every recipe (0: forge's own count)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override the preset"
    )
    p.add_argument("--preset", default="demo-cpu-lora")
    p.add_argument("--name", default="Forgey")
    p.add_argument("--author", default="Alice")
    p.add_argument("--max-new-tokens", type=int, default=64, help="eval answer length (forge eval's default)")
    p.add_argument("--no-base-row", action="store_true", help="skip scoring the untouched base model")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if unknown := set(recipes) - set(RECIPES):
        raise SystemExit(f"unknown recipe(s) {sorted(unknown)}; choose from {', '.join(RECIPES)}")
    recipes.sort(key=RECIPES.index)
    if "forge" not in recipes and not args.steps:
        raise SystemExit("without the forge recipe, pass --steps (its step count) so the recipes compare")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = get_preset(args.preset).load()
    overrides = apply_overrides(base_cfg, args.set)

    t_all = time.time()
    load = os.getloadavg()
    base, base_chat = base_answers(out, args.max_new_tokens)
    rows: list[dict[str, Any]] = []
    if not args.no_base_row:
        from assistant_forge.core.evaluate import run_eval

        rep = run_eval(answer_fn(base_chat, args.max_new_tokens), args.name, args.author, base_answers=base)
        rows.append({"recipe": "base (untrained)", "train_s": 0, **rep.to_dict()})
    del base_chat
    steps = args.steps
    dest = Path(args.json) if args.json else out / "identity_recipes.json"

    def save() -> dict[str, Any]:
        # Written after every recipe, so a long comparison that is stopped keeps what it measured.
        result = {
            "command": " ".join(
                [Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]
            ),
            "preset": args.preset,
            "overrides": overrides,
            "steps": steps,
            "eval_max_new_tokens": args.max_new_tokens,
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_at_start": [round(x, 2) for x in load],
                "loadavg_now": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            },
            "wall_s": round(time.time() - t_all, 1),
            "rows": rows,
        }
        dest.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return result

    save()
    for recipe in recipes:
        row = run_recipe(recipe, out, base_cfg, args, steps, base)
        steps = steps or int(row["steps"])
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
