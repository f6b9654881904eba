"""Global rotations folded into the weights (QuaRot / SpinQuant style). Model-level, no I/O.

Row-vector convention (x -> x @ Q). With Q orthogonal (hidden x hidden):

- norms first: every RMSNorm that feeds linears has its scale (w, or 1 + w for Gemma) folded
  into the columns of those linears and is reset to the identity; then RMSNorm(h Q) =
  RMSNorm(h) Q because the RMS of a vector does not change under rotation;
- R1, the residual stream h -> h Q: embedding rows E Q; every reader of the stream (q, k, v,
  gate, up, lm_head) W -> W Q; every writer (o_proj, down_proj) W -> Q^T W, b -> b Q.
  Tied embeddings are untied when the final norm's scale (folded into lm_head only) is not 1;
- R2 per layer (head_dim x head_dim, one for every head, so also for every query head sharing a
  KV head): v_proj's rows per KV head W_h -> R2^T W_h, o_proj's columns per query head -> . R2;
- R4: down_proj becomes a `HadamardLinear` (W -> W H, the input rotated online by the FWHT);
- R3: keys (and implicitly queries) in a Hadamard basis after RoPE: the attention's KV cache is
  wrapped so that keys are stored as k H and handed back as (k H) H^T; the scores are those of
  (q H)(k H)^T. Without a cache R3 is the identity, exactly as in FP; it matters to KV-cache
  quantizers, which then see rotated keys (use them with keys quantized after RoPE).

Gemma 3 adds norms on each branch's output (post_attention_layernorm, post_feedforward_layernorm).
Their scale multiplies after the normalisation and there is no linear after them to fold it into,
so rotating o_proj / down_proj outputs would not commute with them. lowbit leaves those outputs
unrotated and replaces each post-norm with `RotatedPostNorm`: RMSNorm(y) @ Q, one online
hidden x hidden rotation per post-norm (exact; stored as a buffer, so checkpoints carry it).

Each part of the model is rotated on its own: `rotate_rest` (embeddings, final norm, lm_head) and
`rotate_block` (one decoder block), so a streamed run rotates every block when it is read; `rotate_model`
does both for a model in memory.

Learned rotations (SpinQuant): R1 and R2 start from randomized Hadamard matrices and move on the
orthogonal group by Cayley SGD (`cayley_step`) to lower the next-token loss of the model whose
rotated weights are fake-quantized by RTN with a straight-through gradient; weights stay frozen.
"""

from __future__ import annotations

import logging
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .actquant import act_quant
from .configs import RecipeError, check_fields
from .formats import IntFormat, fake_quantize
from .kernels.hadamard import fwht
from .models import get_adapter
from .transforms.hadamard import fwht_ref, orthogonality_error, rotation_matrix
from .transforms.modules import HadamardLinear, replace_module

log = logging.getLogger("lowbit")

#: R1 / R2 matrices: hadamard (randomized) | orthogonal | bernoulli | learned
RotationKind = typing.Literal["hadamard", "orthogonal", "bernoulli", "learned"]
KINDS = typing.get_args(RotationKind)
_TAGS = {"hadamard": "had", "orthogonal": "orth", "bernoulli": "bern", "learned": "spin"}


class RotationError(ValueError):
    """A model or a rotation setting cannot be rotated as asked."""


class RotationConfigError(RotationError, RecipeError):
    """A RotationConfig field is malformed: both a RotationError (what callers of this module catch)
    and a RecipeError (what recipe checks raise)."""


