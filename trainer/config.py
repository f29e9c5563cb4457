"""Training configs: one dataclass per stage, grouped in `TrainConfig`, with named presets.

Presets: `micro` (every stage in minutes on 2 CPU cores: proves the pipeline), `shapes` (the built-in
model on Shapes World), `wan-1.3b` and `wan-14b` (the papers' recipe on a user's Wan2.1-T2V teacher for GPU
clusters: FSDP, bf16, activation checkpointing; run here only through `wan-tiny`, the same code at toy size,
and `causvid-train bench-memory`), `wan-tiny`. Any field can be overridden from the command line with
`--set stage.field=value` (e.g. `--set dmd.steps=200 --set teacher.lr=2e-4`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from causvid_core.world import SHAPES as SHAPE_WORDS  # Shapes World's rival shape words


@dataclass
class LoopConfig:
    steps: int = 100
    batch: int = 8  # global batch (all processes, all accumulation steps)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    log_every: int = 10
    ckpt_every: int = 50
    # torch.compile the trained model's forward (teacher, teacher-refine, causal-teacher, ode-init, text stages)
    compile: bool = False
    # bfloat16 autocast of the loss (forward and backward); weights and optimizer stay float32
    autocast: bool = False
    # the attention kernel of the stage's DiTs ("sdpa" | "math"): a compute choice, not saved with the weights
    attention: str = "sdpa"
    # activation checkpointing of the trained DiT's blocks (recomputed in the backward pass): for real Wan sizes
    checkpointing: bool = False


@dataclass
class InputsConfig:
    """A user's own models and data (`causvid-train ... --teacher --vae --text-encoder --prompts`): set, they
    replace the Shapes World stages (vae, text, teacher) and the built-in data set's prompts."""
    teacher: Optional[str] = None  # any file load_dit reads: a Wan2.1 folder, a ComfyUI repack, ours
    vae: Optional[str] = None  # the Wan VAE (.pth or safetensors)
    text_encoder: Optional[str] = None  # umT5 (Wan .pth with its tokenizer folder, ComfyUI's file) or ours
    prompts: Optional[str] = None  # text (a prompt a line), JSONL ("prompt"/"text"/"caption") or CSV
    videos: Optional[str] = None  # a folder of videos with caption .txt sidecars, or a CSV of path and caption

    @property
    def active(self) -> bool:
        return self.teacher is not None


@dataclass
class ParallelConfig:
    """How the stages that train a DiT use several processes (trainer/sharding.py)."""
    strategy: str = "ddp"  # "ddp": a whole copy per process | "fsdp": weights, gradients, optimizer sharded (FSDP2)
    param_dtype: str = "float32"  # fsdp: the dtype the gathered weights compute in ("float32" | "bfloat16")
    reshard_after_forward: bool = True  # fsdp: free each block's gathered weights after its forward


@dataclass
class DataConfig:
    height: int = 64  # pixel size of the generated clips (user-data runs; Shapes World is always 64)
    width: int = 64
    clip_frames: int = 33  # pixel frames, 4k+1
    num_clips: int = 512  # pre-rendered training clips (latents cached for the DiT stages)
    seed: int = 1234
    # the teacher stages see each clip's latents rolled by a random whole number of latent cells: with a
    # circular-padded VAE (required) that is exactly the latent of the same clip started elsewhere on the torus
    roll: bool = False


@dataclass
class VAEStage(LoopConfig):
    preset: str = "shapes"
    overrides: dict = field(default_factory=dict)  # VAEConfig fields changed from the preset
    clip_frames: int = 9  # short clips: the VAE is causal and local in time
    kl_weight: float = 1e-6
    stats_clips: int = 64  # clips encoded to measure the latent mean/std
    fg_weight: float = 10.0  # extra loss weight on the object's pixels (it covers only 2-12% of a frame)
    sample_latent: bool = False  # decode mu + sigma * eps instead of mu (slow: sigma starts at 1)
    warmup: int = 50  # linear lr warm-up steps (at most a tenth of the steps), again where the video phase starts
    burn_in_frames: int = 0  # up to this many frames of history (no gradient) before the reconstructed ones
    crop: int = 0  # > 0: train on crop x crop object-centred windows (data.crop_batch) instead of whole frames
    crop_jitter: float = 6.0  # the object's centre lands within +- this many pixels of the window's centre
    # image phase: the first image_steps steps train single frames (the encoder's and decoder's first-frame
    # path, as Wan's VAE started from an image VAE), image_batch_factor frames per batch index, on
    # image_crop windows; the weights start "inflated" (every causal conv sees only its current frame, the
    # time resamplers pass it through), so the video phase starts from a per-frame autoencoder. At the
    # switch the optimizer state is reset (its moments of the time taps, still zero, would jolt them) and
    # the learning rate (video_lr) warms up again
    image_steps: int = 0
    image_batch_factor: int = 4
    image_crop: int = 32
    video_lr: Optional[float] = None  # None: lr
    decay_from: Optional[int] = None  # cosine decay to zero from this step (None: constant to the end)


