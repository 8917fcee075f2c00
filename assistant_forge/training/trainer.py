"""The detached trainer: a transformers Trainer writing the run-directory contract as it goes.

A run, in order (`python -m assistant_forge.training RUN` -> main -> train_run):

    main                 lock the run (core.runs.RunLock), status "running"; any failure ends as a
                         status with one readable reason (_explain), details in error.log
    train_run
      _conversations     data files mixed (core.mixing), rank 0 first, the others read its cache
      build_model        training.modeling: load_base -> fast.apply_speedups (fused loss, Liger)
                         -> wrap_for_training (PEFT) -> fast.after_peft (fused LoRA forwards,
                         compiled layers, the checkpointing plan fitted to the memory budget)
      build_replay       the base model's own answers, mixed in against forgetting
      _samples, pack     token ids and labels (training.data), packed into rows
      fast.make_optimizer, fast.training_args_overrides   on the GPU fast path: the plan's optimizer
      ForgeTrainer(...).train(resume_from_checkpoint=...)  transformers' loop:

One optimizer step inside Trainer.train, and where each piece lives:

    1. callbacks.on_step_begin        faults.FaultInjection, added only under FORGE_TEST_FAULT
    2. per micro-batch (train.grad_accum): Trainer.training_step, forward then backward, through
       three patched forwards:
         causal LM forward             labeled_loss.install_loss: the loss without full logits
                                       (fast.loss on the GPU, labeled_loss on the CPU)
         each decoder layer            fast.checkpoint._layer_forward, as its LayerPlan says:
                                       compiled or eager; checkpointed layers under forge's
                                       recompute, or replaying CUDA graphs (fast.graphs)
         each LoRA projection          fast.lora._lora_forward: one fused op per projection group
       backward re-runs the checkpointed layers (or replays their backward graphs)
    3. gradient clipping (train.max_grad_norm), then optimizer.step: on the fast path its
       pre/post hooks gather the gradients into one flat buffer and free it (fast.optimizer);
       then the learning-rate scheduler
    4. callbacks.on_step_end          RunCallback: sample answers every eval.sample_every, a stop
                                       request (SIGTERM) turned into "save, then stop"
    5. every train.logging_steps      RunCallback.on_log: events.jsonl, status.json, train.log line
    6. every train.save_steps, at the last step, on stop: ForgeTrainer._save_checkpoint (saving.py)
       writes into a staging folder (its _get_output_dir), marks it complete and renames it to
       checkpoint-N; FaultInjection may pause it between weights and optimizer state

After the loop: RunCallback.on_train_end (final samples), the tokenizer saved beside the
checkpoints, and main's final status ("finished", "stopped" or "failed").
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from assistant_forge.core import answer_cache
from assistant_forge.core import memory as mem
from assistant_forge.core.chat import generate_answers
from assistant_forge.core.config import ForgeConfig
from assistant_forge.core.encoding import with_system
from assistant_forge.core.fsutil import append_jsonl, atomic_write_jsonl, restrict_umask
from assistant_forge.core.memory import model_shape
from assistant_forge.core.models import quiet_transformers
from assistant_forge.core.runs import (
    RunLock,
    complete_checkpoints,
    now_iso,
    read_jsonl,
    read_status,
    run_config,
    write_status,
    zero_preflight,
)
from assistant_forge.core.templates import render
from assistant_forge.errors import ForgeError, one_line
from assistant_forge.training import distributed, fast, faults, profiling, zero
from assistant_forge.training.base_anchor import REPLAY
from assistant_forge.training.data import (
    FlatCollator,
    encode_dataset,
    encode_records,
    max_samples_per_row,
    pack_dataset,
    replay_draw,
    replay_openings,
    speaks_of_itself,
)
from assistant_forge.training.modeling import build_model, pick_device, resolve_precision
from assistant_forge.training.saving import ForgeTrainer, as_disk_full, remove_stale_staging

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


class PeakMemory:
    """Peak GPU memory so far, counting the private pool the CUDA-graphed layers replay in (torch's
    allocated figure does not see it while they run).

    Until the graphs are captured the layers' workspace comes from torch's allocator; after, from
    the pool. Adding the pool to a peak taken before it existed would count that workspace twice,
    so the peak before the capture is kept apart and torch's peak counter restarts."""

    def __init__(self) -> None:
        self.before_pool = 0

    def gib(self, pool: int) -> float | None:
        if not torch.cuda.is_available():
            return None
        if pool and not self.before_pool:
            self.before_pool = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return round(max(self.before_pool, torch.cuda.max_memory_allocated() + pool) / 2**30, 2)


