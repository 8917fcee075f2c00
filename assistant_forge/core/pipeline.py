"""The whole path in one call (`forge demo`): identity data, config, training, adapter, merge, questions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from assistant_forge.core.dataset import write_records
from assistant_forge.core.identity import generate_identity_records, heldout_questions, mixed_identity_records
from assistant_forge.core.presets import get_preset
from assistant_forge.core.runs import launch, new_run_dir, read_status
from assistant_forge.errors import ForgeError

DEMO_PRESET = "demo-cpu-lora"


@dataclass
class DemoResult:
    out: Path
    run: Path
    adapter: Path
    merged: Path
    answers: list[tuple[str, str]] = field(default_factory=list)


def demo_records(
    name: str, author: str, langs: Sequence[str] = ("en", "zh"), seed: int = 0, compound: int = 1
) -> list[dict]:
    """The demo's identity data: the question bank, and identity mixed with tasks (trained on identity
    alone, the model answered open tasks such as naming a shop with its own introduction)."""
    return generate_identity_records(name, author, langs=langs, seed=seed) + mixed_identity_records(
        name, author, langs=langs, seed=seed, compound=compound
    )


def demo(
    name: str,
    author: str,
    out: str | Path,
    follow: Callable[[Path], None],
    say: Callable[[str], None] = print,
    langs: tuple[str, ...] = ("en", "zh"),
) -> DemoResult:
    """Run the pipeline on the demo model; `follow(run)` watches the detached trainer until it ends."""
    from assistant_forge.core.chat import load_chat_model
    from assistant_forge.core.merge import convert, merge

    out = Path(out).expanduser().resolve()
    if (out / "run" / "config.toml").exists():
        raise ForgeError(f"{out} already holds a demo run; pick another --out or remove it.")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    records = demo_records(name, author, langs)
    write_records(records, data)
    say(f"1/5 data: {len(records)} identity conversations -> {data}")
    cfg = get_preset(DEMO_PRESET).load()
    cfg.data.files = [str(data)]
    cfg.identity.name, cfg.identity.author = name, author
    cfg.eval.prompts = [q.text for lang in langs for q in heldout_questions(lang)[:1]]
    run = new_run_dir(cfg, out / "run")
    launch(run)
    say(f"2/5 training (detached; reattach with `forge runs logs {run} -f`)")
    follow(run)
    status = read_status(run)
    if status.get("state") != "finished":
        raise ForgeError(
            f"Training ended as {status.get('state')}: {status.get('reason') or 'see ' + str(run / 'train.log')}."
        )
    adapter = convert(run, out / "adapter", force=True)
    say(f"3/5 adapter -> {adapter}")
    merged = merge("demo", adapter, out / "merged", force=True)
    say(f"4/5 merged model -> {merged}")
    chat = load_chat_model(str(merged))
    questions = [q.text for lang in langs for q in heldout_questions(lang)[-1:]]
    answers = chat.answer_batch([[{"role": "user", "content": q}] for q in questions], max_new_tokens=48)
    say("5/5 questions the model never saw in training:")
    return DemoResult(out, run, adapter, merged, list(zip(questions, answers)))
