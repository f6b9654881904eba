"""Downstream evaluation with EleutherAI's lm-evaluation-harness, in this process, on a lowbit checkpoint.

`evaluate("out/ck", ["lowbit_cloze"])` loads the checkpoint (packed QuantizedLinear modules, or float
linears with `dequantize=True`), hands the model object to lm-eval's Hugging Face model class (`HFLM`,
which takes an in-memory `PreTrainedModel`: its loglikelihood, rolling loglikelihood and generation
run the model's own forward, so the packed modules, online rotations and activation quantization of
the checkpoint are what is measured) and runs the tasks through `lm_eval.simple_evaluate`.

Tasks are looked up in lm-eval's own catalogue and in `TASKS_DIR` (lowbit's offline tasks:
`lowbit_cloze`, multiple choice, and `lowbit_passages`, rolling loglikelihood, on text shipped in the
package) plus any `include_path` folders of YAML task files. Catalogue tasks (hellaswag, arc_easy, ...)
fetch their data sets from the Hugging Face hub: they need a connected machine or a filled datasets
cache.

lm-eval is an optional dependency (`pip install lm-eval`, in lowbit's dev extras); without it the
functions here raise `LmEvalError` naming what to install.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LM_EVAL_VERSION = "0.4.13"  # the version tested (constraints.txt)
INSTALL_HINT = f"lm-eval is not installed; install it with: pip install lm-eval=={LM_EVAL_VERSION}"


class LmEvalError(RuntimeError):
    """lm-eval is missing, a task is unknown or cannot get its data, or its options are wrong."""


def require_lm_eval():
    """The lm_eval module, or LmEvalError naming what to install."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the extra modules it needs import too)
    except ImportError as e:
        raise LmEvalError(f"{INSTALL_HINT} ({e})") from None
    return lm_eval


_LM_CLASS = None


def _lm_class():
    """LowbitLM, a subclass of lm-eval's HFLM made on first use (lm-eval is imported only then)."""
    global _LM_CLASS
    if _LM_CLASS is None:
        require_lm_eval()
        from lm_eval.models.huggingface import HFLM

        class LowbitLM(HFLM):
            """HFLM over an in-memory (lowbit) model. Reports the checkpoint instead of asking the hub for a
            revision hash (HFLM would look the model object up as a repository name)."""

            def __init__(self, model, tokenizer, source: str = "", **kw):
                super().__init__(pretrained=model, tokenizer=tokenizer, **kw)
                self.lowbit_source = source

            def get_model_info(self) -> dict:
                m = self._model
                return {"model_num_parameters": sum(p.numel() for p in m.parameters()),
                        "model_dtype": str(getattr(m, "dtype", "")), "model_source": self.lowbit_source,
                        "model_packed": _is_packed(m)}

        _LM_CLASS = LowbitLM
    return _LM_CLASS


class _Quiet(logging.Filter):
    """Drops lm-eval warnings about its own command line that do not apply to an in-process model object or to
    lowbit's tasks (a model passed as an object; custom_dataset kwargs through --metadata)."""

    NOISE = ("model kwarg is not of type", "Passed an already-initialized model", "Custom kwargs can be passed")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


_QUIET = _Quiet()


def _hush() -> None:
    for name in ("lm_eval.models.huggingface", "lm_eval.api.task"):
        lg = logging.getLogger(name)
        if _QUIET not in lg.filters:
            lg.addFilter(_QUIET)


def _is_packed(model: torch.nn.Module) -> bool:
    from ..nn import QUANTIZED_MODULES

    return any(isinstance(m, QUANTIZED_MODULES) for m in model.modules())


