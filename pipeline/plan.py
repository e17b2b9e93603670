"""`knowzoom plan CONFIG [--gpu_memory_gb N]`: per stage and per GPU, the memory a run will need, before anything
launches; exits non-zero naming every stage that does not fit.

Model sizes are exact: the model is built on PyTorch's meta device (no memory, no weights) from its
config.json (a local folder, "tiny", or a known preset such as Qwen/Qwen2.5-VL-7B-Instruct) and its
parameters are counted: total, vision tower, projector, trainable after freezing/LoRA. The rest is a model of
what PyTorch, the HF Trainer, DeepSpeed/FSDP and vLLM keep resident; its assumptions are listed in
ASSUMPTIONS (printed with --explain, and in docs/gpu.md). `tests/test_plan.py` checks it against the
measured peak memory of training steps of small Qwen2.5-VL models on CPU.

About 500 lines on purpose: ASSUMPTIONS and the per-stage estimators read against each other (every
estimate names the assumption it uses), so they stay in one file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, KnowZoomError

GB = 1e9

ASSUMPTIONS = """\
Assumptions of the memory plan (per GPU, decimal GB):
- Parameters are counted exactly on the meta device from the model's config.json (or a preset).
- Precision. SFT with bf16 and DeepSpeed: bf16 weights and grads, fp32 master + AdamW m, v in the optimizer
  (12 B per trainable parameter). SFT with bf16 without DeepSpeed/FSDP: the model is loaded in bf16 and torch
  AdamW keeps m, v in bf16 (2+2+4 B). fp32: 4 B weights, 4 B grads, 8 B AdamW. RL with bf16: fp32 master
  weights under bf16 autocast (4+4+8 B per trainable parameter; activations in bf16).
- Sharding over N ranks: plain DDP keeps everything on every rank plus gradient buckets of the gradients'
  size; ZeRO-1 shards the optimizer; ZeRO-2 also the gradients (kept in fp32 partitions) plus its reduce and
  all-gather buckets (read from the DeepSpeed JSON); ZeRO-3 and FSDP full_shard shard weights too and
  gather two layers at a time.
- LoRA: trainable = r * (in + out) per adapted linear layer; the base weights stay frozen in the stage's
  dtype; no separate reference model (TRL disables the adapters instead).
- Activations of one micro-batch of per_device_train_batch_size x the longest allowed sequence (SFT
  max_length; RL prompt image + text + max_completion_length). Per layer and token the decoder keeps
  a*(6h + 3kv + 4i) + 8h bytes (a = 2 in bf16, 4 in fp32; fp32 norm inputs); with gradient checkpointing
  only each layer's input (a*h) is kept, plus one layer's full set during recomputation. The loss keeps,
  per token and vocabulary entry, the logits (a B), their fp32 copy when a = 2 (4 B), the fp32 log-softmax
  and its gradient (4 + 4 B): 14 B in bf16, 12 B in fp32; RL scores only the completion tokens. A frozen vision tower keeps no activations; a trainable one keeps them per patch.
- Reference model (RL, beta > 0, no LoRA): a bf16 copy, sharded like the policy under ZeRO-3/FSDP.
- vLLM colocate takes vllm_gpu_memory_utilization x GPU memory while generating; with
  vllm_enable_sleep_mode it releases it while training, so the peak is max(generation, training) instead of
  their sum. Server mode puts vLLM on other GPUs (not counted here).
