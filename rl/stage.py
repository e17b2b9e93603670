"""`knowzoom rl`: agentic GRPO with the zoom tool on TRL's `GRPOTrainer` (+ Ray Train, Ray tool actors).

The trainer reads hard VQA samples (mine-hard output), starts from the pre-warm SFT model, and rolls out
multi-turn episodes through `rl.env.ZoomEnv` (`environment_factory`); rewards come from `rl.rewards`
(each component logged on its own). TRL masks tool-response tokens out of the loss (`tool_mask`; checked by
tests/test_rl_train.py). Rollouts: transformers generation on CPU, vLLM (colocate or server) on GPU via the
`use_vllm`/`vllm_*` fields. With `use_ray`, the trainer runs under Ray Train's `TorchTrainer` (gloo on CPU,
nccl on GPU) and checkpoints are reported to Ray on every rank; otherwise it runs in-process.

Outputs in `output_dir`: `model/` (final), `checkpoints/checkpoint-N` + `checkpoints/latest.json` (written
last, atomically), `rewards.jsonl` (one line per logged step), `reward_curve.png`, `train_summary.json`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import DatasetNotFoundError, ModelNotFoundError
from pipeline.core.manifest import atomic_write_text
from pipeline.models import save_processor
from rl.callbacks import _callbacks, _trim_reward_log, latest_checkpoint
from rl.config import RLConfig, _cuda_available
from rl.errors import ChatTemplateError
from rl.plots import plot_reward_curve, read_reward_log
from rl.rewards import ZoomRewards

log = logging.getLogger(__name__)

# --- inputs ----------------------------------------------------------------------------------------------
def resolve_inputs(cfg: RLConfig) -> dict[str, Any]:
    """Model and data paths after fallbacks, with what was used and why (raises when nothing usable)."""
    from pipeline.models import TINY

    out: dict[str, Any] = {"fallbacks": []}
    model = cfg.model
    if model != TINY and not Path(model).exists():
        if not cfg.model_fallback:
            raise ModelNotFoundError(f"rl: start model {model} does not exist; run `knowzoom sft` (pre-warm) first "
                                     f"or set --model_fallback tiny")
        log.warning("rl: start model %s missing; falling back to %s", model, cfg.model_fallback)
        out["fallbacks"].append(f"model {model} missing -> {cfg.model_fallback}")
        model = cfg.model_fallback
    data = cfg.train_data
    problem = "missing" if not Path(data).exists() else ("empty" if not _has_records(data) else "")
    if problem:
        fb = cfg.train_data_fallback
        if not fb or not Path(fb).exists() or not _has_records(fb):
            raise DatasetNotFoundError(
                f"rl: training data {data} is {problem} (fallback {fb or 'none'} is not usable either); "
                "run `knowzoom mine-hard` first or set --train_data")
        log.warning("rl: training data %s is %s; falling back to %s", data, problem, fb)
        out["fallbacks"].append(f"train_data {data} {problem} -> {fb}")
        data = fb
    if not Path(cfg.image_manifest).exists():
        raise DatasetNotFoundError(f"rl: image manifest {cfg.image_manifest} does not exist; run `knowzoom make-scenes` "
                                   "or point --image_manifest at an images.jsonl")
    out["model"], out["train_data"] = model, data
    return out


def _has_records(path: str | Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return any(line.strip() for line in f)


def load_samples(path: str | Path, max_samples: int = 0, max_images: int = 4) -> list[Any]:
    """VQASamples for training (validated); an empty file is an error that says what to do."""
    from pipeline.core.errors import RecordError
    from pipeline.core.records import read_vqa

    samples = read_vqa(path)
    if max_samples:
        samples = samples[:max_samples]
    if not samples:
        raise RecordError(f"{path}: no samples; mine a hard set (knowzoom mine-hard) or point --train_data elsewhere")
    for s in samples:
        if len(s.images) > max_images:
            raise RecordError(f"{path}: sample {s.id} has {len(s.images)} images > max_prompt_images {max_images}")
    return samples


def build_dataset(samples: list[Any], frame: str) -> Any:
    """A datasets.Dataset with `prompt` (system + empty user turn; the env's reset fills the user turn with
    the overviews and the question) and `sample` (the VQASample JSON that reset reads)."""
    import dataclasses

    from datasets import Dataset

    from tools.protocol import build_prompt_messages

    rows = []
    for s in samples:
        msgs = build_prompt_messages(s, frame)
        system = [m for m in msgs if m.get("role") == "system"]
        sys_text = system[0]["content"] if system else ""
        if isinstance(sys_text, list):
            sys_text = "".join(p.get("text", "") for p in sys_text if isinstance(p, dict))
        rows.append({"prompt": [{"role": "system", "content": str(sys_text)}, {"role": "user", "content": ""}],
                     "sample": json.dumps(dataclasses.asdict(s))})
    return Dataset.from_list(rows)


TOOLS_TEMPLATE = Path(__file__).parent / "templates" / "qwen2_5_vl_tools.jinja"


def prepare_processor(processor: Any, mode: str) -> Any:
    """Make the chat template render and parse zoom tool calls, without changing what the model sees.

    'auto': Qwen2.5-VL's own template (used by SFT and eval) cannot render `tool_calls`, so TRL would refuse
    it; `rl/templates/qwen2_5_vl_tools.jinja` is that template plus tool-call rendering in the canonical
    `<tool_call>{...}</tool_call>` form (`tools.protocol.format_tool_call`), so RL prompts and tool turns are
    byte-identical to the SFT/eval ones. Generated turns are parsed with `tools.protocol.parse_turn`, eval's
    parser (`rl.env.install_protocol_parser`)."""
    import trl
    from trl.chat_template_utils import add_response_schema, qwen3_template, supports_tool_calling

    qwen25vl = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl.jinja").read_text(encoding="utf-8")
    custom = False
    if mode not in ("auto", "keep"):
        path = Path(mode)
        if not path.exists():
            raise ChatTemplateError(f"chat_template {mode} does not exist; use auto, keep or a .jinja path")
        _set_template(processor, path.read_text(encoding="utf-8"))
        custom = True
    elif mode == "auto" and processor.chat_template == qwen25vl:
        _set_template(processor, TOOLS_TEMPLATE.read_text(encoding="utf-8"))
        custom = True
    if not supports_tool_calling(processor):
        raise ChatTemplateError("the chat template cannot render tool calls; set --chat_template auto or a .jinja path")
    tok = getattr(processor, "tokenizer", processor)
    if getattr(tok, "response_template", None) is None and getattr(tok, "response_schema", None) is None:
        if custom:
            tok.response_template = dict(qwen3_template)  # <think>, <tool_call>{json}</tool_call>, <|im_end|>
        else:
            try:
                add_response_schema(processor)
            except ValueError as e:
                raise ChatTemplateError(f"cannot parse tool calls with this chat template: {e}") from e
    from rl.env import install_protocol_parser

    return install_protocol_parser(processor)  # turns are parsed by tools.protocol, as in eval


def _set_template(processor: Any, template: str) -> None:
    processor.chat_template = template
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.chat_template = template


# --- training --------------------------------------------------------------------------------------------
def generation_batch_size(cfg: RLConfig, ray_mode: bool) -> int:
    """Rollouts per optimizer step over all ranks: Ray workers, or the ranks the launcher started."""
    world = cfg.world_size() if ray_mode else int(os.environ.get("WORLD_SIZE", "1") or 1)
    return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world


def _grpo_config(cfg: RLConfig, ckpt_dir: Path, ray_mode: bool, processor: Any = None) -> Any:
    """TRL's GRPOConfig for `cfg`; with `processor`, TRL's generation may not write its image or video
    placeholders (rl.backends.placeholder_tokens): vLLM gets them as `bad_words` (TRL passes generation_kwargs
    into every SamplingParams, colocate and server), transformers as `suppress_tokens` (TRL suppresses the
    image token alone)."""
    from trl import GRPOConfig

    from rl.backends import placeholder_token_ids, placeholder_tokens

    kw: dict[str, Any] = dict(
        output_dir=str(ckpt_dir),
        seed=cfg.seed,
        num_generations=cfg.num_generations,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        generation_batch_size=generation_batch_size(cfg, ray_mode),
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        beta=cfg.beta,
        entropy_coef=cfg.entropy_coef,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_completion_length=cfg.max_completion_length,
        max_tool_calling_iterations=cfg.max_zooms,  # max_zooms + 1 generations: tools.protocol.turn_budget
        reward_weights=cfg.reward_settings().weights(),
        # ZoomGRPOTrainer masks them from the loss only (rl/trainer.py, fix 5): TRL's own flag also drops them
        # from the attention mask and misplaces the zoom crops of multimodal rollouts
        mask_truncated_completions=False,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or cfg.max_steps,
        save_total_limit=cfg.save_total_limit,
        save_only_model=False,  # optimizer, scheduler, RNG and trainer state (data position) too
        logging_steps=cfg.logging_steps,
        report_to=list(cfg.report_to) or "none",
        use_cpu=not (_cuda_available() and (cfg.ray_use_gpu or not ray_mode)),
        bf16=cfg.bf16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        log_completions=False,
        use_vllm=cfg.use_vllm,
        vllm_mode=cfg.vllm_mode,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=cfg.vllm_tensor_parallel_size,
        vllm_server_host=cfg.vllm_server_host,
        vllm_server_port=cfg.vllm_server_port,
    )
    if cfg.vllm_max_model_length:
        kw["vllm_max_model_length"] = cfg.vllm_max_model_length
    banned = placeholder_tokens(processor) if processor is not None else []
    if banned:
        kw["generation_kwargs"] = ({"bad_words": banned} if cfg.use_vllm else
                                   {"suppress_tokens": placeholder_token_ids(processor)})
    if cfg.use_vllm and cfg.vllm_mode == "colocate":
        kw["vllm_enable_sleep_mode"] = cfg.vllm_enable_sleep_mode
    if cfg.bf16 and cfg.beta and not cfg.lora:
        # TRL builds the reference model from the policy's folder; fp32 master weights need no fp32 reference
        kw["model_init_kwargs"] = {"dtype": "bfloat16"}
    ranks = cfg.world_size() if ray_mode else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if cfg.fsdp and ranks == 1:
        log.warning("rl: fsdp needs more than one rank (num_processes); this single-process run is not sharded")
    if cfg.fsdp and ranks > 1:
        # FSDP2 (fully_shard) wrapping each decoder layer / vision block (the model's _no_split_modules); the
        # reference model is sharded the same way by TRL (prepare_fsdp). FULL_STATE_DICT: rank 0 writes
        # ordinary checkpoints that resume and `from_pretrained` read.
        kw["fsdp"] = True
        kw["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "cpu_offload": cfg.fsdp_cpu_offload,
                             "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False,
                             # FSDP's own checkpointing of each wrapped layer: the Trainer's would all-gather
                             # every layer once more in the backward pass (and the two cannot be combined)
                             "activation_checkpointing": cfg.gradient_checkpointing}
        kw["gradient_checkpointing"] = False
    if ray_mode:
        kw["ddp_backend"] = "nccl" if cfg.ray_use_gpu else "gloo"
    return GRPOConfig(**kw)


def _lora_config(cfg: RLConfig) -> Any:
    """LoRA on the language model's projections (the vision tower keeps its weights)."""
    from peft import LoraConfig

    pattern = rf"^(?!.*visual).*\.({'|'.join(cfg.lora_target_modules)})$"
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=pattern, task_type="CAUSAL_LM")


