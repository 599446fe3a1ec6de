"""GPU memory of a training configuration, per device, before anything is launched.

The model is built on the meta device (no weights, no GPU) exactly as training builds it (LoRA, frozen parts,
activation checkpointing: backbones/build.prepare_policy_model), so parameter counts are exact. The memory a
step needs on top of the weights is worked out part by part (`Plan`):

- weights, gradients and optimizer states from the counts and the precision's bytes per value
  (AdamW: two states; Lightning's bf16-mixed keeps float32 weights, bf16-true bfloat16 ones); under bf16-mixed the
  frozen linear weights are bfloat16 where the backbone is saved in bfloat16 (backbones/build.store_frozen_in);
- the reference: a `copy` is a second set of weights (its linear ones bfloat16 under bf16-mixed), `adapter` (LoRA
  off) and `precomputed` (a cache on disk) cost no device memory, `none` nothing;
- activations: what autograd saves for the backward, *measured* on a one- and a two-decoder-layer model of the
  same configuration run for a few tokens on the CPU (torch.autograd.graph.saved_tensors_hooks, under autocast
  for bf16-mixed); the difference is one layer's bytes per token, so the figure follows the actual layer code
  (attention kernel, norms in float32, LoRA, autocast's weight casts), scaled to the configured rows. The packed
  rows' attention mask is counted once (sdpa: attention.prefix_sdpa's bool mask of the later responses' tokens;
  eager: the additive [rows, L, L] one). With activation checkpointing, each layer keeps its input and one layer
  is recomputed at a time;
- transients: the response log-probs' [tokens, vocabulary] float32 logits (`logp_chunk` tokens at a time), and
  the optimizer step's scratch (torch's foreach AdamW on a GPU holds one state-sized copy; on a CPU one tensor's);
- sharding: FSDP / FSDP2 over N devices divide weights, gradients, optimizer states and the reference by N, and
  add one layer unsharded (two, with prefetch) while it computes.

Peak = weights + reference + optimizer + the largest of: the forward's end (the last step's gradients, which
Lightning zeroes between the forward and the backward, + activations + logits), the backward (max(activations,
gradients) + one layer's activations + logits) and the optimizer step (gradients + its scratch); plus FSDP's
unsharded layers. The CUDA context and the allocator's fragmentation are not in it: `fits` keeps 10% of the device
free for them. Checked against measured peaks of whole training steps: benchmarks/plan_accuracy.py, tests/test_plan.py.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lightning_meddpo.backbones.build import AUTOCAST_DTYPES, dtype_name, store_frozen_in

# bytes per value: weights, gradients, each optimizer state, activations (autocast computes in bf16)
PRECISION_BYTES = {
    "32-true": (4, 4, 4, 4),
    "32": (4, 4, 4, 4),
    "bf16-mixed": (4, 4, 4, 2),
    "bf16-true": (2, 2, 2, 2),
    "16-mixed": (4, 4, 4, 2),
}
STRATEGIES = ("single", "ddp", "fsdp", "fsdp2")
OPTIMIZER_STATES = 2  # AdamW: exp_avg and exp_avg_sq
HEADROOM = 0.9  # of the device's memory a plan may fill (CUDA context, allocator fragmentation)
GIB = 2**30


@dataclass
class Workload:
    """What one optimizer step on one device forwards: `rows` token rows of `row_tokens` each (packed scoring: one
    row per pair and image side, holding the prompt and every response on that image), `images` images encoded,
    and `response_tokens` tokens scored through the LM head."""

    rows: int
    row_tokens: int
    images: int
    response_tokens: int


@dataclass
class Plan:
    """Bytes per device, by part (see the module's docstring for how each is worked out)."""

    weights: int
    reference: int
    gradients: int
    optimizer: int
    activations: int
    layer_activations: int  # one decoder layer's, live again while it is recomputed or back-propagated
    logits: int
    optimizer_scratch: int
    unsharded_layers: int
    trainable_parameters: int
    parameters: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        forward = self.gradients + self.activations + self.logits  # Lightning zeroes last step's after the forward
        backward = max(self.activations, self.gradients) + self.layer_activations + self.logits
        step = self.gradients + self.optimizer_scratch
        return self.weights + self.reference + self.optimizer + max(forward, backward, step) + self.unsharded_layers

    def fits(self, gpu_gib: float) -> bool:
        return self.peak <= HEADROOM * gpu_gib * GIB

    def as_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak}


