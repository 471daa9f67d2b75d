"""The user-facing configuration of one acceleration: which cache, which precision, which corrections."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SCHEDULES = ("uniform", "quadratic", "dps")
"""Where the full steps go (``cachequant.cache.schedules`` implements each)."""
SELECTION_METHODS = ("tap", "tap-per-step", "random", "uniform-per-step", "kmeans", "dbscan", "agglomerative")
"""Ways of choosing calibration entries from the pool (``cachequant.calibration.select``)."""
CALIBRATION_MODES = ("trajectory",) + SELECTION_METHODS
"""``CacheQuantConfig.calibration``: every step of every trajectory, or a selection."""
WEIGHT_ROUNDINGS = ("nearest", "gptq")
CACHE_DEC_FITS = ("open", "closed")
DPS_COSTS = ("float", "quant")
ATTENTION_PROBS = ("uniform", "e4m3")
VC_FITS = ("open", "closed")


@dataclass
class CacheQuantConfig:
    interval: int = 5
    """N: one full step every N steps on average (K = ceil(T/N) full steps). 1 = no caching."""
    schedule: str = "dps"
    """Where the full steps go: 'uniform', 'quadratic' (DeepCache's non-uniform) or 'dps'."""
    dps_cost: str = "float"
    """What DPS minimises: ``float`` — the L1 drift of the full-precision cached feature on uncached
    trajectories (the paper's Eq. 5 and released code); ``quant`` — the error of what a cached step
    actually reuses, the *quantized* model's feature at the group's full step, against the
    full-precision feature of every step of the group, the full step included
    (``cachequant.cache.schedules.dps_schedule``). The paper says its schedule accounts for
    quantization error; its cost cannot see a step whose quantized feature is far off. Costs a
    provisional activation-range pass and a quantized replay of the feature trajectories."""
    weight_bits: int | None = 8
    """8 or 4 (first/last layers stay at 8); None = no quantization (then act_bits must be None)."""
    act_bits: int | None = 8
    weight_rounding: str = "nearest"
    """How weights round onto their grid: 'nearest', or 'gptq' (each layer's rounding error pushed
    onto its not-yet-rounded input columns, weighted by the inverse input Hessian; Frantar et al.
    2022). The codes are stored in the plan. 'gptq' is what makes W4A8 usable on the CIFAR UNet
    (`results/w4/README.md`). The input Hessians (K × K float64 per layer, K = input channels ×
    kernel taps) are held for all layers at once during calibration. Above 8 GiB in total the
    calibration refuses with an error. That is the case for SD 1.5's UNet, where each 3×3 conv at
    1,280 channels alone needs 1 GiB; its layers would need one-at-a-time accumulation, which is not
    implemented."""
    w8_layers: tuple[str, ...] = ()
    """With weight_bits = 4: more layers that keep 8-bit weights, as ``fnmatch`` patterns over module
    names (e.g. ``"time_embedding.*"``), on top of the adapter's first and last layer. Mixed precision
    for the layers a W4 model is most sensitive to (``benchmarks/w4_sensitivity.py`` measures them)."""
    float_layers: tuple[str, ...] = ()
    """Layers left unquantized (weights and input stay float), as ``fnmatch`` patterns over module
    names (e.g. ``"up_blocks.0.resnets.*.conv_shortcut"``), on top of what the model's description
    keeps in float: mixed precision for the layers whose 8-bit input costs the most.
    ``benchmarks/act_sensitivity.py`` ranks them by the output SQNR of their input's quantization
    error. It pays where one layer dominates the error; where the error is spread over many layers,
    as on the retrained CIFAR UNet (``results/quality/README.md``), a handful of float layers buys
    nothing. A pattern that matches no layer is an error."""
    dec: bool = True
    """Decoupled error correction, both halves (see cache_dec / quant_dec to ablate one)."""
    cache_dec: bool | None = None
    """Cache half of DEC; None follows `dec`."""
    cache_dec_slope: bool = True
    """Cache-DEC fits X_full ≈ a·X_cached + b per step and channel (Eq. 8). False fixes a = 1 and fits
    only the shift b. Why: when the reused feature predicts the fresh one poorly, the least-squares
    slope a = ρ·σ_full/σ_cached shrinks the reused feature towards its mean on every cached step. On
    the shipped DiT under DDPM 250 the slope was 0.96–0.97 and DEC made the images worse
    (`results/quality/README.md`); a shift cannot shrink the feature."""
    cache_dec_fit: str = "open"
    """Where cache-DEC is fitted: ``open`` — on the full-precision, uncached trajectories (the
    papers' reference); ``closed`` — on the trajectories the cached (and quantized) model itself
    follows: its inputs at every step are logged, and the fresh feature it would compute there is
    regressed on the one it reuses. Why: at sampling time the cached steps see the accelerated
    model's own drifted latents, which the open-loop fit never saw. Costs two more passes over the
    feature trajectories."""
    quant_dec: bool | None = None
    """Quantization half of DEC; None follows `dec`."""
    cache_branch: int | None = None
    """UNets: run the last ``cache_branch`` up blocks, whole, on cached steps (1 = the last block)."""
    cache_layers: int | None = None
    """UNets: run only the last ``cache_layers`` up layers (a resnet and its attention) on cached
    steps. Neither this nor cache_branch set: 1 layer for UNet2DConditionModel (DeepCache's
    shallowest branch, the reference's SD site), the whole last up block for UNet2DModel (the
    reference's CIFAR site)."""
    dit_span: tuple[int, int] | None = None
    """Transformers: blocks [start, end) whose deviation is cached; None = all but the first and last.
    Blocks are counted over the model's block lists in order (Flux: the dual-stream blocks, then the
    single-stream ones)."""
    quant_modulation: bool = False
    """Transformers: also quantize the layers the model's description keeps in float — the adaLN
    modulation (``norm1.linear``, ``norm1_context.linear``, the timestep / pooled-text embedders).
    They are a sliver of the compute, and each of their outputs scales or shifts every token of a
    block, so their error is amplified; False (the default) keeps them in float."""
    quant_io: bool = False
    """Also quantize the model's first layer (whose input is the noisy sample itself: ``conv_in``,
    the patch embedding) and its last (the output projection that writes the predicted noise or
    velocity: ``conv_out``, ``proj_out``). Their error goes straight into the sampler's trajectory
    at every step, cached or not, while they are a negligible share of the compute; False (the
    default) keeps both in float. On the retrained CIFAR-10 DiT (DDIM 50, 16 images) these two
    layers carry nearly all of W8A8's error: PSNR to full precision 25.7 dB with them quantized,
    40.9 dB without (``results/quality/README.md``). BRECQ-style PTQ code, which the papers build
    on, does not quantize the network's input either. Plans written before this field existed
    read as True."""
    quant_attention: bool = True
    """Also quantize the attention matmuls (QKᵀ and softmax·V) to act_bits."""
    attention_probs: str = "uniform"
    """The grid of the softmax probabilities P, the left operand of P·V, when the attention matmuls
    are quantized: ``uniform`` — a per-step 8-bit affine range like every other activation;
    ``e4m3`` — FP8 e4m3 at the fixed scale 1/448 (P ∈ [0, 1] onto e4m3's [0, 448]), what an FP8
    attention kernel feeds its P·V. Why: the probabilities' range is set by the rare peaked rows
    (max 0.4–0.8) while most are near 1/tokens, so a uniform step of 0.0015–0.003 rounds the typical
    probability (≈ 0.004 at 257 tokens) to one or two codes; e4m3 keeps 3 mantissa bits at every
    magnitude (down to 2⁻⁹/448). On the CIFAR MMDiT's W8A8 plan the 8-bit P alone cost 10.7 dB PSNR
    and P on e4m3 gave back 9.9 of them (``results/quality/README.md``). Wherever the attention
    matmuls run 8-bit: the reference path, and the kernel backends with ``attention="8bit"`` (by
    default they run fp16 attention). Old plans read as ``uniform``."""
    per_step_act: bool = True
    """One activation range per timestep (the method); False = one range for all steps (baseline)."""
    calib_batch_size: int = 8
    num_calib_samples: int = 32
    """Calibration trajectories when neither prompts nor class labels are given."""
    dps_samples: int = 8
    """Trajectories recorded without cache for the DPS costs and the cache-DEC fit."""
    seed: int = 0
    calibration: str = "trajectory"
    """Which intermediate inputs calibrate the activation ranges: 'trajectory' (every step of every
    calibration trajectory) or a selection of `calib_select` entries from that pool by 'tap'
    (Q&C temporal-aware parallel clustering), 'tap-per-step' (TAP stratified by step: the same
    number from every step, spread over each step's clusters), 'random', 'uniform-per-step',
    'kmeans', 'dbscan', 'agglomerative'."""
    calib_select: int = 256
    tap_lambda: float = 0.5
    """TAP: weight of the data similarity against the temporal one (W = λ·S_data + (1−λ)·S_time)."""
    tap_clusters: int = 100
    vc: bool = False
    """Variance compensation (Q&C): per-step, per-channel rescaling of the predicted noise."""
    vc_gamma: float = 10.0
    """VC: weight of the channel-energy (noise-ratio) term against the MSE term (see correction/vc.py)."""
    vc_fit: str = "open"
    """Where VC is fitted: ``open`` — teacher-forced, the accelerated model evaluated on the
    full-precision trajectories' inputs (Q&C's setting); ``closed`` — on the trajectories the
    accelerated model itself follows from noise, against the full-precision model on the same
    inputs. Why: the variance drift VC corrects comes with exposure bias, which only appears once
    the model runs on its own outputs. Costs one more pass over the `dps_samples` trajectories."""

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if (self.weight_bits is None) != (self.act_bits is None):
            raise ValueError("weight_bits and act_bits must both be set (W8A8, W4A8) or both be None (no quantization)")
        if self.weight_bits is not None and self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 4 or 8 (or None), got {self.weight_bits!r}")
        if self.act_bits is not None and self.act_bits not in (8,):
            raise ValueError(f"act_bits must be 8 (or None), got {self.act_bits!r}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"weight_rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}; got {self.weight_rounding!r}")
        if self.weight_rounding != "nearest" and self.weight_bits is None:
            raise ValueError("weight_rounding='gptq' needs quantized weights (weight_bits=8 or 4)")
        if isinstance(self.w8_layers, str) or not all(isinstance(p, str) and p for p in self.w8_layers):
            raise ValueError(f"w8_layers must be a sequence of non-empty module-name patterns, got {self.w8_layers!r}")
        self.w8_layers = tuple(self.w8_layers)
        if self.w8_layers and self.weight_bits != 4:
            raise ValueError("w8_layers only applies to 4-bit weights (weight_bits=4): every layer is already 8-bit")
        if isinstance(self.float_layers, str) or not all(isinstance(p, str) and p for p in self.float_layers):
            raise ValueError(f"float_layers must be a sequence of non-empty module-name patterns, got "
                             f"{self.float_layers!r}")
        self.float_layers = tuple(self.float_layers)
        if self.float_layers and self.weight_bits is None:
            raise ValueError("float_layers needs quantization (weight_bits / act_bits set): without it every "
                             "layer is float already")
        if not isinstance(self.quant_modulation, bool):
            raise ValueError(f"quant_modulation must be True or False, got {self.quant_modulation!r}")
        if self.dps_cost not in DPS_COSTS:
            raise ValueError(f"dps_cost must be one of {', '.join(DPS_COSTS)}; got {self.dps_cost!r}")
        if self.dps_cost == "quant" and (self.schedule != "dps" or self.weight_bits is None or self.interval == 1):
            raise ValueError("dps_cost='quant' needs the 'dps' schedule, a cache (interval > 1) and quantization "
                             "(weight_bits / act_bits set): it is DPS's cost with the quantized model's features")
        if self.cache_dec_fit not in CACHE_DEC_FITS:
            raise ValueError(f"cache_dec_fit must be one of {', '.join(CACHE_DEC_FITS)}; got {self.cache_dec_fit!r}")
        if not isinstance(self.cache_dec_slope, bool):
            raise ValueError(f"cache_dec_slope must be True (fit a·X + b) or False (shift only), got {self.cache_dec_slope!r}")
        for name in ("cache_branch", "cache_layers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or None for the model's default), got {v!r}")
        if self.cache_branch is not None and self.cache_layers is not None:
            raise ValueError("set cache_branch (whole up blocks) or cache_layers (up layers), not both")
        if self.dit_span is not None:
            if len(self.dit_span) != 2:
                raise ValueError(f"dit_span must be (start, end), got {self.dit_span!r}")
            self.dit_span = (int(self.dit_span[0]), int(self.dit_span[1]))
        if self.calibration not in CALIBRATION_MODES:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_MODES)}; got {self.calibration!r}")
        if not 0.0 <= self.tap_lambda <= 1.0:
            raise ValueError(f"tap_lambda must be in [0, 1], got {self.tap_lambda}")
        if self.attention_probs not in ATTENTION_PROBS:
            raise ValueError(f"attention_probs must be one of {', '.join(ATTENTION_PROBS)}; got {self.attention_probs!r}")
        if self.attention_probs != "uniform" and (not self.quant_attention or self.act_bits is None):
            raise ValueError(f"attention_probs={self.attention_probs!r} sets the grid of the 8-bit attention's "
                             "probabilities: it needs quant_attention=True and quantization (act_bits=8)")
        if self.vc_fit not in VC_FITS:
            raise ValueError(f"vc_fit must be one of {', '.join(VC_FITS)}; got {self.vc_fit!r}")
        if self.vc_fit != "open" and not self.vc:
            raise ValueError("vc_fit='closed' chooses how variance compensation is fitted: set vc=True as well")
        if self.vc_gamma < 0:
            raise ValueError(f"vc_gamma must be >= 0, got {self.vc_gamma}")
        for name in ("calib_batch_size", "num_calib_samples", "dps_samples", "calib_select", "tap_clusters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def quantize(self) -> bool:
        return self.weight_bits is not None

    @property
    def use_cache_dec(self) -> bool:
        on = self.dec if self.cache_dec is None else self.cache_dec
        return bool(on) and self.interval > 1

    @property
    def use_quant_dec(self) -> bool:
        on = self.dec if self.quant_dec is None else self.quant_dec
        return bool(on) and self.quantize and self.interval > 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["w8_layers"] = list(d["w8_layers"])
        d["float_layers"] = list(d["float_layers"])
        if d["dit_span"] is not None:
            d["dit_span"] = list(d["dit_span"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CacheQuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CacheQuantConfig fields: {', '.join(sorted(unknown))}")
        d = dict(d)
        if d.get("dit_span") is not None:
            d["dit_span"] = tuple(d["dit_span"])
        return cls(**d)
