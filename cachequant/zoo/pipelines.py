"""Pixel-space, class-conditional pipelines for the zoo's CIFAR-10 transformers, called like
diffusers' ``DiTPipeline`` (``pipe(class_labels=[...], guidance_scale=..., num_inference_steps=...)``).

diffusers' DiTPipeline assumes a VAE and a 1000-class label table; the zoo's models work on pixels
with 10 classes (null class 10 for classifier-free guidance). Conditional and unconditional halves
run in one batch, as in DiTPipeline, so cachequant caches them together.

- :class:`DiTPixelPipeline`: ``DiTTransformer2DModel``, ε-prediction, DDPM / DDIM samplers.
- :class:`MMDiTPixelPipeline`: ``SD3Transformer2DModel`` trained by flow matching (rectified flow,
  velocity ε − x0), sampled with ``FlowMatchEulerDiscreteScheduler``; the label enters as SD3's
  text token and pooled projection (:func:`class_condition`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class _ClassPixelPipeline(DiffusionPipeline):
    """What the zoo's class-conditional pipelines share: label checks, the starting noise, the
    conditional and unconditional halves in one batch, the guidance mix, the output. A subclass
    says how many classes there are and what the model predicts for a batch."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def _classes(self) -> int:
        raise NotImplementedError

    def _prepare(self, y: torch.Tensor) -> None:
        """Called once per run with the labels of the batch (the null class for the CFG half)."""

    def _predict(self, model_in: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _set_timesteps(self, num_inference_steps: int, device) -> None:
        self.scheduler.set_timesteps(num_inference_steps)

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float = 1.5, generator=None,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True):
        num_classes = self._classes()
        labels = [int(c) for c in class_labels]
        if any(not 0 <= c < num_classes for c in labels):
            raise ValueError(f"class_labels must be in [0, {num_classes - 1}], got {labels}")
        cfg = self.transformer.config
        device, dtype = self._execution_device, self.transformer.dtype
        x = randn_tensor((len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator,
                         device=device, dtype=dtype)
        y = torch.tensor(labels, device=device)
        use_cfg = guidance_scale > 1
        if use_cfg:
            y = torch.cat([y, torch.full_like(y, num_classes)])
        self._prepare(y)
        self._set_timesteps(num_inference_steps, device)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self._predict(torch.cat([x, x]) if use_cfg else x, t, y)
            if use_cfg:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        images = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class DiTPixelPipeline(_ClassPixelPipeline):
    """``DiTTransformer2DModel``, ε-prediction, the DDPM-family samplers."""

    def _classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def _predict(self, model_in: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        model_in = self.scheduler.scale_model_input(model_in, t)
        device = model_in.device
        ts = t.expand(model_in.shape[0]).to(device) if torch.is_tensor(t) else torch.full(
            (model_in.shape[0],), t, device=device)
        return self.transformer(model_in, timestep=ts, class_labels=y).sample[:, : self.transformer.config.in_channels]

NUM_LABELS = 11
"""The MMDiT's label vocabulary: ten classes and the null class (10) of classifier-free guidance."""


def class_condition(labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict:
    """SD3-style conditioning for class labels (10 = null): a one-hot "text" token, which the
    model's ``context_embedder`` turns into a learned label token, and the same one-hot vector as
    the pooled projection that feeds the adaLN modulation. Shared by training and sampling."""
    onehot = F.one_hot(labels, NUM_LABELS).to(dtype)
    return {"encoder_hidden_states": onehot[:, None, :], "pooled_projections": onehot}


class MMDiTPixelPipeline(_ClassPixelPipeline):
    """Class-conditional rectified-flow sampling on pixels: x starts as noise at σ = 1 and follows
    the predicted velocity with the scheduler's Euler steps down to σ = 0 (timestep = 1000·σ, as in
    training)."""

    num_classes = NUM_LABELS - 1

    def _classes(self) -> int:
        return self.num_classes

    def _prepare(self, y: torch.Tensor) -> None:
        self._condition = class_condition(y, self.transformer.dtype)

    def _set_timesteps(self, num_inference_steps: int, device) -> None:
        self.scheduler.set_timesteps(num_inference_steps, device=device)

    def _predict(self, model_in: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(model_in, timestep=t.expand(model_in.shape[0]), **self._condition).sample