# ------------------------------------------------------------------------------------------- the model


def meta_model(config, lora=None, freeze: list[str] | None = None, gradient_checkpointing: bool = False) -> nn.Module:
    """The policy model of `config` on the meta device, prepared as training prepares it."""
    from transformers import AutoModelForImageTextToText

    from lightning_meddpo.backbones.build import prepare_policy_model

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return prepare_policy_model(model, lora, freeze, gradient_checkpointing)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable ones) counted once each (tied weights are one tensor)."""
    seen = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return total, trainable


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from lightning_meddpo.backbones.adapter import adapter_for

    adapter = adapter_for(model)
    return adapter.part(model, adapter.language_model).layers


def largest_layer_bytes(model: nn.Module, precision_bytes: tuple[int, int, int, int]) -> tuple[int, int]:
    """(weights, gradients) of the largest decoder layer: what FSDP gathers while it computes. A weight stored in a
    lower precision than the precision's (store_frozen_in) counts its own bytes."""
    w_bytes, g_bytes = precision_bytes[:2]
    layers = [(sum(p.numel() * min(w_bytes, p.element_size()) for p in layer.parameters()),
               sum(p.numel() * g_bytes for p in layer.parameters() if p.requires_grad)) for layer in decoder_layers(model)]
    return max(layers)


# ------------------------------------------------------------------------------------------- activations


def saved_bytes(model: nn.Module, run, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for the backward while `run()` executes, the weights of
    `model` (and views of them) left out: they are counted as weights; so are `exclude` (counted apart)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


@dataclass
class LayerBytes:
    """What one layer saves for the backward in one forward of R rows of L tokens:
    once + R * (linear * L + quadratic * L**2); `once` is what does not grow with the rows (autocast's low-precision
    copies of the weights), `quadratic` what an attention kernel that keeps its probabilities adds. `outside_*`: the
    same for everything that is not a layer (final norm, inputs), per forward and per token."""

    once: float
    linear: float
    quadratic: float
    outside_once: float
    outside_per_token: float

    def layer(self, rows: int, tokens: int) -> float:
        return self.once + rows * max(0.0, self.linear * tokens + self.quadratic * tokens**2)

    def outside(self, rows: int, tokens: int) -> float:
        return self.outside_once + rows * tokens * self.outside_per_token


def _fit(sizes, values, degree: int) -> list[float]:
    """Coefficients c0 + c1 n (+ c2 n^2) through the points (exact: as many points as coefficients)."""
    a = torch.tensor([[float(n) ** k for k in range(degree + 1)] for n in sizes[: degree + 1]], dtype=torch.float64)
    b = torch.tensor([float(v) for v in values[: degree + 1]], dtype=torch.float64)
    return torch.linalg.solve(a, b).tolist()


def probe_layers(measure, sizes=(32, 64, 128)) -> LayerBytes:
    """Fit LayerBytes from `measure(layers, sizes)`: saved bytes of a model with 1 and 2 layers at each size."""
    one, two = measure(1, sizes), measure(2, sizes)
    layer = [b - a for a, b in zip(one, two)]  # one layer; what is outside the layers cancels
    once, linear, quadratic = _fit(sizes, layer, 2)
    outside_once, outside_per_token = _fit(sizes, [a - b for a, b in zip(one, layer)], 1)
    return LayerBytes(max(0.0, once), linear, quadratic, max(0.0, outside_once), max(0.0, outside_per_token))


def _sized(config, layers: int, key: str = "num_hidden_layers"):
    config = copy.deepcopy(config)
    setattr(config, key, layers)
    for name in ("layer_types", "mlp_layer_types"):  # per-layer lists (sliding windows) follow the count
        if isinstance(getattr(config, name, None), list):
            setattr(config, name, getattr(config, name)[:layers])
    return config


def _probe_model(config, lora, trainable: bool, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    from transformers import AutoModel
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):  # values do not matter, only what is saved (buffers are made)
        model = AutoModel.from_config(config, dtype=dtype)
    model.requires_grad_(trainable)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config(model))
    return model.train()


