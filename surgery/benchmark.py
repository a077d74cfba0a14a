"""`vsurgery bench`: what a retrofitted model gains on this device, end to end.

In one process and on the same inputs: the teacher with stock attention (SDPA's default choice, and SDPA
forced to cuDNN on CUDA), the teacher with its self-attention core skipped (the ceiling for any attention
change), and the student — an export, or the teacher with a plan applied (training-free). Each row is one
denoising step as the pipeline calls the transformer (with classifier-free guidance: both branches), and
with `video` the whole generation (text encoder, every step, VAE decode). Timings are measurements of this
machine, never test assertions.

The yardstick for a student at attention cost b (its FLOPs over dense): if attention time fell exactly with
its FLOPs, a step would take T_skip + b·(T_stock − T_skip), so ideal(b) = T_stock / that.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import SurgeryError
from .loading import load_config, load_model
from .model import PRESETS, conditioner, default_text_tokens, image_embeddings, model_kind, resolve_grid
from .parallel import check_context_parallel, context_parallel
from .plan import Plan
from .planned import check_plan_grid, check_training_free
from .swap import apply, install_processors, self_attention_modules, variant_processors
from .timing import attention_core_skipped, compile_blocks, median_ms, peak_memory, warmup_calls
from .variants import dense_attention_flops
from .wan import fingerprint, latent_channels


@dataclass
class BenchRow:
    name: str
    step_ms: float  # one denoising step: the transformer once per guidance branch
    speedup: float  # stock step / this step
    peak_memory_gib: float | None = None
    video_s: float | None = None  # the whole generation, with `video`
    video_speedup: float | None = None


@dataclass
class BenchReport:
    model: str
    student: str
    device: str
    versions: dict
    grid: dict
    tokens: int
    dtype: str
    compiled: bool
    guidance_branches: int
    repeats: int
    converted_layers: int  # self-attention layers whose variant is not `full`
    attention_flops_ratio: float  # the student's attention FLOPs over dense
    rows: list[BenchRow] = field(default_factory=list)
    ceiling_speedup: float = 0.0  # stock step / step with the attention core skipped
    ideal_speedup: float = 0.0  # ideal(b) at the student's attention FLOPs ratio (module docstring)
    of_ideal: float = 0.0  # the student's speedup over ideal(b)
    # (stock − student) / (stock − skipped): share of the possible time saved; None where attention takes
    # under 2% of the step (a CPU toy run), as the ratio would be noise.
    saving_share: float | None = None
    predicted_speedup: float | None = None  # from a latency-planned plan, to set beside the measured one
    context_parallel: int = 1  # processes each step is split over (Ulysses), all timed together
    video_steps: int | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> BenchRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        return asdict(self)


STOCK, STOCK_CUDNN, SKIPPED, STUDENT = "stock (SDPA default)", "stock (SDPA cuDNN)", "attention core skipped", "student"


def _attention_flops_ratio(model, grid) -> tuple[float, int]:
    """The model's self-attention FLOPs over dense at `grid`, and how many layers are not dense."""
    config = dict(model.config)
    heads, head_dim, layers = config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]
    dense = dense_attention_flops(grid.tokens, heads, head_dim)
    converted = {fqn: p for fqn, p in variant_processors(model).items() if p.name != "full"}
    total = (layers - len(converted)) * dense + sum(
        type(p).flops(p.observed_config(), grid, heads, head_dim) for p in converted.values())
    return total / (dense * layers), len(converted)


def _student_source(model_spec: str, student: str | None, plan: Plan | str | Path | None):
    """(label, a function that gives the student's self-attention processors or model)."""
    if (student is None) == (plan is None):
        raise SurgeryError("give the student as --student (an export folder) or --plan (a plan for --model)")
    if plan is not None:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        return f"{model_spec} + plan", plan
    if fingerprint(load_config(student)) != fingerprint(load_config(model_spec)):
        raise SurgeryError(f"{student} and {model_spec} are different architectures")
    return student, None


@contextlib.contextmanager
def _sdpa_cudnn(enabled: bool):
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        yield


