"""GPU smoke check: a Qwen2.5-VL with the real 7B dimensions and random bf16 weights (built from a config, no
download) through one SFT step, one GRPO step and eval on 4 items; peak memory and tokens/s per stage go to
DIR/smoke.json.

    python tests/gpu/smoke.py --out DIR                      # CUDA machine, 7B dims (< 8 min on one GPU)
    python tests/gpu/smoke.py --out DIR --tiny --device cpu  # the same code on CPU (tests/test_gpu_smoke.py)

Needs torch, transformers, accelerate, numpy, pillow + trl, datasets, rasterio (the wheel folder of
tests/gpu/build_wheels.sh carries what a bare CUDA machine lacks). Everything is offline: the tokenizer is
the project's tiny one (its ids index the 152k-row embedding; only the sizes matter here), the images are
toy GeoTIFF scenes read through the real zoom tool (rasterio windows).

- SFT: one optimizer step of TRL's SFTTrainer as `knowzoom sft` builds it (sft.stage's trainer class and
  TrainingArguments, sft.masks' collator), on oracle zoom trajectories (1 zoom) made by the real tool;
  vision tower and projector frozen as in the 7B recipe, gradient checkpointing, bf16.
- GRPO: 2 rollouts of one prompt with transformers generation: a zoom_in call (the oracle box, executed by
  the real tool, so the episode has its tool image) then a sampled answer turn; rewards by rl.verifier;
  the GRPO loss (group-normalised advantage x token log-probabilities, assistant tokens only, as
  TRL's `grpo` loss on-policy with beta 0) backpropagated and one AdamW step. A random model's rewards tie,
  so tied advantages are replaced by +1/-1 to carry a non-zero gradient.
- eval: 4 items, greedy, batched generation; accuracy by rl.verifier (meaningless for random weights).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fixtures package
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FULL_PIXELS = 1003520  # 1280*28*28, the recipe's image budget
TINY_PIXELS = 50176


def _memory(device: str) -> dict[str, float]:
    import torch

    if device.startswith("cuda"):
        return {"peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2)}
    return {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}


def _reset(device: str) -> None:
    import torch

    gc.collect()  # the previous stage's optimizer states go before this stage's peak is measured
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(tiny: bool, device: str, processor: Any) -> tuple[Any, dict[str, Any]]:
    """Random bf16 Qwen2.5-VL: the 7B architecture (pipeline.plan's preset) or the tiny one, token ids
    of the project's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2_5_VLConfig

    from pipeline.models import resolve_model_path
    from pipeline.plan import QWEN2_5_VL_7B

    tid = processor.tokenizer.convert_tokens_to_ids
    if tiny:
        config = AutoConfig.from_pretrained(resolve_model_path("tiny"), local_files_only=True)
    else:
        spec = json.loads(json.dumps(QWEN2_5_VL_7B))
        for k in ("bos_token_id", "pad_token_id"):
            spec["text_config"][k] = tid("<|endoftext|>")
        spec["text_config"]["eos_token_id"] = tid("<|im_end|>")
        config = Qwen2_5_VLConfig(**spec, image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                                  vision_start_token_id=tid("<|vision_start|>"),
                                  vision_end_token_id=tid("<|vision_end|>"))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = [tid("<|im_end|>"), tid("<|endoftext|>")]
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    n = sum(p.numel() for p in model.parameters())
    vis = sum(p.numel() for p in model.model.visual.parameters())
    tc = config.text_config
    return model, {"params": n, "vision_params": vis, "hidden": tc.hidden_size, "layers": tc.num_hidden_layers,
                   "vocab": tc.vocab_size}


def data(work: Path, max_pixels: int) -> tuple[Any, list[Any], Any]:
    """Toy GeoTIFF scenes (real rasterio files), their VQA samples and an ImageStore."""
    from fixtures.scenes import make_scenes

    from pipeline.core.records import VQASample, read_jsonl
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    scenes = make_scenes(work / "scenes", n=4, size=1024 if max_pixels > TINY_PIXELS else 512, square=48,
                         direct_every=4)
    manifest, vqa = scenes.manifest, scenes.vqa
    store = ImageStore.from_manifest(manifest)
    zoom_cfg = ZoomConfig(max_pixels=max_pixels, min_pixels=3136, frame="shown_pixels", max_turns=1)
    return store, list(read_jsonl(vqa, VQASample)), zoom_cfg


def sft_step(model: Any, processor: Any, store: Any, samples: list[Any], zoom_cfg: Any, work: Path,
             device: str) -> dict[str, Any]:
    """One optimizer step of the project's SFT trainer on 2 oracle trajectories with one zoom each
    (micro-batch 1 x 2 accumulation: at 7B the logits of one 2k-token sequence are ~4 GB)."""
    from transformers.trainer_utils import SaveStrategy

    from pipeline.core.config import config_from_dict
    from sft.config import SFTConfig
    from sft.data import ChatDataset, ChatItem, oracle_trajectory
    from sft.masks import ZoomSFTCollator
    from sft.stage import _trainer_class, _training_args, prepare_model

    items = []
    for s in [s for s in samples if s.targets][:2]:
        messages, images, _ = oracle_trajectory(s, store, zoom_cfg, think=True, max_zooms=1)
        items.append(ChatItem(messages=messages, image_files=[], kind="vqa", images=images))
    cfg = config_from_dict(SFTConfig, {
        "output_dir": str(work / "sft"), "vqa_data": ["smoke"], "images_manifest": "smoke", "max_steps": 1,
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "bf16": True,
        "gradient_checkpointing": True, "freeze_vision": True, "freeze_projector": True, "learning_rate": 2e-5,
        "warmup_steps": 0, "save_steps": 1000, "logging_steps": 1, "group_by_length": False}, check=False)
    prepare_model(model, cfg)
    collator = ZoomSFTCollator(processor)
    batch = collator([ChatDataset(items)[i] for i in range(len(items))])
    tokens, seq_len = int(batch["attention_mask"].sum()), int(batch["input_ids"].shape[1])
    args = _training_args(cfg, work / "sft" / "checkpoints")
    args.save_strategy = SaveStrategy.NO  # no 50 GB checkpoint (weights + optimizer) at the end of the step
    trainer = _trainer_class()(model=model, args=args,
                               train_dataset=ChatDataset(items).to_hf(), processing_class=processor,
                               data_collator=collator)
    _reset(device)
    t = time.time()
    result = trainer.train()
    _sync(device)
    dt = time.time() - t
    del trainer
    return {"seconds": round(dt, 2), "tokens": tokens, "tokens_per_s": round(tokens / dt, 1),
            "loss": result.training_loss, "steps": 1, **_memory(device),
            "plan_estimate_gb": round(_plan_estimate(model, 1, seq_len), 2)}


def _plan_estimate(model: Any, micro_batch: int, seq_len: int) -> float:
    """`knowzoom plan`'s estimate of this very step (one rank, pure bf16 AdamW, frozen vision, grad ckpt, no
    fixed overhead), to set beside the measured peak: on a GPU this checks the estimator at 7B."""
    from pipeline.plan import TrainSetup, _dims_from_config, estimate_training

    s = TrainSetup(ranks=1, weight_bytes=2, grad_bytes=2, optim_bytes=4, act_bytes=2, sharding="ddp",
                   micro_batch=micro_batch, seq_len=seq_len, loss_tokens=seq_len, vision_patches=0,
                   grad_ckpt=True, freeze_vision=True, freeze_projector=True)
    return estimate_training(_dims_from_config("smoke", model.config), s, 80, overhead_gb=0.0)["total"]


def grpo_step(model: Any, processor: Any, store: Any, samples: list[Any], zoom_cfg: Any, device: str,
              max_new_tokens: int) -> dict[str, Any]:
    """2 rollouts (zoom_in through the real tool, then a sampled answer turn), verifier rewards, GRPO loss,
    one AdamW step."""
    import torch

    from rl.verifier import verify_sample
    from sft.masks import assistant_labels
    from tools.protocol import (
        TOOL_NAME,
        Episode,
        ToolCall,
        build_prompt_messages,
        format_tool_call,
        tool_message,
    )

    sample = next(s for s in samples if s.targets)
    tok = processor.tokenizer
    _reset(device)
    t0 = time.time()
    rollouts, gen_tokens = [], 0
    for k in range(2):
        episode = Episode(store, list(sample.images), zoom_cfg)
        obs = list(episode.initial_observations())
        messages = build_prompt_messages(sample, zoom_cfg.frame, sizes=[o.image.size for o in obs])
        images = [o.image for o in obs]
        bbox = episode.oracle_bbox(0, sample.targets[0].bbox)
        messages.append({"role": "assistant", "content": format_tool_call(bbox, source="image_0")})
        result = episode.execute(ToolCall(name=TOOL_NAME, arguments={"bbox": list(bbox), "source": "image_0"}))
        assert result.observation is not None, result.error
        messages.append(tool_message(result))
        images.append(result.observation.image)
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = processor(text=[prompt], images=images, return_tensors="pt").to(device)
        torch.manual_seed(1000 + k)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=False).split("<|im_end|>")[0]
        gen_tokens += int(out.shape[1] - enc["input_ids"].shape[1])
        messages.append({"role": "assistant", "content": text})
        reward = float(verify_sample(text, sample).correct)
        rollouts.append((messages, images, reward))
    _sync(device)
    gen_s = time.time() - t0
    rewards = torch.tensor([r for _, _, r in rollouts])
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    if float(adv.abs().sum()) == 0.0:  # tied rewards (random weights): keep a non-zero gradient
        adv = torch.tensor([1.0, -1.0])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-7)
    model.train()
    t1 = time.time()
    train_tokens = 0
    opt.zero_grad(set_to_none=True)
    for (messages, images, _), a in zip(rollouts, adv.tolist(), strict=True):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        enc = processor(text=[text], images=images, return_tensors="pt")
        labels = assistant_labels(enc["input_ids"], enc["attention_mask"], tok)
        enc = enc.to(device)
        logits = model(**enc).logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        mask = target != -100
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = -(a * logp * mask).sum() / mask.sum() / len(rollouts)
        loss.backward()
        train_tokens += int(enc["attention_mask"].sum())
        del logits, logp
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    train_s = time.time() - t1
    del opt
    return {"rollouts": 2, "zooms_per_rollout": 1, "rewards": rewards.tolist(),
            "generation_seconds": round(gen_s, 2), "generated_tokens": gen_tokens,
            "generation_tokens_per_s": round(gen_tokens / gen_s, 1), "train_seconds": round(train_s, 2),
            "train_tokens": train_tokens, "train_tokens_per_s": round(train_tokens / train_s, 1),
            **_memory(device)}


