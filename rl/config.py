"""The config of `knowzoom rl` (agentic GRPO): every field with its help, its checks, and the settings objects
derived from it. Kept apart from rl/stage.py so that `knowzoom rl --help` and config parsing import neither
torch nor TRL."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import hfield
from pipeline.core.launch import LaunchConfig
from pipeline.core.zoom_settings import ZoomSettings
from rl.rewards import RewardSettings


@dataclass
class RLConfig(LaunchConfig, ZoomSettings):
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
    mask_length_truncated: bool = hfield(True, help="Completions cut by max_completion_length carry no loss (they stay in the attention mask; rl/trainer.py fix 5).")
    max_failure_rate: float = hfield(0.25, help="A step fails when more than this share of its rollouts raised.")
    tool_errors_break_format: bool = hfield(True, help="The format reward is 0 when the tool rejected a call (bad arguments, a box it cannot open).")
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
        if self.zoom_frame not in ("shown_pixels", "norm1000"):
            p.append("zoom_frame: use shown_pixels or norm1000")
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
                              self.max_answer_chars, self.mask_truncated_episodes, self.max_failure_rate,
                              self.tool_errors_break_format)

    def zoom_config(self) -> dict[str, Any]:
        return self.zoom_tool_kwargs()


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken: no GPU path
        return False
