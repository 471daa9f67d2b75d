"""A pixel-space, class-conditional DiT pipeline called like diffusers' ``DiTPipeline``.

diffusers' DiTPipeline assumes a VAE and a 1000-class label table; the zoo's CIFAR-10 DiT works on
pixels with 10 classes (null class 10 for classifier-free guidance). Conditional and unconditional
halves run in one batch, as in DiTPipeline, so cachequant caches them together.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class DiTPixelPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float = 1.5, generator=None,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True):
        num_classes = int(self.transformer.config.num_embeds_ada_norm)
        labels = [int(c) for c in class_labels]
        if any(not 0 <= c < num_classes for c in labels):
            raise ValueError(f"class_labels must be in [0, {num_classes - 1}], got {labels}")
        n = len(labels)
        cfg = self.transformer.config
        device, dtype = self._execution_device, self.transformer.dtype
        x = randn_tensor((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator,
                         device=device, dtype=dtype)
        y = torch.tensor(labels, device=device)
        use_cfg = guidance_scale > 1
        if use_cfg:
            y = torch.cat([y, torch.full_like(y, num_classes)])
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([x, x]) if use_cfg else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            ts = t.expand(model_in.shape[0]).to(device) if torch.is_tensor(t) else torch.full(
                (model_in.shape[0],), t, device=device)
            eps = self.transformer(model_in, timestep=ts, class_labels=y).sample[:, : cfg.in_channels]
            if use_cfg:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        images = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
