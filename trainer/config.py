"""Training configs: one dataclass per stage, grouped in `TrainConfig`, with named presets.

Presets: `micro` (every stage in minutes on 2 CPU cores: proves the pipeline), `shapes` (the built-in
model on Shapes World), `wan-1.3b` (the paper's recipe on Wan2.1-T2V-1.3B for GPU clusters:
documented and constructible, not run here). Any field can be overridden from the command line with
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
    # torch.compile the trained model's forward (nn.Module.compile: same weights and state keys, ~1e-6 from eager);
    # the stages whose loss calls forward: teacher, teacher-refine, causal-teacher, ode-init, text (not the VAE's).
    # Shapes teacher on 2 CPU cores (session 11): a bare forward + backward 0.307 -> 0.246 s, but the whole stage
    # step (text encoder, per-sample noise, EMA) only 0.348 -> 0.330 s over 480 steps: left off in the preset
    compile: bool = False
    # bfloat16 autocast of the loss (forward and backward; weights and optimizer stay float32). On these
    # 2 CPU cores (AMD EPYC, AVX-512 BF16; session 13): a shapes teacher step 0.361 -> 0.269 s, a VAE step
    # on 32x32 windows 1.69 -> 0.97 s (1 thread)
    autocast: bool = False
    # the attention kernel of the stage's DiTs (causvid_core.attention: "sdpa" | "math"); a compute choice, not
    # saved with the weights. Shapes preset, bfloat16 autocast, 2 CPU cores (session 15): a teacher step (120
    # steps, twice each) 0.38-0.43 s with torch's fused CPU kernel ("sdpa"), 0.28-0.30 s with "math" (the fused
    # kernel's backward is the slow part); a DMD step 0.735 -> 0.690 s. Forward alone "math" is no faster: the
    # ODE pairs' compiled sampling (not a loop stage: it keeps "sdpa") took 29 -> 36 s a batch of 32 with it
    attention: str = "sdpa"


@dataclass
class DataConfig:
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
    # 0: the teacher's ODE (CausVid's pairs). > 0: stochastic teacher steps (sample_flow's eta), each pair's
    # fresh noise seeded by (seed, step, pair): trajectories of the student's own kind of sampling. On shapes
    # (session 7): the teacher at eta 1 draws triangles 6/12 instead of 0-2/12 (all-four 31/48 vs 29/48; fewer
    # squares), but its pairs are no deterministic map: ODE init 27.1% all-four (vs 47.9%), after DMD 47.9%
    # / 25.0% held-out (vs 62.5% / 45.8%). Kept at 0.
    eta: float = 0.0
    # torch.compile the teacher (shapes, 2 CPU cores, session 11: 50-52 -> 32-36 s per batch of 32 pairs, after a
    # first batch that compiles; ~13 of the stage's ~41 minutes)
    compile: bool = False
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


@dataclass
class TrainConfig:
    name: str = "shapes"
    seed: int = 0
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
    """The built-in model, on 2 CPU cores alone, within the 2.5 h budget (session 13's layout). DONE.json seconds,
    bfloat16 autocast. runs/s16 (an AMD EPYC of session 16): VAE 37.4 min and text 0.1 (restored from runs/s13's
    published files, same config, with that run's times), teacher 66.3 (15000 steps at ~0.245 s with the "math"
    attention kernel plus ~5 min encoding the 2048 clips), causal teacher 1.3, ODE pairs 13.0 (32 teacher steps,
    compiled), ODE init 7.0, DMD 4.8: 2.16 h. runs/s17 (the same, from a clean checkout on an AVX-512 / bf16 EPYC,
    family 26): teacher 34.3, causal teacher 0.7, ODE pairs 7.2, ODE init 3.9, DMD 2.6: 1.44 h with the VAE's 37.4;
    its student and every number of docs/RESULTS.md came out identical to runs/s16's. runs/s18 (19000 teacher steps,
    the same machine as runs/s17): teacher 43.0 (~0.125 s a step), causal teacher 0.7, ODE pairs 7.1, ODE init 3.9,
    DMD 2.5: 1.58 h with the VAE's 37.4 (at runs/s16's ~0.245 s a step ~2.43 h); the published runs/s18e reran its
    ODE init and DMD with this preset's adversarial weight (4.6 and 3.0 min): 1.60 h. runs/s13 (12000 teacher steps
    at ~0.37 s with sdpa) took 2.53 h; sessions 1-12's layout (a zero-padded VAE on whole frames, a 2000-step
    decoder stage, an 18000-step float32 teacher) 4.5-5.5 h."""
    return TrainConfig(
        name="shapes",
        data=DataConfig(clip_frames=33, num_clips=2048, roll=True),
        # Circular padding (the world is a torus). Session 13, probes of the first-frame (image) path on 32x32
        # object windows, 1 thread, shapes read from 96 single-frame round trips (circles / squares / triangles
        # of 32 each): zero padding 582 steps 32 / 28 / 25, its misses the objects that cross the frame's edge
        # (drawn as blobs against the zero border); circular 337 steps 32 / 30 / 32. Then image steps first
        # (from inflated weights) and video after: 20 min on 1 thread (310 image + 445 video steps, 32x32
        # windows, burn-in up to 16) read 44 of 48 33-frame round trips (16/16, 15/16, 13/16); with 40x40
        # windows and burn-in up to 32 (fewer steps) 34 of 48; the published zero-padded VAE ~41 of 48
        # (2500 + 2000 decoder steps). Video from scratch sits for hundreds of steps on the plateau where the
        # object is drawn as background (object PSNR ~12 dB after 350 steps); the image path leaves it in 100.
        vae=VAEStage(preset="shapes", overrides=dict(padding="circular"), steps=2000, batch=16, lr=2e-3,
                     video_lr=1e-3, decay_from=1500, clip_frames=9, burn_in_frames=16, crop=32, crop_jitter=4.0,
                     image_steps=600, image_batch_factor=4, image_crop=32, autocast=True,
                     log_every=20, ckpt_every=100, stats_clips=128),
        # off: the decoder fine-tune (2000 steps, 32-83 min) does not fit the budget beside the VAE stage above
        vae_decoder=VAEDecoderStage(steps=0, batch=2, lr=2e-4, warmup=100, decoder_res_blocks=2, adv_weight=0.5,
                                    adv_start=200, log_every=20, ckpt_every=100),
        text=TextStage(steps=300, batch=64, lr=3e-3, log_every=20, ckpt_every=100),
        dit=DiTArch(preset="shapes"),
        # EMA weights and an annealed lr: the constant-lr raw weights of 7500 steps scored 35% all-four
        # (sessions 1-12: 18000 steps, decay from 8000, float32). 15000 steps since runs/s16 (12000 before): the
        # minutes the "math" attention kernel saved go back into the teacher, which caps the student. 19000 since
        # runs/s18 (the most that keeps runs/s16's slower CPU under 2.5 h). On validation prompts (seeds +10 / +11,
        # 192 / 48, float16) the student went 87.5% -> 91.1% all-four in distribution (shape 90.6 -> 94.3%) and
        # 16.7% -> 31.2% on held-out pairs; its teacher's loss over the last 1000 steps 0.224 -> 0.219.
        teacher=TeacherStage(steps=19000, batch=16, lr=3e-4, ema=0.999, decay_from=5000, autocast=True,
                             attention="math", log_every=20, ckpt_every=200),
        # Off (steps 0; turn on with --set teacher_refine.steps=4000). The teacher's 2048 clips, seen ~140 times
        # each, fit it 13-17% better than fresh ones (sigma 0.3-0.85). 4000 steps on 10240 clips (11 min to
        # encode, 19 to train) cut the fresh-clip loss 5-6% and lifted the teacher from 21 to 24/48 all-four
        # (29 -> 33 with shape contrast, squares 10 -> 14 of 16), but the student distilled from it scored
        # 60.4% / 41.7% (in-distribution / held-out) against 62.5% / 45.8%: squares up 10 -> 15 of 21,
        # circles down 30 -> 24 of 31. Not worth 30 minutes of a pipeline already over its time budget.
        # More clips from the start do not help either: a teacher trained 18000 steps on 10240 clips (session 7,
        # --set data.num_clips=10240) draws as this one does (diagnose: 36 vs 37 of 48 from sigma 0.6, 29 vs 29
        # from noise; triangles 0 of 12 from noise).
        teacher_refine=TeacherRefineStage(steps=0, batch=16, lr=2e-4, num_clips=10240, warmup=100, ema=0.998,
                                          log_every=20, ckpt_every=200),
        causal_teacher=CausalTeacherStage(steps=300, batch=16, lr=1e-4, autocast=True, attention="math",
                                          log_every=20, ckpt_every=100),
        # 768 pairs: ODE init memorised (0% held out). Shape-contrastive guidance (+1.5 x (square - mean of
        # circle, triangle) for a square): the teacher draws squares 10/16 instead of 2/16, all-four 29/48
        # instead of 21/48 (triangles stay circles); at 3 the distilled student drew squares too big to find
        ode_pairs=ODEPairsStage(num_pairs=1536, teacher_steps=32, guidance=3.0, batch=32, contrast=1.5,
                                contrast_words=[list(SHAPE_WORDS)], compile=True, autocast=True),
        # + a matching-aware latent discriminator from step 200 (real clips of their prompt against the student's
        # x0 and against real clips under a swapped shape word): the teacher's pairs draw triangles as domes and
        # regression copies them; the data has none. Session 9, same pairs and DMD: all-four in distribution
        # 47.9% -> 66.7% after ODE init, 62.5% -> 77.1% after DMD, triangles 1 -> 10 of 20, squares 10 -> 14
        # of 21 (held-out pairs 45.8% -> 41.7%). At weight 0.05 it did nothing (52.1%, triangles 0 of 20).
        # It varies from run to run: session 10's run (restored teacher, new pairs) got 37.5% after ODE init
        # (colour and motion 73%, triangles 8 of 20) against 50.0% without it (triangles 1 of 20); after DMD 70.8%.
        # Weight 0.25 since runs/s18e (0.5 before). Session 18, runs/s18's pairs, validation prompts (seeds +10 / +11,
        # 192 / 48) after DMD: weight 0.5 91.1% / 31.2% all-four (shape 94.3%), 0.25 93.8% / 33.3% (shape 98.4%,
        # colour 95.8%); 0.5 with 2000 ODE-init steps 88.0% / 35.4% (shape 98.4% but colour 89.6%).
        ode_init=ODEInitStage(steps=1000, batch=16, lr=1e-4, adv_weight=0.25, adv_start=200,
                              mismatch_words=[list(SHAPE_WORDS)], autocast=True, attention="math", log_every=20,
                              ckpt_every=100),
        # Self-Forcing's generator input (the student's own cached rollout): against CausVid's noised data it
        # kept in-distribution all-four (45.8% vs 47.9%, n=48) and lifted held-out pairs 33.3% -> 45.8% (n=24)
        # How far DMD moves the student: with gen_every 5, 600 steps are 120 generator updates. Session 10 (a run
        # restored from the built-in files, new ODE pairs, one ODE init; all-four in distribution / held-out):
        # 600 steps 70.8% / 25.0%, 1200 steps 81.2% / 29.2%, lr 4e-5 85.4% / 29.2%, lr 8e-5 89.6% / 16.7%
        # (circles 31/31, squares 16/21, triangles 9/20). In distribution rises, held-out pairs fall at 8e-5.
        # Not yet a full run with publish: the preset keeps the published model's settings.
        # Session 11 measured the same students on more prompts (192 in distribution as docs/RESULTS.md now uses,
        # 96 other in-distribution prompts, 48 held-out): built-in 77.1% / 72.9% / 41.7%, this run's preset
        # 76.6% / 68.8% / 20.8%, lr 8e-5 82.8% / 71.9% / 14.6%, lr 8e-5 + contrast 3 82.3% / 76.0% / 18.8%;
        # guidance 3 (lr 8e-5) 68.8% on the 96; a second seed of lr 8e-5 67.7%. So a stronger DMD gains ~5 points
        # in distribution and loses ~25 on held-out pairs: not taken. A frozen latent shape classifier trained on
        # the data (94.5% on held-out real latents) as an extra generator loss (weight 0.02 / 0.1) left shapes
        # unchanged on the 96 (76 / 75 of 96 vs 76): its loss fell to ~0 within 100 generator updates while the
        # pixels still showed small, soft triangles read as circles (dropped, not committed).
        # Session 14, on runs/s13 (this layout; `causvid eval`, 192 / 48 prompts): lr 2e-5 (published) 78.6% / 8.3%,
        # lr 8e-5 84.9% / 0.0% (colour 88.5% -> 97.9%, shape 87.0% both): a stronger DMD fixes colours, not shapes.
        # Session 17, on runs/s17 (the published run), validation prompts disjoint from RESULTS.md's (prompt seeds
        # +10 / +11, 192 / 48, float16 weights), all-four in distribution / held-out: as published 87.5% / 16.7%
        # (shape 90.6%); DMD 1200 steps 85.9% / 16.7% (colour 99.5%, shape 87.0%); DMD lr 4e-5 88.0% / 20.8%;
        # ODE init adv_weight 1.0 81.2% / 16.7%; ODE pairs contrast 2.0 85.4% / 20.8%. All within the noise
        # (+-5 points) or worse; the shape, at ~90% like the teacher's, is what holds the student under 90%.
        # Session 18, on runs/s18 (19000-step teacher, ODE-init adversarial weight 0.5), the same validation prompts:
        # as trained 91.1% / 31.2%; DMD lr 4e-5 89.1% / 22.9%; lr 8e-5 90.1% / 20.8% (colour 99.0%, shape 90.6%);
        # contrast 3.0 89.1% / 29.2%. On docs/RESULTS.md's prompts runs/s18's student scored 88.0% / 31.2%, the
        # published runs/s18e's (weight 0.25) 92.2% / 35.4%.
        dmd=DMDStage(steps=600, batch=8, lr=2e-5, lr_critic=1e-4, gen_every=5, guidance=2.0, ema=0.99,
                     ema_start=100, generator_input="rollout", contrast=1.5, contrast_words=[list(SHAPE_WORDS)],
                     autocast=True, attention="math", log_every=10, ckpt_every=100),
        # the rolling window of endless streams: the context the model trained on (9 latent frames: two past
        # chunks + the current one). Ten 30-chunk streams: colour, background or motion wrong in 16/300 chunks
        # at 9 + 0 (16 at 12 + 0, 27 at 12 + 3); with the student before contrastive guidance 9 / 24 / 32
        student=StudentConfig(window_frames=9, sink_frames=0),
    )


def wan_1_3b() -> TrainConfig:
    """The paper's recipe at full size (reference/causal-wan.md section 7); for GPU clusters."""
    return TrainConfig(
        name="wan-1.3b",
        data=DataConfig(clip_frames=81, num_clips=0),
        dit=DiTArch(preset="wan2.1-t2v-1.3b"),
        teacher=TeacherStage(steps=0, batch=64, lr=2e-6, shift=8.0),
        ode_pairs=ODEPairsStage(num_pairs=1536, teacher_steps=48, guidance=6.0, batch=1),
        ode_init=ODEInitStage(steps=3000, batch=128, lr=2e-6),
        dmd=DMDStage(steps=600, batch=64, lr=2e-6, lr_critic=4e-7, gen_every=5, guidance=3.0, ema=0.99,
                     ema_start=200, generator_input="rollout", weight_decay=0.01),
        student=StudentConfig(steps_preset="self-forcing-4step", chunk_frames=3),
    )


PRESETS = {"micro": micro, "shapes": shapes, "wan-1.3b": wan_1_3b}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}") from None


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
        setattr(target, parts[-1], value)
    return cfg
