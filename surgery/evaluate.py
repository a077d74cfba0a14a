"""Student vs teacher on the same seeds and inputs, and video generation.

`evaluate` samples with a flow-matching Euler sampler from the same noise and text embeddings
through both models and reports: the per-step velocity error of the student on the teacher's own
trajectory (relative L2), the final-latent relative error of the two independent trajectories,
and PSNR/SSIM of the decoded videos when a VAE is at hand (else of the latents, scaled to [0, 1]
by the teacher's range).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import SurgeryError
from .grid import VideoGrid, video_grid
from .io import atomic_file, check_output_file
from .loading import load_config, load_model, verify_model
from .model import EXPERTS, default_video, expert_spec, is_toy, model_kind, resolve_grid, split_expert
from .metrics import psnr, relative_l2, ssim
from .parallel import check_context_parallel, context_parallel, is_main_process
from .plan import Plan
from .planned import check_plan_grid, check_training_free, load_planned
from .swap import apply
from .experts import ExpertPlans, TwoExperts, load_denoiser, load_plan_for
from .trajectories import sample_latents, sampling_starts
from .wan import fingerprint


@dataclass
class EvalReport:
    """Student against teacher on the same seeds (what `vsurgery eval` prints; `to_dict` for --json)."""

    student: str
    teacher: str
    grid: dict
    samples: int
    steps: int
    seed: int
    compared_on: str  # "decoded video", or "latents" where no decoder is at hand
    prompts: list[str] | str
    velocity_error_per_step: list[float]  # the student's relative L2 error on the teacher's trajectory
    velocity_error_mean: float
    final_latent_rel_error: float  # of the two independent trajectories
    psnr_db: float
    ssim: float

    def to_dict(self) -> dict:
        return asdict(self)


def _step_counter(progress, total: int):
    """on_step() for the samplers: counts steps into `progress(done, total)`; None without progress."""
    if progress is None:
        return None
    done = 0

    def on_step() -> None:
        nonlocal done
        done += 1
        progress(done, total)

    return on_step


def _pipeline_parts(spec: str) -> dict:
    """The VAE (and, for Wan2.1 I2V, CLIP image encoder and processor) of `spec`'s pipeline: a tiny one's built in
    code, a pipeline folder's loaded; {} for a model without a pipeline."""
    from .pipeline import TINY_FORMS, build_tiny_pipeline

    spec = split_expert(spec)[0]
    if spec == "tiny" or spec in TINY_FORMS:
        pipe = build_tiny_pipeline(spec=spec)
        return {name: getattr(pipe, name, None) for name in ("vae", "image_encoder", "image_processor")}
    folder = Path(spec)
    if not (folder.is_dir() and (folder / "vae").is_dir()):
        return {}
    from diffusers import AutoencoderKLWan

    parts = {"vae": AutoencoderKLWan.from_pretrained(folder / "vae")}
    if (folder / "image_encoder").is_dir():
        from transformers import AutoImageProcessor, CLIPVisionModel

        parts["image_encoder"] = CLIPVisionModel.from_pretrained(folder / "image_encoder").eval()
        parts["image_processor"] = AutoImageProcessor.from_pretrained(folder / "image_processor")
    return parts


def _vae_stats(vae):
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def _decoder(spec: str):
    """A function latents → video [B, F, C, H, W] in [0, 1], or None when the model has no decoder."""
    if is_toy(load_config(spec)):
        from .toy import decode_unit

        return decode_unit
    vae = _pipeline_parts(spec).get("vae")
    if vae is None:
        return None

    @torch.no_grad()
    def decode(latents):
        mean, std = _vae_stats(vae)
        video = vae.decode(latents.float() * std + mean).sample  # [B, C, F, H, W] in [-1, 1]
        return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)

    return decode