@dataclass
class VAEDecoderStage(LoopConfig):
    steps: int = 0  # 0: no fine-tune (the VAE stage's decoder is the final one)
    batch: int = 4  # whole clips of the data set (data.clip_frames each)
    fg_weight: float = 10.0
    edge_weight: float = 1.0  # weight of the spatial-gradient L1 (prices blurred edges)
    warmup: int = 20  # then cosine decay to zero
    decoder_res_blocks: Optional[int] = None  # grow the decoder to this many (+1) blocks a level (None: keep)
    # adversarial term (trainer/adversarial.py): a patch discriminator on frames, weighted adaptively
    adv_weight: float = 0.0  # 0: off; else the scale of the adaptive (VQGAN) weight
    adv_start: int = 0  # the decoder feels the discriminator from this step (the discriminator trains from 0)
    lr_disc: float = 2e-4
    disc_channels: tuple = (32, 64, 128)


@dataclass
class TextStage(LoopConfig):
    text_dim: int = 64
    text_len: int = 16
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 128


@dataclass
class DiTArch:
    preset: str = "shapes"
    overrides: dict = field(default_factory=dict)  # DiTConfig fields changed from the preset


@dataclass
class TeacherStage(LoopConfig):
    shift: float = 5.0  # timesteps sampled on this shifted grid
    cond_dropout: float = 0.1  # empty prompt, for classifier-free guidance
    ema: float = 0.0  # weight EMA decay of the saved teacher (0: the raw weights)
    ema_start: int = 0
    decay_from: Optional[int] = None  # cosine lr decay to zero from this step (None: constant lr)


@dataclass
class TeacherRefineStage(LoopConfig):
    """More training of the finished teacher on a bigger clip set, whose first data.num_clips clips are the
    teacher stage's (same seed): a teacher that has seen few clips many times fits them better than fresh
    ones. Same loss, shift and condition dropout as the teacher stage; warm-up, then cosine decay to zero."""
    steps: int = 0  # 0: no refinement (the teacher stage's weights are the final teacher)
    num_clips: int = 0  # clips of its latent set (latents-refine.safetensors)
    warmup: int = 100
    ema: float = 0.998  # weight EMA decay of the saved teacher (started from the teacher's weights)


@dataclass
class CausalTeacherStage(LoopConfig):
    pass


@dataclass
class ContrastGuidance:
    """Attribute-contrastive guidance of a teacher's targets: + contrast * (cond - prompts with a rival
    word), rivals from each group of contrast_words (trainer.losses.contrast_prompts)."""
    contrast: float = 0.0
    contrast_words: list = field(default_factory=list)

    @property
    def active_contrast(self) -> float:
        """The weight in effect: 0 without word groups (plain CFG)."""
        return self.contrast if self.contrast_words else 0.0


@dataclass
class ODEPairsStage(ContrastGuidance):
    num_pairs: int = 256
    teacher_steps: int = 48  # a multiple of 4: the student's warped steps are points of this grid
    guidance: float = 3.0
    batch: int = 8
    # 0: the teacher's ODE (CausVid's pairs); > 0: stochastic teacher steps, whose pairs are no deterministic map
    eta: float = 0.0
    compile: bool = False  # torch.compile the teacher (a third off the stage's time on a CPU)
    autocast: bool = False  # bfloat16 autocast of the teacher's sampling (LoopConfig.autocast)


@dataclass
class ODEInitStage(LoopConfig):
    # adversarial term (trainer/stages/matching.py, as ADD adds one to distillation): the student's x0 against
    # real latents of the data set, by a prompt-conditioned discriminator; 0: off
    adv_weight: float = 0.0
    adv_start: int = 0  # the student feels the discriminator from this step (the discriminator trains from 0)
    lr_disc: float = 2e-4
    disc_width: int = 64
    mismatch_words: list = field(default_factory=list)  # word groups for the mismatched-prompt negatives