@dataclass(frozen=True)
class RotationConfig:
    """Which global rotations to fold into the model before quantization."""

    kind: RotationKind = "hadamard"  # R1 / R2 matrices: hadamard (randomized) | orthogonal | bernoulli | learned
    seed: int = 0
    r2: bool = True  # per-head rotation between v_proj and o_proj
    r3: bool = False  # online Hadamard on keys after RoPE (matters only to KV-cache quantization)
    r4: bool = True  # online Hadamard before down_proj
    steps: int = 20  # learned: Cayley SGD steps
    # learned: Cayley SGD step size. lowbit's gradient is that of the mean token loss w.r.t. R (|G| ~ 50 on
    # SmolLM2): lr 1.5 (the paper's, for its optimizer) moves R by ~25 % of its norm per step and learns
    # nothing; 0.05 moves it ~1 % and lowers the held-out quantized loss (docs/rotations.md)
    lr: float = 0.05
    samples: int = 8  # learned: calibration windows cycled through (one per step)
    seq_len: int = 256  # learned: tokens per window used

    def __post_init__(self) -> None:
        check_fields(self, RotationConfigError)  # the annotations: kind one of `RotationKind`, ints, floats
        if self.steps < 0 or self.samples < 1 or self.seq_len < 2 or self.lr <= 0:
            raise RotationConfigError(f"learned rotations need steps >= 0, samples >= 1, seq_len >= 2 and lr > 0, got "
                                      f"steps={self.steps}, samples={self.samples}, seq_len={self.seq_len}, "
                                      f"lr={self.lr}")

    @property
    def tag(self) -> str:
        """Label prefix: had, orth, bern or spin (spinN when learned with N != 20 steps)."""
        if self.kind == "learned" and self.steps != 20:
            return f"spin{self.steps}"
        return _TAGS[self.kind]

    def to_dict(self) -> dict:
        """Plain dict."""
        return asdict(self)


