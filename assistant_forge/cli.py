"""`forge`: with no subcommand it opens the TUI; every step also runs headless.

Heavy libraries (torch, transformers, textual) are imported inside handlers so `forge --help`
answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from assistant_forge import __version__
from assistant_forge.cli_data import cmd_data_check, cmd_data_convert, cmd_data_identity, cmd_data_preview
from assistant_forge.errors import ForgeError, one_line

Handler = Callable[[argparse.Namespace], int]


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _table(
    columns: list[str], rows: list[list[Any]], title: str | None = None, whole: tuple[int, ...] = (0,)
) -> None:
    """A table whose `whole` columns (names and paths a user types next) are never cut or wrapped,
    whatever the terminal's width; the other columns share what is left and fold."""
    from rich.table import Column, Table

    console = _console()
    natural = [max([len(c), *(len(str(r[i])) for r in rows)]) for i, c in enumerate(columns)]
    chrome = 3 * len(columns) + 1  # a border and two spaces of padding per column, one border to close
    # rich shrinks every column alike once the others cannot wrap any narrower (a timestamp is one
    # long word), names included: capping the others' widths is what keeps names whole. The room
    # left is shared narrowest first, so a short column keeps its width and the widest ones fold.
    room = console.width - chrome - sum(natural[i] for i in whole)
    others = sorted((i for i in range(len(columns)) if i not in whole), key=lambda i: natural[i])
    cap: dict[int, int] = {}
    for k, i in enumerate(others):
        cap[i] = max(4, min(natural[i], room // (len(others) - k)))
        room -= cap[i]
    cols = [
        Column(c, no_wrap=True, min_width=natural[i])
        if i in whole
        else Column(c, overflow="fold", max_width=cap[i])
        for i, c in enumerate(columns)
    ]
    t = Table(*cols, title=title)
    for r in rows:
        t.add_row(*[str(c) for c in r])
    # Names wider than the terminal itself: a wider table (the terminal wraps the line) rather than a cut name.
    console.print(t, width=max(console.width, chrome + sum(cap.values()) + sum(natural[i] for i in whole)))


# --- presets ------------------------------------------------------------------------------------


def cmd_presets_list(a: argparse.Namespace) -> int:
    from assistant_forge.core.presets import list_presets

    rows = []
    for p in list_presets():
        c = p.load()
        gpu = f"{c.meta.min_gpu_gib:g} GiB" if c.meta.min_gpu_gib else "none (CPU)"
        rows.append(
            [
                p.name + (" (user)" if p.user else ""),
                c.model.path,
                c.lora.method,
                c.data.max_length,
                gpu,
                c.meta.verified or "-",
            ]
        )
    # Names (what `forge presets copy` takes) stay whole; the other columns wrap (model ids fold, never cut).
    _table(["name", "model", "method", "max length", "min GPU memory", "verified"], rows)
    return 0


def cmd_presets_show(a: argparse.Namespace) -> int:
    from assistant_forge.core.presets import get_preset

    p = get_preset(a.name)
    p.load()  # a broken preset fails here with its own message
    print(p.path.read_text(encoding="utf-8"), end="")
    return 0


def cmd_presets_copy(a: argparse.Namespace) -> int:
    from assistant_forge.core.presets import copy_preset

    dest = copy_preset(a.name, a.dest, force=a.force)
    print(f"wrote {dest}; edit it, then: forge train {dest}")
    return 0


# --- train and runs -----------------------------------------------------------------------------


def follow_run(run: Path, quiet: bool = False) -> None:
    """Print the trainer's log as it grows until it ends; Ctrl-C detaches, training goes on."""
    from assistant_forge.core.runs import follow_file

    try:
        for line in follow_file(run / "train.log", run):
            if not quiet:
                print(line, flush=True)
    except KeyboardInterrupt:
        print(
            f"\ndetached; training continues. Reattach: forge runs logs {run} -f   Stop: forge runs stop {run}"
        )
        raise SystemExit(0) from None


def cmd_train(a: argparse.Namespace) -> int:
    from assistant_forge.core.presets import resolve_config
    from assistant_forge.core.runs import find_run, launch, new_run_dir, preflight, read_status

    if a.resume:
        if a.gpus:
            raise ForgeError("--gpus applies to new runs; a resumed run keeps the processes it started with.")
        if a.zero is not None:
            raise ForgeError(
                "--zero applies to new runs; a resumed run keeps the ZeRO stage it started with."
            )
        run = find_run(a.run_dir or a.config)
    else:
        cfg, _ = resolve_config(a.config)
        if a.gpus:
            cfg.train.processes = a.gpus
        if a.zero is not None:
            cfg.train.zero_stage = a.zero
        preflight(cfg)
        if cfg.model.trust_remote_code:
            print("warning: trust_remote_code is on: the model's own Python code will run.", file=sys.stderr)
        run = new_run_dir(cfg, a.run_dir, label=Path(a.config).stem)
    pid = launch(run, resume=a.resume)
    print(f"run {run} (trainer pid {pid})", flush=True)
    if a.detach:
        print(f"follow: forge runs logs {run} -f   stop: forge runs stop {run}")
        return 0
    follow_run(run)
    status = read_status(run)
    print(f"run {status.get('state')}" + (f": {status['reason']}" if status.get("reason") else ""))
    return 0 if status.get("state") in ("finished", "stopped") else 1


def cmd_runs_list(a: argparse.Namespace) -> int:
    from assistant_forge.core.run_state import fmt_eta
    from assistant_forge.core.runs import list_runs

    runs = list_runs()
    if not runs:
        print("no runs yet; start one with `forge train CONFIG`")
        return 0
    # An eta only while a run is running; the start to the minute (MM-DD HH:MM): at 80 columns the
    # run names, which the next command takes, keep the room.
    eta = any(r.state == "running" for r in runs)
    rows = []
    for r in runs:
        s = r.status
        started = str(s.get("started") or "-")
        rows.append(
            [
                r.name,
                r.state,
                f"{s.get('step', 0)}/{s.get('total_steps', '?')}",
                s.get("loss", "-"),
                *([fmt_eta(s.get("eta_s")) if r.state == "running" else "-"] if eta else []),
                started[5:16].replace("T", " ") if len(started) >= 16 else started,
            ]
        )
    _table(["run", "state", "step", "loss", *(["eta"] if eta else []), "started"], rows)
    return 0


def cmd_runs_show(a: argparse.Namespace) -> int:
    from assistant_forge.core.run_state import speed_summary
    from assistant_forge.core.runs import complete_checkpoints, find_run, read_jsonl, read_status

    run = find_run(a.run)
    status = read_status(run)
    status["checkpoints"] = [s for s, _ in complete_checkpoints(run)]
    events = read_jsonl(run / "events.jsonl")
    status["speed"] = speed_summary(events)
    status["last_event"] = events[-1] if events else None
    status["path"] = str(run)
    if a.json:
        print(json.dumps(status, ensure_ascii=False, indent=2))
        return 0
    for k, v in status.items():
        print(f"{k:>12}: {v}")
    samples = read_jsonl(run / "samples.jsonl")
    for s in samples[-4:]:
        print(f"  [step {s['step']}] {s['prompt']} -> {s['answer']}")
    return 0


def cmd_runs_logs(a: argparse.Namespace) -> int:
    from assistant_forge.core.runs import find_run

    run = find_run(a.run)
    if a.follow:
        follow_run(run)
        return 0
    log = run / "train.log"
    print(log.read_text(encoding="utf-8", errors="replace") if log.exists() else "(no log yet)", end="")
    return 0


def cmd_runs_stop(a: argparse.Namespace) -> int:
    from assistant_forge.core.runs import find_run, stop

    run = find_run(a.run)
    status = stop(run, wait_s=a.wait)
    print(f"run {run.name}: {status.get('state')}")
    return 0


# --- export, merge, chat, eval, demo --------------------------------------------------------------


def cmd_convert(a: argparse.Namespace) -> int:
    from assistant_forge.core.merge import convert
    from assistant_forge.core.runs import find_run

    out = convert(find_run(a.run), a.output, step=a.checkpoint, force=a.force)
    print(f"adapter written to {out}")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from assistant_forge.core.merge import merge

    out = merge(
        a.base,
        a.adapter,
        a.output,
        max_shard_size=a.max_shard_size,
        dtype=a.dtype,
        force=a.force,
        trust_remote_code=a.trust_remote_code,
        hub_layout=a.hub_layout,
    )
    print(f"merged model written to {out}")
    return 0


def cmd_export_gguf(a: argparse.Namespace) -> int:
    from assistant_forge.core.ollama import export_gguf_for

    done = export_gguf_for(
        a.merged, a.output, a.quant, a.ollama, a.force, progress=_progress_line("writing tensors")
    )
    print("\n".join(done.lines()))
    return 0


def _progress_line(what: str) -> Callable[[int, int, str], None]:
    """A progress callback that rewrites one line on a terminal and prints nothing elsewhere."""

    def show(done: int, total: int, _name: str) -> None:
        if sys.stderr.isatty():
            end = "\n" if done == total else ""
            print(f"\r{what}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def cmd_chat(a: argparse.Namespace) -> int:
    import threading

    from assistant_forge.core.chat import load_chat_model

    chat = load_chat_model(
        a.model,
        a.adapter,
        a.bits,
        template=a.template,
        allow_template_mismatch=a.force_template,
        system=a.system,
        trust_remote_code=a.trust_remote_code,
    )
    if a.prompt is not None:
        for piece in chat.stream([{"role": "user", "content": a.prompt}], max_new_tokens=a.max_new_tokens):
            print(piece, end="", flush=True)
        print()
        return 0
    print(f"chatting with {chat.label}; /reset clears history, /exit or Ctrl-D quits")
    history: list[dict] = []
    while True:
        try:
            q = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if q in ("/exit", "/quit"):
            return 0
        if q == "/reset":
            history = []
            continue
        if not q:
            continue
        history.append({"role": "user", "content": q})
        stop = threading.Event()
        answer = ""
        print("bot> ", end="", flush=True)
        try:
            for piece in chat.stream(history, max_new_tokens=a.max_new_tokens, stop_event=stop):
                answer += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stop.set()
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": answer})


def _positive_int(text: str) -> int:
    """argparse type for counts: a bad --limit is a usage error, not a traceback from deep inside."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def cmd_eval(a: argparse.Namespace) -> int:
    from assistant_forge.core.answer_cache import base_eval_answers
    from assistant_forge.core.chat import load_chat_model
    from assistant_forge.core.evaluate import category_rows, run_eval

    langs = [s.strip() for s in a.lang.split(",") if s.strip()]
    base_answers = None
    if a.base:
        base = load_chat_model(a.base)
        base_answers = base_eval_answers(base, a.base, a.max_new_tokens, langs, a.limit, a.split)
        del base
    tuned = load_chat_model(a.model, a.adapter)
    report = run_eval(
        lambda b: tuned.answer_batch(b, a.max_new_tokens),
        a.name,
        a.author or "",
        langs=langs,
        base_answers=base_answers,
        limit=a.limit,
        batch_size=tuned.batch_size,
        split=a.split,
    )
    d = report.to_dict()
    if a.json:
        print(json.dumps(d, ensure_ascii=False, indent=2))
        return 0
    rows = [[f"identity rate ({lang})", _pct(r)] for lang, r in d["identity_rate"].items()]
    rows += [
        ["leakage", _pct(d["leakage_rate"])],
        ["preservation", _pct(d["preservation"])],
        ["facts kept", _pct(d.get("facts_kept"))],
        ["compound: name and answer", _pct(d.get("compound_both"))],
        [
            "compound: both, of tasks the base knew",
            f"{_pct(d['compound_both_known'])} of {d['compound_known']}" if a.base else "-",
        ],
    ]
    _table(["measure", "value"], rows, title=f"{tuned.label} as {a.name} ({a.split} prompts)")
    _table(
        ["category", "prompts", "leakage", "facts kept", "both parts"],
        [[c, str(n), _pct(leak), _pct(kept), _pct(both)] for c, n, leak, kept, both in category_rows(report)],
    )
    return 0


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def cmd_demo(a: argparse.Namespace) -> int:
    import time

    from assistant_forge.core.pipeline import demo

    t0 = time.time()
    res = demo(a.name, a.author, a.out, follow=lambda run: follow_run(run, quiet=not a.verbose))
    for q, ans in res.answers:
        print(f"  Q: {q}\n  A: {ans}")
    print(f"done in {time.time() - t0:.0f}s; chat with it: forge chat {res.merged}")
    return 0


def cmd_tui(a: argparse.Namespace) -> int:
    try:
        from assistant_forge.tui.app import run_app
    except ImportError as e:
        raise ForgeError(
            f"The terminal app is not available ({e}); every step also runs as a subcommand, see `forge --help`."
        ) from None
    return run_app()


# --- the parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from assistant_forge.core.evaluate import SPLIT_CHOICES

    p = argparse.ArgumentParser(
        prog="forge", description="Turn a chat LLM into your own assistant. No subcommand opens the app."
    )
    p.add_argument("--version", action="version", version=f"forge {__version__}")
    p.set_defaults(func=cmd_tui)
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    def add(parent: Any, name: str, func: Handler, help: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    pr = sub.add_parser("presets", help="list, show and copy presets").add_subparsers(
        metavar="ACTION", required=True
    )
    add(pr, "list", cmd_presets_list, "list presets")
    sp = add(pr, "show", cmd_presets_show, "print a preset")
    sp.add_argument("name")
    sp = add(pr, "copy", cmd_presets_copy, "copy a preset to an editable config file")
    sp.add_argument("name")
    sp.add_argument("dest")
    sp.add_argument("--force", action="store_true", help="overwrite DEST")

    dt = sub.add_parser("data", help="make, check, convert and preview datasets").add_subparsers(
        metavar="ACTION", required=True
    )
    sp = add(dt, "identity", cmd_data_identity, "write a self-identity dataset (messages JSONL)")
    sp.add_argument("--name", required=True, help="the assistant's name")
    sp.add_argument("--author", required=True, help="who made it")
    sp.add_argument("--lang", default="en,zh", help="languages, comma separated (default en,zh)")
    sp.add_argument(
        "--count", type=int, help="number of conversations (default: every training question once)"
    )
    sp.add_argument("--fact", action="append", help="a persona fact (repeatable)")
    sp.add_argument(
        "--mixed",
        action="store_true",
        help="add identity mixed with ordinary tasks (name + task in one question, two-turn chats)",
    )
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("-o", "--output", required=True)
    source_help = (
        "a JSON/JSONL/Parquet/CSV/TSV file, a folder of them, a save_to_disk folder, or hf:owner/name[:split]"
    )

    def source_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--split", help="split of a folder or save_to_disk dataset (default train)")
        sp.add_argument("--hf-config", help="configuration (subset) of a hub dataset")
        sp.add_argument(
            "--column",
            action="append",
            metavar="ROLE=NAME",
            help="field of prompt/response rows, e.g. prompt=question (repeatable)",
        )

    sp = add(
        dt,
        "check",
        cmd_data_check,
        "validate a dataset (or every source of a config.toml) and print counts and token lengths",
    )
    sp.add_argument("source", help=source_help + "; or a config .toml: all its sources, mixed")
    sp.add_argument("--preset", help="preset or config whose tokenizer measures token lengths")
    sp.add_argument("--no-tokens", action="store_true", help="skip token lengths (no tokenizer needed)")
    sp.add_argument("--json", action="store_true")
    source_options(sp)
    sp = add(dt, "convert", cmd_data_convert, "convert any supported dataset to messages JSONL")
    sp.add_argument("input", help=source_help)
    sp.add_argument("-o", "--output", required=True)
    source_options(sp)
    sp = add(dt, "preview", cmd_data_preview, "show templated samples with the tokens that carry loss marked")
    sp.add_argument("file", help=source_help)
    sp.add_argument("--preset", required=True, help="preset name or config file")
    sp.add_argument("-n", type=int, default=2, help="how many samples")
    source_options(sp)

    sp = add(sub, "train", cmd_train, "train from a config (a detached process; Ctrl-C only stops watching)")
    sp.add_argument("config", help="config file or preset name; with --resume, a run")
    sp.add_argument("--detach", action="store_true", help="return at once")
    sp.add_argument(
        "--resume", action="store_true", help="continue a run from its newest complete checkpoint"
    )
    sp.add_argument("--run-dir", help="where the run lives (default: forge's runs folder)")
    sp.add_argument(
        "--gpus",
        type=_positive_int,
        metavar="N",
        help="data-parallel over N GPUs, one process each via torchrun (sets train.processes)",
    )
    sp.add_argument(
        "--zero",
        type=int,
        choices=[0, 2, 3],
        help="DeepSpeed ZeRO stage across the --gpus processes: 2 shards optimizer state and gradients, "
        "3 also the weights, 0 plain data parallel (sets train.zero_stage)",
    )

    rn = sub.add_parser("runs", help="list, inspect, follow and stop runs")
    rn.set_defaults(func=cmd_runs_list)
    rs = rn.add_subparsers(metavar="ACTION")
    add(rs, "list", cmd_runs_list, "list runs")
    sp = add(rs, "show", cmd_runs_show, "show a run's status, checkpoints and samples")
    sp.add_argument("run")
    sp.add_argument("--json", action="store_true")
    sp = add(rs, "logs", cmd_runs_logs, "print a run's log")
    sp.add_argument("run")
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    sp = add(rs, "stop", cmd_runs_stop, "save a checkpoint and stop a run")
    sp.add_argument("run")
    sp.add_argument("--wait", type=float, default=120, help="seconds to wait for the trainer to exit")

    sp = add(sub, "convert", cmd_convert, "export a run's checkpoint as a PEFT adapter folder")
    sp.add_argument("run")
    sp.add_argument("--checkpoint", type=int, help="step (default: newest complete)")
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--force", action="store_true", help="replace OUTPUT")

    sp = add(sub, "merge", cmd_merge, "merge an adapter into its base model")
    sp.add_argument("base", help="base model folder, hub id or 'demo'")
    sp.add_argument("adapter")
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--max-shard-size", default="2GB")
    sp.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    sp.add_argument("--force", action="store_true", help="replace OUTPUT")
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.add_argument(
        "--hub-layout",
        action="store_true",
        help="InternLM2 bases: write the hub's original layout (fused wqkv, remote-code config) for LMDeploy/XTuner",
    )

    ex = sub.add_parser("export", help="export a merged model for other runtimes").add_subparsers(
        metavar="FORMAT", required=True
    )
    sp = add(
        ex, "gguf", cmd_export_gguf, "write a merged model as one GGUF file (llama.cpp, Ollama, LM Studio)"
    )
    sp.add_argument("merged", help="a merged model folder (forge merge BASE ADAPTER -o merged)")
    sp.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    sp.add_argument("--quant", default="f16", help="f16 (default), bf16, q8_0 or q4_0")
    sp.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside it")
    sp.add_argument("--force", action="store_true", help="replace OUTPUT (and its Modelfile)")

    sp = add(sub, "chat", cmd_chat, "chat with a model (streaming)")
    sp.add_argument("model", help="model folder, hub id or 'demo'")
    sp.add_argument("--adapter")
    sp.add_argument("--bits", type=int, choices=[4, 8])
    sp.add_argument("--system")
    sp.add_argument("--prompt", help="answer this once and exit")
    sp.add_argument("--template", help="chat template name (default: the one the model was trained with)")
    sp.add_argument(
        "--force-template", action="store_true", help="allow a template other than the trained one"
    )
    sp.add_argument("--max-new-tokens", type=int, default=512)
    sp.add_argument("--trust-remote-code", action="store_true")

    sp = add(sub, "eval", cmd_eval, "measure identity, leakage and preservation")
    sp.add_argument("model")
    sp.add_argument("--adapter")
    sp.add_argument("--name", required=True)
    sp.add_argument("--author", default="")
    sp.add_argument("--base", help="base model, for preservation")
    sp.add_argument("--lang", default="en,zh")
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="ask only the first N held-out questions and prompts per language (a quick check)",
    )
    sp.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default="test",
        help="held-out prompts to ask: test (the default, never tuned on), dev (for tuning recipes) or all",
    )
    sp.add_argument("--json", action="store_true")

    sp = add(sub, "demo", cmd_demo, "the whole pipeline on the embedded demo model, on CPU")
    sp.add_argument("--name", default="Forgey")
    sp.add_argument("--author", default="Alice")
    sp.add_argument("--out", default="demo_out")
    sp.add_argument("-v", "--verbose", action="store_true", help="show the trainer's log")

    add(sub, "tui", cmd_tui, "open the terminal app")
    return p


def main(argv: list[str] | None = None) -> int:
    from assistant_forge.core.fsutil import restrict_umask

    restrict_umask()  # runs, adapters and merged models are never group- or world-writable
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # never a traceback for users; FORGE_DEBUG=1 shows it
        if os.environ.get("FORGE_DEBUG"):
            raise
        print(
            f"error: {one_line(e)} (FORGE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
