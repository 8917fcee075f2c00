"""forge's GPU fast path (training/fast/), run on the CPU with `force=True`: a tiny random Llama,
4-bit through bitsandbytes' CPU kernels, LoRA with dropout. What is checked is the math and the
plumbing (fused LoRA, fused loss, checkpoint plan, compiled layers), not the speed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from assistant_forge.core.config import ForgeConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A 2-layer decoder with grouped-query attention (k/v narrower than q).
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    return path


def build(
    path: Path, *, method: str = "qlora", dropout: float = 0.1, fast: bool, compile_layers: bool = False
):
    from assistant_forge.training import fast, modeling

    cfg = ForgeConfig()
    cfg.model.path = str(path)
    cfg.model.attn_implementation = "sdpa"
    cfg.lora.method, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = method, 8, 16, dropout
    cfg.lora.target_modules = list(TARGETS)
    cfg.train.compile_layers = compile_layers
    torch.manual_seed(0)  # same LoRA A init in every build
    model = modeling.load_base(cfg, "cpu", torch.float32)
    if fast:
        model = fast.apply_speedups(model, cfg, force=True, liger=False)
    model = modeling.wrap_for_training(model, cfg)
    if fast:
        model = fast.after_peft(model, cfg, force=True)
        fast.configure_checkpointing(model, cfg, checkpointed_layers=1)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so the adapter's path shows in the loss
            p.data.normal_(0, 0.02)
    model.train()
    return model


def loss_and_grads(model, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)  # dropout masks
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.item(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_fast_path_matches_peft_without_dropout(tiny_llama: Path) -> None:
    """Fused LoRA + fused loss + forge's checkpoint == PEFT's plain path (dropout 0: same math)."""
    ref_loss, ref = loss_and_grads(build(tiny_llama, dropout=0.0, fast=False))
    loss, got = loss_and_grads(build(tiny_llama, dropout=0.0, fast=True))
    assert abs(loss - ref_loss) < 1e-5
    assert set(got) == set(ref) and len(got) == 2 * 7 * 2
    assert max(rel_err(got[n], ref[n]) for n in ref) < 1e-4


def test_checkpoint_plan_recomputes_only_the_planned_layers(tiny_llama: Path) -> None:
    from assistant_forge.training import fast

    model = build(tiny_llama, fast=True)
    layers = fast.decoder_layers(model)
    calls = [0, 0]
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    loss_and_grads(model)
    assert calls == [2, 1]  # layer 0 runs again in backward, layer 1 keeps its activations
    assert fast.report(model).checkpointed_layers == 1
    # Without grad (generation during training) nothing is checkpointed or recomputed.
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert calls == [3, 2]


def fused_calls(model) -> tuple[int, float, dict[str, torch.Tensor]]:
    """How many fused LoRA ops one training step runs (torch.profiler's count), its loss and grads."""
    with torch.profiler.profile() as prof:
        loss, grads = loss_and_grads(model)
    calls = sum(e.count for e in prof.key_averages() if e.key == "_LoraLinear")
    return calls, loss, grads


def test_generation_takes_pefts_forward_and_training_the_fused_op(tiny_llama: Path) -> None:
    """In eval mode (replay and sample answers) LoRA layers run PEFT's forward, whose 4-bit
    inference kernel suits a few tokens at a time; back in training mode the fused op runs again."""
    model = build(tiny_llama, dropout=0.0, fast=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    model.eval()
    with torch.no_grad(), torch.profiler.profile() as prof:
        generating = model(input_ids=ids).logits
    assert not any(e.key == "_LoraLinear" for e in prof.key_averages())
    model.train()
    with torch.no_grad():
        training = model(input_ids=ids).logits
    assert torch.allclose(generating, training, atol=1e-4)  # the same maths either way (no dropout)
    calls, _, _ = fused_calls(model)
    assert calls > 0


def test_sibling_projections_run_as_one_group(tiny_llama: Path) -> None:
    """q/k/v and gate/up read one input and run as one fused op each (4 ops a layer, not 7) with
    the same loss and gradients as one op per projection; no group holds tensors after a step."""
    from assistant_forge.training import fast

    model = build(tiny_llama, dropout=0.0, fast=True)
    attn = fast.decoder_layers(model)[1].self_attn
    outs = {}
    for name in ("q_proj", "v_proj"):
        getattr(attn, name).register_forward_hook(lambda _m, _i, y, name=name: outs.__setitem__(name, y))
    grouped_calls, loss, grouped = fused_calls(model)
    # q is a slice of the group's output block; v (kept by attention for backward) has its own
    # storage, so the block can be freed in a layer that is not checkpointed.
    assert outs["q_proj"]._base is not None and outs["v_proj"]._base is None
    fused = [f for m in model.modules() if (f := m.__dict__.get("_forge_lora")) is not None]
    groups = {id(f.group): f.group for f in fused if f.group is not None}
    assert len(groups) == 2 * 2
    assert all(g.x is None and g.outs is None for g in groups.values())
    fast.patch_lora_layers(model, group=False)
    single_calls, single_loss, single = fused_calls(model)
    # Layer 0 is checkpointed: it runs twice (forward, recompute), layer 1 once.
    assert (grouped_calls, single_calls) == (3 * 4, 3 * 7)
    assert abs(loss - single_loss) < 1e-5
    assert max(rel_err(grouped[n], single[n]) for n in single) < 1e-4


def test_groups_with_biases_match_peft(tmp_path: Path) -> None:
    """Qwen2's q/k/v have biases: the group adds them stacked, same loss and gradients as PEFT."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(**TINY))
    for name, p in qwen.named_parameters():
        if name.endswith("bias"):  # zeros at init: make them count
            p.data.normal_(0, 0.5)
    qwen.save_pretrained(tmp_path / "qwen")
    ref_loss, ref = loss_and_grads(build(tmp_path / "qwen", dropout=0.0, fast=False))
    model = build(tmp_path / "qwen", dropout=0.0, fast=True)
    loss, got = loss_and_grads(model)
    assert sum(f.group is not None for m in model.modules() if (f := m.__dict__.get("_forge_lora"))) == 2 * 5
    assert abs(loss - ref_loss) < 1e-5
    assert max(rel_err(got[n], ref[n]) for n in ref) < 1e-4


def test_grouped_lora_with_dropout_matches_float64(tmp_path: Path) -> None:
    """The kernel checks of bench/gpu_train.py on the CPU: the group's dropout masks (rate,
    independence, redrawn alike from one seed), fused LoRA alone and as a 3-projection group with
    per-projection dropout masks, against a float64 reference (and the fused loss)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "gpu_train.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('"check": "group_dropout"') == 3
    assert proc.stdout.count('"group": 3') == 3 and proc.stdout.count('"ok": true') == 9


def test_dropout_recompute_draws_the_same_masks(tiny_llama: Path) -> None:
    """With dropout, a checkpointed layer's recompute must reuse its forward's masks: the same
    seed gives the same gradients whether layer 0 is checkpointed or not."""
    from assistant_forge.core.config import ForgeConfig as _Cfg
    from assistant_forge.training import fast

    model = build(tiny_llama, fast=True)
    _, ckpt = loss_and_grads(model)
    fast.configure_checkpointing(model, _Cfg(), checkpointed_layers=0)
    _, plain = loss_and_grads(model)
    _, other_seed = loss_and_grads(model, seed=6)
    assert max(rel_err(ckpt[n], plain[n]) for n in plain) < 1e-5
    assert max(rel_err(other_seed[n], plain[n]) for n in plain) > 1e-3  # the masks matter


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layers_match_eager(tiny_llama: Path) -> None:
    """Compiled decoder layers (4-bit LoRA as forge's custom op, dropout, one layer checkpointed)
    give the eager fast path's loss and gradients, and both layers share the compiled graphs."""
    from torch._dynamo.utils import counters

    from assistant_forge.training import fast

    torch._dynamo.reset()
    counters.clear()
    eager_loss, eager = loss_and_grads(build(tiny_llama, fast=True))
    model = build(tiny_llama, fast=True, compile_layers=True)
    assert fast.report(model).compiled_layers == 2
    for _ in range(2):  # the second step runs the cached graphs
        loss, got = loss_and_grads(model)
        assert abs(loss - eager_loss) < 1e-5
        assert max(rel_err(got[n], eager[n]) for n in eager) < 1e-4
    # Graphs are per kind of call, not per layer: the checkpointed forward under no_grad and the
    # training forward, and the final norm's. One compile per layer would make at least 5.
    assert counters["stats"]["unique_graphs"] == 3
    assert "forward" in fast.final_norm(model).__dict__  # the final norm is compiled too


def train_losses(model, optimizer: str, *, clear_model_grads: bool, steps: int = 4) -> list[float]:
    from assistant_forge.training import fast

    cfg = ForgeConfig()
    cfg.train.optimizer = optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fast.make_optimizer(model, cfg, params, lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):  # the same batch: the loss must fall
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if clear_model_grads:
            model.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses


def test_flat_optimizer_leaves_no_stale_gradients(tiny_llama: Path) -> None:
    """bitsandbytes optimizers step one flat buffer (fast.FlatParams): a loop that clears grads
    only through the optimizer must train exactly like one that also clears the model's."""
    from assistant_forge.training import fast

    model = build(tiny_llama, dropout=0.0, fast=True)
    only_opt = train_losses(model, "adamw_8bit", clear_model_grads=False)
    assert fast.report(model)._flat is not None  # the flat path really ran
    assert all(p.grad is None for p in model.parameters())
    both = train_losses(build(tiny_llama, dropout=0.0, fast=True), "adamw_8bit", clear_model_grads=True)
    assert only_opt == both
    assert only_opt[-1] < only_opt[0]


def test_failed_compile_falls_back_to_eager(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No working compiler (here: inductor raising) must not stop training: same loss as eager, and
    the fallback is reported rather than silent."""
    import torch._inductor.compile_fx as compile_fx

    from assistant_forge.training import fast

    def broken(*_a, **_k):
        raise RuntimeError("no C compiler")

    torch._dynamo.reset()
    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    eager_loss, eager = loss_and_grads(build(tiny_llama, fast=True))
    fast.compile_failures()  # nothing left over from other tests
    loss, got = loss_and_grads(build(tiny_llama, fast=True, compile_layers=True))
    assert abs(loss - eager_loss) < 1e-6
    assert max(rel_err(got[n], eager[n]) for n in eager) < 1e-6
    # ... and the give-up is said (the trainer prints it after the step), once.
    reasons = fast.compile_failures()
    assert reasons and "no C compiler" in reasons[-1], reasons
    assert fast.compile_failures() == []
    torch._dynamo.reset()


def test_varlen_attention_plugs_into_the_model_and_keeps_sdpa_off_the_gpu(tiny_llama: Path) -> None:
    """The registered attention takes the boundaries the collator sends through the whole model; on a
    CPU (no flash kernel) it answers as SDPA does, a placeholder mask never reaches SDPA, and the fast
    path leaves the model on SDPA."""
    from transformers import AutoModelForCausalLM

    from assistant_forge.training.data import CU_SEQ_Q, FlatCollator
    from assistant_forge.training.fast import attention, report

    rows = []
    for n in (20, 33, 11):  # one packed row of three samples
        ids = torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        rows.append({"input_ids": ids, "labels": ids, "position_ids": list(range(n))})
    batch = FlatCollator(pad_to=80, pad_id=0, boundaries=5)(
        [{k: sum((r[k] for r in rows), []) for k in rows[0]}]
    )
    assert batch[CU_SEQ_Q].tolist() == [0, 20, 53, 64, 80, 80]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")
    inputs = {k: v for k, v in batch.items() if k != "forge_real_tokens"}
    plain = {k: v for k, v in inputs.items() if not k.startswith(("cu_seq", "max_length"))}
    with torch.no_grad():
        want = model(**plain).loss.item()
        attention.register()
        model.set_attn_implementation(attention.NAME)
        assert model(**inputs).loss.item() == pytest.approx(want, abs=1e-6)
        # On the GPU, calls with boundaries skip transformers' mask: the decoder gets a placeholder,
        # which transformers must pass through to the attention as given (4-D). Here no kernel can
        # serve the call, and the placeholder must not reach SDPA as if it were a mask.
        attention.skip_mask_with_boundaries(model.model, torch.device("cpu"))
        with pytest.raises(RuntimeError, match="carries no real mask"):
            model(**inputs)
        assert model(**plain).loss.item() == pytest.approx(want, abs=1e-6)

    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")
    assert not attention.enable(fresh, packing=True)
    assert fresh.config._attn_implementation == "sdpa"
    assert any("needs a CUDA GPU" in n for n in report(fresh).notes)


def test_a_budget_no_plan_fits_is_said(tiny_llama: Path) -> None:
    """memory_budget_gib below the leanest plan: the leanest runs, and the plan's notes say it does
    not fit (a 7B at a 5.4 GiB budget ran at 5.63 GiB with no word of it)."""
    from assistant_forge.training import fast

    model = build(tiny_llama, fast=True)
    cfg = ForgeConfig()
    est = fast.configure_checkpointing(model, cfg, budget_bytes=1024)
    notes = fast.report(model).notes
    assert est is not None and est.checkpointed_layers == TINY["num_hidden_layers"]
    assert any(n.startswith("no plan fits the 0.0 GiB memory budget") for n in notes), notes
    fast.report(model).notes.clear()
    fast.configure_checkpointing(model, cfg, budget_bytes=64 * 2**30)
    assert not any("no plan fits" in n for n in fast.report(model).notes)


@pytest.mark.parametrize(
    "compiled",
    [
        False,
        pytest.param(
            True, marks=pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile needs g++")
        ),
    ],
)
def test_recompute_leaves_the_down_projection_uncomputed(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """FORGE_DISCARD_RECOMPUTED_OUTPUT: a checkpointed layer's recompute skips the down projection's
    product (only the residual add reads it, and the recompute's output is never read), with the
    same loss and gradients, eager and compiled."""
    from assistant_forge.training.fast import lora, plumbing

    model = build(tiny_llama, fast=True, compile_layers=compiled)
    downs = [m for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    assert len(downs) == 2 and all(m.__dict__["_forge_lora"].discardable for m in downs)
    ref_loss, ref = loss_and_grads(model)
    discards: list[bool] = []
    real = lora._lora_fwd

    def spy(*args, **kwargs):  # the real function, its `discard` argument recorded
        discards.append(bool(args[8]) if len(args) > 8 else kwargs.get("discard", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(lora, "_lora_fwd", spy)
    monkeypatch.setattr(plumbing, "DISCARD_RECOMPUTED_OUTPUT", True)
    loss, got = loss_and_grads(model)
    assert discards.count(True) == 1  # layer 0's down projection, in its recompute only
    assert abs(loss - ref_loss) < 1e-6
    assert set(got) == set(ref) and max(rel_err(got[n], ref[n]) for n in ref) < 1e-6
