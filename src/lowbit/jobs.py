"""End-to-end jobs shared by the CLI and the benchmarks: load, calibrate, quantize, evaluate."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass, field

import torch

from .data import calibration_windows, eval_windows, load_text, tokenize
from .eval import perplexity
from .loading import load_model
from .pipeline import QuantizationResult, quantize_model, stored_bits
from .recipe import Recipe


@dataclass
class Protocol:
    """Calibration and evaluation settings (defaults: the shared benchmark protocol)."""

    calib: str = "sotu-calib"
    n_calib: int = 128
    seq_len: int = 512
    seed: int = 0
    eval_sets: tuple[str, ...] = ("sotu-modern", "moby")
    n_eval: int = 64
    batch_size: int = 8

    def to_dict(self) -> dict:
        """Plain dict."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (VmHWM on Linux: ru_maxrss survives exec,
    so a freshly spawned worker would report its parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration, ValueError):
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if platform.system() != "Darwin" else kb / 2**20


def evaluate(model, tokenizer, protocol: Protocol, progress: bool = True) -> dict[str, float]:
    """Perplexity on every evaluation set of the protocol."""
    out = {}
    for name in protocol.eval_sets:
        windows = eval_windows(tokenize(tokenizer, load_text(name)), protocol.n_eval, protocol.seq_len)
        out[name] = perplexity(model, windows, protocol.batch_size, progress, desc=f"eval {name}").ppl
    return out


def calibration_tokens(tokenizer, protocol: Protocol) -> torch.Tensor:
    """The protocol's calibration windows."""
    ids = tokenize(tokenizer, load_text(protocol.calib))
    return calibration_windows(ids, protocol.n_calib, protocol.seq_len, protocol.seed)


@dataclass
class JobResult:
    """What one quantize-and-evaluate run measured."""

    recipe: dict | None
    ppl_fp: dict[str, float] = field(default_factory=dict)
    ppl: dict[str, float] = field(default_factory=dict)
    quant_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    bits_per_weight: float | None = None
    block_errors: list[float] = field(default_factory=list)
    block_fits: list[dict] = field(default_factory=list)  # block-wise optimisation: losses, reverted stages
    device: str = "cpu"
    n_params: int = 0  # parameters of the model (tied weights once)
    memory_plan: dict = field(default_factory=dict)  # streamed runs: the walk's device-memory estimate and choices

    def to_dict(self) -> dict:
        """Plain dict."""
        return dict(self.__dict__)


def bits_per_weight(result: QuantizationResult) -> float:
    """Average storage bits per quantized weight, scales, zeros, group maps and input transforms
    (pairs, angles, channel scales) included."""
    total_bits, total_w = 0.0, 0
    for name, qw in result.weights.items():
        total_bits += stored_bits(qw, result.transforms.get(name))
        total_w += qw.numel()
    return total_bits / max(total_w, 1)


def _share(dist, tokens: torch.Tensor, batch_size: int, recipe: Recipe) -> tuple[torch.Tensor, int]:
    """This rank's calibration windows and the batch size its walk uses: whole batches dealt out, or, when a
    stage trains block by block (`Stage.split_batches`), an equal part of every batch."""
    if dist is None:
        return tokens, batch_size
    from .stages import stages_for

    if any(st.split_batches for st in stages_for(recipe)):
        return dist.shard(tokens, batch_size, split_batches=True), batch_size // dist.world
    return dist.shard(tokens, batch_size), batch_size


def quantize_job(model_spec: str, recipe: Recipe, protocol: Protocol, *, eval_fp: bool = True,
                 eval_quant: bool = True, device: str = "cpu", progress: bool = True,
                 track_error: bool = False, model=None, tokenizer=None, store_dtype: torch.dtype | None = None,
                 dtype: torch.dtype = torch.float32, dist=None, memory_target: float | None = None):
    """Load (unless given), evaluate FP, quantize, evaluate; returns (model, tokenizer, result, job).

    With `store_dtype`, the parameters a checkpoint keeps unquantized are rounded to that dtype
    before the final evaluation, so the perplexity reported is the saved model's. With `dist`, this rank
    quantizes with its share of the calibration batches (`lowbit.distributed`)."""
    if model is None:
        model, tokenizer = load_model(model_spec, dtype=dtype, device=device)
    torch.manual_seed(protocol.seed)
    job = JobResult(recipe=recipe.to_dict(), device=str(device), n_params=sum(p.numel() for p in model.parameters()))
    if eval_fp:
        job.ppl_fp = evaluate(model, tokenizer, protocol, progress)
    tokens, batch_size = _share(dist, calibration_tokens(tokenizer, protocol), protocol.batch_size, recipe)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = quantize_model(model, recipe, tokens, batch_size=batch_size, device=device,
                            progress=progress, track_error=track_error, dist=dist, memory_target=memory_target)
    job.quant_seconds = time.perf_counter() - t0
    job.peak_rss_mb = peak_rss_mb()
    if str(device).startswith("cuda"):
        job.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    job.bits_per_weight = bits_per_weight(result)
    job.block_errors = result.block_errors
    job.block_fits = result.block_fits
    if store_dtype is not None:
        from .checkpoint import round_unquantized

        round_unquantized(model, result, store_dtype)
    if eval_quant:
        job.ppl = evaluate(model, tokenizer, protocol, progress)
    return model, tokenizer, result, job


