"""forge's GPU training step against the peer (bench/peer_qlora.py), same shape, data and settings,
in one launch: the peer runs as a subprocess per setting, forge's path in this process.

    PYTHONPATH=$PWD python3 bench/gpu_train.py --out $OUT [--shapes 1.5b,7b] [--seqs 2048,8192]

Both sides: random-weight checkpoint (speed and memory do not depend on weight values), NF4 with
double quantization, bf16 compute, LoRA r 64 / alpha 16 on all linear layers, paged AdamW 32-bit
(lr 2e-4), batch 1, random token ids from torch.Generator('cuda').manual_seed(0), labels = ids,
grad-norm clip 1.0, 2 warm-up steps, then the median of the timed steps. Peaks are torch's
max_memory_allocated / max_memory_reserved over the steps (the peer's also over its loading).

forge's model is built by training.modeling (load_base -> fast.apply_speedups ->
wrap_for_training -> fast.after_peft) when that module imports, else by the same sequence here;
the variants then only change the checkpointing plan (fast.configure_checkpointing) and re-init
the adapters, so one load serves them all.

--check runs the fused kernels against float64 references (CPU or GPU) and exits; with
--graph-check-only it then runs the CUDA graph check (GPU) too.
Writes $OUT/gpu_train.jsonl (one line per result) and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assistant_forge.core.memory import REFERENCE_SHAPES  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, dict[str, Any]] = {
    "7b": {**REFERENCE_SHAPES["7b"], "max_position_embeddings": 4096},
    "1.5b": {**REFERENCE_SHAPES["1.5b"], "max_position_embeddings": 32768, "rope_theta": 1e6},
    # --graph-check: small enough to build in seconds, a 7B's layer structure.
    "tiny": {
        **REFERENCE_SHAPES["7b"],
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
    },
}
GIB = 1024**3


def log(msg: str) -> None:
    print(msg, flush=True)


def emit(out: Path, rec: dict[str, Any]) -> None:
    log(json.dumps(rec))
    with open(out / "gpu_train.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------------------------
# Checkpoints and the peer
# --------------------------------------------------------------------------------------------


def make_checkpoint(shape: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SHAPES[shape]
    ckpt = os.path.join(tempfile.gettempdir(), f"forge_bench_{shape}_v{dims['vocab_size']}")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t = time.time()
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = LlamaForCausalLM(LlamaConfig(**dims)).to(torch.bfloat16)
        m.save_pretrained(ckpt, max_shard_size="5GB")
        del m
        gc.collect()
        torch.cuda.empty_cache()
        log(f"made {shape} checkpoint in {time.time() - t:.1f}s")
    return ckpt


def run_peer(out: Path, shape: str, ckpt: str, seq: int, steps: int, dropout: float) -> dict[str, Any]:
    """bench/peer_qlora.py unchanged, in its own process (its memory counters are its own)."""
    pdir = out / "peer"
    pdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "peer_qlora.py"),
        "--out",
        str(pdir),
        "--ckpt",
        ckpt,
        "--vocab",
        str(SHAPES[shape]["vocab_size"]),
        "--layers",
        str(SHAPES[shape]["num_hidden_layers"]),
        "--seq",
        str(seq),
        "--steps",
        str(steps),
        "--variants",
        "qlora",
        "--dropout",
        str(dropout),
    ]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    res: dict[str, Any] = {"error": f"peer exit {proc.returncode}: {proc.stderr[-600:]}"}
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"variant"' in line:
            res = json.loads(line)
    res.update(side="peer", shape=shape, seq=seq, dropout=dropout, wall_s=round(time.time() - t, 1))
    return res


# --------------------------------------------------------------------------------------------
# forge's path
# --------------------------------------------------------------------------------------------


def forge_config(ckpt: str, seq: int, dropout: float, compiled: bool = True) -> Any:
    from assistant_forge.core.config import ForgeConfig

    cfg = ForgeConfig()
    cfg.model.path = ckpt
    cfg.model.attn_implementation = "sdpa"
    cfg.data.max_length = seq
    cfg.lora.method, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = "qlora", 64, 16, dropout
    cfg.lora.target_modules = list(TARGETS)
    cfg.train.micro_batch_size = 1
    cfg.train.optimizer = "paged_adamw_32bit"
    cfg.train.precision = "bf16"
    cfg.train.device = "cuda"
    cfg.train.compile_layers = compiled
    return cfg


def build_forge(cfg: Any, ref_ids: Any) -> tuple[Any, dict[str, Any]]:
    """forge's model via training.modeling when it imports; info has the unpatched reference loss."""
    import torch

    from assistant_forge.training import fast

    info: dict[str, Any] = {}
    try:
        from assistant_forge.training import modeling

        load_base, wrap = modeling.load_base, modeling.wrap_for_training
        info["builder"] = "training.modeling"
    except Exception as e:  # not landed yet, or a dependency missing on this machine
        load_base, wrap = _load_base, _wrap_for_training
        info["builder"] = f"bench mirror ({type(e).__name__}: {str(e)[:80]})"
    t = time.time()
    model = load_base(cfg, "cuda", torch.bfloat16)
    info["load_s"] = round(time.time() - t, 1)
    # Reference: the plain transformers bf16 forward on the same weights and first batch (LoRA B
    # starts at zero, so step 1's loss is the base model's whatever the adapter init).
    with torch.no_grad():
        out = model(input_ids=ref_ids, labels=ref_ids)
    info["ref_loss_hf_bf16"] = round(out.loss.item(), 5)
    del out
    torch.cuda.empty_cache()
    model = fast.apply_speedups(model, cfg)
    model = wrap(model, cfg)
    model = fast.after_peft(model, cfg)
    return model, info