def compute_dtype(precision: str, strategy: str) -> torch.dtype:
    """The dtype the layers' weights have when they compute: bf16-true's bfloat16, and under FSDPStrategy (FSDP1)
    with a mixed precision Lightning's param_dtype bfloat16 too (so autocast copies nothing); else float32."""
    if precision == "bf16-true" or (strategy == "fsdp" and precision in ("bf16-mixed", "16-mixed")):
        return torch.bfloat16
    return torch.float32


def text_layer_bytes(text_config, lora, trainable: bool, precision: str, device: str = "cpu",
                     dtype: torch.dtype | None = None, store_frozen: bool = False) -> LayerBytes:
    """What a decoder layer of `text_config` saves, measured on the CPU with a one- and a two-layer model fed
    one packed row with its additive block mask (as policy.Rows.block_mask gives it), under autocast for the
    mixed precisions (`store_frozen`: its frozen linear weights in bfloat16, as training stores them, so autocast
    makes no copies of them). The mask itself is left out (counted once, apart: every layer shares it)."""
    autocast = precision in ("bf16-mixed", "16-mixed")
    dtype = dtype or compute_dtype(precision, "single")
    mask_dtype = torch.bfloat16 if autocast else dtype

    def measure(layers: int, sizes) -> list[int]:
        config = _sized(text_config, layers)
        config.vocab_size = 16  # fed embeddings: the token embedding table is never read
        model = _probe_model(config, lora, trainable, dtype, device)
        if store_frozen and autocast:
            store_frozen_in(model, torch.bfloat16, exact_only=False)
        return [saved(model, tokens) for tokens in sizes]

    def saved(model, tokens: int) -> int:
        embeds = torch.randn(1, tokens, text_config.hidden_size, dtype=dtype, device=device, requires_grad=True)
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
        mask = torch.zeros(1, 1, tokens, tokens, dtype=mask_dtype, device=device).masked_fill(
            ~causal, torch.finfo(mask_dtype).min)

        def run():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                model(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.arange(tokens, device=device)[None],
                      use_cache=False)

        return saved_bytes(model, run, exclude=(mask,))  # the mask: counted apart

    return probe_layers(measure)


def vision_layer_bytes(vision_config, lora, precision: str, dtype: torch.dtype | None = None) -> LayerBytes:
    """What a vision encoder layer saves, measured like text_layer_bytes on a one- and a two-layer tower fed
    1, 2 and 3 images (CLIP-style towers: `AutoModel` of the vision config taking `pixel_values`): read it with
    rows=1, tokens=images."""
    autocast = precision in ("bf16-mixed", "16-mixed")
    dtype = dtype or compute_dtype(precision, "single")
    size = vision_config.image_size

    def measure(layers: int, counts) -> list[int]:
        model = _probe_model(_sized(vision_config, layers), lora if lora is not None and lora.vision else None, True, dtype)

        def forward(images: int):
            pixels = torch.randn(images, vision_config.num_channels, size, size, dtype=dtype)

            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    model(pixel_values=pixels, output_hidden_states=True)

            return run

        return [saved_bytes(model, forward(n)) for n in counts]

    return probe_layers(measure, sizes=(1, 2, 3))


def used_vision_layers(config) -> int:
    """LLaVA reads `vision_feature_layer` (-2 for LLaVA-1.5 / LLaVA-Med): the layers after it never run into the
    loss (backbones/build.freeze_unused_vision_layers)."""
    n = config.vision_config.num_hidden_layers
    layer = getattr(config, "vision_feature_layer", -1)
    layers = layer if isinstance(layer, (list, tuple)) else [layer]
    return max(k if k >= 0 else n + 1 + k for k in layers)


def vision_trains(model: nn.Module) -> bool:
    from lightning_meddpo.backbones.build import part_parameters

    return any(p.requires_grad for p in part_parameters(model, "vision_tower"))


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class Settings:
    """The training configuration a plan is for (the fit config's keys, see commands/plan.py)."""

    precision: str = "bf16-mixed"
    strategy: str = "single"
    devices: int = 1
    reference: str = "copy"
    lora: object = None  # LoraSettings
    freeze: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    logp_chunk: int | None = 1024
    on_gpu: bool = True
    saved_dtype: str | None = None  # the backbone's weights as saved (config.json); None: read from the config


