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
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import hfield
from pipeline.core.errors import DatasetNotFoundError, ModelNotFoundError
from pipeline.core.launch import LaunchConfig
from pipeline.core.manifest import atomic_write_text
from rl.errors import ChatTemplateError
from rl.rewards import RewardSettings, ZoomRewards

log = logging.getLogger(__name__)

PLOT_KEYS = {
    "tool-call rate": "episodes/tool_call_rate",
    "zoom success rate": "episodes/zoom_ok_rate",
    "accuracy": "episodes/accuracy",
    "format rate": "episodes/format_ok_rate",
}
LOG_KEYS = [
    "reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean", "rewards/tool_bonus/mean",
    "rewards/region/mean", "tools/call_frequency", "tools/failure_frequency", "loss", "grad_norm", "kl",
    "entropy", "learning_rate", "completions/mean_length", "frac_reward_zero_std",
]


@dataclass
class RLConfig(LaunchConfig):
    """Agentic GRPO (TRL) with the zoom environment; defaults are the tiny CPU run."""

    output_dir: str = hfield("runs/tiny/rl", help="Folder for the model, checkpoints, reward log and plot.")
    # model and data
    model: str = hfield("runs/tiny/sft_prewarm/model", help="Start model: a model folder, 'tiny', or a local HF id.")
    model_fallback: str = hfield("", help="Used (with a warning, recorded in the summary) when `model` is missing; empty = fail.")
    train_data: str = hfield("runs/tiny/hard/hard.jsonl", help="VQASample JSONL to train on (the mined hard set).")
    train_data_fallback: str = hfield("", help="Used (with a warning) when `train_data` is missing; empty = fail.")
    image_manifest: str = hfield("runs/tiny/scenes/images.jsonl", help="images.jsonl of the image store the samples' ids refer to.")
    image_roots: list[str] = hfield([], help="Allowed image roots; empty = the manifest's folder.")
    max_samples: int = hfield(0, help="Use at most this many training samples (0 = all).")
    chat_template: str = hfield("auto", help="'auto': switch to TRL's tool-capable Qwen-VL template when the model's cannot call tools; 'keep'; or a .jinja path.")
    # zoom tool
    frame: str = hfield("shown_pixels", help="Box frame the model uses: shown_pixels | norm1000.")
    max_zooms: int = hfield(4, help="Zoom calls allowed per episode; the answer turn comes on top (TRL "
                                    "max_tool_calling_iterations; the same field in sft, mine-hard and eval).")
    zoom_max_pixels: int = hfield(50176, help="Pixel cap of an overview or crop shown to the model (7B: 1003520).")
    zoom_min_pixels: int = hfield(3136, help="Pixel floor of an image shown to the model.")
    tool_read_timeout_s: float = hfield(10.0, help="Time limit of one raster read.")
    # GRPO
    num_generations: int = hfield(4, help="Rollouts per prompt (G).")
    per_device_train_batch_size: int = hfield(4, help="Completions per device per micro-batch.")
    gradient_accumulation_steps: int = hfield(1, help="Micro-batches per optimizer step.")
    max_steps: int = hfield(12, help="Optimizer steps.")
    learning_rate: float = hfield(1e-4, help="Actor learning rate (paper 7B: 5e-7).")
    lr_scheduler_type: str = hfield("constant", help="HF scheduler name.")
    warmup_steps: int = hfield(0, help="Linear warmup steps.")
    max_grad_norm: float = hfield(1.0, help="Gradient clipping norm.")
    beta: float = hfield(0.0, help="KL coefficient to the reference model (paper: 0.001; 0 skips the ref model).")
    entropy_coef: float = hfield(0.0, help="Entropy bonus coefficient (paper: 0.001).")
    loss_type: str = hfield("dapo", help="TRL GRPO loss type.")
    scale_rewards: str = hfield("group", help="Advantage scaling: group | batch | none.")
    temperature: float = hfield(1.0, help="Sampling temperature of rollouts.")
    top_p: float = hfield(1.0, help="Nucleus sampling of rollouts.")
    max_completion_length: int = hfield(384, help="Token budget of a whole multi-turn completion (tool tokens included).")
    max_prompt_images: int = hfield(4, help="Samples with more input images than this are rejected at load time.")
    # rewards and faults
    accuracy_weight: float = hfield(0.8, help="Weight of the verifier accuracy reward.")
    format_weight: float = hfield(0.2, help="Weight of the format reward (1 / 0 / -1 unbalanced tags).")
    tool_bonus_weight: float = hfield(1.2, help="Weight of the tool bonus (right answer AND >= 1 successful zoom).")
    region_weight: float = hfield(0.0, help="Weight of the region reward (zoom covers the target); 0 = off.")
    max_answer_chars: int = hfield(1000, help="Answers this long or longer get no accuracy credit.")
    mask_truncated_episodes: bool = hfield(True, help="Episodes cut by the zoom limit get no reward (zero advantage) instead of a penalty.")
    mask_length_truncated: bool = hfield(True, help="Completions cut by max_completion_length carry no loss (TRL mask_truncated_completions).")
    max_failure_rate: float = hfield(0.25, help="A step fails when more than this share of its rollouts raised.")
    # checkpoints and logs
    save_steps: int = hfield(4, help="Checkpoint every N optimizer steps (0 = only at the end).")
    save_total_limit: int = hfield(2, help="Checkpoints kept.")
    resume: bool = hfield(True, help="Resume from the latest checkpoint in output_dir when there is one.")
    logging_steps: int = hfield(1, help="Log (and append to rewards.jsonl) every N steps.")
    report_to: list[str] = hfield([], help="Trainer loggers (HF `report_to`): tensorboard, wandb, ... ([] = none).")
    plot: bool = hfield(True, help="Write reward_curve.png at the end.")
    log_episodes: int = hfield(2, help="Episodes per step written to episodes.jsonl (turns + reward components; 0 = none).")
    torch_threads: int = hfield(1, help="torch CPU threads per trainer process.")
    # rollout backend
    use_vllm: bool = hfield(False, help="Generate rollouts with vLLM (GPU; needs the `gpu` extra).")
    vllm_mode: str = hfield("colocate", help="vLLM mode: colocate (same GPUs) | server (trl vllm-serve).")
    vllm_gpu_memory_utilization: float = hfield(0.3, help="vLLM GPU memory share in colocate mode.")
    vllm_tensor_parallel_size: int = hfield(1, help="vLLM tensor parallel size in colocate mode.")
    vllm_server_host: str = hfield("0.0.0.0", help="vLLM server host (server mode).")
    vllm_server_port: int = hfield(8000, help="vLLM server port (server mode).")
    vllm_max_model_length: int = hfield(0, help="vLLM context length (0 = the model's).")
    vllm_enable_sleep_mode: bool = hfield(False, help="Colocate: vLLM releases its weights and KV cache while the "
                                                      "trainer runs (TRL sleep level 2; weights re-pushed each step). "
                                                      "Ignored without use_vllm colocate.")
    bf16: bool = hfield(False, help="bf16 autocast over fp32 master weights (the policy and its AdamW states stay "
                                    "fp32 so lr-5e-7 updates are not rounded away); the reference model is bf16.")
    gradient_checkpointing: bool = hfield(False, help="Gradient checkpointing (large models).")
    # memory at scale
    fsdp: bool = hfield(False, help="Shard policy, grads, AdamW states and the reference model over the ranks "
                                    "(FSDP2 full shard through accelerate; gloo on CPU, nccl on GPU).")
    fsdp_cpu_offload: bool = hfield(False, help="With fsdp: keep the sharded parameters and optimizer on CPU.")
    lora: bool = hfield(False, help="Train LoRA adapters on the language model; the reference model is then the "
                                    "base with adapters disabled (no second copy).")
    lora_r: int = hfield(16, help="LoRA rank.")
    lora_alpha: int = hfield(32, help="LoRA alpha.")
    lora_dropout: float = hfield(0.0, help="LoRA dropout.")
    lora_target_modules: list[str] = hfield(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], help="Language-model linear layers that get LoRA.")
    tool_threads: int = hfield(1, help="Threads that run one turn's pending zoom calls of all rollouts at once "
                                       "(TRL calls tools one at a time); 1 = sequential. Helps when calls wait "
                                       "(Ray tool actors, remote storage), not on a few busy cores.")
    # Ray
    use_ray: bool = hfield(False, help="Run the trainer under Ray Train (TorchTrainer) and tools in Ray actors.")
    ray_address: str = hfield("", help="Ray cluster address; empty = start a local Ray.")
    num_processes: int = hfield(1, help="Trainer ranks (one per GPU): Ray Train workers with use_ray, else ranks "
                                        "started by the stage launcher. Same meaning as ray_num_workers; set one.")
    ray_num_workers: int = hfield(1, help="Trainer workers under Ray (kept for old configs; num_processes wins when "
                                          "it is > 1).")
    ray_use_gpu: bool = hfield(False, help="One GPU per trainer worker (nccl); False = CPU workers (gloo).")
    ray_cpus_per_worker: float = hfield(1.0, help="CPUs reserved per trainer worker.")
    ray_storage_path: str = hfield("", help="Ray Train storage (checkpoints); empty = OUTPUT_DIR/ray.")
    tool_actors: int = hfield(2, help="Ray tool actors per trainer worker (0 = tools in-process even under Ray).")
    tool_timeout_s: float = hfield(60.0, help="Time limit of one call to a tool actor.")
    gdal_cachemax_mb: int = hfield(256, help="GDAL_CACHEMAX of each tool actor.")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.num_generations < 2:
            p.append("num_generations: GRPO needs >= 2 rollouts per prompt; set 2 or more")
        world = max(self.world_size(), 1)
        gen_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps * world
        if gen_batch % max(self.num_generations, 1):
            p.append(f"per_device_train_batch_size × gradient_accumulation_steps × workers = {gen_batch} must be "
                     f"divisible by num_generations={self.num_generations}; change one of them")
        if self.max_steps < 1:
            p.append("max_steps: must be >= 1")
        if self.max_zooms < 1:
            p.append("max_zooms: must be >= 1 (zoom calls per episode)")
        if self.frame not in ("shown_pixels", "norm1000"):
            p.append("frame: use shown_pixels or norm1000")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            p.append("max_failure_rate: must be in [0, 1]")
        if self.max_completion_length < 16:
            p.append("max_completion_length: too small; give >= 16 tokens")
        if self.zoom_min_pixels <= 0 or self.zoom_max_pixels < self.zoom_min_pixels:
            p.append("zoom_min_pixels/zoom_max_pixels: need 0 < min <= max")
        if self.vllm_mode not in ("colocate", "server"):
            p.append("vllm_mode: use colocate or server")
        if self.use_vllm and not (self.use_ray and self.ray_use_gpu) and not _cuda_available():
            p.append("use_vllm: vLLM needs a GPU; set use_vllm false on CPU machines")
        if self.use_ray and self.ray_num_workers < 1:
            p.append("ray_num_workers: must be >= 1 with use_ray")
        if self.num_processes < 1:
            p.append("num_processes: must be >= 1")
        if self.num_processes > 1 and self.ray_num_workers > 1 and self.num_processes != self.ray_num_workers:
            p.append(f"num_processes={self.num_processes} and ray_num_workers={self.ray_num_workers} disagree; "
                     f"set only num_processes")
        if self.fsdp and self.lora:
            p.append("fsdp and lora: pick one (LoRA needs no sharding at 7B; FSDP shards a full fine-tune)")
        if self.lora and self.lora_r <= 0:
            p.append("lora_r: must be > 0")
        if self.tool_threads < 1:
            p.append("tool_threads: must be >= 1")
        if self.loss_type not in ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"):
            p.append(f"loss_type: {self.loss_type!r} is not a TRL GRPO loss type")
        if self.scale_rewards not in ("group", "batch", "none"):
            p.append("scale_rewards: use group, batch or none")
        for name in ("accuracy_weight", "format_weight", "tool_bonus_weight", "region_weight"):
            if not math.isfinite(getattr(self, name)):
                p.append(f"{name}: must be a finite number")
        if self.tool_actors < 0:
            p.append("tool_actors: must be >= 0")
        if self.log_episodes < 0:
            p.append("log_episodes: must be >= 0")
        return p

    def world_size(self) -> int:
        """Trainer ranks: `num_processes` (the launcher's generic field) or the older `ray_num_workers`."""
        if self.num_processes > 1:
            return self.num_processes
        return self.ray_num_workers if self.use_ray else 1

    def reward_settings(self) -> RewardSettings:
        return RewardSettings(self.accuracy_weight, self.format_weight, self.tool_bonus_weight, self.region_weight,
                              self.max_answer_chars, self.mask_truncated_episodes, self.max_failure_rate)

    def zoom_config(self) -> dict[str, Any]:
        return {"max_pixels": self.zoom_max_pixels, "min_pixels": self.zoom_min_pixels, "frame": self.frame,
                "max_turns": self.max_zooms, "read_timeout_s": self.tool_read_timeout_s}


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken: no GPU path
        return False


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
    from pipeline.core.records import VQASample, read_jsonl

    samples = list(read_jsonl(path, VQASample))
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


