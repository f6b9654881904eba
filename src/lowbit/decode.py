"""lowbit's own decode loop: a static KV cache, fused linears and one CUDA graph per decode step.

transformers' eager decode launches over a thousand small kernels per token (an 8B Llama in bf16
reaches about 10 % of the weight-bandwidth bound), and its compiled static-cache path is fragile;
the kernels for packed weights would be hidden behind that. `DecodeModel` re-uses a loaded model's
own modules (packed `QuantizedLinear` / `VectorQuantizedLinear` or float `nn.Linear`, norms,
embeddings, RoPE) in a compact forward written for generation:

- q/k/v and gate/up fused into one matmul each when their formats allow (same bits, groups,
  act-order permutation, or same vector codebook; no online transform); the fused module holds the concatenated packed
  tensors, so the weight bytes are not duplicated for long (the originals are dropped). Packed linears that each
  have their own pairwise transform (ParoQuant-style, no act order) fuse too (`RotatedGroupLinear`): one launch
  rotates the input by every transform, one GEMV reads each segment's own rotated input;
- a static KV cache [layers, batch, kv heads, max_len, head dim] written in place at the step's
  positions, attention through `scaled_dot_product_attention` with a position mask (GQA native);
- at one token on CUDA, each plain packed linear runs with its elementwise neighbours in its own GEMV
  launch (`FUSED_GEMV`): q/k/v and gate/up normalise their input (RMSNorm), down applies SiLU-gate
  to its, o and down add the residual to their output;
- otherwise (more tokens, float or rotated linears) RMSNorm, residual add + RMSNorm and SiLU-gate, and
  always RoPE with the KV-cache writes, compiled by torch.compile on CUDA (one compiled graph each,
  shared by all layers: they take only tensors; a layer's cache is a view at its own offset, which
  does not recompile);
- the attention mask made once per step (additive), the greedy token picked in two stages (`greedy`);
- `Generator` runs the prompt (prefill) eagerly, then captures one decode step (embed, all layers,
  norm, lm_head, greedy argmax, position += 1) in a CUDA graph and replays it per token.

Families: Llama, Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (q/k norms). Others (Gemma 3)
raise DecodeError; `lowbit generate` then uses transformers' `generate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .kernels._common import interpreting
from .kernels.attention import applies, decode_attention
from .kernels.pairwise import norm_rotate_many, rms_norm, silu_mul, silu_mul_rotate_many
from .kernels.quant import setting as quant_setting
from .nn.quantized import QuantizedLinear
from .nn.vector import VectorQuantizedLinear

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class DecodeError(ValueError):
    """The model cannot run in lowbit's decode loop."""


# ---- the elementwise pieces (compiled on CUDA) ---------------------------------------------------