def _load_base(cfg: Any, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        cfg.model.path, dtype=dtype, attn_implementation="sdpa", quantization_config=q, device_map={"": 0}
    )


def _wrap_for_training(model: Any, cfg: Any) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        ),
    )
    model.config.use_cache = False
    return model


def reset_adapters(model: Any, dropout: float) -> None:
    """Same adapter init for every variant (A seeded, B zero), dropout set."""
    import torch
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            m.reset_lora_parameters("default", True)
            if isinstance(m.lora_dropout["default"], torch.nn.Dropout):
                m.lora_dropout["default"].p = dropout
            elif dropout > 0:
                m.lora_dropout["default"] = torch.nn.Dropout(dropout)


def train_steps(
    model: Any, cfg: Any, vocab: int, seq: int, steps: int, profile: Path | None = None
) -> dict[str, Any]:
    """The peer's exact loop: same ids, optimizer update, clipping, warm-up and median."""
    import torch

    from assistant_forge.training import fast

    params = [p for p in model.parameters() if p.requires_grad]
    # bitsandbytes' AdamW default weight decay is 1e-2; the on-device swap keeps it.
    opt = fast.make_optimizer(model, cfg, params, lr=2e-4, weight_decay=1e-2)
    model.train()
    g = torch.Generator(device="cuda").manual_seed(0)
    times, losses = [], []
    # Time the garbage collector spends in the timed steps (measured: < 0.5 ms a step, so not
    # the source of the step-to-step spread of a CPU-bound step).
    gc_pause = [0.0, 0.0]  # total, start of the current collection

    def on_gc(phase: str, _info: dict) -> None:
        if phase == "start":
            gc_pause[1] = time.perf_counter()
        else:
            gc_pause[0] += time.perf_counter() - gc_pause[1]

    gc.callbacks.append(on_gc)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    # Peaks by phase: step 0 (the plain path: graphs are captured at step 1), step 1, the timed steps.
    phase_peaks: list[int] = []
    warmup: list[float] = []  # step 0 compiles the layers, step 1 captures the graphs
    for step in range(steps + 2):
        ids = torch.randint(0, vocab, (1, seq), device="cuda", generator=g)
        torch.cuda.synchronize()
        t0 = time.time()
        loss = one_step(model, opt, params, ids)
        torch.cuda.synchronize()
        if step == 1:
            gc_pause[0] = 0.0  # count only the timed steps
        (times if step >= 2 else warmup).append(time.time() - t0)
        if step < 2:
            phase_peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        losses.append(loss.item())
        del loss
    phase_peaks.append(torch.cuda.max_memory_allocated())
    gc.callbacks.remove(on_gc)
    # CUDA graphs replay in a private pool that torch's allocated figure does not see while they
    # run: from the capture step on, the peak counts that pool on top (for the capture step an
    # upper bound, as its allocations from the pool were counted too).
    plan = fast.graph_plan(model)
    pool = fast.graph_pool_bytes(model)
    peak = max(phase_peaks[0], phase_peaks[1] + pool, phase_peaks[2] + pool)
    res = {
        "step_s_median": round(statistics.median(sorted(times)), 4),
        "step_s_spread": round(max(times) - min(times), 4),
        "gc_s_per_step": round(gc_pause[0] / len(times), 4),
        "step_times": [round(t, 3) for t in times],
        "warmup_step_s": [round(t, 1) for t in warmup],
        "tokens_per_s": round(seq / statistics.median(times), 1),
        "peak_alloc_gib": round(peak / GIB, 3),
        "peak_phases_gib": [round(p / GIB, 3) for p in phase_peaks],
        "graph_pool_gib": round(pool / GIB, 3),
        "graphs": None if plan is None else {"captured": plan.captured, "failed": plan.failed},
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
        "loss": round(losses[-1], 4),
        "loss_first": round(losses[0], 5),
    }
    if profile is not None:
        res["profile"] = profile_steps(model, opt, params, vocab, seq, profile)
    del opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return res