def resolve_dtype(name: str, device: str | torch.device, streamed: bool) -> torch.dtype:
    """The model dtype for `--dtype` (auto: float32 on the CPU, the protocol's; bf16 on GPUs when streamed)."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if streamed and torch.device(device).type == "cuda" else torch.float32
    if name not in table:
        from .loading import ModelLoadError

        raise ModelLoadError(f"--dtype must be auto, fp32, bf16 or fp16, got {name!r}")
    return table[name]


def stream_quantize_job(folder: str, recipe: Recipe, protocol: Protocol, out, *, dtype: torch.dtype,
                        store_dtype: torch.dtype = torch.bfloat16, device: str = "cpu", progress: bool = True,
                        track_error: bool = False, resume: bool = False, overwrite: bool = False,
                        extra: dict | None = None, tokens: torch.Tensor | None = None, tokenizer=None,
                        max_blocks: int | None = None, state_every_s: float = 0.0, dist=None,
                        memory_target: float | None = None):
    """Quantize the safetensors folder `folder` block by block (`lowbit.pipeline.quantize_streamed`) into the
    checkpoint `out`; with `resume`, go on from an interrupted run of the same settings. Calibration windows
    come from the protocol (with the folder's tokenizer) unless `tokens` are given. Returns (result, job,
    path or None when `max_blocks` stopped the walk early). `memory_target`: GiB of device memory the walk plans
    for (`lowbit.walk.plan_walk`; None: $LOWBIT_GPU_MEMORY, else most of the free memory)."""
    from pathlib import Path

    from . import __version__
    from .checkpoint import PartialCheckpoint, is_checkpoint
    from .loading import StreamSource, check_device
    from .pipeline import quantize_streamed

    check_device(device)
    source = StreamSource(folder)
    if tokens is None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source.folder)
        tokens = calibration_tokens(tokenizer, protocol)
    world = 1 if dist is None else dist.world
    fingerprint = {"model": str(source.folder.resolve()), "recipe": recipe.to_dict(), "identity": recipe.identity,
                   "protocol": protocol.to_dict(), "n_tokens": list(tokens.shape), "dtype": str(dtype),
                   "store_dtype": str(store_dtype), "device": torch.device(device).type, "world": world,
                   "track_error": track_error, "lowbit_version": __version__}
    rank = 0 if dist is None else dist.rank
    partial = PartialCheckpoint(out, fingerprint, resume, rank)
    if dist is not None:
        dist.barrier()  # rank 0 has (re)created the partial folder
    tokens, batch_size = _share(dist, tokens, protocol.batch_size, recipe)
    torch.manual_seed(protocol.seed)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, result, info = quantize_streamed(source, recipe, tokens, partial, dtype=dtype, store_dtype=store_dtype,
                                            batch_size=batch_size, device=device, progress=progress,
                                            track_error=track_error, max_blocks=max_blocks,
                                            state_every_s=state_every_s, dist=dist, memory_target=memory_target)
    job = JobResult(recipe=recipe.to_dict(), device=str(device),
                    n_params=sum(p.numel() for p in model.parameters()))
    job.quant_seconds = time.perf_counter() - t0
    job.peak_rss_mb = peak_rss_mb()
    if torch.device(device).type == "cuda":
        job.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    job.bits_per_weight = info["bits"] / max(info["weights"], 1)
    job.block_errors = result.block_errors
    job.block_fits = result.block_fits
    job.memory_plan = info.get("memory_plan", {})
    path = None
    if info["complete"] and rank == 0:
        out = Path(out).expanduser()
        path = partial.assemble(info["n_blocks"], model.config, result, tokenizer, extra, store_dtype,
                                report={"job": job.to_dict(), "block_seconds": result.block_seconds},
                                overwrite=overwrite or (resume and is_checkpoint(out)))
    if dist is not None:
        dist.barrier()
    return result, job, path
