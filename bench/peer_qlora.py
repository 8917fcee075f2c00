# Copied unchanged from shared/bench/peer_qlora.py (the shared peer baseline) so it travels with the working tree.
"""Peer baseline: the plain Transformers + PEFT + bitsandbytes QLoRA step that
XTuner, LLaMA-Factory and TRL all build on, measured on a Llama-2-7B-shaped model
with random weights (speed and memory do not depend on weight values).

Usage (on a GPU): python3 bench/peer_qlora.py --out DIR [--layers 32] [--seq 2048]
Prints one JSON line per variant: tokens/s and peak allocated GiB.
"""
import argparse, json, os, time, gc, sys, tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--layers", type=int, default=32)
p.add_argument("--seq", type=int, default=2048)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--variants", default="qlora,lora_bf16,qlora_liger")
p.add_argument("--vocab", type=int, default=32000)
p.add_argument("--dropout", type=float, default=0.1)
p.add_argument("--tokenizer", help="tokenizer folder saved beside the checkpoint (tools that need one)")
p.add_argument("--ckpt", default=None)
a = p.parse_args()

ckpt = a.ckpt or os.path.join(tempfile.gettempdir(), f"llama7b_random_v{a.vocab}_l{a.layers}")
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=a.layers,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=a.vocab,
                  max_position_embeddings=4096)
if not os.path.exists(os.path.join(ckpt, "config.json")):
    t = time.time()
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(ckpt, max_shard_size="5GB")
    if a.tokenizer:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(a.tokenizer).save_pretrained(ckpt)
    del m; gc.collect(); torch.cuda.empty_cache()
    print(json.dumps({"made_checkpoint_s": round(time.time() - t, 1)}), flush=True)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(variant):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    if variant.startswith("qlora"):
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if variant.endswith("liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map={"": 0}, **kw)
    load_s = time.time() - t
    if variant.startswith("qlora"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=a.dropout,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    params = [q for q in model.parameters() if q.requires_grad]
    try:
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    except Exception:
        opt = torch.optim.AdamW(params, lr=2e-4)
    model.train()
    g = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for step in range(a.steps + 2):
        ids = torch.randint(0, cfg.vocab_size, (1, a.seq), device="cuda", generator=g)
        torch.cuda.synchronize(); t0 = time.time()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.time() - t0)
    times.sort()
    med = times[len(times) // 2]
    res = {"variant": variant, "dropout": a.dropout, "vocab": a.vocab, "layers": a.layers, "seq": a.seq, "load_s": round(load_s, 1),
           "step_s_median": round(med, 3), "tokens_per_s": round(a.seq / med, 1),
           "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
           "loss": round(out.loss.item(), 3), "gpu": torch.cuda.get_device_name()}
    print(json.dumps(res), flush=True)
    with open(os.path.join(a.out, "peer_qlora.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")
    del model, opt, params, out; gc.collect(); torch.cuda.empty_cache()


for v in a.variants.split(","):
    try:
        run(v)
    except Exception as e:
        import traceback; traceback.print_exc()
        print(json.dumps({"variant": v, "error": repr(e)[:300]}), flush=True)