class RunCallback(TrainerCallback):
    """Writes events.jsonl, samples.jsonl and status.json; marks complete checkpoints; honours stop."""

    def __init__(self, run: Path, cfg: ForgeConfig, tok: Any):
        self.run, self.cfg, self.tok = run, cfg, tok
        self.t0 = time.time()
        self.start_step = 0
        self.last = (time.time(), 0, 0)  # time, tokens seen and step at the last logged step
        # Seconds since then spent on sample answers and checkpoint saves: a step's speed leaves them out.
        self.paused = 0.0
        self.peak = PeakMemory()
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
        t0 = time.time()
        if when == "before":  # the untrained adapter changes nothing: the base model's answers, cached
            answers, _ = base_model_answers(self.cfg, model, self.tok, convs, 16)
        else:
            answers = generate_answers(model, self.tok, convs, self.cfg.eval.max_new_tokens)
        self.paused += time.time() - t0
        if not self.main:
            return
        print(f"samples at step {step}: {len(prompts)} answers in {time.time() - t0:.1f} s", flush=True)
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
            self.last = (self.t0, state.num_input_tokens_seen or 0, state.global_step)
            write_status(self.run, state="running", step=state.global_step, total_steps=state.max_steps)
        if state.global_step == 0:
            self._samples(model, 0, "before")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" not in logs or not self.main:
            return
        now = time.time()
        tokens = state.num_input_tokens_seen or 0  # real tokens, counted by ForgeTrainer.training_step
        pool = fast.graph_pool_bytes(kw["model"]) if kw.get("model") is not None else 0
        dt = max(now - self.last[0] - self.paused, 1e-9)
        tps = (tokens - self.last[1]) / dt
        step_s = dt / max(state.global_step - self.last[2], 1)
        self.last, self.paused = (now, tokens, state.global_step), 0.0
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
            "step_s": round(step_s, 3),  # training time of one step, sample answers and saves left out
            "tokens_seen": tokens,
            "mem_gib": self.peak.gib(pool),
            "mem_pool_gib": round(pool / 2**30, 2),
            # What stays between steps (weights, adapters, optimizer state); the rest of the peak is the step's.
            "mem_resident_gib": round(torch.cuda.memory_allocated() / 2**30, 2)
            if torch.cuda.is_available()
            else None,
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

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # The Trainer saves right after logging the step: the time since is the save's.
        if self.last[2] == state.global_step:
            self.paused += time.time() - self.last[0]

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self.main and (failed := fast.compile_failures()):
            print(
                f"fast path: torch.compile gave up {len(failed)} time(s); those layers run eager, "
                f"slower: {failed[-1]}",
                flush=True,
            )
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

    def announce() -> None:
        print(f"forgetting guard: the base model answers {len(prompts)} generic prompts", flush=True)

    answers, cached = base_model_answers(
        cfg, model, tok, convs, lambda: replay_batch(model, tok, convs, cfg), announce
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
        if a.strip() and not speaks_of_itself(a)
    ]
    if dropped := sum(bool(a.strip()) for a in answers) - len(recs):
        print(
            f"forgetting guard: {dropped} answers in which the base model speaks of itself left out",
            flush=True,
        )
    atomic_write_jsonl(path, recs)
    return recs


def base_model_answers(
    cfg: ForgeConfig,
    model: Any,
    tok: Any,
    convs: list[list[dict]],
    batch: int | Callable[[], int],
    before: Callable[[], None] = lambda: None,
) -> tuple[list[str], bool]:
    """The base model's greedy answers (adapters off), and whether they came from the answer cache:
    one model's answers to one prompt set never change, so later runs (and the demo, whose answers
    ship in sample_data/base_answers) reuse them instead of generating. `before` runs only when they
    are generated; `batch` may be a function, so that sizing it is skipped on a cache hit."""
    # Adapters are disabled so these are the base model's answers even when the model is already wrapped.
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx:

        def generate() -> list[str]:
            before()
            size = batch() if callable(batch) else batch
            return generate_answers(
                model, tok, convs, max_new_tokens=cfg.eval.max_new_tokens, batch_size=size
            )

        return answer_cache.cached_answers(
            cfg.model.path, model, tok, convs, cfg.eval.max_new_tokens, generate
        )