- Inference stages (mine-hard, eval with vLLM): bf16 weights must fit in the vLLM share (the config's
  vllm_gpu_memory_utilization, else vLLM's default 0.9) with >= 10% of it left for the KV cache. transformers backend: bf16 weights + KV cache of the batch.
- Fixed overhead per GPU: 3 GB (CUDA context, NCCL buffers, allocator fragmentation).
"""

# Qwen/Qwen2.5-VL-7B-Instruct's config.json (the architecture facts only): 8.29B parameters, ~0.67B vision.
QWEN2_5_VL_7B: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    },
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
        "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "hidden_act": "silu",
    },
    "tie_word_embeddings": False,
}
PRESETS = {"qwen2.5-vl-7b": QWEN2_5_VL_7B}


@dataclass
class ModelDims:
    """Sizes the estimate needs, counted on the meta device."""

    name: str
    params: int
    vision_params: int  # vision tower without the projector
    projector_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    lm_linear: dict[str, tuple[int, int]] = field(default_factory=dict)  # module name -> (in, out) per layer

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


def _dims_from_config(name: str, config: Any) -> ModelDims:
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    visual = getattr(getattr(model, "model", model), "visual", None)
    vis = sum(p.numel() for p in visual.parameters()) if visual is not None else 0
    merger = getattr(visual, "merger", None)
    proj = sum(p.numel() for p in merger.parameters()) if merger is not None else 0
    tc = getattr(config, "text_config", config)
    vc = getattr(config, "vision_config", None)
    linear: dict[str, tuple[int, int]] = {}
    lm = getattr(getattr(model, "model", model), "language_model", None)
    if lm is not None and len(lm.layers):
        for mname, mod in lm.layers[0].named_modules():
            if isinstance(mod, torch.nn.Linear):
                linear[mname.split(".")[-1]] = (mod.in_features, mod.out_features)
    return ModelDims(
        name=name, params=total, vision_params=vis - proj, projector_params=proj, hidden=tc.hidden_size,
        intermediate=tc.intermediate_size, layers=tc.num_hidden_layers, heads=tc.num_attention_heads,
        kv_heads=tc.num_key_value_heads, vocab=tc.vocab_size,
        vision_hidden=getattr(vc, "hidden_size", 0), vision_intermediate=getattr(vc, "intermediate_size", 0),
        vision_layers=getattr(vc, "depth", 0), lm_linear=linear)


def model_dims(spec: str) -> ModelDims:
    """Dims of "tiny", a local model folder (its config.json), or a preset matched by name (e.g. any id or
    path naming Qwen2.5-VL-7B). Raises ConfigError when none applies."""
    from transformers import AutoConfig, Qwen2_5_VLConfig

    path = Path(spec)
    for cand in (path, path / "model"):
        if (cand / "config.json").exists():
            return _dims_from_config(spec, AutoConfig.from_pretrained(cand, local_files_only=True))
    if spec == "tiny":
        from pipeline.models import resolve_model_path

        return _dims_from_config(spec, AutoConfig.from_pretrained(resolve_model_path(spec), local_files_only=True))
    key = spec.lower().replace("_", ".")
    for preset, cfg in PRESETS.items():
        if preset in key:
            return _dims_from_config(spec, Qwen2_5_VLConfig(**json.loads(json.dumps(cfg))))
    try:  # a Hub id in the local cache
        return _dims_from_config(spec, AutoConfig.from_pretrained(spec, local_files_only=True))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {spec!r}: no local config.json and no preset ({', '.join(PRESETS)}); give a "
                          "local model folder") from e


# ------------------------------------------------------------------------------------------ the estimate
@dataclass
class TrainSetup:
    """What one training rank holds; built from a stage config by `sft_setup` / `rl_setup`."""

    ranks: int
    weight_bytes: int  # per parameter as stored
    grad_bytes: int  # per trainable parameter
    optim_bytes: int  # per trainable parameter (incl. an fp32 master copy when there is one)
    act_bytes: int  # activations dtype
    sharding: str  # ddp | zero1 | zero2 | zero3 | fsdp
    micro_batch: int
    seq_len: int
    loss_tokens: int  # tokens per sequence whose logits the loss keeps
    vision_patches: int  # patches per sequence (before the 2x2 merge)
    grad_ckpt: bool
    freeze_vision: bool
    freeze_projector: bool
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ()
    ref_model: bool = False
    vllm_share_gb: float = 0.0
    vllm_sleep: bool = False
    bucket_elems: int = 0  # ZeRO reduce + all-gather bucket elements
    precision: str = ""


def trainable_params(d: ModelDims, s: TrainSetup) -> int:
    if s.lora_r:
        per_layer = sum(s.lora_r * (i + o) for n, (i, o) in d.lm_linear.items() if n in s.lora_targets)
        return per_layer * d.layers
    t = d.params
    if s.freeze_vision:
        t -= d.vision_params
    if s.freeze_projector:
        t -= d.projector_params
    return t


def activation_bytes(d: ModelDims, s: TrainSetup) -> dict[str, float]:
    """Activation memory of one micro-batch: decoder layers, loss (logits), vision tower."""
    a, h, i, kv = s.act_bytes, d.hidden, d.intermediate, d.kv_dim
    tokens = s.micro_batch * s.seq_len
    per_layer_token = a * (6 * h + 3 * kv + 4 * i) + 8 * h
    if s.grad_ckpt:
        decoder = tokens * (d.layers * a * h + per_layer_token)
    else:
        decoder = tokens * d.layers * per_layer_token
    # logits in the activation dtype, their fp32 copy when that is 16-bit, fp32 log-softmax and its gradient
    loss = s.micro_batch * s.loss_tokens * d.vocab * (a + (4 if a < 4 else 0) + 8)
    patches = s.micro_batch * s.vision_patches
    vis_layer = patches * (a * (6 * d.vision_hidden + 3 * d.vision_intermediate) + 8 * d.vision_hidden)
    vision = vis_layer if (s.freeze_vision or s.grad_ckpt) else vis_layer * d.vision_layers
    return {"activations": decoder + vision, "logits": loss}


def estimate_training(d: ModelDims, s: TrainSetup, gpu_gb: float, overhead_gb: float = 3.0) -> dict[str, float]:
    """Per-GPU memory (GB) of one training rank, by component, with 'total'."""
    n = max(s.ranks, 1)
    t = trainable_params(d, s)
    weights: float = d.params * s.weight_bytes + (t * s.weight_bytes if s.lora_r else 0)
    grads: float = t * s.grad_bytes
    optim: float = t * s.optim_bytes
    extra = 0.0
    if s.sharding in ("zero1", "zero2", "zero3", "fsdp"):
        optim /= n
    if s.sharding in ("zero2", "zero3", "fsdp"):
        grads /= n
    if s.sharding in ("zero3", "fsdp"):
        layer = (d.params - d.vision_params - d.projector_params) / max(d.layers, 1)
        weights = weights / n + 2 * layer * s.weight_bytes  # two gathered layers (prefetch)
    if s.sharding in ("zero1", "zero2", "zero3") and s.bucket_elems:
        extra = s.bucket_elems * s.act_bytes
    if s.sharding == "ddp" and n > 1:
        extra = t * s.grad_bytes  # DDP's gradient buckets
    out = {"weights": weights, "grads": grads, "optimizer": optim, "buckets": extra}
    if s.ref_model:
        ref = d.params * 2
        out["reference"] = ref / n if s.sharding in ("zero3", "fsdp") else ref
    out.update(activation_bytes(d, s))
    out = {k: v / GB for k, v in out.items()}
    out["overhead"] = overhead_gb
    vllm = s.vllm_share_gb
    static = sum(v for k, v in out.items() if k not in ("grads", "activations", "logits", "buckets"))
    train_peak = sum(out.values()) + (0.0 if s.vllm_sleep else vllm)
    gen_peak = static + vllm
    out["vllm"] = vllm
    out["total"] = max(train_peak, gen_peak)
    return out


# ----------------------------------------------------------------------------------- stage config → setup
def _zero(path: str) -> tuple[int, int]:
    """(ZeRO stage, bucket elements) of a DeepSpeed JSON."""
    if not path:
        return 0, 0
    try:
        z = json.loads(Path(path).read_text()).get("zero_optimization", {})
    except (OSError, ValueError) as e:
        raise ConfigError(f"deepspeed: cannot read {path} ({e})") from e

    def num(k: str, default: float) -> int:
        v = z.get(k, default)
        return int(float(v)) if not isinstance(v, str) or v.replace(".", "").replace("e", "").isdigit() else int(
            default)

    stage = int(z.get("stage", 0))
    buckets = num("reduce_bucket_size", 5e8) + (num("allgather_bucket_size", 5e8) if stage < 3 else 0)
    return stage, buckets if stage in (1, 2, 3) else 0


def _sharding(cfg: Any) -> tuple[str, int]:
    ds = getattr(cfg, "deepspeed", "") or ""
    stage, buckets = _zero(ds)
    if ds:
        return ("ddp", 0) if stage == 0 else (f"zero{stage}", buckets)
    fsdp = getattr(cfg, "fsdp", "") or ""
    if isinstance(fsdp, str) and ("full_shard" in fsdp or "shard_grad_op" in fsdp) or fsdp is True:
        return "fsdp", 0
    return "ddp", 0


def _zooms(cfg: Any) -> int:
    """Zoom calls per episode (`max_zooms`, the one zoom-limit field of every stage)."""
    return int(getattr(cfg, "max_zooms", 1))


def image_patches(max_pixels: int, n_images: int) -> int:
    """Vision patches (14x14) of n images at the pixel cap."""
    return n_images * max_pixels // (14 * 14)


def sft_setup(cfg: Any) -> TrainSetup:
    sharding, buckets = _sharding(cfg)
    bf16 = bool(getattr(cfg, "bf16", False))
    if bf16 and sharding != "ddp":
        wb, gb, ob, prec = 2, (4 if sharding != "zero1" else 2), 12, "bf16 weights, fp32 master in the optimizer"
    elif bf16:
        wb, gb, ob, prec = 2, 2, 4, "pure bf16 (model loaded in bf16, AdamW states in bf16)"
    else:
        wb, gb, ob, prec = 4, 4, 8, "fp32"
    n_images = 1 + int(getattr(cfg, "max_zooms", 0)) if getattr(cfg, "vqa_data", None) else 0
    return TrainSetup(
        ranks=int(getattr(cfg, "num_processes", 1)), weight_bytes=wb, grad_bytes=gb, optim_bytes=ob,
        act_bytes=2 if bf16 else 4, sharding=sharding, micro_batch=int(cfg.per_device_train_batch_size),
        seq_len=int(cfg.max_length), loss_tokens=int(cfg.max_length),
        vision_patches=image_patches(int(getattr(cfg, "zoom_max_pixels", 0)), n_images),
        grad_ckpt=bool(getattr(cfg, "gradient_checkpointing", False)),
        freeze_vision=bool(getattr(cfg, "freeze_vision", False)),
        freeze_projector=bool(getattr(cfg, "freeze_projector", False)),
        lora_r=int(getattr(cfg, "lora_r", 0)) if getattr(cfg, "lora", False) else 0,
        lora_targets=tuple(getattr(cfg, "lora_target_modules", ())), bucket_elems=buckets, precision=prec)


def rl_setup(cfg: Any, gpu_gb: float) -> TrainSetup:
    """RL fields are read with defaults: fields the sharded-RL work adds (`deepspeed`, `fsdp`,
    `vllm_enable_sleep_mode`, `lora`) are optional here."""
    sharding, buckets = _sharding(cfg)
    bf16 = bool(getattr(cfg, "bf16", False))
    if callable(getattr(cfg, "world_size", None)):  # RLConfig: num_processes (or the older ray_num_workers)
        ranks = int(cfg.world_size())
    else:
        ranks = int(getattr(cfg, "ray_num_workers", 1)) if getattr(cfg, "use_ray", False) else int(
            getattr(cfg, "num_processes", 1))
    lora = bool(getattr(cfg, "lora", False) or getattr(cfg, "use_peft", False))
    colocate = bool(getattr(cfg, "use_vllm", False)) and getattr(cfg, "vllm_mode", "colocate") == "colocate"
    zoom = int(getattr(cfg, "zoom_max_pixels", 0))
    prompt = zoom // (28 * 28) + 512  # overview image tokens + system/user text
    completion = int(getattr(cfg, "max_completion_length", 0))
    return TrainSetup(
        ranks=ranks, weight_bytes=4, grad_bytes=4, optim_bytes=8,
        act_bytes=2 if bf16 else 4, sharding=sharding, micro_batch=int(cfg.per_device_train_batch_size),
        seq_len=prompt + completion, loss_tokens=completion,
        vision_patches=image_patches(zoom, 1 + _zooms(cfg)),
        grad_ckpt=bool(getattr(cfg, "gradient_checkpointing", False)),
        freeze_vision=bool(getattr(cfg, "freeze_vision", True)),
        freeze_projector=bool(getattr(cfg, "freeze_projector", False)),
        lora_r=int(getattr(cfg, "lora_r", 16)) if lora else 0,
        lora_targets=tuple(getattr(cfg, "lora_target_modules", ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"))),
        ref_model=float(getattr(cfg, "beta", 0.0)) > 0 and not lora,
        vllm_share_gb=float(getattr(cfg, "vllm_gpu_memory_utilization", 0.0)) * gpu_gb if colocate else 0.0,
        vllm_sleep=bool(getattr(cfg, "vllm_enable_sleep_mode", False)), bucket_elems=buckets,
        precision="fp32 master weights, bf16 autocast" if bf16 else "fp32")


def estimate_inference(d: ModelDims, cfg: Any, gpu_gb: float) -> dict[str, float]:
    backend = getattr(cfg, "backend", "")
    weights = d.params * 2 / GB
    if backend == "vllm":
        util = float(getattr(cfg, "vllm_gpu_memory_utilization", getattr(cfg, "gpu_memory_utilization", 0.9)))
        share = util * gpu_gb
        return {"weights": weights, "vllm": share, "kv_cache": share - weights, "total": share,
                "min_kv_fraction": 0.1 * share}
    batch = int(getattr(cfg, "batch_size", 1))
    seq = int(getattr(cfg, "max_new_tokens", 512)) + int(getattr(cfg, "zoom_max_pixels", 0)) // 784 * (
        1 + _zooms(cfg))
    kv = 2 * d.layers * d.kv_dim * 2 * batch * seq / GB
    return {"weights": weights, "kv_cache": kv, "overhead": 3.0, "total": weights + kv + 3.0}


# ----------------------------------------------------------------------------------------------- report
MODEL_STAGES = ("sft", "rl", "eval", "mine-hard")


def _model_spec(name: str, cfg: Any, outputs: dict[str, str]) -> str:
    spec = str(getattr(cfg, "model", "tiny"))
    for out_dir, src in outputs.items():  # a model an earlier stage of this pipeline writes
        if spec.rstrip("/") in (out_dir, out_dir + "/model"):
            return src
    return spec


def plan(stages: list[tuple[str, str, Any]], gpu_gb: float) -> list[dict[str, Any]]:
    """Rows: one per stage: {id, stage, gpus, components (GB), total, fits, note}."""
    rows: list[dict[str, Any]] = []
    outputs: dict[str, str] = {}
    cache: dict[str, ModelDims] = {}
    for sid, name, cfg in stages:
        row: dict[str, Any] = {"id": sid, "stage": name, "gpus": 0, "components": {}, "total": 0.0,
                               "fits": True, "note": "no GPU"}
        if name in MODEL_STAGES:
            spec = _model_spec(name, cfg, outputs)
            if spec not in cache:
                cache[spec] = model_dims(spec)
            d = cache[spec]
            row["dims"] = d
            outputs[str(cfg.output_dir).rstrip("/")] = spec
            if name in ("sft", "rl"):
                s = sft_setup(cfg) if name == "sft" else rl_setup(cfg, gpu_gb)
                comp = estimate_training(d, s, gpu_gb)
                row.update(gpus=s.ranks, note=f"{s.sharding}, {s.precision}, {trainable_params(d, s) / 1e9:.2f}B "
                                              f"trainable of {d.params / 1e9:.2f}B, micro-batch {s.micro_batch} x "
                                              f"{s.seq_len} tokens" + (", grad ckpt" if s.grad_ckpt else "")
                                              + (", vLLM sleep" if s.vllm_sleep else ""))
                row["setup"] = s
            else:
                comp = estimate_inference(d, cfg, gpu_gb)
                row.update(gpus=1, note=f"{getattr(cfg, 'backend', '')} inference, {d.params / 1e9:.2f}B bf16")
            row["components"] = {k: round(v, 2) for k, v in comp.items() if k != "total"}
            row["total"] = round(comp["total"], 2)
            if "min_kv_fraction" in comp:
                row["fits"] = comp["total"] <= gpu_gb and comp["kv_cache"] >= comp["min_kv_fraction"]
            else:
                row["fits"] = comp["total"] <= gpu_gb
            row["model"] = f"{spec} ({d.params / 1e9:.2f}B params, vision {d.vision_params / 1e9:.2f}B)"
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]], gpu_gb: float) -> str:
    lines = [f"memory plan, per GPU (budget {gpu_gb:g} GB):"]
    for r in rows:
        if not r["components"]:
            lines.append(f"  {r['id']:<12} {r['note']}")
            continue
        flag = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"  {r['id']:<12} {r['total']:7.1f} GB  {flag}  on {r['gpus']} GPU(s); {r['note']}")
        lines.append(f"  {'':<12} model {r['model']}")
        lines.append("  " + " " * 12 + " " + ", ".join(f"{k} {v:.1f}" for k, v in r["components"].items()
                                                       if v or k not in ("vllm", "buckets", "reference")))
        if r.get("hint"):
            lines.append(f"  {'':<12} to fit: {r['hint']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`knowzoom plan CONFIG [--gpu_memory_gb N] [--stage NAME] [--explain] [--json]`."""
    import argparse

    p = argparse.ArgumentParser(prog="knowzoom plan", description="Per-stage, per-GPU memory estimate.")
    p.add_argument("config", help="a pipeline YAML (stages:) or one stage's YAML with --stage")
    p.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--stage", default="", help="the stage of a single-stage YAML (sft, rl, eval, mine-hard)")
    p.add_argument("--explain", action="store_true", help="print the estimate's assumptions")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        stages = _load_stages(args.config, args.stage)
        rows = plan(stages, args.gpu_memory_gb)
        for r in rows:
            if not r["fits"]:
                r["hint"] = fit_hint(r, args.gpu_memory_gb)
    except KnowZoomError as e:
        print(f"knowzoom plan: error: {e}", file=sys.stderr)
        return 2
    if args.explain:
        print(ASSUMPTIONS)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k not in ("setup", "dims")} for r in rows], indent=2))
    else:
        print(format_rows(rows, args.gpu_memory_gb))
    bad = [r for r in rows if not r["fits"]]
    if bad:
        for r in bad:
            print(f"knowzoom plan: stage {r['id']} does not fit: {r['total']:.1f} GB per GPU > "
                  f"{args.gpu_memory_gb:g} GB" + (f"; {r['hint']}" if r.get("hint") else ""), file=sys.stderr)
        return 1
    print(f"every stage fits in {args.gpu_memory_gb:g} GB per GPU")
    return 0