def step_inputs(model_spec: str, config: dict, grid, guidance: bool, device, dtype) -> list[dict]:
    """The transformer's inputs for one denoising step at `grid`: one call per guidance branch (random
    latents, the same for both; random text embeddings, one per branch; timestep 500) as the model's pipeline
    makes them: one timestep per token for Wan2.2 TI2V, random CLIP image tokens for Wan2.1 I2V. Outputs come as
    tuples (return_dict=False), which context parallelism's output hook requires."""
    pt, ph, pw = config["patch_size"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, latent_channels(config), grid.frames * pt, grid.height * ph, grid.width * pw, generator=g)
    text_tokens = default_text_tokens(model_spec)
    texts = [torch.randn(1, text_tokens, config["text_dim"], generator=g) for _ in range(2 if guidance else 1)]
    kind = model_kind(model_spec)
    timestep = torch.full((1, grid.tokens) if kind.expand_timesteps else (1,), 500.0, device=device)
    image = image_embeddings(config, kind.image_tokens, 1, g)
    image = None if image is None else image.to(device, dtype)
    return [dict(hidden_states=conditioner(config)(latents).to(device, dtype), timestep=timestep,
                 encoder_hidden_states=text.to(device, dtype), encoder_hidden_states_image=image,
                 return_dict=False)
            for text in texts]


def planned_processors(model, plan: Plan) -> dict:
    """The processors `plan` gives `model`, built on it and left out: install them with `install_processors`."""
    stock = {fqn: attn.processor for fqn, attn in self_attention_modules(model).items()}
    apply(model, plan)
    planned = variant_processors(model)
    install_processors(model, stock)
    return planned


def time_step(model, inputs: list[dict], name: str, repeats: int, device, *, cudnn: bool = False,
              warmup: int = 1) -> BenchRow:
    """One row: the median of `repeats` steps (every call of `inputs`) after `warmup`, and its peak memory."""
    def step():
        with torch.no_grad(), _sdpa_cudnn(cudnn):
            for branch in inputs:
                model(**branch)

    with peak_memory(device) as memory:
        ms = median_ms(step, repeats, device, warmup=warmup)
    return BenchRow(name, ms, 0.0, memory["gib"])


def yardsticks(stock_ms: float, skipped_ms: float, student_ms: float, flops_ratio: float) -> dict:
    """ceiling, ideal(b) at the student's FLOPs ratio b, the share of it reached and of the possible saving."""
    ideal = stock_ms / (skipped_ms + flops_ratio * (stock_ms - skipped_ms))
    return dict(
        ceiling_speedup=stock_ms / skipped_ms, ideal_speedup=ideal, of_ideal=stock_ms / student_ms / ideal,
        saving_share=(stock_ms - student_ms) / (stock_ms - skipped_ms) if stock_ms > 1.02 * skipped_ms else None,
    )


def benchmark(
    model_spec: str = "tiny",
    *,
    student: str | None = None,
    plan: Plan | str | Path | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    repeats: int = 5,
    guidance: bool = True,
    video: bool = False,
    video_steps: int = 50,
    compile: bool = False,
    device=None,
    dtype=None,
    cp: int = 1,
) -> BenchReport:
    """Time stock, skipped-core and student steps of `model_spec` on this device (see the module docstring).

    student: an export folder of `model_spec`'s architecture; or plan: a plan applied to `model_spec` itself
    (untrained learned variants are accepted here, for their speed only, with a note in the report).
    cp: context-parallel processes (`surgery.parallel.context_parallel`); every process times the same steps.
    """
    check_context_parallel(cp, load_config(model_spec)["num_attention_heads"])
    student_label, plan = _student_source(model_spec, student, plan)
    if cp > 1:
        from accelerate import PartialState

        device = PartialState().device  # this process's GPU
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if video and model_spec == "toy":
        raise SurgeryError("--video times a Wan pipeline; the toy teacher samples with its own loop (vsurgery generate)")
    teacher = load_model(model_spec, device=device, dtype=dtype)
    config = dict(teacher.config)
    grid = resolve_grid(model_spec, config, frames, height, width)
    notes = []
    if plan is not None:
        check_plan_grid(plan, grid)
        try:
            check_training_free(plan)
        except SurgeryError:
            notes.append("the plan's learned variants run untrained: their speed is real, their output is not")
        stock_processors = {fqn: attn.processor for fqn, attn in self_attention_modules(teacher).items()}
        student_processors = planned_processors(teacher, plan)
        student_model = None
    else:
        student_model = context_parallel(load_model(student, device=device, dtype=dtype), cp)
    context_parallel(teacher, cp)  # after the plan's processors are built: they take its config when installed
    inputs = step_inputs(model_spec, config, grid, guidance, device, dtype)
    if compile:
        for model in (teacher, student_model):
            if model is not None:
                compile_blocks(model)
    warmup = warmup_calls(compile)

    rows = [time_step(teacher, inputs, STOCK, repeats, device, warmup=warmup)]
    if device.type == "cuda":
        rows.append(time_step(teacher, inputs, STOCK_CUDNN, repeats, device, cudnn=True, warmup=warmup))
    with attention_core_skipped(teacher):
        rows.append(time_step(teacher, inputs, SKIPPED, repeats, device, warmup=warmup))
    if student_model is None:
        install_processors(teacher, student_processors)
        student_model = teacher
    ratio, converted = _attention_flops_ratio(student_model, grid)
    rows.append(time_step(student_model, inputs, STUDENT, repeats, device, warmup=warmup))
    stock_ms, skipped_ms, student_ms = rows[0].step_ms, rows[-2].step_ms, rows[-1].step_ms
    for row in rows:
        row.speedup = stock_ms / row.step_ms

    if video:
        _time_videos(model_spec, teacher, student_model, plan, rows, grid, device, dtype, video_steps,
                     stock_processors if plan is not None else None, student_processors if plan is not None else None)

    latency = (plan.meta.get("latency") if plan is not None else None) or {}
    return BenchReport(
        model=model_spec, student=student_label, device=device_name(device), versions=software_versions(device),
        grid=grid.to_dict(), tokens=grid.tokens, dtype=str(dtype).removeprefix("torch."), compiled=compile,
        guidance_branches=len(inputs), repeats=repeats, converted_layers=converted, attention_flops_ratio=ratio,
        rows=rows, **yardsticks(stock_ms, skipped_ms, student_ms, ratio),
        predicted_speedup=latency.get("predicted_speedup"), video_steps=video_steps if video else None, notes=notes,
        context_parallel=cp,
    )


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def software_versions(device) -> dict:
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    if device.type == "cuda":
        import triton

        versions |= {"triton": triton.__version__, "cuda": torch.version.cuda,
                     "cudnn": str(torch.backends.cudnn.version())}
    return versions