def evaluate(model: Any, processor: Any, store: Any, samples: list[Any], zoom_cfg: Any, device: str,
             max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers to 4 items in one batch; accuracy by the strict verifier."""
    import torch

    from rl.verifier import verify_sample
    from tools.protocol import Episode, build_prompt_messages

    tok = processor.tokenizer
    tok.padding_side = "left"
    prompts, images = [], []
    for s in samples[:4]:
        obs = list(Episode(store, list(s.images), zoom_cfg).initial_observations())
        msgs = build_prompt_messages(s, zoom_cfg.frame, sizes=[o.image.size for o in obs])
        prompts.append(processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        images += [o.image for o in obs]
    model.eval()
    _reset(device)
    t = time.time()
    enc = processor(text=prompts, images=images, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    _sync(device)
    dt = time.time() - t
    tok.padding_side = "right"
    new = out[:, enc["input_ids"].shape[1]:]
    texts = [tok.decode(x, skip_special_tokens=False).split("<|im_end|>")[0] for x in new]
    correct = sum(verify_sample(x, s).correct for x, s in zip(texts, samples[:4], strict=True))
    n_new = int(new.numel())
    return {"items": len(texts), "accuracy": correct / len(texts), "seconds": round(dt, 2),
            "prompt_tokens": int(enc["attention_mask"].sum()), "generated_tokens": n_new,
            "tokens_per_s": round(n_new / dt, 1), **_memory(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for smoke.json")
    p.add_argument("--tiny", action="store_true", help="the tiny model instead of the 7B dimensions")
    p.add_argument("--device", default="", help="cuda (default when available) or cpu")
    p.add_argument("--max_new_tokens", type=int, default=0, help="per rollout / eval answer (default 64; tiny 8)")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("smoke: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cpu" and not args.tiny:
        print("smoke: the 7B dimensions need a GPU; use --tiny on CPU", file=sys.stderr)
        return 2
    max_new = args.max_new_tokens or (8 if args.tiny else 64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": device, "tiny": args.tiny, "python": platform.python_version(),
                              "torch": torch.__version__, "stages": {}}
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
        report["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="kz_smoke_") as tmp:
        work = Path(tmp)
        os.environ.setdefault("KNOWZOOM_CACHE", str(work / "cache"))
        from pipeline.models import load_processor, set_pixel_bounds

        max_pixels = TINY_PIXELS if args.tiny else FULL_PIXELS
        processor = load_processor("tiny")
        set_pixel_bounds(processor, min_pixels=3136, max_pixels=max_pixels)
        t = time.time()
        _reset(device)
        model, dims = build_model(args.tiny, device, processor)
        _sync(device)
        report["model"] = dims
        report["stages"]["build"] = {"seconds": round(time.time() - t, 2), **_memory(device)}
        store, samples, zoom_cfg = data(work, max_pixels)
        steps = {"sft": lambda: sft_step(model, processor, store, samples, zoom_cfg, work, device),
                 "grpo": lambda: grpo_step(model, processor, store, samples, zoom_cfg, device, max_new),
                 "eval": lambda: evaluate(model, processor, store, samples, zoom_cfg, device, max_new)}
        for name, step in steps.items():
            # a failed stage (say, out of memory) is recorded and the next one still runs: a device run is
            # scarce, and every stage's figures should come back from it
            try:
                report["stages"][name] = step()
            except Exception as e:
                report["stages"][name] = {"error": f"{type(e).__name__}: {e}"[:2000], **_memory(device)}
                print(f"smoke: stage {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            report["total_seconds"] = round(time.time() - t_all, 1)
            (out / "smoke.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    failed = [n for n, st in report["stages"].items() if "error" in st]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