class RotatedPostNorm(nn.Module):
    """RMSNorm(y) @ Q: a post-norm (Gemma 3) whose output joins a rotated residual stream."""

    def __init__(self, norm: nn.Module, q: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("rotation", q.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return (y.float() @ self.rotation.float()).to(y.dtype)


class _R3Cache:
    """Wraps a KV cache so that keys are stored in a Hadamard basis (k H) and returned as (k H) H^T."""

    def __init__(self, inner):
        self._inner = inner

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self._inner.update(fwht(key_states), value_states, layer_idx, *args, **kwargs)
        return fwht(k, transpose=True), v

    def __getattr__(self, name):
        return getattr(self._inner, name)


class R3Hook:
    """Forward pre-hook of one attention module that hands it its KV cache wrapped in `_R3Cache`, so
    that its keys are stored and read in the Hadamard basis (R3). Kept in the module's hook table
    (found there again by `r3_hook`, copied with the module) with its handle, so it can be removed;
    `fired` says whether it has seen a cache (`verify_r3`)."""

    def __init__(self, index: int = 0):
        self.index, self.fired = index, False
        self.handle = None

    def __call__(self, module, args, kwargs):
        from .compat import cache_from_kwargs

        name, cache = cache_from_kwargs(kwargs)
        if cache is None:
            return None
        self.fired = True
        if isinstance(cache, _R3Cache):
            return None
        return args, dict(kwargs, **{name: _R3Cache(cache)})


def r3_hook(attn: nn.Module) -> R3Hook | None:
    """The R3 hook installed on an attention module (None: keys are not rotated there)."""
    return next((h for h in attn._forward_pre_hooks.values() if isinstance(h, R3Hook)), None)


def hook_r3(attn: nn.Module, index: int) -> R3Hook | None:
    """Hook the attention module of layer `index` so that R3 applies; returns the hook (None: it had one).
    Raises CompatError when attention takes no cache argument at all."""
    from .compat import cache_kwarg

    cache_kwarg(attn)
    if r3_hook(attn) is not None:
        return None
    hook = R3Hook(index)
    hook.handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    return hook


def verify_r3(model: nn.Module, hooks: list[R3Hook]) -> None:
    """One 2-token forward of the whole model with a cache checks that every one of `hooks` wrapped it
    (CompatError otherwise, the hooks removed again: R3 must never silently do nothing)."""
    from transformers import DynamicCache

    from .compat import CompatError, probe_forward

    for h in hooks:
        h.fired = False
    probe_forward(model, DynamicCache(config=model.config))
    missing = sorted(h.index for h in hooks if not h.fired)
    if missing:
        for h in hooks:
            h.handle.remove()
        raise CompatError(f"R3: attention layers {missing[:5]} received no KV cache through a keyword argument, "
                          "so their keys would not be rotated")


def install_r3(model: nn.Module, verify: bool = True) -> list[R3Hook]:
    """Hook every attention module so that R3 applies (modules already hooked are left alone); returns
    the hooks installed (each has `.handle.remove()`; `remove_r3` undoes them all).

    The hook finds the KV cache under whichever keyword this transformers version passes it by;
    with `verify` (and the weights in memory), `verify_r3` checks that every new hook takes effect."""
    layers = get_adapter(model).layers(model)
    hooks = [h for h in (hook_r3(blk.self_attn, i) for i, blk in enumerate(layers)) if h is not None]
    if verify and hooks and not any(p.is_meta for p in model.parameters()):
        verify_r3(model, hooks)
    return hooks


def remove_r3(model: nn.Module) -> int:
    """Remove the R3 hooks of every attention module (keys stay in the basis they were cached in: start
    with an empty cache); returns how many were removed."""
    n = 0
    for blk in get_adapter(model).layers(model):
        hook = r3_hook(blk.self_attn)
        if hook is not None:
            hook.handle.remove()
            n += 1
    return n


# ---- the math: pure tensor functions ----------------------------------------------------------

def cayley_step(x: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group: with the skew matrix A = G X^T - X G^T,
    X <- (I + lr/2 A)^-1 (I - lr/2 A) X. The Cayley transform of a skew matrix is orthogonal,
    so X stays orthogonal; the curve's tangent at 0 is -(G - X G^T X), the negative Riemannian
    gradient."""
    a = grad @ x.T - x @ grad.T
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye + 0.5 * lr * a, (eye - 0.5 * lr * a) @ x)


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """U V^T of the SVD: the orthogonal matrix closest to x (cleans up rounding drift)."""
    u, _, vh = torch.linalg.svd(x.double())
    return u @ vh


def _heads(attn: nn.Module) -> tuple[int, int]:
    hd = getattr(attn, "head_dim", None)
    if hd is None:
        raise RotationError("attention module has no head_dim; cannot apply R2")
    return int(hd), int(attn.v_proj.out_features // hd)


def _hidden(model: nn.Module) -> int:
    """The width of the residual stream."""
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(text_cfg.hidden_size)


def _param_names(params: dict[str, nn.Parameter]) -> dict[int, str]:
    """The name of each parameter by id (tied parameters: their last name)."""
    return {id(p): n for n, p in params.items()}


def _rest_names(model: nn.Module, pname: dict[int, str]) -> dict:
    """Names (in `pname`) of the embedding and lm_head, the parameters R1 touches outside the blocks (one name
    when tied)."""
    return {"embed": pname[id(model.get_input_embeddings().weight)],
            "head": pname[id(model.get_output_embeddings().weight)]}


#: a block's readers and writers of the residual stream
_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def _block_names(blk: nn.Module, pname: dict[int, str]) -> dict:
    """Names (in `pname`) of the parameters R1 / R2 touch in one block, per role: the readers of the residual
    stream, its writers (weight, bias), v_proj (weight, bias) and o_proj."""
    def weight_bias(lin: nn.Module) -> tuple[str, str | None]:
        return pname[id(lin.weight)], None if lin.bias is None else pname[id(lin.bias)]

    return {"readers": [pname[id(blk.get_submodule(g).weight)] for g in _READERS],
            "writers": [weight_bias(blk.get_submodule(g)) for g in _WRITERS],
            "v": weight_bias(blk.self_attn.v_proj), "o": pname[id(blk.self_attn.o_proj.weight)]}


def rotated_rest(names: dict, base: dict[str, torch.Tensor], q1: torch.Tensor) -> dict[str, torch.Tensor]:
    """The new embedding and lm_head (`_rest_names`) from the norm-folded `base` tensors (differentiable in q1;
    computed in q1's dtype)."""
    new = {names["embed"]: base[names["embed"]].to(q1.device, q1.dtype) @ q1}
    if names["head"] != names["embed"]:
        new[names["head"]] = base[names["head"]].to(q1.device, q1.dtype) @ q1
    return new


def _rotated_role(role: str, names: dict, get, q1: torch.Tensor, r2: torch.Tensor | None,
                  heads: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """One block's tensors of one role (`_block_names`) rotated: "readers" (R1 on their inputs), "writers" (R1
    on their outputs) or "r2" (v_proj's rows and o_proj's columns per head, `heads` = (head_dim, KV heads));
    `get(name)` is a tensor's value so far, in q1's dtype."""
    if role == "readers":
        return {n: get(n) @ q1 for n in names["readers"]}
    new = {}
    if role == "writers":
        for w, b in names["writers"]:
            new[w] = q1.T @ get(w)
            if b is not None:
                new[b] = get(b) @ q1
        return new
    hd, n_kv = heads
    (vw, vb), ow = names["v"], names["o"]
    a = r2.to(q1.dtype)
    w = get(vw)
    new[vw] = (a.T @ w.reshape(n_kv, hd, -1)).reshape(w.shape)
    if vb is not None:
        new[vb] = (get(vb).reshape(n_kv, hd) @ a).reshape(-1)
    w = get(ow)
    new[ow] = (w.reshape(w.shape[0], -1, hd) @ a).reshape(w.shape)
    return new


def _roles(r2, rotate_outputs: bool) -> list[str]:
    """The roles a block's rotation touches, in order."""
    return ["readers", *(["writers"] if rotate_outputs else []), *(["r2"] if r2 is not None else [])]


def _getter(base: dict[str, torch.Tensor], new: dict[str, torch.Tensor], q1: torch.Tensor):
    """A tensor's value so far: its new value, else its `base` value in q1's device and dtype."""
    return lambda n: new[n] if n in new else base[n].to(q1.device, q1.dtype)


def rotated_block(names: dict, base: dict[str, torch.Tensor], q1: torch.Tensor, r2: torch.Tensor | None,
                  heads: tuple[int, int] | None, rotate_outputs: bool) -> dict[str, torch.Tensor]:
    """The new values of one block's tensors R1 / R2 touch (`_block_names`; R2 when `r2` is given, with `heads`
    = (head_dim, KV heads)) from the norm-folded `base` tensors (computed in q1's dtype)."""
    new: dict[str, torch.Tensor] = {}
    for role in _roles(r2, rotate_outputs):
        new.update(_rotated_role(role, names, _getter(base, new, q1), q1, r2, heads))
    return new


def rotated_weights(model: nn.Module, base: dict[str, torch.Tensor], q1: torch.Tensor,
                    r2: list[torch.Tensor] | None, rotate_outputs: bool) -> dict[str, torch.Tensor]:
    """The new values of every tensor R1 / R2 touch, from the norm-folded `base` tensors (differentiable in q1
    and r2; computed in q1's dtype). Role by role over the blocks: that sets the order autograd sums the
    gradients of q1 and r2 in, which learned rotations depend on to the last bit."""
    pname = _param_names(dict(model.named_parameters(remove_duplicate=False)))
    layers = get_adapter(model).layers(model)
    names = [_block_names(blk, pname) for blk in layers]
    heads = [None if r2 is None else _heads(blk.self_attn) for blk in layers]
    new = rotated_rest(_rest_names(model, pname), base, q1)
    for role in _roles(r2, rotate_outputs):
        for i in range(len(layers)):
            new.update(_rotated_role(role, names[i], _getter(base, new, q1), q1, None if r2 is None else r2[i],
                                     heads[i]))
    return new


# ---- model surgery ----------------------------------------------------------------------------

def _fold_norm(norm: nn.Module, lins: list[nn.Linear], off: float) -> None:
    """Fold the norm's scale (off + w) into the columns of the linears reading it; the norm becomes the identity."""
    g = (off + norm.weight.double())
    for lin in lins:
        lin.weight.copy_((lin.weight.double() * g).to(lin.weight.dtype))
    norm.weight.fill_(1.0 - off)


@torch.no_grad()
def fold_block_norms(adapter, blk: nn.Module) -> None:
    """Fold a block's pre-norm scales into the linears reading them and make those norms the identity."""
    attn, mlp = blk.self_attn, blk.mlp
    _fold_norm(blk.get_submodule(adapter.attn_norm), [attn.q_proj, attn.k_proj, attn.v_proj], adapter.norm_offset)
    _fold_norm(blk.get_submodule(adapter.mlp_norm), [mlp.gate_proj, mlp.up_proj], adapter.norm_offset)


@torch.no_grad()
def fold_final_norm(model: nn.Module) -> bool:
    """Fold the final norm's scale into lm_head and make the norm the identity; unties lm_head from the
    embedding first when that scale is not all ones. Returns whether it untied."""
    adapter = get_adapter(model)
    off = adapter.norm_offset
    final = adapter.decoder(model).get_submodule(adapter.final_norm)
    untied = False
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight and \
            not bool(((off + final.weight) == 1).all()):
        untie(model)
        untied = True
    _fold_norm(final, [model.get_output_embeddings()], off)
    return untied


def untie(model: nn.Module) -> None:
    """Give lm_head its own copy of the embedding matrix (and say so in the config and the log)."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False
    log.info("untied lm_head from the embedding: the final norm's scale is folded into lm_head only")


def restore_online(model: nn.Module, info: dict, r3: bool = True) -> None:
    """Re-create the online parts of a rotation recorded by `rotate_model` on a freshly built model
    (checkpoint load): HadamardLinear down_projs, RotatedPostNorm modules (their rotation is loaded
    with the state dict afterwards) and, unless `r3` is False (the caller installs them once the weights
    are in: their check runs a forward), the R3 hooks. Records `info` as the model's rotation."""
    adapter = get_adapter(model)
    hidden = _hidden(model)
    for blk in adapter.layers(model):
        lin = blk.mlp.down_proj
        if info.get("r4") and type(lin) is nn.Linear:  # a packed QuantizedLinear holds R4 as its transform
            replace_module(blk, "mlp.down_proj", HadamardLinear.wrap(lin, weight=lin.weight.data))
        if info.get("post_norm_rotation"):
            for name in adapter.post_norms:
                norm = blk.get_submodule(name)
                replace_module(blk, name, RotatedPostNorm(norm, torch.eye(hidden, dtype=norm.weight.dtype)))
    if r3 and info.get("r3"):
        install_r3(model)
    model.lowbit_rotation = dict(info)


def _rotate_post_norms(adapter, blk: nn.Module, q1: torch.Tensor) -> None:
    """The block's post-norms (Gemma 3) become RotatedPostNorm with rotation `q1` (set anew where they are)."""
    for name in adapter.post_norms:
        norm = blk.get_submodule(name)
        if isinstance(norm, RotatedPostNorm):
            norm.rotation.copy_(q1.to(norm.rotation.dtype))
        else:
            replace_module(blk, name, RotatedPostNorm(norm, q1.to(norm.weight.device, norm.weight.dtype)))


@torch.no_grad()
def _prepare_block(adapter, blk: nn.Module, r4: bool, hidden: int) -> None:
    """A block's module tree as rotated, its function unchanged: pre-norms folded, down_proj a HadamardLinear
    (R4: weight W H, input rotated online) when `r4`, post-norms in RotatedPostNorm with the identity."""
    fold_block_norms(adapter, blk)
    down = blk.mlp.down_proj
    if r4 and isinstance(down, HadamardLinear):  # a streamed block read again: the module tree was kept, but its
        # weight is the file's again (W, not W H)
        down.weight.data.copy_(fwht_ref(down.weight.data.double()).to(down.weight.dtype))
    elif r4:
        replace_module(blk, "mlp.down_proj", HadamardLinear.wrap(down))
    if adapter.post_norms:
        _rotate_post_norms(adapter, blk, torch.eye(hidden, dtype=torch.float64))


def _copy_into(params: dict[str, nn.Parameter], new: dict[str, torch.Tensor]) -> None:
    """Write the `new` values into the parameters of those names (in their device and dtype)."""
    for n, t in new.items():
        params[n].copy_(t.to(params[n].device, params[n].dtype))


@torch.no_grad()
def _fold_rest(model: nn.Module, q1: torch.Tensor) -> None:
    """R1 into the embedding and lm_head (once when tied), computed in float64 where the embedding lives."""
    params = dict(model.named_parameters(remove_duplicate=False))
    q1 = q1.to(model.get_input_embeddings().weight.device, torch.float64)
    _copy_into(params, rotated_rest(_rest_names(model, _param_names(params)), params, q1))


@torch.no_grad()
def _fold_block(adapter, blk: nn.Module, q1: torch.Tensor, r2: torch.Tensor | None) -> None:
    """R1 (and R2 when given) into a prepared block's weights, computed in float64 where the block lives; where
    the block has post-norms (Gemma 3), they rotate by R1 instead of the outputs of o_proj and down_proj."""
    params = dict(blk.named_parameters(remove_duplicate=False))
    dev = blk.self_attn.q_proj.weight.device
    q1 = q1.to(dev, torch.float64)
    a, heads = (None, None) if r2 is None else (r2.to(dev, torch.float64), _heads(blk.self_attn))
    new = rotated_block(_block_names(blk, _param_names(params)), params, q1, a, heads,
                        rotate_outputs=not adapter.post_norms)
    _copy_into(params, new)
    if adapter.post_norms:
        _rotate_post_norms(adapter, blk, q1)


def _record(model: nn.Module, cfg: RotationConfig, q1: torch.Tensor, untied: bool) -> dict:
    """What a rotation does to `model`, as `rotation_of` and checkpoints keep it (bernoulli: how far R1 is from
    orthogonal, also logged)."""
    info: dict = {"kind": cfg.kind, "seed": cfg.seed, "r2": cfg.r2, "r3": cfg.r3, "r4": cfg.r4,
                  "post_norm_rotation": bool(get_adapter(model).post_norms), "untied": untied}
    if cfg.kind == "bernoulli":
        e = orthogonality_error(q1)
        info["orthogonality"] = e
        log.warning("bernoulli R1 is not orthogonal (||Q^T Q - I||_F / sqrt(n) = %.3f, cond %.0f): "
                    "the rotated FP model differs from the original", e["fro_rel"], e["cond"])
    return info


def r1_matrix(model: nn.Module, cfg: RotationConfig) -> torch.Tensor:
    """R1 of `cfg` for `model` (hidden x hidden, float64; a learned rotation's starting point)."""
    return rotation_matrix(cfg.kind, _hidden(model), cfg.seed)


def r2_matrix(blk: nn.Module, i: int, cfg: RotationConfig) -> torch.Tensor:
    """R2 of `cfg` for block `i` (head_dim x head_dim; a learned rotation's starting point)."""
    return rotation_matrix(cfg.kind, _heads(blk.self_attn)[0], cfg.seed + 1 + i)


def rotate_rest(model: nn.Module, cfg: RotationConfig, q1: torch.Tensor) -> dict:
    """The part of a deterministic rotation outside the blocks, in place: the final norm folded into lm_head
    (untied from the embedding when needed), R1 = `q1` into the embedding and lm_head. Records the rotation on
    the model (`rotation_of`) and returns that record; `rotate_block` does the rest, block by block. Needs
    only the parts outside the blocks in memory."""
    untied = fold_final_norm(model)
    _fold_rest(model, q1)
    model.lowbit_rotation = _record(model, cfg, q1, untied)
    return model.lowbit_rotation


def rotate_block(model: nn.Module, i: int, cfg: RotationConfig, q1: torch.Tensor) -> None:
    """The part of a deterministic rotation in block i, in place: pre-norms folded, R1 = `q1` on the block's
    inputs and outputs (Gemma 3: its post-norms rotate online instead), R2 between v_proj and o_proj, down_proj
    a HadamardLinear (R4) and the R3 hook on attention, as `cfg` says. Needs only block i in memory (the R3
    hook is checked by the caller, with the whole model: `verify_r3`)."""
    adapter = get_adapter(model)
    blk = adapter.layers(model)[i]
    _prepare_block(adapter, blk, cfg.r4, _hidden(model))
    _fold_block(adapter, blk, q1, r2_matrix(blk, i, cfg) if cfg.r2 else None)
    if cfg.r3:
        hook_r3(blk.self_attn, i)


def rotate_model(model: nn.Module, cfg: RotationConfig, tokens: torch.Tensor | None = None,
                 fmt: IntFormat | None = None, act_bits: int | None = None, act_symmetric: bool = False,
                 progress: bool = True) -> dict:
    """Fold the configured rotations into `model` in place (the FP function is unchanged for
    orthogonal kinds); returns what was done, for the checkpoint manifest and reports, and records it
    on the model as `model.lowbit_rotation` (`rotation_of`): a rotated model refuses a second rotation.
    Deterministic kinds rotate the parts outside the blocks (`rotate_rest`), then each block (`rotate_block`),
    as a streamed run does; learned rotations need calibration `tokens` and the weight format `fmt`."""
    if rotation_of(model) is not None:
        raise RotationError("the model is already rotated; load it again to rotate it another way")
    layers = get_adapter(model).layers(model)
    q1 = r1_matrix(model, cfg)
    if cfg.kind == "learned" and cfg.steps > 0:
        info = _rotate_learned(model, cfg, q1, tokens, fmt, act_bits, act_symmetric, progress)
    else:
        info = rotate_rest(model, cfg, q1)
        for i in range(len(layers)):
            rotate_block(model, i, cfg, q1)
    if cfg.r3:
        verify_r3(model, [r3_hook(blk.self_attn) for blk in layers])
    return info


def _rotate_learned(model: nn.Module, cfg: RotationConfig, q1: torch.Tensor, tokens: torch.Tensor | None,
                    fmt: IntFormat | None, act_bits: int | None, act_symmetric: bool, progress: bool) -> dict:
    """`rotate_model` for learned kinds: every part prepared (norms folded, R4, post-norms wrapped), R1 and R2
    learned on the whole model (`learn_rotations`) from `q1` and `r2_matrix`, then folded in."""
    if tokens is None or fmt is None:
        raise RotationError("learned rotations need calibration tokens and a weight format")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    untied = fold_final_norm(model)
    for blk in layers:
        _prepare_block(adapter, blk, cfg.r4, _hidden(model))
    r2 = [r2_matrix(blk, i, cfg) for i, blk in enumerate(layers)] if cfg.r2 else None
    q, r2, losses = learn_rotations(model, q1, r2, tokens, fmt, cfg, act_bits, act_symmetric, progress)
    _fold_rest(model, q)
    for i, blk in enumerate(layers):
        _fold_block(adapter, blk, q, None if r2 is None else r2[i])
        if cfg.r3:
            hook_r3(blk.self_attn, i)
    info = _record(model, cfg, q1, untied)
    info["losses"] = losses
    model.lowbit_rotation = info
    return info


def rotation_of(model: nn.Module) -> dict | None:
    """What `rotate_model` did to `model` (None: not rotated by it)."""
    return getattr(model, "lowbit_rotation", None)


# ---- learned rotations (SpinQuant) ------------------------------------------------------------

def learn_rotations(model: nn.Module, q1: torch.Tensor, r2: list[torch.Tensor] | None, tokens: torch.Tensor,
                    fmt: IntFormat, cfg: RotationConfig, act_bits: int | None = None, act_symmetric: bool = False,
                    progress: bool = True) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[float]]:
    """Cayley SGD on R1 (and R2) against the next-token loss of the rotated model with its
    decoder linears fake-quantized (RTN, straight-through), optionally activations too.
    `model` must have its norms folded (and R4 applied); its weights are not changed."""
    from torch.func import functional_call
    from tqdm.auto import tqdm

    adapter = get_adapter(model)
    device = next(model.parameters()).device
    params = dict(model.named_parameters(remove_duplicate=False))
    base = {n: p.detach() for n, p in params.items()}
    canon = {id(p): n for n, p in params.items()}  # tied names -> the one rotated_weights uses
    prefix = next(n for n, m in model.named_modules() if m is adapter.layers(model))
    quantized = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix + ".")}
    post = [f"{prefix}.{i}.{name}" for i in range(len(adapter.layers(model))) for name in adapter.post_norms]
    q = q1.float().to(device)
    rs = None if r2 is None else [a.float().to(device) for a in r2]
    windows = tokens[: cfg.samples, : cfg.seq_len].to(device)
    # activations quantized as at inference (after an online transform where there is one: R4), only here
    aq = nullcontext() if act_bits is None else act_quant(map(model.get_submodule, quantized), act_bits, act_symmetric)
    losses: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with aq, torch.enable_grad():  # the pipeline runs under no_grad
            for step in tqdm(range(cfg.steps), desc="learn rotations", disable=not progress):
                q.requires_grad_(True)
                if rs is not None:
                    for a in rs:
                        a.requires_grad_(True)
                new = rotated_weights(model, base, q, rs, rotate_outputs=not adapter.post_norms)
                state = {}
                for n, p in params.items():
                    t = new.get(canon[id(p)], base[n])
                    if n.rsplit(".", 1)[0] in quantized and n.endswith(".weight"):
                        t32 = t.float()
                        t = t32 + (fake_quantize(t32.detach(), fmt) - t32).detach()
                    state[n] = t.to(p.dtype)
                for name in post:
                    state[f"{name}.rotation"] = q
                ids = windows[step % windows.shape[0]][None]
                kw = {"input_ids": ids, "labels": ids, "use_cache": False}
                out = functional_call(model, state, args=(), kwargs=kw, tie_weights=False, strict=False)
                loss = out.loss
                loss.backward()
                losses.append(float(loss.detach()))
                with torch.no_grad():
                    q = cayley_step(q.detach(), q.grad, cfg.lr)
                    if rs is not None:
                        rs = [cayley_step(a.detach(), a.grad, cfg.lr) for a in rs]
    finally:
        model.train(was_training)
    q = nearest_orthogonal(q.detach())
    rs = None if rs is None else [nearest_orthogonal(a.detach()) for a in rs]
    log.info("learned rotations: loss %.4f -> %.4f over %d steps", losses[0] if losses else float("nan"),
             losses[-1] if losses else float("nan"), len(losses))
    return q.cpu(), None if rs is None else [a.cpu() for a in rs], losses