@dataclass
class DMDStage(LoopConfig, ContrastGuidance):  # contrast: of the real score
    lr_critic: float = 1e-4
    gen_every: int = 5  # generator updated every 5th step, critic every step (CausVid)
    guidance: float = 3.0  # real score: cond + g * (cond - uncond)
    t_min: float = 20.0
    t_max: float = 980.0
    ema: float = 0.99
    ema_start: int = 0
    generator_input: str = "data"  # "data" (CausVid: data noised to the step list) | "rollout" (Self-Forcing)
    real_score: str = "teacher"  # "teacher" (bidirectional) | "causal-teacher" (the ablation)
    init: str = "ode-init"  # "ode-init" | "teacher" (the ablation without ODE initialisation)


@dataclass
class StudentConfig:
    steps_preset: str = "self-forcing-4step"
    chunk_frames: int = 3
    window_frames: Optional[int] = None  # rolling window the student is exported for (None: full cache)
    sink_frames: int = 0
    export_dtype: str = "float32"  # the exported student's weights ("bfloat16": ComfyUI's Wan repacks' dtype)


@dataclass
class TrainConfig:
    name: str = "shapes"
    seed: int = 0
    inputs: InputsConfig = field(default_factory=InputsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEStage = field(default_factory=VAEStage)
    vae_decoder: VAEDecoderStage = field(default_factory=VAEDecoderStage)
    text: TextStage = field(default_factory=TextStage)
    dit: DiTArch = field(default_factory=DiTArch)
    teacher: TeacherStage = field(default_factory=TeacherStage)
    teacher_refine: TeacherRefineStage = field(default_factory=TeacherRefineStage)
    causal_teacher: CausalTeacherStage = field(default_factory=CausalTeacherStage)
    ode_pairs: ODEPairsStage = field(default_factory=ODEPairsStage)
    ode_init: ODEInitStage = field(default_factory=ODEInitStage)
    dmd: DMDStage = field(default_factory=DMDStage)
    student: StudentConfig = field(default_factory=StudentConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = cls()
        for k, v in d.items():
            sub = getattr(cfg, k)
            if dataclasses.is_dataclass(sub):
                setattr(cfg, k, type(sub)(**v))
            else:
                setattr(cfg, k, v)
        return cfg


def micro() -> TrainConfig:
    """Every stage for real at the smallest size that still exercises it: minutes on 2 CPU cores."""
    return TrainConfig(
        name="micro",
        data=DataConfig(clip_frames=9, num_clips=32, roll=True),
        vae=VAEStage(preset="wan-tiny", overrides=dict(padding="circular"), steps=30, batch=4, lr=2e-3,
                     clip_frames=5, burn_in_frames=4, image_steps=10, image_crop=16, log_every=5, ckpt_every=10,
                     stats_clips=8),
        vae_decoder=VAEDecoderStage(steps=6, batch=2, lr=1e-3, decoder_res_blocks=2, adv_weight=0.5, adv_start=2,
                                    disc_channels=(8, 16, 16), log_every=2, ckpt_every=3),
        text=TextStage(steps=30, batch=16, lr=3e-3, text_dim=16, text_len=12, num_layers=1, num_heads=2, ffn_dim=32,
                       log_every=5, ckpt_every=10),
        dit=DiTArch(preset="shapes", overrides=dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16,
                                                    text_len=12)),
        teacher=TeacherStage(steps=30, batch=8, lr=2e-3, ema=0.9, decay_from=20, log_every=5, ckpt_every=10),
        teacher_refine=TeacherRefineStage(steps=6, batch=8, lr=1e-3, num_clips=48, warmup=2, ema=0.5, log_every=2,
                                          ckpt_every=3),
        causal_teacher=CausalTeacherStage(steps=10, batch=8, lr=1e-3, log_every=5, ckpt_every=5),
        ode_pairs=ODEPairsStage(num_pairs=8, teacher_steps=8, batch=4),
        ode_init=ODEInitStage(steps=10, batch=4, lr=1e-3, adv_weight=0.1, adv_start=5, disc_width=16,
                              mismatch_words=[list(SHAPE_WORDS)], log_every=5, ckpt_every=5),
        dmd=DMDStage(steps=10, batch=4, lr=1e-3, lr_critic=1e-3, gen_every=2, log_every=5, ckpt_every=5),
    )


def shapes() -> TrainConfig:
    """The built-in model, trained on 2 CPU cores alone within a 2.5 h budget (timings: docs/training.md)."""
    return TrainConfig(
        name="shapes",
        data=DataConfig(clip_frames=33, num_clips=2048, roll=True),
        # circular padding (the world is a torus); single frames first, then clips: video from scratch stalls
        vae=VAEStage(preset="shapes", overrides=dict(padding="circular"), steps=2000, batch=16, lr=2e-3,
                     video_lr=1e-3, decay_from=1500, clip_frames=9, burn_in_frames=16, crop=32, crop_jitter=4.0,
                     image_steps=600, image_batch_factor=4, image_crop=32, autocast=True,
                     log_every=20, ckpt_every=100, stats_clips=128),
        # off: the decoder fine-tune does not fit the time budget beside the VAE stage
        vae_decoder=VAEDecoderStage(steps=0, batch=2, lr=2e-4, warmup=100, decoder_res_blocks=2, adv_weight=0.5,
                                    adv_start=200, log_every=20, ckpt_every=100),
        text=TextStage(steps=300, batch=64, lr=3e-3, log_every=20, ckpt_every=100),
        dit=DiTArch(preset="shapes"),
        # EMA weights, an annealed lr, and as many steps as the budget allows: the teacher caps the student
        teacher=TeacherStage(steps=19000, batch=16, lr=3e-4, ema=0.999, decay_from=5000, autocast=True,
                             attention="math", log_every=20, ckpt_every=200),
        # off (--set teacher_refine.steps=4000 turns it on): a better teacher, not a better student
        teacher_refine=TeacherRefineStage(steps=0, batch=16, lr=2e-4, num_clips=10240, warmup=100, ema=0.998,
                                          log_every=20, ckpt_every=200),
        causal_teacher=CausalTeacherStage(steps=300, batch=16, lr=1e-4, autocast=True, attention="math",
                                          log_every=20, ckpt_every=100),
        # enough pairs that ODE init does not memorise them; shape-contrastive guidance makes the teacher draw squares
        ode_pairs=ODEPairsStage(num_pairs=1536, teacher_steps=32, guidance=3.0, batch=32, contrast=1.5,
                                contrast_words=[list(SHAPE_WORDS)], compile=True, autocast=True),
        # + a prompt-matching latent discriminator: the teacher's pairs draw triangles as domes, the data does not
        ode_init=ODEInitStage(steps=1000, batch=16, lr=1e-4, adv_weight=0.25, adv_start=200,
                              mismatch_words=[list(SHAPE_WORDS)], autocast=True, attention="math", log_every=20,
                              ckpt_every=100),
        # Self-Forcing's generator input (the student's own rollout) and a gentle lr: held-out pairs survive
        dmd=DMDStage(steps=600, batch=8, lr=2e-5, lr_critic=1e-4, gen_every=5, guidance=2.0, ema=0.99,
                     ema_start=100, generator_input="rollout", contrast=1.5, contrast_words=[list(SHAPE_WORDS)],
                     autocast=True, attention="math", log_every=10, ckpt_every=100),
        # the rolling window of endless streams: the context the model trained on (two past chunks + the current)
        student=StudentConfig(window_frames=9, sink_frames=0),
    )


def wan_1_3b(name: str = "wan-1.3b", dit: str = "wan2.1-t2v-1.3b") -> TrainConfig:
    """The papers' recipe at full size (reference/causal-wan.md section 7) for GPU clusters: FSDP with bf16
    weights in compute, float32 gradients and optimizer state, activation checkpointing. `batch` is the papers'
    global batch (64 GPUs); on N GPUs, --set dmd.grad_accum=64/N (and ode_init.grad_accum=64/N) keeps their
    per-GPU micro-batch (1 for DMD, 2 for ODE init), which is what fits in memory.
    teacher / causal_teacher steps > 0 fine-tune the user's teacher on their clips (--videos) first."""
    # autocast: bf16 compute also where nothing is sharded (one GPU); FSDP's bf16 weights make it a no-op
    tuned = dict(batch=64, lr=2e-6, checkpointing=True, autocast=True, log_every=1, ckpt_every=50)
    return TrainConfig(
        name=name,
        parallel=ParallelConfig(strategy="fsdp", param_dtype="bfloat16"),
        data=DataConfig(height=480, width=832, clip_frames=81, num_clips=0),
        dit=DiTArch(preset=dit),
        teacher=TeacherStage(steps=0, shift=8.0, **tuned),
        causal_teacher=CausalTeacherStage(steps=0, **tuned),
        ode_pairs=ODEPairsStage(num_pairs=1536, teacher_steps=48, guidance=6.0, batch=1, autocast=True),
        ode_init=ODEInitStage(steps=3000, batch=128, lr=2e-6, checkpointing=True, autocast=True, log_every=10,
                              ckpt_every=250),
        dmd=DMDStage(steps=600, batch=64, lr=2e-6, lr_critic=4e-7, gen_every=5, guidance=3.0, ema=0.99,
                     ema_start=200, generator_input="rollout", weight_decay=0.01, checkpointing=True, autocast=True,
                     log_every=1, ckpt_every=50),
        student=StudentConfig(steps_preset="self-forcing-4step", chunk_frames=3, export_dtype="bfloat16"),
    )


def wan_14b() -> TrainConfig:
    """The same recipe on Wan2.1-T2V-14B (as Krea Realtime distilled it with Self-Forcing's DMD): the 14B
    teacher, critic and real score only fit sharded (reference/causal-wan.md section 7)."""
    return wan_1_3b(name="wan-14b", dit="wan2.1-t2v-14b")


def wan_tiny() -> TrainConfig:
    """The user-data path (a teacher, VAE, text encoder and prompt file from outside) end to end on a CPU in
    minutes, on tiny Wan-layout files: the same code the wan-1.3b recipe runs, at toy size."""
    return TrainConfig(
        name="wan-tiny",
        data=DataConfig(height=32, width=32, clip_frames=9, num_clips=0),
        teacher=TeacherStage(steps=0, batch=2, lr=1e-3, shift=8.0, log_every=2, ckpt_every=2),
        causal_teacher=CausalTeacherStage(steps=0, batch=2, lr=1e-3, log_every=2, ckpt_every=2),
        ode_pairs=ODEPairsStage(num_pairs=4, teacher_steps=8, guidance=3.0, batch=2),
        ode_init=ODEInitStage(steps=4, batch=2, lr=1e-3, log_every=2, ckpt_every=2),
        dmd=DMDStage(steps=4, batch=2, lr=1e-3, lr_critic=1e-3, gen_every=2, guidance=3.0, ema=0.5,
                     generator_input="rollout", log_every=2, ckpt_every=2),
        student=StudentConfig(steps_preset="self-forcing-4step", chunk_frames=3),
    )


PRESETS = {"micro": micro, "shapes": shapes, "wan-1.3b": wan_1_3b, "wan-14b": wan_14b, "wan-tiny": wan_tiny}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}") from None


