"""Training step of the demo model on the CPU in fp32 against bf16 autocast (one torch thread).

    python bench/cpu_bf16_probe.py ~/.cache/assistant_forge/smollm2-135m-instruct

The demo's LoRA (r 16 on every projection of layers 20-29), a random 256-token row, plain transformers +
PEFT (full logits, not forge's labeled loss), six steps per mode, twice each. Prints seconds a step.
A CPU with AMX (bf16 tiles) runs bf16 matmuls several times faster than fp32; one without runs them slower.
"""

from __future__ import annotations

import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(path: str) -> None:
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, layers_to_transform=list(range(20, 30)))
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49000, (1, 256), generator=torch.Generator().manual_seed(0))
    print("cpu capability", torch.backends.cpu.get_cpu_capability())
    for mode in ("fp32", "bf16", "fp32", "bf16"):
        times = []
        for _ in range(6):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        print(f"{mode}: {sorted(times)[3]:.3f} s a step (median of 6: {[round(x, 3) for x in times]})")


if __name__ == "__main__":
    main(sys.argv[1])