def replay_batch(model: Any, tok: Any, convs: list[list[dict]], cfg: ForgeConfig) -> int:
    """How many replay prompts to answer at once. Each decoding step reads every weight once whatever
    the batch, so bigger is faster: on a CPU one batch of 64 (demo model, 71 prompts: 25 s instead of
    36 s at 16, the same greedy answers); on a GPU as many as the KV cache of the longest prompt and
    its answer fits into half the memory the budget leaves free (7B at an 8.55 GiB budget with 128
    tokens assumed per prompt: ~20, so 64 prompts took 23 s against 7 s in one batch of 64)."""
    if pick_device(cfg) == "cpu" or not torch.cuda.is_available():
        return 64
    prompt_tokens = max(len(tok(render(tok, c, add_generation_prompt=True))["input_ids"]) for c in convs)
    shape = model_shape(model.config)
    per_seq = (
        2 * shape.layers * shape.kv_heads * shape.head_dim * 2 * (prompt_tokens + cfg.eval.max_new_tokens)
    )
    free = fast.memory_budget_bytes(cfg) - torch.cuda.memory_allocated()
    return max(1, min(64, int(free * 0.5 // per_seq)))


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
    flag = cfg.train.kl_to_base > 0  # the KL anchor needs to know which samples are replay
    if flag:
        samples = samples.add_column(REPLAY, [0] * len(samples))
    replayed_ds = Dataset.from_list(
        [{**s, "length": len(s["input_ids"]), **({REPLAY: 1} if flag else {})} for s in replayed],
        features=samples.features,
    )
    return concatenate_datasets([samples, replayed_ds])


def training_args(run: Path, cfg: ForgeConfig, device: str, **overrides: Any) -> TrainingArguments:
    t = cfg.train
    precision = resolve_precision(t.precision, device)
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
        # On a CPU too: accelerate runs the forward under bf16 autocast (LoRA weights and optimizer state
        # stay fp32), ~1.7x faster on CPUs with AMX tiles (modeling.resolve_precision decides "auto").
        bf16=precision == "bf16",
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
        # ForgeTrainer counts real tokens itself: the Trainer's count syncs with the GPU on every
        # micro-batch and would count padding.
        include_num_input_tokens_seen="no",
        # The filter checks each micro-batch's loss for NaN on the host: a GPU sync per micro-batch, so
        # the CPU can no longer queue the next one while the GPU works. A NaN loss shows in the log.
        logging_nan_inf_filter=False,
        # Data parallel: every trainable (LoRA) weight gets a gradient each step; no search needed.
        ddp_find_unused_parameters=False,
        # Batches are pinned, so their copy to the GPU need not wait for it: a blocking copy syncs, and
        # the Trainer fetches a step's micro-batches while the GPU still runs the step before.
        accelerator_config={"non_blocking": device == "cuda"},
        **overrides,
    )  # gradient checkpointing is configured on the model in modeling.wrap_for_training


def train_run(run: Path, resume: bool = False) -> str:
    """Train the run in this process; returns the final state. The caller holds the run lock."""
    quiet_transformers()  # progress bars make train.log unreadable; events.jsonl has the progress
    cfg = run_config(run)
    # Also for a trainer started without `forge train` (python -m assistant_forge.training).
    zero_preflight(cfg)
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    device = pick_device(cfg)
    if cfg.train.kl_to_base and device == "cuda" and mem.fast_path_configured(cfg):
        # Before the model loads (fast.enabled's test): the fast path's compiled and graph-replayed
        # layers were not checked to honour the adapter switched off.
        raise ForgeError(
            "train.kl_to_base is not supported on forge's fast GPU path yet; set train.fused_kernels = false"
        )
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
    extra += replay_openings(replay, cfg.data.replay_openings, tok)
    if torch.cuda.is_available():
        # The replay batch was sized to the memory left free; the peak events.jsonl reports is training's.
        torch.cuda.reset_peak_memory_stats()
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
    if fast.enabled(model, cfg):
        # The fast path fitted checkpointing and the optimizer to the memory budget; keep its plan.
        overrides = fast.training_args_overrides(cfg, model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers = (
            fast.make_optimizer(
                model, cfg, trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay
            ),
            None,
        )
        say(f"fast path: {fast.report(model).as_dict()}", flush=True)
    if stage:
        # Made after the model is loaded, so transformers loads it whole in each process (no
        # zero.Init): the replay answers above came from the whole model, and DeepSpeed shards it
        # when the Trainer starts. The price: each process must fit the (4-bit) model once.
        zero.prepare(device)
        overrides["deepspeed"] = zero.deepspeed_config(stage)
    # Compiled layers see one shape when every micro-batch is padded to the most a step can hold: no
    # recompiles, and CUDA-graphed layers replay on every micro-batch (best-fit rows are ~99% full).
    pad_to = cfg.data.max_length * cfg.train.micro_batch_size if fast.report(model).compiled_layers else 0
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # Varlen attention needs the samples' boundaries, in a list of one length for compiled layers.
    bounds = (
        max_samples_per_row(rows) * cfg.train.micro_batch_size + 1
        if fast.report(model).varlen_attention
        else 0
    )
    collator = FlatCollator(pad_to, pad_id or 0, bounds)
    trainer = ForgeTrainer(
        model=model,
        args=training_args(run, cfg, device, **overrides),
        train_dataset=rows,
        data_collator=collator,
        callbacks=[RunCallback(run, cfg, tok)],
        optimizers=optimizers,
    )
    trainer.kl_to_base = cfg.train.kl_to_base
    trainer.remove_callback(PrinterCallback)  # RunCallback prints one readable line per step instead
    if injected := faults.requested():  # tests/faults only
        trainer.add_callback(faults.FaultInjection(trainer, injected))
    if (profiled := profiling.requested()) and distributed.is_main():  # benchmarks only
        trainer.add_callback(profiling.StepProfiler(run, profiled))
    if (traced := profiling.memory_step_requested()) and distributed.is_main():  # benchmarks only
        trainer.add_callback(profiling.MemoryTrace(run, traced))
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
    return os.getpid()


def _explain(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return OOM_ADVICE
    e = as_disk_full(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({e.strerror}); free space and resume with `forge train --resume`"
    if isinstance(e, OSError) and e.errno == errno.EFBIG:
        return (
            "a file outgrew the size limit this process may write (File too large, see `ulimit -f`); "
            "raise the limit and resume with `forge train --resume`"
        )
    return one_line(e)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