def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, rms_norm(x + r)): the residual add fused with the next norm."""
    s = x + r
    return s, rms_norm(s, w, eps)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q [B, T, H, D] and k [B, T, Hkv, D] with cos / sin [T, D]."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]

    def rot(t):
        h = t.shape[-1] // 2
        return torch.cat((-t[..., h:], t[..., :h]), dim=-1)

    return q * c + rot(q) * s, k * c + rot(k) * s


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """RoPE of q and k, k and v [B, T, Hkv, D] written into one layer's caches [B, Hkv, max_len, D] at
    positions `pos` [T]; returns the rotated q. Compiled, the writes join the RoPE kernels instead of
    being two more launches per layer."""
    q, k = rope(q, k, cos, sin)
    k_cache.index_copy_(2, pos, k.transpose(1, 2))
    v_cache.index_copy_(2, pos, v.transpose(1, 2))
    return q


class _Ops:
    """The elementwise functions, compiled once per process on CUDA (eager elsewhere)."""

    def __init__(self, compiled: bool):
        if compiled:
            c = torch.compile
            self.rms_norm, self.add_rms_norm = c(rms_norm, dynamic=False), c(add_rms_norm, dynamic=False)
            self.rope_store, self.silu_mul = c(rope_store, dynamic=False), c(silu_mul, dynamic=False)
        else:
            self.rms_norm, self.add_rms_norm, self.rope_store, self.silu_mul = rms_norm, add_rms_norm, rope_store, silu_mul


# ---- fusing linears that share an input ---------------------------------------------------------

def _same_format(mods: list[nn.Module]) -> bool:
    a = mods[0]
    if all(type(m) is nn.Linear for m in mods):
        return all((m.bias is None) == (a.bias is None) and m.weight.dtype == a.weight.dtype for m in mods)
    if all(isinstance(m, VectorQuantizedLinear) for m in mods):
        return _same_vector_format(mods)
    if not all(isinstance(m, QuantizedLinear) for m in mods):
        return False
    for m in mods:
        if (m.bits, m.group_size, m.symmetric, m.sym_grid, m.kind, m.in_features) != \
                (a.bits, a.group_size, a.symmetric, a.sym_grid, a.kind, a.in_features):
            return False
        if m.transform is not None or m.act_bits is not None or (m.bias is None) != (a.bias is None):
            return False
        for t, ta in ((m.perm, a.perm), (m.in_scale, a.in_scale)):
            if (t is None) != (ta is None) or (t is not None and not torch.equal(t, ta)):
                return False
    return True


def _pairwise_group(mods: list[nn.Module]) -> bool:
    """Packed linears of one format, no act order, each with its own pairwise transform of one shape
    (group, rotation count): what `RotatedGroupLinear` fuses."""
    from .transforms.online import PairwiseInput

    if not (2 <= len(mods) <= 3 and all(isinstance(m, QuantizedLinear) for m in mods)):
        return False
    if not all(isinstance(m.transform, PairwiseInput) for m in mods):
        return False
    a, ta = mods[0], mods[0].transform
    for m in mods:
        t = m.transform
        if (t.group, t.rot_pairs.shape, m.bits, m.group_size, m.symmetric, m.sym_grid, m.kind, m.in_features) != \
                (ta.group, ta.rot_pairs.shape, a.bits, a.group_size, a.symmetric, a.sym_grid, a.kind, a.in_features):
            return False
        if m.perm is not None or m.act_bits is not None or (m.bias is None) != (a.bias is None):
            return False
        if m.out_features % 8 or (m.in_scale is None) != (a.in_scale is None) or (
                m.in_scale is not None and not torch.equal(m.in_scale, a.in_scale)):
            return False
    return True


class RotatedGroupLinear(nn.Module):
    """Packed linears sharing one input, each with its own pairwise transform, as one module: y =
    [m_0(x) | m_1(x) | ...]. The transforms run in one launch (`pairwise_rotate_many`) and the matmul
    in one GEMV over the concatenated packed weight whose row segments read their own rotated input
    (`quant_linear_segments`; one matmul per linear beyond one token). Same arithmetic as the separate
    modules on their decode path (rotate, round to x's dtype, packed GEMV); on CPU each transform's own
    forward."""

    def __init__(self, linear: QuantizedLinear, transforms: list[nn.Module], rows: list[int]):
        super().__init__()
        self.linear = linear
        self.transforms = nn.ModuleList(transforms)
        self.rows = list(rows)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._stacked: dict = {}

    def _coefficients(self, device: torch.device) -> tuple:
        key = (device.type, device.index)
        c = self._stacked.get(key)
        if c is None:
            parts = [t.coefficients(device)[:4] for t in self.transforms]
            c = self._stacked[key] = tuple(torch.stack([p[i] for p in parts]).contiguous() for i in range(4))
        return c

    def rotation(self, device: torch.device) -> tuple:
        """(scale, partner, cos, sin, group) of all transforms stacked, as `pairwise_rotate_many` and the
        fused prologues (`norm_rotate_many`) take them."""
        return (*self._coefficients(device), self.transforms[0].group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels.pairwise import pairwise_rotate_many

        if x.is_cuda or interpreting():
            xs = pairwise_rotate_many(x, *self.rotation(x.device))
        else:   # each transform's own CPU path (dense per-group blocks): exactly what the separate modules do
            xs = torch.stack([t(x) for t in self.transforms])
        return self.from_rotated(xs)

    def from_rotated(self, xs: torch.Tensor) -> torch.Tensor:
        """The GEMV of the inputs already rotated by each transform, xs [S, ..., in_features]."""
        from .kernels.quant import quant_linear_segments

        m = self.linear
        return quant_linear_segments(xs, m.qweight, m.scales, m.zeros, m.bits, m.kernel_group_size, m.in_features,
                                     self.rows, m.in_scale, m.bias)


def _same_vector_format(mods: list[VectorQuantizedLinear]) -> bool:
    a = mods[0]
    for m in mods:
        if (m.codebook_name, m.dim, m.code_bits, m.in_features) != (a.codebook_name, a.dim, a.code_bits, a.in_features):
            return False
        if m.transform is not None or m.act_bits is not None or (m.bias is None) != (a.bias is None):
            return False
        if m.codebook is not None and not torch.equal(m.codebook, a.codebook):
            return False
    return True


@torch.no_grad()
def fuse_linears(mods: list[nn.Module]) -> list[nn.Module]:
    """One module computing [m_0(x) | m_1(x) | ...] when the formats allow it, else the modules."""
    if len(mods) > 1 and _pairwise_group(mods):
        return [RotatedGroupLinear(_concat_quantized(mods), [m.transform for m in mods],
                                   [m.out_features for m in mods])]
    if len(mods) == 1 or not _same_format(mods):
        return mods
    a = mods[0]
    out = sum(m.out_features for m in mods)
    if type(a) is nn.Linear:
        f = nn.Linear(a.in_features, out, bias=a.bias is not None, device="meta")
        f.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
        if a.bias is not None:
            f.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
        return [f]
    if isinstance(a, VectorQuantizedLinear):
        f = VectorQuantizedLinear(a.in_features, out, a.codebook_name, a.dim, a.code_bits, a.bias is not None,
                                  device="meta")
        f.codes = torch.cat([m.codes for m in mods])
        f.scales = torch.cat([m.scales for m in mods])
        f.codebook = a.codebook
        if a.bias is not None:
            f.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
        return [f]
    return [_concat_quantized(mods)]


def _concat_quantized(mods: list[QuantizedLinear]) -> QuantizedLinear:
    """The packed linears stacked by rows (their transforms left out)."""
    a = mods[0]
    f = QuantizedLinear(a.in_features, sum(m.out_features for m in mods), a.bits, a.group_size, a.symmetric,
                        a.bias is not None, a.kind, a.perm is not None, a.in_scale is not None, None, device="meta",
                        sym_grid=a.sym_grid)
    f.qweight = torch.cat([m.qweight for m in mods])
    f.scales = torch.cat([m.scales for m in mods])
    f.zeros = None if a.zeros is None else torch.cat([m.zeros for m in mods])
    f.perm, f.in_scale = a.perm, a.in_scale
    if a.bias is not None:
        f.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
    return f


def _apply(mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return mods[0](x) if len(mods) == 1 else torch.cat([m(x) for m in mods], dim=-1)


# ---- the model ---------------------------------------------------------------------------------

@dataclass
class _Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: list[nn.Module]
    o: nn.Module
    gate_up: list[nn.Module]
    down: nn.Module
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    # pairwise transforms fused into the kernel producing their input (`prologue_rotations`): the
    # stacked coefficients of q/k/v's (after the input norm), gate/up's (after the post-attention
    # norm) and down's (after SiLU-gate), or None
    in_rot: tuple | None = None
    post_rot: tuple | None = None
    down_rot: tuple | None = None
    o_rot: tuple | None = None      # o's transform, fused into the decode attention kernel's output
    # plain packed linears whose elementwise neighbours run inside their GEMV at one token
    # (`fused_gemvs`): q/k/v and gate/up with their RMSNorm, o and down with the residual add, down
    # with SiLU-gate
    fuse_qkv: bool = False
    fuse_o: bool = False
    fuse_gate_up: bool = False
    fuse_down: bool = False


#: fuse pairwise transforms into the kernel that produces their input (residual add + RMSNorm before
#: q/k/v and gate/up, SiLU-gate before down) on CUDA: 3 of the 4 rotation launches of a layer go
#: (benchmarks may switch it off to compare)
PROLOGUE_ROTATIONS = True
#: one-token steps on CUDA run attention in lowbit's decode kernel (`kernels.attention`) instead of
#: `scaled_dot_product_attention` with a mask; it also applies o's pairwise transform to its output.
#: Off: one program per (sequence, head) walking the cache is slower than SDPA at batch 1 (H100, 8B
#: shape, 384 positions: 382 against 218 us per step; BENCHMARKS.md), more than the 92 us of o's
#: rotation launches it saves
DECODE_ATTENTION = False
#: one-token steps on CUDA run each plain packed linear (no online transform, no act quant) of the
#: widths in FUSED_GEMV_BITS with its elementwise neighbours in the same GEMV launch
#: (`QuantizedLinear.fused`): the input RMSNorm in q/k/v's and gate/up's, SiLU-gate in down's, the
#: residual add in o's and down's: three fewer launches per layer (benchmarks may switch it off)
FUSED_GEMV = True
#: H100, 8B shape, batch 1 (BENCHMARKS.md, 2026-12-08): fused against apart, W4 346.2 / 339.3 tok/s,
#: W2 405.5 / 393.9, but W3 253.3 / 278.5 (its short 16-row programs pay the prologue per program:
#: its GEMVs 2567 -> 3151 us); 1, 5-8 bits not measured: apart
FUSED_GEMV_BITS = (2, 4)


def fused_gemvs(layer: _Layer, dtype: torch.dtype) -> None:
    """Mark the layer's linears that `QuantizedLinear.fused` can run with their neighbours (see `_Layer`)."""

    def plain(mods) -> bool:
        m = mods[0] if isinstance(mods, list) and len(mods) == 1 else mods
        return isinstance(m, QuantizedLinear) and m.transform is None and m.act_bits is None and \
            m.bits in FUSED_GEMV_BITS

    layer.fuse_qkv = layer.in_rot is None and plain(layer.qkv) and layer.in_norm.dtype == dtype
    layer.fuse_o = layer.o_rot is None and plain(layer.o)
    layer.fuse_gate_up = layer.post_rot is None and plain(layer.gate_up) and layer.post_norm.dtype == dtype
    layer.fuse_down = layer.down_rot is None and plain(layer.down)


def prologue_rotations(layer: _Layer, device: torch.device, head_dim: int | None = None) -> None:
    """Set the layer's fused-prologue coefficients where its linears allow (see `_Layer`); with
    `head_dim` (the decode attention kernel is used) also o's when its rotation groups are the heads."""
    from .transforms.online import PairwiseInput

    def stacked(t: PairwiseInput) -> tuple:
        # one transform as a stack of one, contiguous once here (cos / sin may be views of wider
        # tensors): not copied again at every step
        return (*(c[None].contiguous() for c in t.coefficients(device)[:4]), t.group)

    if len(layer.qkv) == 1 and isinstance(layer.qkv[0], RotatedGroupLinear):
        layer.in_rot = layer.qkv[0].rotation(device)
    if len(layer.gate_up) == 1 and isinstance(layer.gate_up[0], RotatedGroupLinear):
        layer.post_rot = layer.gate_up[0].rotation(device)
    d = layer.down
    if isinstance(d, QuantizedLinear) and isinstance(d.transform, PairwiseInput) and d.act_bits is None:
        layer.down_rot = stacked(d.transform)
    o = layer.o
    if head_dim is not None and isinstance(o, QuantizedLinear) and isinstance(o.transform, PairwiseInput) and \
            o.act_bits is None and applies(head_dim, (None,) * 4 + (o.transform.group,)):
        layer.o_rot = stacked(o.transform)


class DecodeModel:
    """A causal LM re-assembled for generation (see the module docstring). Holds the model's modules;
    the original model should not be used afterwards (its q/k/v and gate/up may have been fused)."""

    def __init__(self, model: nn.Module, max_len: int, batch: int = 1, compile: bool | None = None):
        cfg = model.config.get_text_config(decoder=True)
        if cfg.model_type not in SUPPORTED:
            raise DecodeError(f"lowbit's decode loop supports {', '.join(SUPPORTED)}, not {cfg.model_type!r}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise DecodeError(f"activation {cfg.hidden_act!r} is not supported by the decode loop (silu only)")
        inner = model.model
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.norm_w = inner.norm.weight
        self.eps = float(cfg.rms_norm_eps)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        self.max_len, self.batch = max_len, batch
        self.layers: list[_Layer] = []
        for blk in inner.layers:
            at, mlp = blk.self_attn, blk.mlp
            self.layers.append(_Layer(
                blk.input_layernorm.weight, blk.post_attention_layernorm.weight,
                fuse_linears([at.q_proj, at.k_proj, at.v_proj]), at.o_proj,
                fuse_linears([mlp.gate_proj, mlp.up_proj]), mlp.down_proj,
                getattr(getattr(at, "q_norm", None), "weight", None), getattr(getattr(at, "k_norm", None), "weight", None)))
        del inner.layers  # the fused modules replace the originals (frees the unfused copies)
        kernels = self.device.type == "cuda" or interpreting()
        self.attn_kernel = DECODE_ATTENTION and kernels and applies(self.head_dim)
        if PROLOGUE_ROTATIONS and kernels:
            for L in self.layers:
                prologue_rotations(L, self.device, self.head_dim if self.attn_kernel else None)
        if FUSED_GEMV and kernels:
            for L in self.layers:
                fused_gemvs(L, self.dtype)
        pos = torch.arange(max_len, device=self.device)
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = inner.rotary_emb(probe, pos[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim], in the model dtype as transformers has them
        shape = (len(self.layers), batch, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.key_pos = torch.arange(max_len, device=self.device)
        self.ops = _Ops(self.device.type == "cuda" if compile is None else compile)

    def weight_bytes(self) -> int:
        """Bytes of every weight the decode step reads (packed codes, scales, norms, embeddings, lm_head)."""
        seen, n = set(), 0
        mods = [self.embed, self.lm_head] + [m for L in self.layers for m in (*L.qkv, L.o, *L.gate_up, L.down)]
        tensors = [t for m in mods for t in [*m.parameters(), *m.buffers()]]
        tensors += [t for L in self.layers for t in (L.in_norm, L.post_norm, L.q_norm, L.k_norm) if t is not None]
        for t in tensors + [self.norm_w]:
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel() * t.element_size()
        return n

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Logits for tokens `ids` [B, T] at positions `pos` [T] (a device tensor), the cache updated in place."""
        B, T = ids.shape
        ops = self.ops
        x = self.embed(ids)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        attn_kernel = self.attn_kernel and T == 1
        if not attn_kernel:
            allowed = self.key_pos[None, :] <= pos[:, None]  # [T, max_len]
            if self.window is not None:
                allowed = allowed & (self.key_pos[None, :] > pos[:, None] - self.window)
            # an additive mask made once per step: a boolean one is converted to this by every attention
            # call (three small kernels per layer)
            mask = torch.zeros(allowed.shape, device=x.device, dtype=x.dtype).masked_fill_(~allowed, float("-inf"))
            mask = mask[None, None]
        # one-token steps: the plain packed linears take their norm / gate / residual add along
        # (`fused_gemvs`); with them x stays the residual stream and r (an output not yet added) is None
        one = B * T <= quant_setting("GEMV_MAX_TOKENS")
        r = None
        for i, L in enumerate(self.layers):
            if L.in_rot is not None:
                x, xs = norm_rotate_many(x, r, L.in_norm, self.eps, *L.in_rot)
                qkv = L.qkv[0].from_rotated(xs)
            elif one and L.fuse_qkv:
                if r is not None:
                    x = x + r
                qkv = L.qkv[0].fused(x, norm=(L.in_norm, self.eps))
            else:
                x, h = self._add_norm(x, r, L.in_norm)
                qkv = _apply(L.qkv, h)
            q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                 self.kv_heads * self.head_dim], dim=-1)
            q = q.view(B, T, self.heads, self.head_dim)
            k = k.view(B, T, self.kv_heads, self.head_dim)
            if L.q_norm is not None:
                q, k = ops.rms_norm(q, L.q_norm, self.eps), ops.rms_norm(k, L.k_norm, self.eps)
            q = ops.rope_store(q, k, v.view(B, T, self.kv_heads, self.head_dim), cos, sin, self.k_cache[i],
                               self.v_cache[i], pos)
            if attn_kernel:   # o's transform (if any) applied by the attention kernel
                a = decode_attention(q, self.k_cache[i], self.v_cache[i], pos, self.window, L.o_rot)
                a = L.o.matmul(a) if L.o_rot is not None else L.o(a)
            else:
                a = F.scaled_dot_product_attention(q.transpose(1, 2), self.k_cache[i], self.v_cache[i],
                                                   attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
                a = a.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
                if one and L.fuse_o:
                    x, a = L.o.fused(a, residual=x), None
                else:
                    a = L.o(a)
            if L.post_rot is not None:
                x, hs = norm_rotate_many(x, a, L.post_norm, self.eps, *L.post_rot)
                gu = L.gate_up[0].from_rotated(hs)
            elif one and L.fuse_gate_up:
                if a is not None:
                    x = x + a
                gu = L.gate_up[0].fused(x, norm=(L.post_norm, self.eps))
            else:
                x, h = self._add_norm(x, a, L.post_norm)
                gu = _apply(L.gate_up, h)
            if L.down_rot is not None:
                r = L.down.matmul(silu_mul_rotate_many(gu, *L.down_rot)[0])
            elif one and L.fuse_down:
                x, r = L.down.fused(gu, gate=True, residual=x), None
            else:
                r = L.down(ops.silu_mul(gu))
        if r is not None:
            x = x + r
        if last_only:
            x = x[:, -1:]
        return self.lm_head(ops.rms_norm(x, self.norm_w, self.eps))

    def _add_norm(self, x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + r, its RMSNorm) in one compiled kernel; (x, RMSNorm(x)) when there is nothing to add (the
        first layer, or a fused linear added it already)."""
        if r is None:
            return x, self.ops.rms_norm(x, w, self.eps)
        return self.ops.add_rms_norm(x, r, w, self.eps)

    def reset(self) -> None:
        """Empty the KV cache."""
        self.k_cache.zero_()
        self.v_cache.zero_()


# ---- generation --------------------------------------------------------------------------------

def greedy(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """argmax(logits, -1, keepdim=True) for logits [B, V], the first index of the maximum as argmax
    gives it, in two stages for a large vocabulary: one argmax over a row of 128 k values is a single
    slow reduction on the GPU (36 us of an 8B decode step), the maxima of 1024-wide chunks and then
    the first chunk holding the largest are many short ones."""
    B, V = logits.shape
    n = V // chunk
    if n < 4:
        return logits.argmax(-1, keepdim=True)
    val, idx = logits[:, : n * chunk].view(B, n, chunk).max(-1)                   # [B, n], first per chunk
    idx = idx + torch.arange(0, n * chunk, chunk, device=logits.device)
    if V > n * chunk:
        tv, ti = logits[:, n * chunk:].max(-1, keepdim=True)
        val, idx = torch.cat((val, tv), 1), torch.cat((idx, ti + n * chunk), 1)
    return idx.gather(1, val.argmax(-1, keepdim=True))                             # the first chunk with the max


@dataclass
class GenerationStats:
    """Token counts and times of one generation."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    graph: bool

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens (all sequences) per second of prefill."""
        return self.batch * self.prompt_tokens / max(self.prefill_s, 1e-12)

    @property
    def decode_tok_s(self) -> float:
        """New tokens per second per sequence (batch 1: the usual tokens/s)."""
        return max(self.new_tokens - 1, 0) / max(self.decode_s, 1e-12)

    def to_dict(self) -> dict:
        """Plain dict with the rates."""
        return {**self.__dict__, "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}


class Generator:
    """Greedy generation on a DecodeModel: eager prefill, then one decode step per CUDA-graph replay
    (on CUDA; eager steps elsewhere)."""

    def __init__(self, dm: DecodeModel, use_graph: bool | None = None):
        self.dm = dm
        self.use_graph = dm.device.type == "cuda" if use_graph is None else use_graph
        self.ids = torch.zeros(dm.batch, 1, dtype=torch.long, device=dm.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=dm.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self) -> None:
        logits = self.dm.forward(self.ids, self.pos)
        self.ids.copy_(greedy(logits[:, -1]))
        self.pos.add_(1)

    def _capture(self) -> None:
        # warm up on a side stream (compiles, autotunes, sizes workspaces), then capture one step;
        # the warm-up wrote into the cache at the current position, which the real steps overwrite
        saved_ids, saved_pos = self.ids.clone(), self.pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step()
                self.ids.copy_(saved_ids)
                self.pos.copy_(saved_pos)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._step()
        self.ids.copy_(saved_ids)
        self.pos.copy_(saved_pos)
        self.graph = g

    def _sync(self) -> None:
        if self.dm.device.type == "cuda":
            torch.cuda.synchronize(self.dm.device)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, on_token: Callable[[torch.Tensor], None] | None = None
                 ) -> tuple[torch.Tensor, GenerationStats]:
        """Greedy continuation of `prompt` [B, T] by `new_tokens` tokens: (tokens [B, new], stats).
        `on_token(ids [B])` is called with every new token (that forces a sync per token)."""
        dm = self.dm
        B, T = prompt.shape
        if B != dm.batch:
            raise DecodeError(f"the decode model was set up for batch {dm.batch}, got {B}")
        if T + new_tokens > dm.max_len:
            raise DecodeError(f"prompt {T} + {new_tokens} new tokens exceed max_len {dm.max_len}")
        dm.reset()
        prompt = prompt.to(dm.device)
        self._sync()
        t0 = time.perf_counter()
        logits = dm.forward(prompt, torch.arange(T, device=dm.device))
        self.ids.copy_(greedy(logits[:, -1]))
        self.pos.fill_(T)
        self._sync()
        prefill = time.perf_counter() - t0
        out = torch.empty(B, new_tokens, dtype=torch.long, device=dm.device)
        out[:, 0] = self.ids[:, 0]
        if on_token is not None:
            on_token(out[:, 0])
        if self.use_graph and self.graph is None and new_tokens > 1:
            self._capture()
        self._sync()
        t1 = time.perf_counter()
        for i in range(1, new_tokens):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            out[:, i] = self.ids[:, 0]
            if on_token is not None:
                on_token(out[:, i])
        self._sync()
        decode = time.perf_counter() - t1
        return out, GenerationStats(B, T, new_tokens, prefill, decode, self.graph is not None)


# ---- speed measurement (`lowbit speed`, benchmarks) -------------------------------------------------

def measure_speed(model: nn.Module, batches: tuple[int, ...] = (1, 4, 16), prompt_len: int = 128,
                  new_tokens: int = 128, seed: int = 0, compile: bool | None = None, repeats: int = 2) -> dict:
    """Prefill and decode rates of `model` in lowbit's decode loop at each batch size, with the
    weight bytes and (CUDA) peak memory. The model is consumed (re-assembled for decoding)."""
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    rows = []
    dm = None
    for b in batches:
        if dm is None:
            dm = DecodeModel(model, prompt_len + new_tokens, b, compile=compile)
        else:  # same modules, a new cache for this batch size
            dm.batch = b
            shape = (len(dm.layers), b, dm.kv_heads, dm.max_len, dm.head_dim)
            dm.k_cache = dm.v_cache = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            dm.k_cache = torch.zeros(shape, device=device, dtype=dm.dtype)
            dm.v_cache = torch.zeros(shape, device=device, dtype=dm.dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        gen = Generator(dm)
        prompt = torch.randint(0, vocab, (b, prompt_len), generator=g)
        best, prefill = None, []
        for _ in range(repeats):  # the first run compiles and captures; keep the best of each phase
            _, st = gen.generate(prompt, new_tokens)
            prefill.append(st.prefill_s)
            best = st if best is None or st.decode_s < best.decode_s else best
        best.prefill_s = min(prefill)
        row = {**best.to_dict(), "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20
               if device.type == "cuda" else None}
        rows.append(row)
        del gen
    return {"weight_bytes": dm.weight_bytes(), "rows": rows}
