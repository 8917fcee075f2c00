"""The detached trainer: a transformers Trainer writing the run-directory contract as it goes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from assistant_forge.core import answer_cache
from assistant_forge.core.chat import generate_answers
from assistant_forge.core.config import ForgeConfig
from assistant_forge.core.encoding import with_system
from assistant_forge.core.fsutil import append_jsonl, atomic_write_json, atomic_write_jsonl, restrict_umask
from assistant_forge.core.models import quiet_transformers
from assistant_forge.core.runs import (
    COMPLETE_MARKER,
    RunLock,
    complete_checkpoints,
    now_iso,
    read_jsonl,
    read_status,
    run_config,
    write_status,
    zero_preflight,
)
from assistant_forge.errors import ForgeError
from assistant_forge.training import distributed, layer_graphs, speed, zero
from assistant_forge.training.data import (
    FlatCollator,
    encode_dataset,
    encode_records,
    pack_dataset,
    replay_draw,
)
from assistant_forge.training.modeling import build_model, pick_device

ERROR_LOG = "error.log"
OOM_ADVICE = (
    "out of GPU memory: lower data.max_length or train.micro_batch_size, turn on "
    'train.gradient_checkpointing, or use method = "qlora"'
)


class StopRequested:
    """Set by SIGTERM (`forge runs stop`): the trainer saves a checkpoint and ends as 'stopped'."""

    flag = False

    @classmethod
    def install(cls) -> None:
        def handler(signum: int, frame: Any) -> None:
            cls.flag = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        # The trainer runs in its own session; a hang-up of the terminal that started it is not its concern.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # Past a file-size limit a write fails with EFBIG (reported as a full disk) instead of killing us.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


# --- test-only fault injection ---------------------------------------------------------------------
# FORGE_TEST_FAULT="<what>@<step>[,...]" makes tests/faults reproduce failures for real on a CPU:
#   oom@N         raises a real torch.OutOfMemoryError inside training step N (no GPU to exhaust on CPU)
#   fsize=B@N     from training step N on, no file may grow past B bytes (RLIMIT_FSIZE: writes fail, EFBIG)
#   pause_save@N  sleeps inside the save of checkpoint N, after its weights and before its optimizer state,
#                 so a test can kill the trainer while a checkpoint is half written
# Unset (always, outside tests) it costs one dict lookup per step.


def _faults() -> dict[str, tuple[str, int]]:
    out = {}
    for item in filter(None, os.environ.get("FORGE_TEST_FAULT", "").split(",")):
        what, _, step = item.partition("@")
        name, _, arg = what.partition("=")
        out[name.strip()] = (arg, int(step))
    return out


def _fault(name: str, step: int) -> None:
    fault = _faults().get(name)
    if fault is None or fault[1] != step:
        return
    arg = fault[0]
    print(f"test fault: {name} at step {step}", flush=True)
    if name == "oom":
        import torch

        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB (injected by FORGE_TEST_FAULT)"
        )
    if name == "fsize":
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    if name == "pause_save":
        time.sleep(float(arg or 600))


# --- atomic checkpoints ----------------------------------------------------------------------------

STAGING_PREFIX = ".saving-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in [*folder.rglob("*"), folder]:
        _fsync(p)


def remove_stale_staging(checkpoints: Path) -> None:
    """Half-written saves of a trainer that was killed; only the lock holder calls this."""
    for d in checkpoints.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)


class ForgeTrainer(Trainer):
    """A Trainer whose checkpoints appear whole or not at all.

    Trainer writes each checkpoint into a hidden staging folder beside the others; once every file is
    written and synced, the completeness marker goes in and the folder is renamed to checkpoint-N in one
    step. A trainer killed mid-save leaves only a staging folder, which nothing reads and the next trainer
    removes. The marker stays the test of completeness (checkpoints of older versions carry it too).
    """

    _staging: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging or super()._get_output_dir(trial)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        _fault("oom", self.state.global_step + 1)
        _fault("fsize", self.state.global_step + 1)
        return super().training_step(*args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        _fault("pause_save", self.state.global_step)
        super()._save_optimizer_and_scheduler(output_dir)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        root = Path(self.args.output_dir)
        main_rank = distributed.is_main()
        final = root / f"checkpoint-{self.state.global_step}"
        staging = None
        if main_rank:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=root, prefix=f"{STAGING_PREFIX}{self.state.global_step}-"))
        # Every process writes into rank 0's staging folder (each its own RNG state).
        staging = Path(distributed.broadcast(str(staging) if staging else ""))
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
            distributed.barrier()
            if main_rank:
                written = staging / final.name
                atomic_write_json(
                    written / COMPLETE_MARKER, {"step": self.state.global_step, "time": now_iso()}
                )
                _fsync_tree(written)
                if final.exists():  # an incomplete leftover of the same step
                    shutil.rmtree(final)
                os.replace(written, final)
                _fsync(root)
        except Exception as e:
            disk_full = _as_disk_full(e, root)
            if disk_full is e:
                raise
            raise disk_full from e
        finally:
            self._staging = None
            if main_rank:
                shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()
        if not main_rank:
            return
        rotate_checkpoints(
            output_dir=str(root),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,
        )


_DISK_FULL_TEXT = (
    "no space left on device",
    "file too large",
    "disk quota exceeded",
    "storagefull",
    "filetoolarge",
)


def _as_disk_full(e: BaseException, folder: Path | None = None) -> BaseException:
    """safetensors and torch.save report a full disk as their own error types; make it an OSError again.

    torch.save may say no more than "unexpected pos 382144 vs 382036": when a write into `folder` failed
    and its filesystem has (almost) no space left, that was the cause.
    """
    if isinstance(e, OSError):
        return e
    text = str(e).lower()
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        if os.strerror(code).lower() in text:
            return OSError(code, os.strerror(code))
    if any(t in text for t in _DISK_FULL_TEXT):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with contextlib.suppress(OSError):
        if folder is not None and shutil.disk_usage(folder).free < 16 * 2**20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return e


def _mem_gib(model: Any = None) -> float | None:
    """Peak GPU memory so far: torch's allocated peak, plus the private pool the CUDA-graphed layers
    replay in (torch's allocated figure does not see it while they run)."""
    import torch

    if not torch.cuda.is_available():
        return None
    pool = (
        layer_graphs.pool_bytes(layer_graphs.plan_of(speed.decoder_layers(model))) if model is not None else 0
    )
    return round((torch.cuda.max_memory_allocated() + pool) / 2**30, 2)


class RunCallback(TrainerCallback):
    """Writes events.jsonl, samples.jsonl and status.json; marks complete checkpoints; honours stop."""

    def __init__(self, run: Path, cfg: ForgeConfig, tok: Any, rows: int):
        self.run, self.cfg, self.tok = run, cfg, tok
        self.t0 = time.time()
        self.start_step = 0
        self.last = (time.time(), 0)
        self.rows = rows
        self.main = distributed.is_main()
        # Under ZeRO-3 each process holds a slice of every weight, so generating needs them all
        # (transformers syncs their steps); rank 0 alone would wait forever for the others' slices.
        self.samples_here = self.main or (
            distributed.world_size() > 1 and zero.shards_weights(cfg.train.zero_stage)
        )

    def _samples(self, model: Any, step: int, when: str) -> None:
        prompts = self.cfg.eval.prompts
        if not prompts or not self.samples_here:
            return
        convs = [with_system([{"role": "user", "content": p}], self.cfg.data.system_prompt) for p in prompts]
        answers = generate_answers(model, self.tok, convs, self.cfg.eval.max_new_tokens)
        if not self.main:
            return
        for p, a in zip(prompts, answers):
            append_jsonl(
                self.run / "samples.jsonl",
                {"step": step, "when": when, "prompt": p, "answer": a, "time": now_iso()},
            )
            print(f"[sample step {step}] {p!r} -> {a!r}", flush=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self.main:
            self.start_step = state.global_step
            self.t0 = time.time()
            self.last = (self.t0, state.num_input_tokens_seen or 0)
            write_status(self.run, state="running", step=state.global_step, total_steps=state.max_steps)
        if state.global_step == 0:
            self._samples(model, 0, "before")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" not in logs or not self.main:
            return
        now = time.time()
        tokens = state.num_input_tokens_seen or 0
        dt = max(now - self.last[0], 1e-9)
        tps = (tokens - self.last[1]) / dt
        self.last = (now, tokens)
        done = state.global_step - self.start_step
        eta = (now - self.t0) / done * (state.max_steps - state.global_step) if done else None
        event = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(state.epoch or 0, 4),
            "loss": round(float(logs["loss"]), 5),
            "lr": logs.get("learning_rate"),
            "grad_norm": round(float(logs["grad_norm"]), 4) if logs.get("grad_norm") is not None else None,
            "tokens_per_s": round(tps, 1),
            "tokens_seen": tokens,
            "mem_gib": _mem_gib(kw.get("model")),
            "eta_s": round(eta, 1) if eta is not None else None,
            "time": now_iso(),
        }
        append_jsonl(self.run / "events.jsonl", event)
        write_status(
            self.run,
            state="running",
            step=state.global_step,
            total_steps=state.max_steps,
            loss=event["loss"],
            eta_s=event["eta_s"],
        )
        print(
            f"step {state.global_step}/{state.max_steps} loss {event['loss']:.4f} lr {event['lr']:.2e} "
            f"{event['tokens_per_s']:.0f} tok/s eta {event['eta_s']}s",
            flush=True,
        )

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        every = self.cfg.eval.sample_every
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            self._samples(model, state.global_step, "during")
        if state.global_step >= state.max_steps:
            control.should_save = True  # the final step always leaves a checkpoint
        # A stop reaches rank 0 (its pid is the run's); every process must stop at the same step.
        StopRequested.flag = distributed.any_rank(StopRequested.flag)
        if StopRequested.flag:
            if self.main:
                write_status(self.run, state="stopping")
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if not StopRequested.flag:  # agreed by every process at the last step's end
            self._samples(model, state.global_step, "after")


def build_replay(run: Path, cfg: ForgeConfig, model: Any, tok: Any) -> list[dict]:
    """The base model's own answers to generic prompts, cached in the run so a resume reuses them."""
    path = run / "replay.jsonl"
    if path.exists():
        return read_jsonl(path)
    if cfg.data.replay_ratio <= 0 or cfg.data.replay_prompts <= 0:
        return []
    from assistant_forge.core.identity import generic_prompts

    prompts = generic_prompts("replay")[: cfg.data.replay_prompts]
    convs = [with_system([{"role": "user", "content": p}], cfg.data.system_prompt) for p in prompts]
    # Adapters are disabled so these are the base model's answers even when the model is already wrapped.
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx:
        # On a CPU each decoding step reads every weight once whatever the batch, so one big batch is
        # much faster (demo model, 71 prompts: 25 s instead of 36 s at 16, the same greedy answers).
        batch = 64 if pick_device(cfg) == "cpu" else 16

        def generate() -> list[str]:
            print(f"forgetting guard: the base model answers {len(prompts)} generic prompts", flush=True)
            return generate_answers(
                model, tok, convs, max_new_tokens=cfg.eval.max_new_tokens, batch_size=batch
            )

        # Greedy answers of one model to one prompt set never change: later runs (and the demo, whose
        # answers ship in sample_data/base_answers) reuse them instead of generating.
        answers, cached = answer_cache.cached_answers(
            cfg.model.path, model, tok, convs, cfg.eval.max_new_tokens, generate
        )
    if cached:
        print(
            f"forgetting guard: the base model's answers to {len(prompts)} generic prompts (cached)",
            flush=True,
        )
    # An answer cut off by max_new_tokens is marked open-ended: training on its end-of-turn token would
    # teach the model to stop mid-thought, which measurably shortened (and so changed) unrelated answers.
    limit = cfg.eval.max_new_tokens - 2  # decode/re-encode may differ by a token; a near-full answer counts
    recs = [
        {
            "messages": [*c, {"role": "assistant", "content": a}],
            **({"open_end": True} if len(tok(a, add_special_tokens=False)["input_ids"]) >= limit else {}),
        }
        for c, a in zip(convs, answers)
        if a.strip()
    ]
    atomic_write_jsonl(path, recs)
    return recs


def _conversations(cfg: ForgeConfig) -> Any:
    from assistant_forge.core.mixing import build_mix

    mix, reports = build_mix(cfg.data.files, cfg.data.general_files, cfg.data.columns, cfg.train.seed)
    if distributed.is_main():
        for r in reports:
            dup = f", {r.duplicates} duplicates dropped" if r.duplicates else ""
            print(f"data: {r.label}: {r.used} of {r.rows} conversations{dup}", flush=True)
    return mix


def _samples(cfg: ForgeConfig, tok: Any, conversations: Any, extra: list[dict]) -> Any:
    """Token ids and labels of the conversations (datasets map, cached) and of the replay answers."""
    from datasets import Dataset, concatenate_datasets

    d = cfg.data
    samples = encode_dataset(conversations, tok, d.max_length, d.system_prompt, d.num_proc)
    if not extra:
        return samples
    replayed = encode_records(tok, extra, d.max_length, d.system_prompt)
    replayed_ds = Dataset.from_list(
        [{**s, "length": len(s["input_ids"])} for s in replayed], features=samples.features
    )
    return concatenate_datasets([samples, replayed_ds])


def training_args(run: Path, cfg: ForgeConfig, device: str, **overrides: Any) -> TrainingArguments:
    import torch

    t = cfg.train
    precision = t.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device == "cuda" else "fp32"
    optim = (
        t.optimizer
        if device == "cuda" or not t.optimizer.startswith(("paged", "adamw_8bit"))
        else "adamw_torch"
    )
    optim = overrides.pop("optim", optim)  # the fast path may move a paged optimizer on-device
    if t.zero_stage:
        optim = zero.optimizer(optim)
    return TrainingArguments(
        output_dir=str(run / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optim,
        bf16=precision == "bf16" and device == "cuda",
        fp16=precision == "fp16",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=device == "cpu",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen=True,
        # Data parallel: every trainable (LoRA) weight gets a gradient each step; no search needed.
        ddp_find_unused_parameters=False,
        **overrides,
    )  # gradient checkpointing is configured on the model in modeling.wrap_for_training


def train_run(run: Path, resume: bool = False) -> str:
    """Train the run in this process; returns the final state. The caller holds the run lock."""
    import torch

    quiet_transformers()  # progress bars make train.log unreadable; events.jsonl has the progress
    cfg = run_config(run)
    # Also for a trainer started without `forge train` (python -m assistant_forge.training).
    zero_preflight(cfg)
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    device = pick_device(cfg)
    distributed.init(device)
    say = print if distributed.is_main() else _quiet
    if not cfg.data.files:
        raise ForgeError("The config lists no training data; set data.files.")
    # Rank 0 converts (and caches) the data first; the others then read the cache.
    conversations = _conversations(cfg) if distributed.is_main() else None
    distributed.barrier()
    if conversations is None:
        conversations = _conversations(cfg)
    say(f"loading {cfg.model.path} ({cfg.lora.method}) on {device}", flush=True)
    stage = cfg.train.zero_stage
    if distributed.world_size() > 1:
        sharding = f", DeepSpeed ZeRO-{stage}" if stage else ""
        say(f"data parallel: {distributed.world_size()} processes{sharding}", flush=True)
    # Seeded before the model is built: LoRA's A matrices are drawn at wrap time, before the Trainer
    # seeds, so without this two runs of one config started from different adapters.
    set_seed(cfg.train.seed)
    model, tok = build_model(cfg)
    # Rank 0 makes the replay answers (cached in the run); the others wait and read them.
    replay = build_replay(run, cfg, model, tok) if distributed.is_main() else []
    distributed.barrier()
    if not distributed.is_main():
        replay = build_replay(run, cfg, model, tok)
    extra = replay_draw(len(conversations), replay, cfg.data.replay_ratio, cfg.train.seed)
    t0 = time.time()
    samples = _samples(cfg, tok, conversations, extra) if distributed.is_main() else None
    distributed.barrier()
    if samples is None:
        samples = _samples(cfg, tok, conversations, extra)
    rows = pack_dataset(samples, cfg.data.max_length, cfg.data.packing, cfg.train.seed)
    if not len(rows):
        raise ForgeError("No sample has an assistant token within data.max_length; nothing to learn from.")
    say(
        f"{len(conversations) + len(extra)} conversations ({len(replay)} replay answers available) -> "
        f"{len(rows)} rows of <= {cfg.data.max_length} tokens ({time.time() - t0:.1f} s)",
        flush=True,
    )
    if distributed.is_main():
        remove_stale_staging(run / "checkpoints")
    overrides: dict[str, Any] = {}
    optimizers: tuple[Any, Any] = (None, None)
    if speed.enabled(model, cfg):
        # The fast path fitted checkpointing and the optimizer to the memory budget; keep its plan.
        overrides = speed.training_args_overrides(cfg, model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers = (
            speed.make_optimizer(
                model, cfg, trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay
            ),
            None,
        )
        say(f"fast path: {speed.report(model).as_dict()}", flush=True)
    if stage:
        # Made after the model is loaded, so transformers loads it whole in each process (no
        # zero.Init): the replay answers above came from the whole model, and DeepSpeed shards it
        # when the Trainer starts. The price: each process must fit the (4-bit) model once.
        zero.prepare(device)
        overrides["deepspeed"] = zero.deepspeed_config(stage)
    trainer = ForgeTrainer(
        model=model,
        args=training_args(run, cfg, device, **overrides),
        train_dataset=rows,
        data_collator=FlatCollator(),
        callbacks=[RunCallback(run, cfg, tok, len(rows))],
        optimizers=optimizers,
    )
    trainer.remove_callback(PrinterCallback)  # RunCallback prints one readable line per step instead
    checkpoint = str(complete_checkpoints(run)[-1][1]) if resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    # Keep the tokenizer (with the pipeline's template) beside the newest checkpoint for `forge convert`.
    if distributed.is_main():
        tok.save_pretrained(run / "tokenizer")
    return "stopped" if StopRequested.flag else "finished"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run = Path(argv[0]).resolve()
    resume = "--resume" in argv
    StopRequested.install()
    restrict_umask()
    # With several processes (torchrun), rank 0 owns the run: the lock, status.json and the logs.
    main_rank = distributed.is_main()
    lock = RunLock(run)
    if main_rank:
        if not lock.acquire():
            return _refuse(f"run directory {run} is in use by another trainer")
        # A trainer that lost the race for the lock by a whole run must not train the finished run again.
        if not resume and read_status(run).get("started"):
            lock.release()
            return _refuse(
                f"run directory {run} was already trained by another trainer; "
                "continue it with `forge train --resume`"
            )
        write_status(run, state="running", pid=_pid(), started=now_iso(), reason="", resumed=resume)
    state, reason, code = "failed", "", 1
    try:
        state = train_run(run, resume)
        code = 0
    except ForgeError as e:
        reason = str(e)
    except Exception as e:  # every failure ends as a status the watchers can show
        reason = _explain(e)
        import traceback

        # The details go to error.log, not train.log: `forge train` shows train.log, and people get one sentence.
        with (
            contextlib.suppress(OSError),
            open(run / ERROR_LOG, "a", encoding="utf-8") as f,
        ):  # the disk may be full
            f.write(f"--- {now_iso()} (rank {distributed.rank()})\n{traceback.format_exc()}")
        with contextlib.suppress(OSError):
            print(f"the details of this failure are in {run / ERROR_LOG}", flush=True)
    finally:
        if main_rank:
            write_status(run, state=state, reason=reason, ended=now_iso())
            with contextlib.suppress(OSError):
                print(f"run {state}" + (f": {reason}" if reason else ""), flush=True)
            lock.release()
    return code


def _refuse(why: str) -> int:
    """A trainer that must not touch this run: one line on stderr, exit status 3."""
    print(f"error: {why}", file=sys.stderr)
    return 3


def _quiet(*_args: Any, **_kw: Any) -> None:
    """print() for processes other than rank 0: one copy of each line in train.log."""


def _pid() -> int:
    import os

    return os.getpid()


def _explain(e: BaseException) -> str:
    import torch

    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return OOM_ADVICE
    e = _as_disk_full(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({e.strerror}); free space and resume with `forge train --resume`"
    if isinstance(e, OSError) and e.errno == errno.EFBIG:
        return (
            "a file outgrew the size limit this process may write (File too large, see `ulimit -f`); "
            "raise the limit and resume with `forge train --resume`"
        )
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
