"""End-to-end distillation after the walk (`lowbit.e2e`): the FP model's final hidden states are taken before
any block changes, and after the walk the quantized linears' continuous parameters are trained against them."""

from __future__ import annotations

from .base import E2EFTConfig, Flag, Run, Stage, register_stage

FLAGS = {
    "e2e_steps": Flag("steps", int, "Steps of end-to-end distillation (KL to the FP logits) of the same parameters "
                      "after quantizing (0 = off; not with --stream).", ("--e2e-steps",)),
    "e2e_lr": Flag("lr", float, "Learning rate of end-to-end distillation (default 1e-4).", ("--e2e-lr",)),
    "e2e_batch": Flag("batch", int, "Calibration windows per end-to-end step (default 4).", ("--e2e-batch",)),
    "e2e_embed_lr": Flag("embed_lr", float, "Learning rate of the token embedding and output head in end-to-end "
                         "distillation (default 0: they stay as they are).", ("--e2e-embed-lr",)),
    "e2e_generated": Flag("generated", int, "Sequences sampled from the FP model (before quantizing) that "
                          "end-to-end distillation trains on next to the calibration windows (default 0).",
                          ("--e2e-generated",)),
}


@register_stage(E2EFTConfig, key="e2e_ft", order=70, what="end-to-end fine-tuning", switch="steps", flags=FLAGS,
                label="suffix")
class E2EFinetuneStage(Stage):
    """KL to the FP logits on the calibration windows (and / or sequences sampled from the FP model), a few Adam
    steps; the best validation point is kept. It reads the calibration tokens itself (`run.tokens`), not the
    walker's streams."""

    not_streamed = "end-to-end fine-tuning (it trains the whole model at once)"

    def __init__(self, cfg: E2EFTConfig):
        self.cfg = cfg
        self._teacher = None
        self._tokens = None

    def before_model(self, run: Run) -> None:
        from ..e2e import mix, sample, teacher_states

        cfg = self.cfg
        if run.tokens is None or (cfg.calibration and run.tokens.shape[0] + cfg.generated < 2):
            from ..pipeline import PipelineError

            raise PipelineError("end-to-end fine-tuning needs at least 2 windows (train + validation)")
        model = run.model
        home = next(model.parameters()).device
        device = run.device or home
        model.to(device)
        try:
            gen = None
            tokens = run.tokens if run.dist is None else run.dist.unshard(run.tokens)  # every rank: all windows
            if cfg.generated:   # seeded: the same sequences on every rank
                gen = sample(model, cfg.generated, run.tokens.shape[1], batch_size=64,
                             progress=run.progress)
            self._tokens = mix(tokens if cfg.calibration else None, gen)
            self._teacher = teacher_states(model, self._tokens, run.batch_size)
        finally:
            model.to(home)

    def after_model(self, run: Run) -> None:
        import torch

        from ..e2e import distill

        cfg, res, model = self.cfg, run.result, run.model
        home = next(model.parameters()).device
        device = run.device or home
        model.to(device)
        try:
            weights = {n: qw.to(device) for n, qw in res.weights.items()}
            ft = distill(model, weights, self._tokens, self._teacher, run.batch_size, steps=cfg.steps, lr=cfg.lr,
                         batch=cfg.batch, norm_lr=cfg.norm_lr, embed_lr=cfg.embed_lr, eval_every=cfg.eval_every,
                         val_fraction=cfg.val_fraction, progress=run.progress, dist=run.dist)
            res.block_fits.append({"e2e_ft": ft["losses"], "reverted": ft["reverted"]})
            if not ft["reverted"]:
                with torch.no_grad():
                    for name, qw in ft["weights"].items():
                        lin = model.get_submodule(name)
                        lin.weight.data.copy_(qw.dequantize().to(lin.weight.dtype))
                        res.weights[name] = qw.to("cpu")
                    for name, t in ft["norms"].items():
                        model.get_parameter(name).data.copy_(t)
        finally:
            self._teacher = self._tokens = None
            model.to(home)