def _pipeline_for(model_spec: str, transformer, device, dtype):
    """A text-to-video pipeline around `transformer`: the tiny one, a diffusers pipeline folder's, or
    Wan2.1's full-size components with random weights for a preset."""
    from .pipeline import TINY_FORMS, build_tiny_pipeline

    if model_spec == "tiny" or model_spec in TINY_FORMS:
        pipe = build_tiny_pipeline(transformer=transformer, spec=model_spec)
        return pipe.to(device), pipe.tokenizer.model_max_length
    path = Path(model_spec)
    if path.is_dir() and (path / "model_index.json").is_file():
        from diffusers import WanPipeline

        return WanPipeline.from_pretrained(path, transformer=transformer).to(device), 512
    if model_spec in PRESETS:
        from .pipeline import WAN_TEXT_TOKENS, build_random_pipeline

        return build_random_pipeline(transformer, device=device, dtype=dtype, spec=model_spec), WAN_TEXT_TOKENS
    raise SurgeryError(f"--video needs a pipeline: a preset, tiny or a diffusers pipeline folder, not {model_spec}")


def _time_videos(model_spec, teacher, student_model, plan, rows, grid, device, dtype, steps, stock_processors,
                 student_processors):
    """Whole generations (guidance 5, `steps` steps) with the stock teacher and with the student, on one
    pipeline: the second video only swaps the transformer's attention (or the transformer)."""
    import time

    frames, height, width = (getattr(grid, a) for a in ("frames", "height", "width"))
    preset = PRESETS.get(model_spec)
    scale = preset.vae_scale if preset else (4, 8, 8)
    pt, ph, pw = teacher.config.patch_size
    size = dict(num_frames=(frames * pt - 1) * scale[0] + 1, height=height * ph * scale[1], width=width * pw * scale[2])
    pipe, text_tokens = _pipeline_for(model_spec, teacher, device, dtype)
    pipe.set_progress_bar_config(disable=True)

    def generate(num_steps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        pipe("a red square moving left to right", negative_prompt="", num_inference_steps=num_steps,
             guidance_scale=5.0, max_sequence_length=text_tokens, output_type="np",
             generator=torch.Generator(device).manual_seed(0), **size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began

    for name in (STOCK, STUDENT):
        if plan is not None:
            install_processors(teacher, stock_processors if name == STOCK else student_processors)
        else:
            pipe.transformer = teacher if name == STOCK else student_model
        generate(2)  # warm-up: allocations, autotuning, the VAE's first decode
        row = next(r for r in rows if r.name == name)
        row.video_s = generate(steps)
    for row in rows:
        if row.video_s is not None:
            row.video_speedup = rows[0].video_s / row.video_s