class _MaskedRowFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "All reward functions returned None" not in record.getMessage()


@dataclass
class RLRun:
    """Everything a built (not yet trained) run holds; `train_worker` trains it, tests drive it directly."""

    cfg: RLConfig
    trainer: Any
    rewards: ZoomRewards
    counters: dict[str, int]
    backend: Any
    inputs: dict[str, Any]
    n_samples: int
    resume_from: str | None
    start_step: int
    ray_mode: bool
    t0: float
    padding_side: str = "right"  # the input model's tokenizer's; the saved model keeps it


def build_run(cfg: RLConfig, ray_mode: bool = False, backend: Any = None) -> RLRun:
    """Load model and data, set up the tool backend, rewards, callbacks and the GRPOTrainer."""
    import torch

    from pipeline.models import load_model, set_pixel_bounds
    from rl.env import LocalEpisodes, make_env_factory
    from rl.trainer import ZoomGRPOTrainer

    t0 = time.time()
    torch.set_num_threads(max(cfg.torch_threads, 1))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # masked/unscorable rollouts are expected and counted by rl.rewards; TRL would print each whole prompt
    logging.getLogger("trl.trainer.grpo_trainer").addFilter(_MaskedRowFilter())
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    inputs = resolve_inputs(cfg)
    samples = load_samples(inputs["train_data"], cfg.max_samples, cfg.max_prompt_images)
    dataset = build_dataset(samples, cfg.zoom_frame)

    device = "cuda" if (_cuda_available() and (cfg.ray_use_gpu or not ray_mode)) else "cpu"
    # fp32 master weights even with bf16: bf16 is autocast (accelerate / FSDP mixed precision). A bf16 policy
    # under AdamW at lr 5e-7 rounds ~99% of its updates away (tests/test_rl_gpu_path.py measures it).
    sharded = cfg.fsdp and (cfg.world_size() if ray_mode else int(os.environ.get("WORLD_SIZE", "1") or 1)) > 1
    model, processor = load_model(inputs["model"], dtype="float32", device="cpu" if sharded else device)
    set_pixel_bounds(processor, min_pixels=cfg.zoom_min_pixels, max_pixels=cfg.zoom_max_pixels)
    prepare_processor(processor, cfg.chat_template)
    # TRL left-pads the prompt ids, and in a batch where no rollout opened a view it takes the image token types
    # of the loss forward from the processor, padded as the tokenizer says. The tiny tokenizer pads on the right
    # (transformers' default where a tokenizer config names no side): the shorter prompts' image positions then
    # shifted and get_rope_index crashed or placed them wrongly. TRL's own processor loading pads on the left;
    # ours must too.
    # (tests/test_rl_scripted.py::test_prompts_of_different_lengths_without_a_crop_keep_their_image_positions)
    tok: Any = getattr(processor, "tokenizer", processor)
    padding_side, tok.padding_side = tok.padding_side, "left"

    counters: dict[str, int] = {}
    if backend is None and ray_mode and cfg.tool_actors > 0:
        from rl.ray_pool import RayEpisodePool

        backend = RayEpisodePool(cfg.image_manifest, cfg.zoom_config(), n_actors=cfg.tool_actors,
                                 roots=cfg.image_roots or None, call_timeout_s=cfg.tool_timeout_s,
                                 gdal_cachemax_mb=cfg.gdal_cachemax_mb)
        backend.wait_ready(timeout_s=max(cfg.tool_timeout_s, 60.0))
    elif backend is None:
        from tools.store import ImageStore
        from tools.zoom import ZoomConfig

        store = ImageStore.from_manifest(cfg.image_manifest, roots=cfg.image_roots or None)
        backend = LocalEpisodes(store, ZoomConfig(**cfg.zoom_config()))
    env_factory = make_env_factory(backend, cfg.zoom_frame, counters=counters)
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    rewards = ZoomRewards(processor.tokenizer, cfg.reward_settings(),
                          episode_log=str(out / "episodes.jsonl") if (is_rank0 and cfg.log_episodes) else None,
                          episodes_per_batch=cfg.log_episodes)

    resume_from = None
    if cfg.resume:
        if ray_mode:
            import ray.train

            ray_ckpt = ray.train.get_checkpoint()
            if ray_ckpt is not None:
                resume_from = ray_ckpt.path  # local storage: the folder itself
        else:
            latest = latest_checkpoint(ckpt_dir)
            resume_from = str(latest) if latest else None
    start_step = 0
    if resume_from:
        start_step = int(json.loads((Path(resume_from) / "trainer_state.json").read_text())["global_step"])
        log.info("rl: resuming from %s (step %d)", resume_from, start_step)
    if is_rank0:
        for name in ("rewards.jsonl", "episodes.jsonl"):
            if resume_from:
                _trim_reward_log(out / name, start_step)
            elif (out / name).exists():
                (out / name).unlink()

    trainer = ZoomGRPOTrainer(
        model=model,
        reward_funcs=rewards.functions(),
        args=_grpo_config(cfg, ckpt_dir, ray_mode, processor),
        train_dataset=dataset,
        processing_class=processor,
        environment_factory=env_factory,
        callbacks=_callbacks(cfg, ckpt_dir, ray_mode, rewards, counters),
        peft_config=_lora_config(cfg) if cfg.lora else None,
        tool_threads=cfg.tool_threads,
        mask_length_truncated=cfg.mask_length_truncated,
    )
    return RLRun(cfg, trainer, rewards, counters, backend, inputs, len(samples), resume_from, start_step,
                 ray_mode, t0, padding_side)