def wrap(model: torch.nn.Module, tokenizer, batch_size: int = 1, max_length: int | None = None,
         source: str = "", **hflm_kwargs):
    """An lm-eval `LM` (an HFLM subclass) running `model` as it is (on its own device and dtype).

    `tokenizer` gets a pad token when it has none (lm-eval's rule: unk, else eos, else a new one);
    `max_length` defaults to the model's `max_position_embeddings`."""
    if batch_size < 1:
        raise LmEvalError(f"batch size must be >= 1, got {batch_size}")
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None and "prefix_token_id" not in hflm_kwargs:
        raise LmEvalError("the tokenizer has neither a BOS nor an EOS token: lm-eval needs one to score text "
                          "from its start (pass prefix_token_id=...)")
    cls = _lm_class()
    _hush()
    return cls(model.eval(), tokenizer, source=source, batch_size=batch_size, max_length=max_length, **hflm_kwargs)


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] = ()):
    """A TaskManager that knows lowbit's tasks and `include_path`'s; lm-eval's catalogue (about 15,000
    entries, some seconds to index) is indexed only when a task is not found in those folders."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)]
    for p in include_path:
        p = Path(p).expanduser()
        if not p.is_dir():
            raise LmEvalError(f"--include-path {p}: not a folder")
        paths.append(str(p))
    local = TaskManager(include_defaults=False, include_path=paths)
    if all(t in local.all_tasks for t in tasks):
        return local
    tm = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in tm.all_tasks and not Path(t).is_file()]
    if unknown:
        raise LmEvalError(f"unknown lm-eval task(s) {unknown}; lowbit's offline tasks: "
                          f"{sorted(local.all_tasks)}; add folders of task YAMLs with --include-path")
    return tm


def _plain(obj):
    """`obj` with everything JSON can't hold turned into strings (torch dtypes, numpy scalars, ...) and
    non-finite floats into None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _plain(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def run_tasks(lm, tasks: Sequence[str], limit: int | float | None = None, include_path: Sequence[str | Path] = (),
              num_fewshot: int | None = None, bootstrap_iters: int = 1000, log_samples: bool = False,
              seed: int = 0) -> dict:
    """Run lm-eval `tasks` on an lm-eval LM; returns lm-eval's results dict made JSON-safe (keys `results`:
    metrics per task, `n-samples`, `config`, `versions`, ...; `samples` too with `log_samples`)."""
    lm_eval = require_lm_eval()
    tasks = [t for t in (s.strip() for s in tasks) if t]
    if not tasks:
        raise LmEvalError("no task given (e.g. --tasks lowbit_cloze)")
    if limit is not None and limit <= 0:
        raise LmEvalError(f"--limit must be > 0, got {limit}")
    tm = task_manager(tasks, include_path)
    _hush()
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                      num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                      log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    except (ConnectionError, OSError) as e:  # datasets' hub errors derive from these
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmEvalError(f"a task could not get its data set ({type(e).__name__}: {first}); catalogue tasks "
                          "download from the Hugging Face hub: run on a connected machine or fill the "
                          "datasets cache first") from None
    return _plain(res or {})


def evaluate(model: str | torch.nn.Module, tasks: Sequence[str], tokenizer=None, limit: int | float | None = None,
             batch_size: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32, dequantize: bool = False,
             include_path: Sequence[str | Path] = (), num_fewshot: int | None = None, max_length: int | None = None,
             bootstrap_iters: int = 1000, log_samples: bool = False, seed: int = 0) -> dict:
    """Run lm-eval `tasks` on `model`: a lowbit checkpoint folder, a model folder / hub id / .gguf, `smollm2`
    (see `lowbit.loading.load_model`), or an in-memory model with its `tokenizer`. Returns lm-eval's results
    (see `run_tasks`)."""
    require_lm_eval()  # before loading a model for nothing
    if isinstance(model, (str, Path)):
        from ..loading import load_model

        source = str(model)
        m, tok = load_model(source, dtype=dtype, device=device, dequantize=dequantize)
    else:
        if tokenizer is None:
            raise LmEvalError("an in-memory model needs its tokenizer")
        source, m, tok = type(model).__name__, model, tokenizer
    lm = wrap(m, tok, batch_size=batch_size, max_length=max_length, source=source)
    return run_tasks(lm, tasks, limit=limit, include_path=include_path, num_fewshot=num_fewshot,
                     bootstrap_iters=bootstrap_iters, log_samples=log_samples, seed=seed)


def metric_rows(results: dict) -> list[tuple[str, str, float | None, float | None]]:
    """(task, metric, value, stderr) for each metric of each task in lm-eval's results."""
    rows = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float, type(None))):
                continue
            name, _, filt = key.partition(",")
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append((task, name, value, stderr if isinstance(stderr, (int, float)) else None))
    return rows
