"""Measure the peak memory of real training steps of a small Qwen2.5-VL on CPU (run as a subprocess by
tests/test_plan.py): `python tests/plan_measure.py CASE_JSON` prints {"measured_bytes", "dims"...}.

Peak = ru_maxrss after the steps minus the resident size just before the model is built (torch and the
interpreter already loaded). Two optimizer steps of two micro-batches each: the second micro-batch of the
second step runs with weights, gradients, AdamW states and activations all alive, as on a GPU rank with
gradient accumulation. Run it with MALLOC_MMAP_THRESHOLD_=131072 (tests/test_plan.py does): large blocks
are then mmap'd and unmapped when freed, so the peak RSS follows live memory instead of glibc's retained
heap (without it the same case varied by +-30 MB between runs)."""

from __future__ import annotations

import json
import resource
import sys


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so imports and the warm-up cannot set the peak (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak RSS since `reset_peak` (VmHWM), else since the start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(case: dict) -> object:
    from transformers import Qwen2_5_VLConfig

    h, layers = case["hidden"], case["layers"]
    half = h // case["heads"] // 2  # mrope sections (temporal, height, width) sum to head_dim / 2
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=case["vocab"], hidden_size=h, intermediate_size=case["intermediate"],
                         num_hidden_layers=layers, num_attention_heads=case["heads"], num_key_value_heads=2,
                         max_position_embeddings=8192, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8,
                                                            3 * half // 8]}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=h,
                           fullatt_block_indexes=[1]),
        tie_word_embeddings=False)


def steps(model: object, case: dict) -> list:
    import torch

    if case["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case["freeze_vision"]:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    b, s = case["batch"], case["seq"]
    for _ in range(2):
        for _ in range(2):
            ids = torch.randint(0, case["vocab"] - 100, (b, s))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params


def main(case: dict) -> dict:
    import gc

    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    torch.set_num_threads(1)
    # warm-up on a minute model: one-time allocations (kernels' scratch, thread pools) are not the model's
    small = {**case, "hidden": 64, "intermediate": 128, "layers": 1, "heads": 2, "vocab": 512, "batch": 1,
             "seq": 16}
    warm = AutoModelForImageTextToText.from_config(build(small))
    steps(warm, small)
    del warm
    gc.collect()
    dtype = torch.bfloat16 if case["bf16"] else torch.float32
    reset_peak()
    base = rss_bytes()
    model = AutoModelForImageTextToText.from_config(build(case), dtype=dtype)
    model.train()
    params = steps(model, case)
    peak = peak_bytes()
    return {"measured_bytes": peak - base, "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