def one_step(model: Any, opt: Any, params: Any, ids: Any, on_grads: Any = None) -> Any:
    """The peer's step: forward with labels = ids, backward, clip to 1.0, update. Returns the loss.
    on_grads(params), when given, sees the gradients before clipping."""
    import torch

    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    if on_grads is not None:
        on_grads(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()


def profile_steps(model: Any, opt: Any, params: Any, vocab: int, seq: int, path: Path) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator(device="cuda").manual_seed(1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            one_step(model, opt, params, torch.randint(0, vocab, (1, seq), device="cuda", generator=g))
        torch.cuda.synchronize()
    avg = prof.key_averages()
    table = avg.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
    table += "\n" + avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    path.write_text(table)
    return path.name


def run_forge(
    out: Path,
    shape: str,
    ckpt: str,
    seqs: list[int],
    steps: dict[int, int],
    peers: dict[tuple[int, float], dict[str, Any]],
    dropouts: list[float],
    do_profile: bool,
    compiled: bool = True,
    only: list[str] | None = None,
    rounds: int = 1,
) -> None:
    import torch

    from assistant_forge.core import memory as mem
    from assistant_forge.training import fast

    vocab = SHAPES[shape]["vocab_size"]
    g = torch.Generator(device="cuda").manual_seed(0)
    ref_ids = torch.randint(0, vocab, (1, min(seqs)), device="cuda", generator=g)
    cfg = forge_config(ckpt, min(seqs), dropouts[0], compiled)
    mode = "compiled" if compiled else "eager"
    torch.cuda.reset_peak_memory_stats()
    model, info = build_forge(cfg, ref_ids)
    rep = fast.report(model)
    emit(
        out,
        {
            "side": "forge",
            "shape": shape,
            "event": "built",
            "mode": mode,
            **info,
            "speed": rep.as_dict(),
            "static_alloc_gib": round(torch.cuda.memory_allocated() / GIB, 3),
        },
    )
    for seq in seqs:
        seq_drops = [d for d in dropouts if (seq, d) in peers] or dropouts
        for dropout in seq_drops:
            peer = peers.get((seq, dropout), {})
            peer_peak = peer.get("peak_alloc_gib")
            cfg = forge_config(ckpt, seq, dropout, compiled)
            variants: list[tuple[str, dict[str, Any]]] = []
            if peer_peak:
                variants.append(("auto@peer", {"budget_bytes": int(peer_peak * GIB)}))
            variants += [
                ("all", {"policy": "all"}),
                ("all+devopt", {"policy": "all", "optimizer_on_device": True}),
                ("offload", {"policy": "offload"}),
                ("auto@gpu", {}),
            ]
            variants += [  # the same plans without CUDA graphs, same process
                ("all+devopt-nograph", {"policy": "all", "optimizer_on_device": True, "graphs": False}),
                ("all-nograph", {"policy": "all", "graphs": False}),
            ]
            if peer_peak:  # last: the fitted plan with one fused op per projection (no groups)
                variants.append(
                    ("auto@peer-nograph", {"budget_bytes": int(peer_peak * GIB), "graphs": False})
                )
                variants.append(("auto@peer-1by1", {"budget_bytes": int(peer_peak * GIB), "group": False}))
            # ckptN: N layers checkpointed (graphed), optimizer on the device.
            variants += [
                (n, {"checkpointed_layers": int(n[4:]), "optimizer_on_device": True})
                for n in only or []
                if n.startswith("ckpt") and n[4:].isdigit()
            ]
            if only:
                variants = [v for v in variants if v[0] in only]
                variants.sort(key=lambda v: only.index(v[0]))
            if dropout != seq_drops[0]:
                variants = variants[:1]
            # Later rounds repeat every variant on the warm process (the first variant after a
            # build has measured up to 20% slower than the same plan run later).
            variants += [(f"{n} r{k}", dict(kw)) for k in range(2, rounds + 1) for n, kw in variants]
            for name, kw in variants:
                policy = kw.pop("policy", "auto")
                cfg.train.checkpoint_policy = policy
                rec: dict[str, Any] = {
                    "side": "forge",
                    "shape": shape,
                    "seq": seq,
                    "dropout": dropout,
                    "variant": f"{name} {mode}",
                }
                norm = kw.pop("norm", None)
                group = kw.pop("group", True)
                try:
                    reset_adapters(model, dropout)
                    if not group:
                        fast.patch_lora_layers(model, group=False)
                    if norm:
                        fast.set_rms_norm_impl(model, norm)
                    est = fast.configure_checkpointing(model, cfg, seq_len=seq, **kw)
                    prof = out / f"profile_{shape}_{seq}.txt" if do_profile and name == "auto@peer" else None
                    rec.update(train_steps(model, cfg, vocab, seq, steps[seq], prof))
                    rec.update(
                        plan=f"{rep.checkpointed_layers}/{rep.num_layers}"
                        + (" offload" if rep.offload else "")
                        + (" devopt" if rep.optimizer_on_device else "")
                        + (" absmax" if rep.absmax_cache_gib else "")
                        + (f" graphs {rep.graphed_layers}" if rep.graphed_layers else ""),
                        estimate_gib=round(est.total_gib, 3) if est else None,
                        estimate=est.breakdown_gib() if est else None,
                    )
                    if peer.get("tokens_per_s"):
                        rec["x_peer"] = round(rec["tokens_per_s"] / peer["tokens_per_s"], 3)
                        rec["mem_vs_peer"] = round(rec["peak_alloc_gib"] / peer["peak_alloc_gib"], 3)
                        rec["peer_loss"] = peer.get("loss")
                except Exception as e:  # keep the other variants' numbers
                    import traceback

                    traceback.print_exc()
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    gc.collect()
                    torch.cuda.empty_cache()
                if norm:
                    fast.set_rms_norm_impl(model, "liger")
                if not group:
                    fast.patch_lora_layers(model)
                emit(out, rec)
    # How good the estimate is at other plans of the same model is in the records above.
    _ = mem
    del model, rep
    if compiled:
        # Compiled graphs belong to this model; drop them before the next build.
        torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    emit(
        out,
        {
            "side": "forge",
            "shape": shape,
            "event": "freed",
            "mode": mode,
            "left_alloc_gib": round(torch.cuda.memory_allocated() / GIB, 3),
        },
    )


def _graph_check_pair(
    out: Path, model: Any, cfg: Any, ids_all: Any, dropout: float, offload: bool, steps: int, seq: int
) -> bool:
    import torch

    from assistant_forge.training import fast

    runs: dict[bool, dict[str, Any]] = {}
    for graphs in (False, True):
        reset_adapters(model, dropout)
        cfg.train.checkpoint_policy = "all"
        fast.configure_checkpointing(
            model, cfg, seq_len=seq, optimizer_on_device=True, offload=offload, graphs=graphs
        )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = fast.make_optimizer(model, cfg, params, lr=2e-4, weight_decay=1e-2)
        torch.manual_seed(1)
        torch.cuda.manual_seed(1)
        model.train()
        # one_step drops the step's output before the next forward: a live autograd graph
        # would hold nodes tied to the default stream, and the backward capture fails on them.
        losses: list[float] = []
        grads: list[Any] = []

        def keep_grads(ps: Any, into: list[Any] = grads) -> None:
            into.append(torch.cat([p.grad.reshape(-1).float() for p in ps]))

        for k in range(steps):
            last = k == steps - 1
            losses.append(one_step(model, opt, params, ids_all[k], keep_grads if last else None).item())
        plan = fast.graph_plan(model)
        runs[graphs] = {
            "losses": losses,
            "grads": grads[0],
            "graphed": fast.report(model).graphed_layers,
            "captured": plan.captured if plan else 0,
            "failed": plan.failed if plan else None,
            "offloaded": bool(plan and plan.offload),
        }
        del opt, params
    a, b = runs[False], runs[True]
    loss_diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    grad_rel = ((a["grads"] - b["grads"]).norm() / a["grads"].norm()).item()
    passed = b["captured"] > 0 and b["failed"] is None and loss_diff < 1e-3 and grad_rel < 1e-2
    passed = passed and b["offloaded"] == offload
    emit(
        out,
        {
            "check": "cuda_graphs",
            "dropout": dropout,
            "offload": offload,
            "seq": seq,
            "losses_plain": [round(x, 5) for x in a["losses"]],
            "losses_graphs": [round(x, 5) for x in b["losses"]],
            "max_loss_diff": loss_diff,
            "last_grad_rel_diff": grad_rel,
            "graphed_layers": b["graphed"],
            "captured": b["captured"],
            "failed": b["failed"],
            "ok": passed,
        },
    )
    return passed


def graph_check(out: Path, steps: int = 6, seq: int = 1024) -> bool:
    """CUDA-graphed checkpointed layers against the same plan without graphs, inputs kept on the
    device and offloaded to the host: same adapters, ids and seeds, so the losses of every step and
    the gradients of the last (graphs captured at step 2, replayed after) must agree; with dropout
    0.1 that also checks that the backward replay recomputes the forward's dropout masks (other
    masks would move the gradients by far more)."""
    import torch

    ckpt = make_checkpoint("tiny")
    vocab = SHAPES["tiny"]["vocab_size"]
    ids_all = torch.randint(
        0, vocab, (steps, 1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    ok = True
    for dropout in (0.0, 0.1):
        cfg = forge_config(ckpt, seq, dropout)
        model, _info = build_forge(cfg, ids_all[0])
        for offload in (False, True):  # inputs kept on the device, or copied to the host and back
            ok &= _graph_check_pair(out, model, cfg, ids_all, dropout, offload, steps, seq)
        del model
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    return ok


# --------------------------------------------------------------------------------------------
# Kernel checks (float64 references), CPU or GPU
# --------------------------------------------------------------------------------------------


def make_base(din: int, dout: int, quant: bool, dev: str) -> Any:
    """A bf16 linear, or the same weights as a bitsandbytes NF4 (double-quant) linear."""
    import torch

    lin = torch.nn.Linear(din, dout, bias=False, dtype=torch.bfloat16, device=dev)
    if not quant:
        return lin
    import bitsandbytes as bnb

    base = bnb.nn.Linear4bit(
        din, dout, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    base.weight = bnb.nn.Params4bit(
        lin.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    return base.to(dev)


def check_nf4_kernel() -> dict[str, Any]:
    """forge's NF4 dequantize kernel against bitsandbytes' on the GPU: the same bits for a 7B's
    weight shapes (and an odd one), and both kernels' speed on a 7B MLP weight."""
    import torch

    from assistant_forge.training.fast import dequant as dq

    dq.NF4_KERNEL = True  # checked even where FORGE_NF4_KERNEL=0 turned it off
    same = True
    for dout, din in ((4096, 4096), (11008, 4096), (4096, 11008), (96, 200)):
        base = make_base(din, dout, True, "cuda")
        w, absmax, blocksize, quant_type, shape = dq.weight_args(base)
        ref = torch.ops.bitsandbytes.dequantize_4bit.default(
            w, absmax, blocksize, quant_type, shape, torch.bfloat16
        )
        same &= torch.equal(dq.dequant(w, absmax, blocksize, quant_type, shape, torch.bfloat16), ref)
        rows = dq.dequant_rows(
            [w, w], [absmax, absmax], blocksize, quant_type, [dout, dout], din, torch.bfloat16
        )
        same &= torch.equal(rows, torch.cat([ref, ref]))
    base = make_base(4096, 11008, True, "cuda")
    w, absmax, blocksize, quant_type, shape = dq.weight_args(base)
    timing = {}
    for name, fn in (
        (
            "bitsandbytes",
            lambda: torch.ops.bitsandbytes.dequantize_4bit.default(
                w, absmax, blocksize, quant_type, shape, torch.bfloat16
            ),
        ),
        ("forge", lambda: dq.dequant(w, absmax, blocksize, quant_type, shape, torch.bfloat16)),
    ):
        us = _cuda_us(fn, warm=5, timed=100)
        # bytes moved: the 4-bit codes read, the bf16 weight written
        timing[name] = {"us": round(us, 1), "tb_per_s": round(w.numel() * 5 / us / 1e6, 2)}
    return {"check": "nf4_dequant", "ok": bool(same), "same_bits": bool(same), **timing}


def _cuda_us(fn: Any, warm: int = 3, timed: int = 20) -> float:
    """Microseconds a call of fn takes on the GPU (`warm` calls first, then the mean of `timed`)."""
    import torch

    for _ in range(warm):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(timed):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1000 / timed, 1)


def _dropped_grad_row(n: int, k: int) -> dict[str, Any]:
    import torch

    from assistant_forge.training.fast import dropout as dr

    torch.manual_seed(5)
    t, r = 2048, 64
    gxa = torch.randn(t, n * r, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(n * r, k, device="cuda", dtype=torch.bfloat16) * 0.02
    gx = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    keep = dr.group_dropout(torch.randn(t, k, device="cuda", dtype=torch.bfloat16), n, 0.1)[1]

    def torch_ops(into: Any) -> None:
        gxd = torch.bmm(gxa.view(t, n, -1).transpose(0, 1), a.view(n, -1, k))
        into.add_(torch.ops.aten.native_dropout_backward(gxd, keep, 1 / 0.9).sum(0))

    ref = gx.double() + sum(
        (gxa[:, i * r : (i + 1) * r].double() @ a[i * r : (i + 1) * r].double()) * keep[i] / 0.9
        for i in range(n)
    )
    got, old, scratch = gx.clone(), gx.clone(), gx.clone()
    dr.add_dropped_grad_(got, gxa, a, keep, 0.1)
    torch_ops(old)
    return {
        "group": n,
        "in": k,
        "rel_err": float((got.double() - ref).norm() / ref.norm()),
        "rel_err_torch": float((old.double() - ref).norm() / ref.norm()),
        "us_kernel": _cuda_us(lambda: dr.add_dropped_grad_(scratch, gxa, a, keep, 0.1)),
        "us_torch": _cuda_us(lambda: torch_ops(scratch)),
    }


def check_dropped_grad() -> dict[str, Any]:
    """The gradient into x through the LoRA dropout masks (fast.dropout.add_dropped_grad_) against
    torch's ops it replaced (batched matmul, dropout backward, sum, add), at a 7B's 2048-token
    micro-batch and r 64: the same result to bf16 rounding, and both timed."""
    rows = [_dropped_grad_row(n, k) for n, k in ((3, 4096), (2, 4096), (1, 4096), (1, 11008))]
    ok = all(row["rel_err"] <= max(1.5 * row["rel_err_torch"], 1e-3) for row in rows)
    return {"check": "dropped_grad", "ok": ok, "rows": rows}


def check_host_embedding() -> dict[str, Any]:
    """The input embedding read in place from pinned host memory (fast.host_embedding, offloaded
    plans): the same rows as the device table's, and both lookups timed for one 2048-token row of a
    7B with vocab 49152 (in training it runs once a micro-batch, beside ~0.2 s of layers)."""
    import torch
    import torch.nn.functional as F

    from assistant_forge.training.fast.host_embedding import device_view

    table = torch.randn(49152, 4096, device="cuda", dtype=torch.bfloat16)
    host = table.cpu().pin_memory()
    view = device_view(host, table.device)
    ids = torch.randint(0, 49152, (1, 2048), device="cuda")
    same = torch.equal(F.embedding(ids, view), F.embedding(ids, table))
    before = torch.cuda.memory_allocated()
    view2 = device_view(host, table.device)
    return {
        "check": "host_embedding",
        "ok": bool(same) and torch.cuda.memory_allocated() == before and view2.is_cuda,
        "same_rows": bool(same),
        "us_device_table": _cuda_us(lambda: F.embedding(ids, table)),
        "us_host_table": _cuda_us(lambda: F.embedding(ids, view)),
    }


def check(out: Path | None) -> bool:
    import torch

    from assistant_forge.training import fast
    from assistant_forge.training.fast.dropout import group_dropout

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    results = []
    if dev == "cuda":
        results.append(check_nf4_kernel())
        ok &= results[-1]["ok"]
        results.append(check_dropped_grad())
        ok &= results[-1]["ok"]
        results.append(check_host_embedding())
        ok &= results[-1]["ok"]
    for n in (1, 2, 3):
        # The group's masks: each keeps 1 - p, independent of its siblings, redrawn alike from one
        # generator state (what recomputes and graph replays rely on), and the kept inputs scaled.
        x = torch.randn(2048, 4096, device=dev, dtype=torch.bfloat16)
        torch.manual_seed(3)
        xd, keep = group_dropout(x, n, 0.1)
        torch.manual_seed(3)
        xd2, keep2 = group_dropout(x, n, 0.1)
        rates = [float(keep[i].float().mean()) for i in range(n)]
        both = [float((~keep[i] & ~keep[j]).float().mean()) for i in range(n) for j in range(i + 1, n)]
        scaled = torch.where(keep, x.float() / 0.9, 0.0)  # to rounding: CPU's dropout rounds twice
        good = (
            all(abs(r - 0.9) < 2e-3 for r in rates)
            and all(abs(b - 0.01) < 1e-3 for b in both)
            and torch.equal(keep, keep2)
            and torch.equal(xd, xd2)
            and torch.allclose(xd.float(), scaled, rtol=8e-3, atol=0)
            and not torch.equal(keep, group_dropout(x, n, 0.1)[1])
        )
        ok &= good
        results.append(
            {"check": "group_dropout", "group": n, "ok": good, "keep_rates": rates, "both_dropped": both}
        )

    def rel(a: Any, b: Any) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    for quant in [False, True] if dev == "cuda" else [False]:
        for n, p in ((1, 0.0), (1, 0.1), (3, 0.0), (3, 0.1)):
            # n = 3: a q/k/v-like group (rows dout, dout/2, dout/2), run as one op.
            torch.manual_seed(1)
            din, dout, r, m_tok = (1024, 768, 64, 777) if dev == "cuda" else (256, 192, 16, 99)
            outs = [dout] if n == 1 else [dout, dout // 2, dout // 2]
            bases = [make_base(din, o, quant, dev) for o in outs]
            w_dense = torch.cat([fast.dense_weight(base, torch.bfloat16).double() for base in bases])
            x = torch.randn(2, m_tok, din, device=dev, dtype=torch.bfloat16, requires_grad=True)
            a = (torch.randn(n * r, din, device=dev) * 0.05).requires_grad_(True)
            bs = [(torch.randn(o, r, device=dev) * 0.05).requires_grad_(True) for o in outs]
            torch.manual_seed(7)
            y = fast.lora_linear(x, bases if n > 1 else bases[0], a, torch.block_diag(*bs), 0.25, p)
            gy = torch.randn_like(y)
            gx, ga, *gbs = torch.autograd.grad(y, (x, a, *bs), gy)
            # The masks the op drew: the same call under the same seed (its RNG use is the op's).
            torch.manual_seed(7)
            x2 = x.detach().reshape(-1, din)
            keep = (
                group_dropout(x2, n, p)[1]
                if p > 0
                else torch.ones((n, *x2.shape), dtype=torch.bool, device=dev)
            )
            xr, ar, *brs = (t.detach().double().requires_grad_(True) for t in (x, a, *bs))
            xd = xr.reshape(-1, din) * keep / (1 - p)  # (n, tokens, in)
            lora = torch.cat([xd[i] @ ar[i * r : (i + 1) * r].t() @ brs[i].t() for i in range(n)], dim=-1)
            yr = (xr.reshape(-1, din) @ w_dense.t() + 0.25 * lora).reshape(y.shape)
            rx, ra, *rbs = torch.autograd.grad(yr, (xr, ar, *brs), gy.double())
            errs = {"y": rel(y, yr), "gx": rel(gx, rx), "gA": rel(ga, ra)}
            errs["gB"] = max(rel(g, rg) for g, rg in zip(gbs, rbs))
            good = all(e < 1.5e-2 for e in errs.values())
            ok &= good
            results.append(
                {"check": "lora_linear", "quant": quant, "group": n, "dropout": p, "ok": good, **errs}
            )
    for denom in (None, 333):
        torch.manual_seed(2)
        n_tok, vocab = (1500, 50000) if dev == "cuda" else (150, 5000)
        h = torch.randn(1, n_tok, 512, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(vocab, 512, device=dev, dtype=torch.bfloat16) * 0.05
        labels = torch.randint(0, vocab, (1, n_tok), device=dev)
        labels[0, :100] = -100
        loss = fast.fused_linear_cross_entropy(h, w, labels, num_items_in_batch=denom)
        (gh,) = torch.autograd.grad(loss, h)
        hr = h.detach().double().requires_grad_(True)
        logits = (h.detach() @ w.t()).double()  # bf16-rounded logits, as transformers computes them
        logits = logits + (hr - hr.detach()) @ w.double().t()
        sl = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
        lr = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), sl, ignore_index=-100, reduction="mean" if denom is None else "sum"
        )
        lr = lr if denom is None else lr / denom
        (grr,) = torch.autograd.grad(lr, hr)
        errs = {"loss_abs": abs(loss.item() - lr.item()), "gh": rel(gh, grr)}
        good = errs["loss_abs"] < 1e-4 and errs["gh"] < 1.5e-2
        ok &= good
        results.append({"check": "fused_ce", "denom": denom, "ok": good, **errs})
    if dev == "cuda":  # flash attention's varlen kernel against SDPA per sample (7B's heads, 1.5B's GQA)
        from assistant_forge.training.fast import attention

        for heads, kv in ((32, 32), (12, 2)):
            why = attention.self_test(torch.device(dev), heads, kv, 128, torch.bfloat16)
            ok &= why is None
            results.append(
                {"check": "varlen_attention", "heads": heads, "kv_heads": kv, "ok": why is None, "why": why}
            )
    for r in results:
        log(json.dumps(r))
        if out is not None:
            emit(out, {"side": "check", **r})
    return ok


# --------------------------------------------------------------------------------------------


def table(out: Path) -> str:
    rows = [json.loads(x) for x in (out / "gpu_train.jsonl").read_text().splitlines()]
    lines = [
        "| shape | seq | side/variant | drop | tok/s | x peer | peak alloc GiB | reserved GiB | est GiB | plan | loss (peer) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("side") not in ("peer", "forge") or r.get("event"):
            continue
        if "error" in r:
            lines.append(
                f"| {r.get('shape')} | {r.get('seq')} | {r['side']} {r.get('variant', '')} | "
                f"{r.get('dropout')} | error: {r['error'][:80]} |"
            )
            continue
        name = (
            ("peer (after)" if r.get("after") else "peer") if r["side"] == "peer" else f"forge {r['variant']}"
        )
        lines.append(
            f"| {r['shape']} | {r['seq']} | {name} | {r['dropout']} | {r['tokens_per_s']:.0f} | "
            f"{r.get('x_peer', 1.0):.2f} | {r['peak_alloc_gib']:.2f} | {r['peak_reserved_gib']:.2f} | "
            f"{r.get('estimate_gib') or ''} | {r.get('plan', '')} | {r['loss']}"
            + (f" ({r['peer_loss']})" if r.get("peer_loss") is not None else "")
            + " |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--shapes", default="1.5b,7b")
    ap.add_argument("--seqs", default="2048,8192")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--steps-long", type=int, default=5, help="timed steps at seq >= 8192")
    ap.add_argument("--dropouts", default="0.1,0.0", help="first: every variant; others: auto@peer only")
    ap.add_argument("--peer-dropouts", default="0.1,0.0", help="peer settings run at the shortest seq")
    ap.add_argument("--long-seqs-shapes", default="7b", help="shapes that also run the longer seqs")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--modes", default="compiled,eager", help="forge layers: compiled and/or eager")
    ap.add_argument("--eager-variants", default="all+devopt", help="plans run with eager layers")
    ap.add_argument("--compiled-variants", default="", help="plans run with compiled layers (default: all)")
    ap.add_argument(
        "--check", action="store_true", help="only the kernel checks (with --graph-check-only: both)"
    )
    ap.add_argument("--graph-check", action="store_true", help="CUDA graphs against the plain path first")
    ap.add_argument("--graph-check-only", action="store_true", help="only the CUDA graph check")
    ap.add_argument("--rounds", type=int, default=1, help="run the variant list this many times")
    ap.add_argument("--peer-after", action="store_true", help="run the first peer setting again at the end")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    checked = True
    if a.check:
        checked = check(None)
        if not a.graph_check_only:
            return 0 if checked else 1
    import torch

    log(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    if a.graph_check_only:  # after --check's kernel checks when both are given
        return 0 if graph_check(out) and checked else 1
    check(out)
    if a.graph_check and not graph_check(out):
        log("CUDA graph check FAILED")
    seqs = [int(s) for s in a.seqs.split(",")]
    dropouts = [float(d) for d in a.dropouts.split(",")]
    peer_drops = [float(d) for d in a.peer_dropouts.split(",")]
    for shape in a.shapes.split(","):
        ckpt = make_checkpoint(shape)
        shape_seqs = seqs if shape in a.long_seqs_shapes.split(",") else seqs[:1]
        steps = {s: (a.steps_long if s >= 8192 else a.steps) for s in shape_seqs}
        peers: dict[tuple[int, float], dict[str, Any]] = {}
        for seq in shape_seqs:
            # At the longer seqs only the last peer dropout (0.0, as the shared README measured).
            for d in peer_drops if seq == shape_seqs[0] else peer_drops[-1:]:
                res = run_peer(out, shape, ckpt, seq, steps[seq], d)
                emit(out, res)
                if "tokens_per_s" in res:
                    peers[(seq, d)] = res
        for mode in a.modes.split(","):
            chosen = a.compiled_variants if mode == "compiled" else a.eager_variants
            only = chosen.split(",") if chosen else None
            run_forge(
                out,
                shape,
                ckpt,
                shape_seqs,
                steps,
                peers,
                dropouts,
                a.profile,
                mode == "compiled",
                only,
                a.rounds,
            )
        if a.peer_after and (shape_seqs[0], peer_drops[0]) in peers:
            # The lent machines drift (the same forge plan spans +-13% within one launch): the
            # peer again after forge brackets the ratios.
            res = run_peer(out, shape, ckpt, shape_seqs[0], steps[shape_seqs[0]], peer_drops[0])
            emit(out, {**res, "after": True})
    log(table(out))
    (out / "table.md").write_text(table(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