# --- callbacks -------------------------------------------------------------------------------------------
def _callbacks(cfg: RLConfig, ckpt_dir: Path, ray_mode: bool, rewards: ZoomRewards, counters: dict) -> list[Any]:
    from transformers import TrainerCallback

    class NonFiniteGradGuard(TrainerCallback):
        """Skip the optimizer update when any gradient is NaN/inf (grads dropped; AdamW skips params without grad)."""

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):  # type: ignore[override]
            import torch

            if model is None:
                return
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads and not all(torch.isfinite(g).all() for g in grads):
                for p in model.parameters():
                    p.grad = None
                counters["nonfinite_skipped"] = counters.get("nonfinite_skipped", 0) + 1
                log.warning("rl: non-finite gradients at step %d; update skipped", state.global_step + 1)

    class RewardLog(TrainerCallback):
        """Append the step's logged metrics to rewards.jsonl (rank 0)."""

        def on_log(self, args, state, control, logs=None, **kw):  # type: ignore[override]
            if not state.is_world_process_zero or not logs or "reward" not in logs:
                return
            row = {"step": state.global_step}
            row.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))
                        and (k in LOG_KEYS or k.startswith("episodes/"))})
            row["nonfinite_skipped"] = counters.get("nonfinite_skipped", 0)
            with open(Path(cfg.output_dir) / "rewards.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    class CheckpointMarker(TrainerCallback):
        """After a checkpoint is complete: latest.json (atomic, written last); under Ray, report it on every rank."""

        def on_save(self, args, state, control, **kw):  # type: ignore[override]
            path = ckpt_dir / f"checkpoint-{state.global_step}"
            # rank 0 may still be writing the folder when another rank gets here: wait for every rank
            _barrier()
            if ray_mode:
                import ray.train

                metrics = {"step": state.global_step, **{k: float(v) for k, v in rewards.last_batch.items()}}
                # every rank reports (Ray needs the same number of reports from each), the folder once: Ray
                # merges reported folders into one, so N ranks reporting it would copy it N times
                ckpt = ray.train.Checkpoint.from_directory(str(path)) if state.is_world_process_zero else None
                ray.train.report(metrics, checkpoint=ckpt)
            if state.is_world_process_zero:
                atomic_write_text(ckpt_dir / "latest.json",
                                  json.dumps({"step": state.global_step, "path": str(path.resolve())}))

    return [NonFiniteGradGuard(), RewardLog(), CheckpointMarker()]


def _barrier() -> None:
    """Wait for every rank of the default process group (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint named by latest.json when it exists and is complete, else None."""
    marker = ckpt_dir / "latest.json"
    if not marker.exists():
        return None
    try:
        path = Path(json.loads(marker.read_text(encoding="utf-8"))["path"])
    except (json.JSONDecodeError, KeyError):
        return None
    return path if (path / "trainer_state.json").exists() else None


def _trim_reward_log(path: Path, step: int) -> None:
    """Drop log lines after the resumed step (they were written after the checkpoint and will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    atomic_write_text(path, "".join(k + "\n" for k in keep))


# --- training --------------------------------------------------------------------------------------------
def generation_batch_size(cfg: RLConfig, ray_mode: bool) -> int:
    """Rollouts per optimizer step over all ranks: Ray workers, or the ranks the launcher started."""
    world = cfg.world_size() if ray_mode else int(os.environ.get("WORLD_SIZE", "1") or 1)
    return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world


def _grpo_config(cfg: RLConfig, ckpt_dir: Path, ray_mode: bool) -> Any:
    from trl import GRPOConfig

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
        mask_truncated_completions=cfg.mask_length_truncated,
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
    dataset = build_dataset(samples, cfg.frame)

    device = "cuda" if (_cuda_available() and (cfg.ray_use_gpu or not ray_mode)) else "cpu"
    # fp32 master weights even with bf16: bf16 is autocast (accelerate / FSDP mixed precision). A bf16 policy
    # under AdamW at lr 5e-7 rounds ~99% of its updates away (tests/test_rl_gpu_path.py measures it).
    sharded = cfg.fsdp and (cfg.world_size() if ray_mode else int(os.environ.get("WORLD_SIZE", "1") or 1)) > 1
    model, processor = load_model(inputs["model"], dtype="float32", device="cpu" if sharded else device)
    set_pixel_bounds(processor, min_pixels=cfg.zoom_min_pixels, max_pixels=cfg.zoom_max_pixels)
    prepare_processor(processor, cfg.chat_template)

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
    env_factory = make_env_factory(backend, cfg.frame, counters=counters)
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
        args=_grpo_config(cfg, ckpt_dir, ray_mode),
        train_dataset=dataset,
        processing_class=processor,
        environment_factory=env_factory,
        callbacks=_callbacks(cfg, ckpt_dir, ray_mode, rewards, counters),
        peft_config=_lora_config(cfg) if cfg.lora else None,
        tool_threads=cfg.tool_threads,
    )
    return RLRun(cfg, trainer, rewards, counters, backend, inputs, len(samples), resume_from, start_step,
                 ray_mode, t0)


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
    trainer.save_model(str(final))  # every rank: with FSDP the full state dict is gathered; rank 0 writes
    if trainer.is_world_process_zero():
        processor = trainer.processing_class
        processor.save_pretrained(str(final))
        if getattr(processor, "chat_template", None):
            (final / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
        summary["final_model"] = str(final)
        rows = read_reward_log(out / "rewards.jsonl")
        summary["last_log"] = rows[-1] if rows else {}
        if cfg.plot and rows:
            summary["plot"] = str(plot_reward_curve(rows, out / "reward_curve.png"))
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
    return summary


def _full(p: Any) -> Any:
    """A parameter's whole tensor (an FSDP2 shard is gathered)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def read_reward_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_reward_curve(rows: list[dict[str, Any]], path: Path, smooth: int = 5) -> Path:
    """Tool-call rate, zoom success, accuracy and format rate (and the total reward) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    window = max(1, min(smooth, len(rows)))

    def rolling(v: list[float]) -> list[float]:
        return [sum(v[max(0, i - window + 1): i + 1]) / len(v[max(0, i - window + 1): i + 1]) for i in range(len(v))]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, key in PLOT_KEYS.items():
        v = [float(r.get(key, float("nan"))) for r in rows]
        (line,) = ax1.plot(steps, rolling(v), lw=2, label=f"{label} ({window}-step mean)" if window > 1 else label)
        if window > 1:
            ax1.plot(steps, v, lw=0.8, alpha=0.3, color=line.get_color())
    ax1.set_xlabel("step")
    ax1.set_ylabel("rate")
    ax1.set_ylim(-0.05, 1.05)
    ax1.legend()
    ax1.set_title("episodes")
    ax2.plot(steps, rolling([float(r.get("reward", float("nan"))) for r in rows]), lw=2, label="total reward")
    for k in ("rewards/accuracy/mean", "rewards/format/mean", "rewards/tool_bonus/mean"):
        ax2.plot(steps, rolling([float(r.get(k, float("nan"))) for r in rows]), ls="--", label=k.split("/")[1])
    ax2.set_xlabel("step")
    ax2.legend()
    ax2.set_title(f"rewards ({window}-step mean)" if window > 1 else "rewards")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- Ray Train -------------------------------------------------------------------------------------------
def _ray_train_loop(config: dict[str, Any]) -> None:
    cfg = RLConfig(**config["cfg"])
    train_worker(cfg, ray_mode=True)


def run_ray(cfg: RLConfig) -> dict[str, Any]:
    """The trainer under Ray Train's TorchTrainer (workers = DDP ranks); Ray restores the run from its storage."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env_vars = {k: os.environ[k] for k in ("RAY_TRAIN_ENABLE_PRINT_PATCH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                           "HF_DATASETS_OFFLINE", "KNOWZOOM_CACHE", "TRL_EXPERIMENTAL_SILENCE")
                if k in os.environ}
    env_vars.setdefault("OMP_NUM_THREADS", str(max(cfg.torch_threads, 1)))
    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or None, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env_vars})
        started = True
    storage = Path(cfg.ray_storage_path or Path(cfg.output_dir) / "ray").resolve()
    cfg_dict = cfg.to_dict()
    cfg_dict["output_dir"] = str(Path(cfg.output_dir).resolve())
    for k in ("model", "train_data", "train_data_fallback", "image_manifest"):
        if cfg_dict[k] and Path(cfg_dict[k]).exists():
            cfg_dict[k] = str(Path(cfg_dict[k]).resolve())
    t0 = time.time()
    try:
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"cfg": cfg_dict},
            scaling_config=ScalingConfig(num_workers=cfg.world_size(), use_gpu=cfg.ray_use_gpu,
                                         resources_per_worker={"CPU": cfg.ray_cpus_per_worker,
                                                               **({"GPU": 1} if cfg.ray_use_gpu else {})}),
            torch_config=TorchConfig(backend="nccl" if cfg.ray_use_gpu else "gloo"),
            run_config=RunConfig(name="rl", storage_path=str(storage),
                                 checkpoint_config=CheckpointConfig(num_to_keep=max(cfg.save_total_limit, 1))),
        )
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    summary_path = Path(cfg_dict["output_dir"]) / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["ray_fit_seconds"] = round(time.time() - t0, 1)
    summary["ray_checkpoint"] = str(result.checkpoint.path) if result.checkpoint else None
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return summary


def run(cfg: RLConfig) -> dict[str, Any]:
    """`knowzoom rl`: train, then return the summary (also in OUTPUT_DIR/train_summary.json)."""
    cfg.check()
    resolve_inputs(cfg)  # fail fast (before Ray starts) on missing inputs
    if cfg.use_ray:
        return run_ray(cfg)
    return train_worker(cfg, ray_mode=False)