class Planner:
    """Plans for one model and settings: the meta model and the layer probe are made once, then `plan(workload)`
    is arithmetic (so `largest_batch` can search)."""

    def __init__(self, config, settings: Settings):
        if settings.precision not in PRECISION_BYTES:
            raise ValueError(f"plan: unknown precision {settings.precision!r}; known: {sorted(PRECISION_BYTES)}")
        if settings.strategy not in STRATEGIES:
            raise ValueError(f"plan: unknown strategy {settings.strategy!r}; known: {list(STRATEGIES)}")
        self.config, self.settings = config, settings
        model = meta_model(config, settings.lora, settings.freeze, settings.gradient_checkpointing)
        self.parameters, self.trainable = parameter_counts(model)
        self.largest_trainable = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
        self.lm_trains = any(p.requires_grad for p in decoder_layers(model).parameters())
        self.vision_trains = vision_trains(model)
        self.reference = "adapter" if settings.lora is not None and settings.reference == "copy" else settings.reference
        # frozen linear weights in autocast's dtype (PreferenceModule.store_frozen_in_compute_dtype): the reference
        # copy's all, the policy's where the backbone is saved in that dtype (exact values)
        self.low = AUTOCAST_DTYPES.get(settings.precision) if settings.strategy != "fsdp" else None
        saved = settings.saved_dtype or dtype_name(getattr(config, "dtype", None))
        self.store_policy = self.low is not None and saved == dtype_name(self.low)
        self.stored = self.reference_stored = 0
        if self.low is not None and self.reference == "copy":
            self.reference_stored = store_frozen_in(copy.deepcopy(model).requires_grad_(False), self.low, False).stored
        if self.store_policy:
            self.stored = store_frozen_in(model, self.low, exact_only=False).stored
        self.layer_weight_bytes, self.layer_gradient_bytes = largest_layer_bytes(model, PRECISION_BYTES[settings.precision])
        dtype = compute_dtype(settings.precision, settings.strategy)
        self.text = text_layer_bytes(config.text_config, settings.lora, self.lm_trains, settings.precision, dtype=dtype,
                                     store_frozen=self.store_policy)
        self.vision: LayerBytes | None = None  # a frozen tower's forward keeps nothing for the backward
        self.vision_modelled = True
        if self.vision_trains:
            if hasattr(config.vision_config, "image_size") and hasattr(config, "vision_feature_layer"):
                self.vision = vision_layer_bytes(config.vision_config, settings.lora, settings.precision, dtype)
            else:
                self.vision_modelled = False

    def plan(self, workload: Workload) -> Plan:
        s, text = self.settings, self.config.text_config
        w_bytes, g_bytes, o_bytes, a_bytes = PRECISION_BYTES[s.precision]
        shards = s.devices if s.strategy in ("fsdp", "fsdp2") else 1
        tokens = workload.rows * workload.row_tokens
        if getattr(text, "_attn_implementation", None) == "eager":  # packed rows' additive [L, L] mask
            mask = workload.rows * workload.row_tokens**2 * a_bytes
        else:  # sdpa -> attention.prefix_sdpa: a bool mask for the later responses' tokens (at most all responses')
            mask = workload.response_tokens * workload.row_tokens
        embeddings = tokens * text.hidden_size * a_bytes  # the embeddings the image features are written into
        one_layer = self.text.layer(workload.rows, workload.row_tokens)
        if s.gradient_checkpointing:
            layers = text.num_hidden_layers * tokens * text.hidden_size * a_bytes  # each layer's input...
            layers += self.text.once * (text.num_hidden_layers - 1)  # ...and autocast's weight copies (as without)
        else:
            layers = text.num_hidden_layers * one_layer
        chunk = min(workload.response_tokens, s.logp_chunk or workload.response_tokens)
        notes = []
        if self.reference != "copy":
            notes.append({"adapter": "reference: the policy with LoRA disabled (no second copy)",
                          "precomputed": "reference: log-probs cached on disk before step 1 (no reference model)",
                          "none": "no reference model"}[self.reference])
        if not self.vision_modelled:
            notes.append("the vision tower trains: its activations are not in this plan (freeze it, as the paper does)")
        low = dtype_name(self.low)
        if self.stored:
            notes.append(f"frozen linear weights in {low} (the backbone is saved in it): {self.stored:,} values")
        elif self.low is not None and self.parameters > self.trainable:
            notes.append(f"frozen weights kept in float32: the backbone is not saved in {low} (or say so: --saved_dtype; "
                         "autocast casts them each step, stored in it they take a third of the memory)")
        low_bytes = torch.finfo(self.low).bits // 8 if self.low is not None else w_bytes
        weights = ((self.parameters - self.stored) * w_bytes + self.stored * low_bytes) // shards
        reference = ((self.parameters - self.reference_stored) * w_bytes + self.reference_stored * low_bytes) // shards
        return Plan(
            weights=weights,
            reference=reference if self.reference == "copy" else 0,
            gradients=self.trainable * g_bytes // shards,
            optimizer=OPTIMIZER_STATES * self.trainable * o_bytes // shards,
            activations=int(layers + self.text.outside(workload.rows, workload.row_tokens) + mask + embeddings
                            + self.vision_activations(workload.images)),
            layer_activations=int(one_layer),
            logits=3 * chunk * text.vocab_size * 4,  # float32 logits, their log-softmax and its gradient
            optimizer_scratch=(self.trainable // shards if s.on_gpu else self.largest_trainable) * o_bytes,
            unsharded_layers=2 * (self.layer_weight_bytes + self.layer_gradient_bytes) if shards > 1 else 0,
            trainable_parameters=self.trainable,
            parameters=self.parameters,
            notes=notes,
        )

    def vision_activations(self, images: int) -> float:
        if self.vision is None:
            return 0.0
        return used_vision_layers(self.config) * self.vision.layer(1, images) + self.vision.outside(1, images)

    def largest_batch(self, workload_for, gpu_gib: float, limit: int = 4096) -> int:
        """The largest per-device batch (pairs) whose plan fits `gpu_gib`; 0 if not even one pair fits."""
        best, low, high = 0, 1, limit
        while low <= high:
            mid = (low + high) // 2
            if self.plan(workload_for(mid)).fits(gpu_gib):
                best, low = mid, mid + 1
            else:
                high = mid - 1
        return best


# ------------------------------------------------------------------------------------------- published shapes


def published_config(name: str):
    """The architecture of a published backbone from its released dimensions (`llava_med_7b`, `huatuo_7b`: the
    families' `published`), for planning without its files."""
    from lightning_meddpo.backbones.adapter import published_config as from_family

    return from_family(name)


# ------------------------------------------------------------------------------------------- from a run


def workload_of(batch, views: tuple[str, ...], packed: bool = True) -> Workload:
    """The Workload one training batch forwards (the rows policy.build_rows makes of it)."""
    from lightning_meddpo.data.rows import VIEWS, build_rows

    rows = build_rows(batch, views, packed=packed)
    sides = {VIEWS[v][1] for v in views}
    responses = sum(int(getattr(batch, VIEWS[v][0]).lengths.sum()) for v in views)
    return Workload(rows=rows.input_ids.shape[0], row_tokens=rows.input_ids.shape[1], images=len(sides) * len(batch),
                    response_tokens=responses)


def settings_of(module, trainer) -> Settings:
    """The Settings of a built PreferenceModule under a Trainer (what `plan` reads from a fit config)."""
    from lightning_meddpo.backbones.build import LoraSettings

    h = module.hparams
    lora = LoraSettings(**h.lora) if isinstance(h.lora, dict) else h.lora
    name = type(trainer.strategy).__name__
    strategy = "fsdp2" if "ModelParallel" in name or "FSDP2" in name else "fsdp" if "FSDP" in name else \
        "ddp" if "DDP" in name else "single"
    low = AUTOCAST_DTYPES.get(str(trainer.precision))
    stored = low is not None and any(p.dtype == low for p in module.policy.model.parameters() if not p.requires_grad)
    return Settings(precision=str(trainer.precision), strategy=strategy, devices=trainer.world_size,
                    reference=module.reference_strategy, lora=lora, freeze=module.frozen_parts,
                    gradient_checkpointing=h.gradient_checkpointing, logp_chunk=h.logp_chunk,
                    on_gpu=trainer.strategy.root_device.type == "cuda",
                    saved_dtype=dtype_name(low if stored else torch.float32))