def fit_hint(row: dict[str, Any], gpu_gb: float) -> str:
    """The first single change (least disruptive first) under which a training stage fits."""
    from dataclasses import replace

    s: TrainSetup | None = row.get("setup")
    d: ModelDims | None = row.get("dims")
    if s is None or d is None:
        return "use GPUs with more memory (or, for vLLM, a lower gpu_memory_utilization)"
    tries: list[tuple[str, TrainSetup]] = []
    if not s.grad_ckpt:
        tries.append(("gradient_checkpointing: true", replace(s, grad_ckpt=True)))
    if s.vllm_share_gb and not s.vllm_sleep:
        tries.append(("vllm_enable_sleep_mode: true", replace(s, vllm_sleep=True)))
    if s.sharding in ("ddp", "zero1", "zero2"):
        tries.append(("ZeRO-3 or FSDP full_shard (deepspeed/fsdp)", replace(s, sharding="zero3")))
    for mb in (4, 2, 1):
        if mb < s.micro_batch:
            tries.append((f"per_device_train_batch_size: {mb} (raise gradient_accumulation_steps to keep the "
                          "effective batch)", replace(s, micro_batch=mb)))
    if not s.lora_r:
        tries.append(("lora: true", replace(s, lora_r=16, lora_targets=tuple(d.lm_linear), ref_model=False)))
    for text, alt in tries:
        if estimate_training(d, alt, gpu_gb)["total"] <= gpu_gb:
            return text
    # no single change: apply them cumulatively, least disruptive first, and name the set that fits
    texts: list[str] = []
    cur = s
    for text, alt in tries:
        changed = {k: getattr(alt, k) for k in ("grad_ckpt", "vllm_sleep", "sharding", "micro_batch", "lora_r",
                                                  "lora_targets", "ref_model") if getattr(alt, k) != getattr(s, k)}
        if "micro_batch" in changed and texts and texts[-1].startswith("per_device_train_batch_size"):
            texts.pop()
        cur = replace(cur, **changed)
        texts.append(text)
        if estimate_training(d, cur, gpu_gb)["total"] <= gpu_gb:
            return " + ".join(texts)
    return "no combination of these settings fits: more GPUs (ranks) or GPUs with more memory"


def _load_stages(path: str, stage: str) -> list[tuple[str, str, Any]]:
    from pipeline.core.config import config_from_dict, load_yaml
    from pipeline.stages import STAGES

    data = load_yaml(path)
    if "stages" in data:
        from pipeline.runner import PipelineConfig, stage_configs

        return stage_configs(config_from_dict(PipelineConfig, data, path))
    if stage not in STAGES:
        raise ConfigError(f"{path} is not a pipeline (no stages:); name its stage with --stage "
                          f"({', '.join(MODEL_STAGES)})")
    cls = STAGES[stage].config_class()
    return [(stage, stage, config_from_dict(cls, data, path, check=False))]