def train_worker(cfg: RLConfig, ray_mode: bool = False, run: RLRun | None = None) -> dict[str, Any]:
    """One trainer process (the whole run without Ray; one rank under Ray Train). Returns the summary."""
    import torch

    r = run or build_run(cfg, ray_mode)
    trainer, out = r.trainer, Path(cfg.output_dir)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    before = [_full(p).detach().clone() for p in trainer.model.parameters()] if n_params <= 50_000_000 else None
    try:
        result = trainer.train(resume_from_checkpoint=r.resume_from)
    finally:
        pool_counters = dict(getattr(r.backend, "counters", {}) or {})
        if hasattr(r.backend, "shutdown"):
            r.backend.shutdown()
    delta = None
    if before is not None:
        with torch.no_grad():
            # FSDP parameters are shards (DTensor): gather each (a collective every rank runs in this order)
            delta = float(sum((_full(p).detach().float() - b.float()).pow(2).sum() for p, b in
                              zip(trainer.model.parameters(), before, strict=True)) ** 0.5)
    summary: dict[str, Any] = {
        "model": r.inputs["model"], "train_data": r.inputs["train_data"], "fallbacks": r.inputs["fallbacks"],
        "n_samples": r.n_samples, "steps": int(trainer.state.global_step), "resumed_from_step": r.start_step,
        "train_loss": float(result.training_loss) if result.training_loss is not None else None,
        "param_delta_l2": delta, "n_params": n_params, "reward_totals": dict(r.rewards.totals),
        "episode_failures": r.counters.get("episode_failures", 0),
        "nonfinite_skipped": r.counters.get("nonfinite_skipped", 0), "tool_pool": pool_counters,
        "ray": r.ray_mode, "train_seconds": round(time.time() - r.t0, 1),
    }
    final = out / "model"
    save_final_model(trainer, final, padding_side=r.padding_side)
    if trainer.is_world_process_zero():
        summary["final_model"] = str(final)
        rows = read_reward_log(out / "rewards.jsonl")
        summary["last_log"] = rows[-1] if rows else {}
        if cfg.plot and rows:
            summary["plot"] = str(plot_reward_curve(rows, out / "reward_curve.png"))
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
    return summary


def save_final_model(trainer: Any, final: Path, padding_side: str | None = None) -> None:
    """The trained policy as a loadable model folder: the weights from every rank (with FSDP the full state dict
    is gathered; rank 0 writes), the processor from rank 0 through the shared `save_processor` (tokenizer
    truncation cleared, chat_template.jinja), as SFT saves its model; with `padding_side`, the tokenizer is saved
    padding on that side (the input model's; training padded on the left)."""
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        tok = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        side = tok.padding_side
        tok.padding_side = padding_side or side
        try:
            save_processor(trainer.processing_class, final)
        finally:
            tok.padding_side = side


def _full(p: Any) -> Any:
    """A parameter's whole tensor (an FSDP2 shard is gathered)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def run(cfg: RLConfig) -> dict[str, Any]:
    """`knowzoom rl`: train, then return the summary (also in OUTPUT_DIR/train_summary.json)."""
    cfg.check()
    resolve_inputs(cfg)  # fail fast (before Ray starts) on missing inputs
    if cfg.use_ray:
        from rl.ray_train import run_ray

        return run_ray(cfg, train_worker)
    return train_worker(cfg, ray_mode=False)