@torch.no_grad()
def encode_image(spec: str, image, grid: VideoGrid, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A PIL image as the conditioning of image-to-video model `spec` at `grid`, as diffusers' Wan image-to-video
    pipeline makes it: latents [1, C, F, H, W] of the image followed by black frames (of the image alone for
    Wan2.2 TI2V, [1, C, 1, H, W]), normalised by the VAE's statistics, and the CLIP image tokens of a model with
    image_dim (else None)."""
    import numpy as np

    parts = _pipeline_parts(spec)
    if "vae" not in parts:
        raise SurgeryError(f"{spec} has no VAE here to encode --image with: use a pipeline folder or a tiny form")
    vae, kind = parts["vae"], model_kind(spec)
    config = load_config(spec)
    pt, ph, pw = config["patch_size"]
    st, sh, sw = kind.vae_scale
    frames, height, width = (grid.frames * pt - 1) * st + 1, grid.height * ph * sh, grid.width * pw * sw
    pixels = torch.from_numpy(np.asarray(image.resize((width, height)), dtype=np.float32) / 127.5 - 1)
    first = pixels.permute(2, 0, 1)[None, :, None]  # [1, 3, 1, H, W] in [-1, 1]
    video = first if kind.expand_timesteps else torch.cat([first, first.new_zeros(1, 3, frames - 1, height, width)], 2)
    mean, std = _vae_stats(vae)
    latents = (vae.encode(video).latent_dist.mode() - mean) / std
    embeds = None
    if config.get("image_dim"):
        inputs = parts["image_processor"](images=image, return_tensors="pt")
        embeds = parts["image_encoder"](**inputs, output_hidden_states=True).hidden_states[-2].to(device)
    return latents.to(device), embeds


def evaluate(
    student_spec: str | None,
    teacher_spec: str = "tiny",
    *,
    plan: Plan | str | Path | None = None,
    samples: int = 2,
    steps: int = 8,
    seed: int = 0,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    verify: bool = False,
    progress=None,
    cp: int = 1,
    image: str | Path | None = None,
) -> EvalReport:
    """Compare a student (an export, or with `plan` the teacher with a training-free plan applied) with its
    teacher on `samples` seeded generations.

    verify: the student is an export; check its files' SHA-256 first. progress(done, total): sampling steps.
    cp: context-parallel processes (`surgery.parallel.context_parallel`) for both models.
    image: the first frame (an image file) every sample of an image-to-video teacher (or Wan2.2 TI2V) starts
    from; an image-to-video teacher without one gets a random first-frame latent per sample."""
    if (student_spec is None) == (plan is None):
        raise SurgeryError("give the student as an export folder or as a training-free --plan, not both or neither")
    check_context_parallel(cp, load_config(teacher_spec)["num_attention_heads"])
    grid = resolve_grid(teacher_spec, load_config(teacher_spec), frames, height, width)
    kind = model_kind(teacher_spec)
    picture = None if image is None else check_image(teacher_spec, image)
    if plan is not None:
        plan = plan if isinstance(plan, (Plan, ExpertPlans)) else load_plan_for(teacher_spec, plan)
        plans = plan.plans if isinstance(plan, ExpertPlans) else {None: plan}
        for one in plans.values():
            check_training_free(one)
            check_plan_grid(one, grid)
        if isinstance(plan, ExpertPlans):
            plan.check_for(teacher_spec)
            student = TwoExperts(*(load_planned(expert_spec(teacher_spec, name), plans[name]) for name in EXPERTS),
                                 kind.boundary_ratio)
        else:
            student = load_planned(teacher_spec, plan)
        student_spec = f"{teacher_spec} + plan"
    else:
        # Compare architectures from the configs first: loading a mismatched full-size model is slow.
        if fingerprint(load_config(student_spec)) != fingerprint(load_config(teacher_spec)):
            raise SurgeryError(
                f"{student_spec} and {teacher_spec} are different architectures; eval needs a student of the teacher")
        student_experts = model_kind(student_spec).experts if split_expert(student_spec)[1] is None else EXPERTS[:1]
        teacher_experts = kind.experts if split_expert(teacher_spec)[1] is None else EXPERTS[:1]
        if len(student_experts) != len(teacher_experts):
            raise SurgeryError(f"{student_spec} has {len(student_experts)} transformer(s) and {teacher_spec} "
                               f"{len(teacher_experts)}: eval needs a student of the teacher, expert for expert")
        if verify:
            verify_model(student_spec)
        student = load_denoiser(student_spec)
    return compare(_context_parallel(student, cp), _context_parallel(load_denoiser(teacher_spec), cp),
                   teacher_spec, grid, samples=samples, steps=steps, seed=seed, student_name=student_spec,
                   progress=progress, image=picture)


def _context_parallel(denoiser, cp: int):
    """`context_parallel` for a transformer, or for both experts of a `TwoExperts`."""
    for model in (denoiser.high, denoiser.low) if isinstance(denoiser, TwoExperts) else (denoiser,):
        context_parallel(model, cp)
    return denoiser


def compare(
    student,
    teacher,
    teacher_spec: str,
    grid: VideoGrid,
    *,
    samples: int = 2,
    steps: int = 8,
    seed: int = 0,
    prompts: list[str] | None = None,
    student_name: str = "student",
    progress=None,
    image=None,
) -> EvalReport:
    """`evaluate` on models in memory (on the teacher's device): `teacher_spec` names the teacher, for its
    decoder and text length. prompts: the toy's captions to compare on (default: `samples` drawn from `seed`).
    progress(done, total): sampling steps. image: a PIL image, the first frame of an image-to-video teacher."""
    decode = _decoder(teacher_spec)
    picture = None if image is None else encode_image(teacher_spec, image, grid, next(teacher.parameters()).device)
    starts, prompts = sampling_starts(teacher, teacher_spec, grid, samples, seed, prompts, picture)
    samples = len(starts)
    on_step = _step_counter(progress, 2 * samples * steps)  # two trajectories per sample
    per_step, latent_errors, psnrs, ssims = [], [], [], []
    for start in starts:
        z_teacher, errors = sample_latents(teacher, steps=steps, reference=student, on_step=on_step, **start)
        z_student, _ = sample_latents(student, steps=steps, on_step=on_step, **start)
        per_step.append(errors)
        z_teacher, z_student = z_teacher.cpu(), z_student.cpu()  # decoders and metrics run on the CPU
        latent_errors.append(relative_l2(z_student, z_teacher))
        if decode is not None:
            a, b = decode(z_teacher)[0], decode(z_student)[0]
        else:
            lo, hi = z_teacher.min(), z_teacher.max()
            a = ((z_teacher - lo) / (hi - lo)).clamp(0, 1)[0].transpose(0, 1)
            b = ((z_student - lo) / (hi - lo)).clamp(0, 1)[0].transpose(0, 1)
        psnrs.append(psnr(a, b))
        ssims.append(ssim(a, b))
    steps_mean = [sum(col) / len(col) for col in zip(*per_step)]
    return EvalReport(
        student=student_name, teacher=teacher_spec, grid=grid.to_dict(), samples=samples, steps=steps, seed=seed,
        compared_on="decoded video" if decode is not None else "latents",
        prompts=prompts or "random text embeddings",
        velocity_error_per_step=steps_mean, velocity_error_mean=sum(steps_mean) / len(steps_mean),
        final_latent_rel_error=sum(latent_errors) / samples, psnr_db=sum(psnrs) / samples, ssim=sum(ssims) / samples,
    )


def _video_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in (".mp4", ".gif"):
        raise SurgeryError(f"--out must end in .mp4 or .gif, got {path.name}")
    return path


def generate(spec: str, prompt: str, out: str | Path, *, force: bool = False, **options) -> tuple[Path, int]:
    """`generate_video` written to `out` (.mp4 or .gif); returns (path, frames). The destination is checked
    before sampling: an existing file is overwritten only with `force`. Under context parallelism every process
    samples the same video and the main one writes it."""
    check_output_file(_video_path(out), force=force)
    check_image(spec, options.get("image"))  # before the pipeline loads
    video = generate_video(spec, prompt, **options)
    return write_video(video, out) if is_main_process() else _video_path(out), len(video)


def write_video(frames, path: str | Path, fps: int = 8) -> Path:
    """frames: [F, H, W, 3] uint8 or floats in [0, 1]; .mp4 through imageio-ffmpeg, .gif otherwise."""
    import imageio.v3 as iio
    import numpy as np

    path = _video_path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    with atomic_file(path) as tmp:
        if path.suffix == ".mp4":
            iio.imwrite(tmp, frames, plugin="FFMPEG", extension=".mp4", fps=fps, macro_block_size=1)
        else:
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
    return path


def generate_video(
    spec: str,
    prompt: str,
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 1.0,
    verify: bool = False,
    progress=None,
    plan: Plan | str | Path | None = None,
    cp: int = 1,
    image: str | Path | None = None,
):
    """Run the pipeline of `spec`; returns frames [F, H, W, 3] floats in [0, 1].

    tiny (or a transformer-only export of it): the tiny pipeline of surgery.pipeline around the
    loaded transformer; a tiny form of another kind (tiny-wan2.*): its tiny pipeline, both experts where it has
    two; toy (or an export of it): the toy sampler with its caption encoder (surgery.toy.sample, uint8 frames);
    a pipeline folder (or a pipeline export): WanPipeline.from_pretrained, WanImageToVideoPipeline with `image`.
    image: the first frame (an image file) of an image-to-video model (required there) or of Wan2.2 TI2V
    (optional); a text-to-video model refuses one.
    verify: `spec` is an export; check its files' SHA-256 first. progress(done, total): denoising steps.
    plan: a training-free plan (one per expert for two experts) applied to the transformers first.
    cp: context-parallel processes (`surgery.parallel.context_parallel`) for the transformers.
    """
    from diffusers import WanPipeline

    from .pipeline import TEXT_TOKENS, TINY_FORMS, build_tiny_pipeline

    check_context_parallel(cp, load_config(spec)["num_attention_heads"])
    kind = model_kind(spec)
    picture = check_image(spec, image)
    if picture is not None:
        from diffusers import WanImageToVideoPipeline
    plans = {}
    if plan is not None:
        plan = plan if isinstance(plan, (Plan, ExpertPlans)) else load_plan_for(spec, plan)
        plans = plan.plans if isinstance(plan, ExpertPlans) else {EXPERTS[0]: plan}
        grid = resolve_grid(spec, load_config(spec), frames, height, width)
        for one in plans.values():
            check_training_free(one)
            check_plan_grid(one, grid)
    on_step = _step_counter(progress, steps)
    path = Path(spec)
    if spec in TINY_FORMS:
        pipe, text_tokens = build_tiny_pipeline(spec=spec), kind.text_tokens
    elif path.is_dir() and (path / "model_index.json").is_file():
        if verify:
            verify_model(spec)
        pipe, text_tokens = WanPipeline.from_pretrained(path) if picture is None else \
            WanImageToVideoPipeline.from_pretrained(path), 512
    else:
        transformer = load_model(spec, verify=verify)
        if plan is not None:
            apply(transformer, plan)
            plans = {}
        if is_toy(dict(transformer.config)):
            from . import toy

            context_parallel(transformer, cp)

            size = dict(zip(("frames", "height", "width"), (frames, height, width)))
            video = toy.sample(transformer, toy.load_caption_encoder(), prompt, seed=seed, steps=steps,
                               on_step=on_step, **{k: v for k, v in size.items() if v is not None})
            return video.numpy()
        if fingerprint(dict(transformer.config)) != fingerprint(load_config("tiny")):
            raise SurgeryError(
                f"generate needs a pipeline (a diffusers folder with model_index.json) or the tiny model; {spec} is a bare transformer"
            )
        pipe, text_tokens = build_tiny_pipeline(transformer=transformer), TEXT_TOKENS
        spec = "tiny"
    for name, one in plans.items():
        apply(getattr(pipe, name), one)
    for name in EXPERTS:
        if getattr(pipe, name, None) is not None:
            context_parallel(getattr(pipe, name), cp)
    if picture is not None and type(pipe) is not WanImageToVideoPipeline:
        # Wan2.2 TI2V: the same parts and settings, with a first frame
        pipe = WanImageToVideoPipeline(**pipe.components, boundary_ratio=pipe.config.boundary_ratio,
                                       expand_timesteps=pipe.config.expand_timesteps)
    defaults = default_video(spec)
    frames, height, width = (default if value is None else value
                             for value, default in zip((frames, height, width), defaults))
    video_grid(frames, height, width, vae_scale=kind.vae_scale)  # check the size before sampling

    def step_end(pipeline, step, timestep, tensors):
        on_step()
        return tensors

    pipe.set_progress_bar_config(disable=True)  # progress goes through `progress`, in the CLI's style
    pipe.to(pipe.transformer.device)  # under context parallelism: this process's device
    result = pipe(
        prompt=prompt, num_frames=frames, height=height, width=width, num_inference_steps=steps,
        guidance_scale=guidance_scale, max_sequence_length=text_tokens, output_type="np",
        generator=torch.Generator().manual_seed(seed), callback_on_step_end=step_end if on_step else None,
        **({} if picture is None else {"image": picture}),
    )
    return result.frames[0]


def check_image(spec: str, image: str | Path | None):
    """The image an image-to-video model `spec` is conditioned on, read (RGB), or None; SurgeryError for a
    missing image where the model needs one, an image for a text-to-video model, or an unreadable file."""
    kind = model_kind(spec)
    if image is None:
        if kind.image == "required":
            raise SurgeryError(f"{spec} is an image-to-video model: give its first frame with --image")
        return None
    if kind.image is None:
        raise SurgeryError(f"{spec} is a text-to-video model: it takes no --image")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise SurgeryError(f"--image {image} does not exist") from None
    except (OSError, UnidentifiedImageError) as e:
        raise SurgeryError(f"--image {image} is not a readable image ({type(e).__name__})") from None
