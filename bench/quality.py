"""The quality–cost front: planned mixes of variants against each single variant, at several budgets.

For every budget and method, a student of the teacher (`--model`, default the toy):
- `planned-distilled`: the planner with learned candidates measured after stage 1 (`vsurgery plan`);
- `planned-init`: the planner with every candidate measured as built (`vsurgery plan --no-distill-errors`);
- one method per registered variant but `full`: that variant on every layer, at the most expensive of its
  `plan_candidates` settings whose attention FLOPs fit the budget (none where no setting fits).
Each student is scored at three levels of training: training-free (where every variant of its plan is
`training_free`), after stage 1, and after stage 1 + stage 2 (the recipe's: default `mixed` on the toy's
own clips). A plan that two budgets or methods share is trained once. Scores are `vsurgery eval`'s
(`surgery.evaluate.compare`): PSNR and SSIM of the decoded video against the teacher's on the same seeds,
the per-step velocity error on the teacher's trajectory, on captions that neither distillation nor the
planner saw; and on the toy the direction score (`scripts/toy_directions.py`), on prompts that are not
training captions either.

    python bench/quality.py [--model toy] [--budgets 0.7 0.5 0.3 0.15] [--methods planned-distilled vsa ...]
        [--set stage1.steps=40 ...] [--eval-samples 16] [--eval-steps 8] [--direction-seeds 1]
        [--direction-steps 12] [--device cpu|cuda] [--out runs/quality] [--doc docs/quality.md]
        [--plot docs/quality.png] [--jobs 6]

Writes OUT/quality.json (every score, the settings and the times), OUT/students/ (one distill run folder
per trained plan), the tables into --doc between its `quality-table` markers (the whole file when it
does not exist) and the plot (PSNR against attention cost, one line per method, after stage 1 + 2).
A rerun into the same OUT reuses the students already scored there.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

PLANNED = ("planned-distilled", "planned-init")
LEVELS = ("training-free", "stage 1", "stage 1 + 2")
BUDGETS = (0.7, 0.5, 0.3, 0.15)
TABLE_START, TABLE_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


def all_methods() -> list[str]:
    from surgery.variants import VARIANTS

    return [*PLANNED, *(name for name in VARIANTS if name != "full")]


def setting_label(variant: str, config) -> str:
    """The variant with the settings its `plan_candidates` vary, e.g. `hybrid(rate=4)`."""
    from surgery.variants import VARIANTS

    keys = [k for k in dict.fromkeys(k for c in VARIANTS[variant].plan_candidates for k in c)]
    values = config.to_dict()
    return f"{variant}({', '.join(f'{k}={values[k]}' for k in keys)})" if keys else variant


def layers_label(plan) -> str:
    """Layer by layer, runs of the same setting joined: `full, linear ×3, hybrid(rate=4)`."""
    runs: list[list] = []
    for choice in plan.layers.values():
        label = setting_label(choice.variant, choice.config)
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    return ", ".join(label if n == 1 else f"{label} ×{n}" for label, n in runs)


class MeasureOnce:
    """A planner `measure` that measures on its first call and hands back the same table afterwards: the
    error table does not depend on the budget, so one table serves every budget."""

    def __init__(self, measure=None):
        self.measure, self.table = measure, None

    def __call__(self, model, candidates, inputs, *, seed, progress=None, **context):
        from surgery.sensitivity import measure_errors

        if self.table is None:
            self.table = (self.measure(model, candidates, inputs, seed=seed, progress=progress, **context)
                          if self.measure else measure_errors(model, inputs, candidates, seed=seed, progress=progress))
        return self.table


def uniform_plan(spec: str, teacher, grid, variant: str, budget: float, table, dense=None):
    """`variant` on every layer at the most expensive of its candidate settings that fits `budget`, with the
    configs and costs the planner observed in `table` (init errors); None when no setting fits. With `dense`
    (`surgery.sampling.DenseSteps`), its first steps dense and the budget over the sampling run, as the
    planner counts it."""
    from surgery.plan import LayerChoice, Plan
    from surgery.variants import VARIANTS, dense_attention_flops
    from surgery.wan import fingerprint, self_attention_fqn

    config = dict(teacher.config)
    heads, head_dim, layers = config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]
    dense_flops = dense_attention_flops(grid.tokens, heads, head_dim) * layers
    if dense and budget <= dense.share:
        return None
    allowed = dense.planned_budget(budget) if dense else budget
    best = None
    for j, candidate in enumerate(table.candidates):
        if candidate.variant != variant:
            continue
        costs = [VARIANTS[variant].flops(table.configs[i][j], grid, heads, head_dim) for i in range(layers)]
        if sum(costs) <= allowed * dense_flops and (best is None or sum(costs) > best[1]):
            best = (j, sum(costs), costs)
    if best is None:
        return None
    j, total, costs = best
    choices = {self_attention_fqn(i): LayerChoice(variant, table.configs[i][j], costs[i], table.errors[i][j])
               for i in range(layers)}
    ratio = total / dense_flops
    return Plan(spec, fingerprint(config), layers, choices, grid, budget,
                {"dense_flops": dense_flops, "flops": total, "flops_ratio": dense.run_ratio(ratio) if dense else ratio},
                dense_boundary=dense.boundary if dense else None)


def held_out_captions(spec: str, recipe, count: int, seed: int, used: set[str]) -> list[str]:
    """`count` distinct toy captions drawn from `seed` that are not in `used`."""
    from surgery import toy

    drawn = toy.sample_clips(64 * count, toy.clip_generator(seed, 0)).captions()
    fresh = [c for c in dict.fromkeys(drawn) if c not in used]
    return fresh[:count]


def training_captions(recipe, calibration_samples: int) -> set[str]:
    """Every toy caption distillation and the planner see: distillation's clips, the planner's stage-1
    clips (the next seed) and its calibration clips."""
    from surgery import toy

    seed, samples = recipe.train.seed, recipe.data.samples
    sets = [(samples, seed), (samples, seed + 1), (calibration_samples, seed)]
    return {c for n, s in sets for c in toy.toy_dataset(n, s)["caption"]}


class Sweep:
    def __init__(self, args, log, argv: list[str]):
        import torch

        from surgery.loading import load_model
        from surgery.model import is_toy, resolve_grid
        from surgery.recipe import load_recipe
        from surgery.sampling import DenseSteps

        self.args, self.log, self.argv = args, log, argv
        overrides = (["data.source=toy"] if args.model == "toy" else []) + list(args.set or [])
        self.recipe = load_recipe(args.recipe, overrides)
        self.device = torch.device(args.device)
        self.teacher = load_model(args.model).to(self.device)
        self.teacher.requires_grad_(False)
        self.grid = resolve_grid(args.model, dict(self.teacher.config), args.frames, args.height, args.width)
        self.toy = is_toy(dict(self.teacher.config))
        plan = self.recipe.plan  # the first steps dense, where `--set plan.dense_steps=N` asks for it
        self.dense = DenseSteps(plan.dense_steps, plan.sampling_steps) if plan.dense_steps else None
        self.out = Path(args.out)
        self.students: dict[str, Future] = {}
        self.prompts, self.avoid, self.encoder = None, frozenset(), None
        if self.toy:
            from surgery import toy

            self.avoid = frozenset(training_captions(self.recipe, self.recipe.plan.samples))
            self.prompts = held_out_captions(args.model, self.recipe, args.eval_samples, args.eval_seed, self.avoid)
            self.encoder = toy.load_caption_encoder().to(self.device)

    def plans(self):
        """((budget, method), plan) pairs, plan None where nothing fits the budget, as they are ready: the
        init-error plans and the single-variant ones first (one cheap calibration), then the distilled-error
        plans (the planner's stage 1 of every learned candidate), so that students can train meanwhile.
        Planned methods' plans are kept in OUT/plans/ and read back by a rerun."""
        args = self.args
        uniform = [m for m in args.methods if m not in PLANNED]
        for method in [m for m in PLANNED if m in args.methods or (m == "planned-init" and uniform)]:
            planned = self.planned(method)
            if method in args.methods:
                yield from (((budget, method), planned[budget]) for budget in args.budgets)
            if method == "planned-init" and uniform:
                table = self.init_table()
                for budget in args.budgets:
                    for variant in uniform:
                        yield (budget, variant), uniform_plan(args.model, self.teacher, self.grid, variant, budget,
                                                              table, self.dense)

    def planned(self, method: str) -> dict[float, object]:
        """The planner's plan (None where nothing fits) at every budget, with `method`'s errors."""
        from surgery.errors import SurgeryError
        from surgery.plan import Plan
        from surgery.planner import make_plan

        began, plans = time.perf_counter(), {}
        for budget in self.args.budgets:
            path = self.out / "plans" / f"{method}@{budget:g}.json"
            if path.exists():
                plans[budget] = Plan.load(path)
                continue
            try:
                plans[budget] = make_plan(self.args.model, budget, **self.plan_options(method))
                plans[budget].save(path)
            except SurgeryError as e:  # a budget below every candidate's cost
                self.log(f"{method} at {budget:g}: {e}")
                plans[budget] = None
        self.times[f"plan {method}"] = time.perf_counter() - began
        self.log(f"planned {method} at every budget in {self.times[f'plan {method}']:.0f} s")
        return plans

    def plan_options(self, method: str) -> dict:
        """The planner's options: the recipe's, as `vsurgery run` plans, with `method`'s errors and this video,
        and every variant a candidate whatever the recipe's `[plan] variants` (the front's mix is the planner's
        choice among all of them; the single-variant plans take their settings from the same table)."""
        from surgery.train.distilled_errors import recipe_plan_options

        return recipe_plan_options(self.recipe) | dict(variants=None, model=self.teacher, measure=self.measures[method],
                                                       frames=self.args.frames, height=self.args.height,
                                                       width=self.args.width)

    def init_table(self):
        """The init-error table the planner measured (once more when every init plan was read back): the
        single-variant plans take their settings' configs and costs from it."""
        measure = self.measures["planned-init"]
        if measure.table is None:
            from surgery.planner import calibrate

            calibrate(self.args.model, **self.plan_options("planned-init"))
        return measure.table

    def run(self, report) -> dict:
        """Score every (budget, method); `report(result)` gets the result so far after each student. With
        `--jobs` above 1, students train in that many processes at once while the main one plans."""
        from surgery.train.distilled_errors import DistilledErrors

        self.measures = {"planned-init": MeasureOnce(),
                         "planned-distilled": MeasureOnce(DistilledErrors.for_recipe(self.recipe))}
        self.times: dict[str, float] = {}
        began, lock = time.perf_counter(), threading.Lock()
        order = {key: i for i, key in enumerate((b, m) for b in self.args.budgets for m in self.args.methods)}
        done: dict[tuple, dict] = {}
        result = dict(model=self.args.model, recipe=self.recipe.to_dict(), settings=self.settings(),
                      prompts=self.prompts, times=self.times, rows=[])

        def finish(row: dict, student: dict | None = None) -> None:
            with lock:
                if student is not None:
                    row.update(student=student["id"], levels=student["levels"])
                done[row["budget"], row["method"]] = row
                result["rows"] = [done[key] for key in sorted(done, key=order.get)]
                self.times["total"] = time.perf_counter() - began
                report(result)

        pool = ThreadPoolExecutor(self.args.jobs) if self.args.jobs > 1 else None
        pending = []
        try:
            for (budget, method), plan in self.plans():
                row = dict(budget=budget, method=method)
                if plan is None:
                    finish(row)
                    continue
                row.update(layers=layers_label(plan), flops_ratio=plan.meta["flops_ratio"])
                pending.append((row, self.submit(pool, plan, f"{method}@{budget:g}")))
            for row, student in pending:
                finish(row, student.result())
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return result

    def submit(self, pool, plan, name: str) -> Future:
        """The student of `plan` scored: at once in this process without a pool, else in a process of its own
        from the pool. A plan that two budgets or methods share is trained once."""
        described = plan.to_dict()  # hashes the stage-1 weights: once
        key = json.dumps({"layers": described["layers"], "stage1": described.get("stage1_weights"),
                          "dense_boundary": plan.dense_boundary}, sort_keys=True)
        if key not in self.students:
            if pool is None:
                self.students[key] = Future()
                self.students[key].set_result(self.score(plan, name))
            else:
                self.students[key] = pool.submit(self.score_in_process, plan, name)
        return self.students[key]

    def score_in_process(self, plan, name: str) -> dict:
        """`score` in a child process (this script with `--score-student`) on the same device."""
        folder = self.out / "students" / name
        cached = folder / "scores.json"
        if not cached.exists():
            plan.save(folder / "plan.json")
            threads = max(1, (os.cpu_count() or 1) // self.args.jobs)
            env = os.environ | {"OMP_NUM_THREADS": str(threads)}
            subprocess.run([sys.executable, __file__, *self.argv, "--score-student", name], check=True, env=env)
        return json.loads(cached.read_text())

    def settings(self) -> dict:
        a = self.args
        return dict(device=a.device, eval_samples=a.eval_samples, eval_steps=a.eval_steps, eval_seed=a.eval_seed,
                    direction_seeds=a.direction_seeds, direction_steps=a.direction_steps,
                    direction_levels=a.direction_levels)

    def score(self, plan, name: str) -> dict:
        """Train and score `plan` at every level it allows (read back when OUT has its scores)."""
        folder = self.out / "students" / name
        cached = folder / "scores.json"
        if cached.exists():
            return json.loads(cached.read_text())
        from surgery.io import atomic_write_json
        from surgery.swap import apply
        from surgery.train.distill import finish_run, open_run, train_stage1, train_stage2
        from surgery.variants import VARIANTS

        began = time.perf_counter()
        levels = {}
        if all(VARIANTS[c.variant].training_free for c in plan.layers.values()):
            levels["training-free"] = self.evaluate(apply(copy.deepcopy(self.teacher), plan), name, "training-free")
        run = open_run(self.args.model, self.recipe, folder / "run", plan, resume=False)
        student, _, ran = train_stage1(run)
        if ran == 0 and not plan.stage1 and "training-free" in levels:  # nothing trained: the same student
            levels["stage 1"] = levels["training-free"]
        else:
            levels["stage 1"] = self.evaluate(student.eval(), name, "stage 1")
        if self.recipe.stage2.steps:
            student, _ = train_stage2(run, student)
            student.eval()
            finish_run(run, student)
            levels["stage 1 + 2"] = self.evaluate(student, name, "stage 1 + 2")
        result = dict(id=name, levels=levels, seconds=time.perf_counter() - began)
        atomic_write_json(cached, result)
        self.log(f"{name}: {layers_label(plan)}; scored in {result['seconds']:.0f} s")
        return result

    def evaluate(self, student, name: str, level: str) -> dict:
        from surgery.evaluate import compare

        a = self.args
        report = compare(student, self.teacher, a.model, self.grid, samples=a.eval_samples, steps=a.eval_steps,
                         seed=a.eval_seed, prompts=self.prompts, student_name=name)
        scores = dict(psnr_db=report.psnr_db, ssim=report.ssim, velocity_error=report.velocity_error_mean,
                      final_latent_error=report.final_latent_rel_error)
        if self.toy and a.direction_seeds and level in a.direction_levels:
            from surgery import toy

            directions = toy.direction_scores(student, self.encoder, a.direction_seeds, avoid=self.avoid,
                                              steps=a.direction_steps)
            scores["direction"] = directions["all"]["follows"]
        self.log(f"  {name} {level}: PSNR {scores['psnr_db']:.2f} dB, SSIM {scores['ssim']:.3f}"
                 + (f", directions {scores['direction']:.0%}" if "direction" in scores else ""))
        return scores


def _cell(scores: dict | None, key: str, fmt: str) -> str:
    return "—" if scores is None or key not in scores else format(scores[key], fmt)


def render_tables(result: dict) -> str:
    """The front (after stage 1 + 2) and every level, as Markdown."""
    final = LEVELS[-1]
    lines = ["After stage 1 + 2 (the front in the plot):", "",
             "| budget | method | layers | attention FLOPs | PSNR (dB) | SSIM | velocity error | directions |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        if "levels" not in row:
            lines.append(f"| {row['budget']:g} | {row['method']} | nothing fits the budget | | | | | |")
            continue
        s = row["levels"].get(final)
        lines.append(f"| {row['budget']:g} | {row['method']} | {row['layers']} | {row['flops_ratio']:.1%} | "
                     f"{_cell(s, 'psnr_db', '.2f')} | {_cell(s, 'ssim', '.3f')} | "
                     f"{_cell(s, 'velocity_error', '.4f')} | {_cell(s, 'direction', '.0%')} |")
    lines += ["", "Every level (PSNR dB / SSIM / velocity error / directions; — where the level does not apply):", "",
              "| budget | method | " + " | ".join(LEVELS) + " |", "|---:|---|" + "---|" * len(LEVELS)]
    for row in result["rows"]:
        if "levels" not in row:
            continue
        cells = []
        for level in LEVELS:
            s = row["levels"].get(level)
            cells.append("—" if s is None else " / ".join(
                [_cell(s, "psnr_db", ".2f"), _cell(s, "ssim", ".3f"), _cell(s, "velocity_error", ".4f"),
                 _cell(s, "direction", ".0%")]))
        lines.append(f"| {row['budget']:g} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_doc(path: Path, tables: str) -> None:
    """The tables between the doc's markers; a new doc holds only them."""
    from surgery.io import atomic_write_text

    block = f"{TABLE_START}\n{tables}{TABLE_END}"
    if path.exists():
        text = path.read_text()
        start, end = text.find(TABLE_START), text.find(TABLE_END)
        if start < 0 or end < start:
            raise SystemExit(f"{path} has no {TABLE_START} … {TABLE_END} block to fill")
        text = text[:start] + block + text[end + len(TABLE_END):]
    else:
        text = block + "\n"
    atomic_write_text(path, text)


def plot(result: dict, path: Path) -> None:
    """PSNR after stage 1 + 2 against attention FLOPs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for method in dict.fromkeys(row["method"] for row in result["rows"]):
        points = sorted({(row["flops_ratio"], row["levels"][LEVELS[-1]]["psnr_db"])
                         for row in result["rows"] if row["method"] == method and LEVELS[-1] in row.get("levels", {})})
        if points:
            style = "-" if method in PLANNED else "--"
            axes.plot(*zip(*points), style, marker="o", label=method, linewidth=2 if method in PLANNED else 1)
    axes.set_xlabel("attention FLOPs (fraction of dense)")
    axes.set_ylabel("PSNR against the teacher (dB)")
    axes.set_title(f"{result['model']}: quality against attention cost, after stage 1 + 2", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="the teacher (a model spec)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--frames", type=int, help="video size (default: the model's)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--methods", nargs="+", help="default: " + ", ".join(PLANNED) + " and every variant but full")
    parser.add_argument("--recipe", default="mixed", help="distill recipe (on the toy with data.source = toy)")
    parser.add_argument("--set", action="append", help="override a recipe field: section.key=value (repeatable)")
    # One student's PSNR spans 22–33 dB over captions: 16 keep a method's mean within a dB or so.
    parser.add_argument("--eval-samples", type=int, default=16, help="captions (seeds) compared per student")
    parser.add_argument("--eval-steps", type=int, default=8, help="sampler steps of the comparison")
    parser.add_argument("--eval-seed", type=int, default=100, help="seed of the compared noise and captions")
    parser.add_argument("--direction-seeds", type=int, default=1, help="clips per direction (0: no direction score)")
    parser.add_argument("--direction-steps", type=int, default=24, help="sampler steps of the direction clips")
    parser.add_argument("--direction-levels", nargs="+", default=list(LEVELS), choices=LEVELS,
                        help="levels that get a direction score (the costliest score on a CPU)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--doc", type=Path, help="Markdown file whose quality-table block gets the tables")
    parser.add_argument("--plot", type=Path, help="PNG to draw the front into")
    parser.add_argument("--jobs", type=int, default=1,
                        help="students trained at once, each in a process of its own on --device (a small teacher "
                             "leaves a GPU mostly idle)")
    parser.add_argument("--score-student", help=argparse.SUPPRESS)  # a --jobs child: OUT/students/NAME/plan.json
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # distillation (accelerate) then stays on the CPU as well
    methods = all_methods()
    args.methods = args.methods or methods
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r} (known: {', '.join(methods)})")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    def report(result: dict) -> None:
        from surgery.io import atomic_write_json

        atomic_write_json(args.out / "quality.json", result)
        if args.doc:
            write_doc(args.doc, render_tables(result))
        if args.plot:
            plot(result, args.plot)

    if args.score_student:
        from surgery.plan import Plan

        sweep = Sweep(args, log, argv)
        return sweep.score(Plan.load(args.out / "students" / args.score_student / "plan.json"), args.score_student)
    result = Sweep(args, log, argv).run(report)
    print(render_tables(result))
    log(f"done; results in {args.out / 'quality.json'}")
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