# stages a pipeline cannot skip: steps must be at least 1 (the optional ones are off at 0)
REQUIRED_LOOPS = ("vae", "text", "teacher", "ode_init", "dmd")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse settings that would train nothing or diverge silently, before any run folder is made."""
    problems = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not isinstance(sub, LoopConfig):
            continue
        name = section.name
        required = name in REQUIRED_LOOPS and not (cfg.inputs.active and name in ("vae", "text", "teacher"))
        problems += loop_problems(name, sub, required)
    op = cfg.ode_pairs
    if not isinstance(op.num_pairs, int) or op.num_pairs < 1:
        problems.append(f"ode_pairs.num_pairs must be a whole number >= 1, got {op.num_pairs!r}")
    if not isinstance(op.teacher_steps, int) or op.teacher_steps < 4 or op.teacher_steps % 4:
        problems.append(f"ode_pairs.teacher_steps must be a multiple of 4, got {op.teacher_steps!r}")
    problems += parallel_problems(cfg)
    if cfg.student.export_dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"student.export_dtype must be float32, bfloat16 or float16, got {cfg.student.export_dtype!r}")
    given = [n for n in ("vae", "text_encoder", "prompts", "videos") if getattr(cfg.inputs, n) is not None]
    if given and not cfg.inputs.active:
        problems.append(f"--{given[0].replace('_', '-')} is for distilling your own teacher: pass --teacher too")
    if not cfg.inputs.active and cfg.teacher.steps == 0:
        problems.append(f"the {cfg.name} preset trains no teacher: pass your own with --teacher (and --vae, "
                        "--text-encoder, --prompts)")
    if cfg.inputs.active:
        absent = [f"--{n.replace('_', '-')}" for n in ("vae", "text_encoder", "prompts") if getattr(cfg.inputs, n) is None]
        if absent:
            problems.append(f"a run from your own teacher also needs {', '.join(absent)}")
        if cfg.ode_init.adv_weight or cfg.ode_pairs.active_contrast or cfg.dmd.active_contrast:
            problems.append(f"the {cfg.name} preset's Shapes World extras (ode_init.adv_weight, contrast guidance) "
                            "do not apply to your own data: use --preset wan-tiny, or set them to 0")
        if cfg.inputs.videos is None and cfg.dmd.generator_input != "rollout":
            problems.append("dmd.generator_input=data needs a video set (--videos): without one use rollout")
        tuned = [n for n in ("teacher", "causal_teacher") if getattr(cfg, n).steps > 0]
        if tuned and cfg.inputs.videos is None:
            problems.append(f"{tuned[0]}.steps > 0 fine-tunes on your clips: pass --videos, or set it to 0")
        if cfg.teacher_refine.steps > 0 or cfg.data.roll:
            problems.append("teacher_refine and data.roll are Shapes World's: set teacher_refine.steps=0 and "
                            "data.roll=false for your own data")
        if cfg.dmd.real_score == "causal-teacher" and cfg.causal_teacher.steps <= 0:
            problems.append("dmd.real_score=causal-teacher needs the causal-teacher stage: set causal_teacher.steps")
    if problems:
        raise ValueError("invalid training settings: " + "; ".join(problems))
    return cfg


def loop_problems(name: str, sub: LoopConfig, required: bool = False) -> list[str]:
    """What is wrong with one stage's loop settings (steps at least 1 when the stage is required)."""
    import math

    problems = []
    low = 1 if required else 0
    if not isinstance(sub.steps, int) or sub.steps < low:
        problems.append(f"{name}.steps must be a whole number >= {low}, got {sub.steps!r}")
    for field_name in ("batch", "grad_accum", "log_every", "ckpt_every"):
        v = getattr(sub, field_name)
        if not isinstance(v, int) or v < 1:
            problems.append(f"{name}.{field_name} must be a whole number >= 1, got {v!r}")
    for field_name in ("lr", "grad_clip"):
        v = getattr(sub, field_name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            problems.append(f"{name}.{field_name} must be a finite number > 0, got {v!r}")
    if isinstance(sub, DMDStage) and (not isinstance(sub.gen_every, int) or sub.gen_every < 1):
        problems.append(f"{name}.gen_every must be a whole number >= 1, got {sub.gen_every!r}")
    return problems


def parallel_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with cfg.parallel (the strategy and the dtype names trainer/sharding.py knows)."""
    problems = []
    if cfg.parallel.strategy not in ("ddp", "fsdp"):
        problems.append(f"parallel.strategy must be ddp or fsdp, got {cfg.parallel.strategy!r}")
    if cfg.parallel.param_dtype not in ("float32", "bfloat16"):
        problems.append(f"parallel.param_dtype must be float32 or bfloat16, got {cfg.parallel.param_dtype!r}")
    return problems


def _typed(value: Any, current: Any, item: str) -> Any:
    """An override's value, checked against the field's current value's type (int, float, bool, str, list)."""
    if isinstance(value, bool) != isinstance(current, bool) and current is not None:
        pass  # true/false for a number (bool is an int in Python), or a number for a flag: refused below
    elif current is None or isinstance(value, type(current)) or (isinstance(current, float) and
                                                                 isinstance(value, int) and not isinstance(value, bool)):
        return float(value) if isinstance(current, float) and not isinstance(value, bool) else value
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    kinds = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a JSON list",
             tuple: "a JSON list", dict: "a JSON object"}
    raise ValueError(f"override {item!r}: {kinds.get(type(current), type(current).__name__)} is expected, "
                     f"got {value!r}")


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """`stage.field=value` strings; the value is parsed as JSON when it can be, else kept as text."""
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like stage.field=value")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target: Any = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not hasattr(target, p):
                raise ValueError(f"override {item!r}: no section {p!r}")
            target = getattr(target, p)
        if isinstance(target, dict):
            target[parts[-1]] = value
            continue
        if not hasattr(target, parts[-1]):
            raise ValueError(f"override {item!r}: no field {parts[-1]!r} in {type(target).__name__}")
        setattr(target, parts[-1], _typed(value, getattr(target, parts[-1]), item))
    return cfg
