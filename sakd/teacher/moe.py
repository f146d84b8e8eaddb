"""Routing of an MoE teacher decided from the outside: Knowledge Augmentation and the all-experts routing
of the Student-Aware Router (Kim, Chu & Yang 2025, "Every Expert Matters", arXiv 2502.12947).

What transformers 5.x gives (checked against 5.24's ``modeling_qwen3_moe.py`` and by the tests): every
MoE layer holds a router module (``Qwen3MoeTopKRouter``, ``model.layers[i].mlp.gate``) whose forward
returns ``(logits [T, E], scores [T, k], indices [T, k])`` for the ``T = B*L`` token rows, and an experts
module that reads ``k`` off ``indices.size(-1)`` -- so any number of experts per token, all ``E``
included, can be handed to it. :func:`override_routing` puts a forward hook on every router that keeps
its logits (what ``output_router_logits`` records) and replaces scores and indices; leaving the context
removes the hooks and nothing else of the model was touched, so the teacher is exactly restored.

Modes of :class:`RoutingSpec`:

* ``topk`` -- the top ``k`` of ``softmax(logits)``; with the model's own ``k`` this *is* the model.
* ``ka`` -- Knowledge Augmentation (paper Eq. 7-8 and the authors' code): per token and layer, with
  probability ``sampling_prob`` the ``k`` experts (default ``E - 1``) are drawn without replacement from
  ``softmax(logits)``, otherwise the top ``k``; their probabilities renormalised. Every block of ``L``
  rows draws from its own generator (seeded from the run seed, the step, the block's sample id and the
  sample index), so the draws of a block do not depend on which other blocks share its micro-batch.
* ``all`` -- every expert, weighted by the full softmax (what the Student-Aware Router routes with);
  ``logit_offsets`` (:mod:`sakd.teacher.moe_router`) then shift the logits before the softmax.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sakd.config import MoEConfig
from sakd.errors import SetupError
from sakd.models.capture import RouterSignal
from sakd.models.forward import HiddenAndHead, hidden_and_head

MODES = ("topk", "ka", "all")
Selector = Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]
LogitOffsets = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def is_router(module: nn.Module) -> bool:
    """A transformers 5.x top-k router (``Qwen3MoeTopKRouter`` and its look-alikes), by duck type."""
    return (
        type(module).__name__.endswith("TopKRouter")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and hasattr(module, "top_k")
        and hasattr(module, "num_experts")
    )


def bare_model(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DeepSpeed engines
        model = model.module
    return model


def routers(model: nn.Module) -> list[nn.Module]:
    """The router modules of ``model``, in layer order (empty for a dense model)."""
    return [m for m in bare_model(model).modules() if is_router(m)]


def require_moe(model: nn.Module, key: str) -> list[nn.Module]:
    """The routers of ``model``, or a one-line error naming ``key`` for a dense teacher."""
    found = routers(model)
    if not found:
        name = type(bare_model(model)).__name__
        raise SetupError(
            f"{key} needs a Mixture-of-Experts teacher with router modules (transformers 5.x, e.g. "
            f"Qwen3-MoE); the teacher is a dense {name}: turn {key} off"
        )
    return found


@dataclass
class RoutingSpec:
    """How the routers of one forward decide (see the module docstring for the modes).

    ``generators``: KA, one per block of ``rows_per_block`` token rows (consumed in layer order);
    ``selector`` (tests) replaces ``torch.multinomial``; ``logit_offsets(layer, router_input, logits)``
    returns the logits to route with (mode ``all``); with ``record``, ``recorded`` collects per layer the
    router's own logits and the logits routed with (``(original [T, E], routed [T, E])``).
    """

    mode: str = "topk"
    k: int | None = None
    sampling_prob: float = 0.05
    generators: list[torch.Generator] | None = None
    rows_per_block: int | None = None
    selector: Selector | None = None
    logit_offsets: LogitOffsets | None = None
    record: bool = False
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    decisions: int = 0  # KA: routing decisions (token rows x layers) drawn so far
    changed: torch.Tensor | int = 0  # KA: how many of them chose other experts than the top k

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"routing mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.sampling_prob <= 1.0:
            raise ValueError(f"sampling_prob must be in [0, 1], got {self.sampling_prob}")


def _draw(probs: torch.Tensor, k: int, spec: RoutingSpec) -> torch.Tensor:
    """KA's choice per row: with probability ``sampling_prob`` k experts sampled without replacement from
    ``probs``, else the top k; each block of rows from its own generator."""
    top = torch.topk(probs, k, dim=-1).indices
    if spec.sampling_prob == 0.0:
        spec.decisions += top.shape[0]
        return top
    pick = spec.selector or (lambda p, n, g: torch.multinomial(p, n, replacement=False, generator=g))
    gens = spec.generators or [None]
    block = spec.rows_per_block or probs.shape[0]
    if len(gens) * block != probs.shape[0] and spec.generators is not None:
        raise ValueError(f"{len(gens)} generators for {probs.shape[0]} rows of blocks of {block}")
    chosen = []
    for j, g in enumerate(gens):
        rows = slice(j * block, (j + 1) * block) if spec.generators is not None else slice(None)
        coin = torch.rand((probs[rows].shape[0], 1), generator=g, device=probs.device) < spec.sampling_prob
        chosen.append(torch.where(coin, pick(probs[rows], k, g), top[rows]))
    drawn = torch.cat(chosen)
    spec.decisions += drawn.shape[0]
    spec.changed = spec.changed + (drawn.sort(-1).values != top.sort(-1).values).any(-1).sum()
    return drawn


def route(logits: torch.Tensor, router: nn.Module, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [T, k] in the logits' dtype, indices [T, k] int64)`` for router ``logits [T, E]``."""
    num_experts = router.num_experts
    probs = F.softmax(logits, dtype=torch.float, dim=-1)  # as Qwen3MoeTopKRouter.forward
    if spec.mode == "all":
        indices = torch.arange(num_experts, device=logits.device).expand(logits.shape[0], num_experts)
        values = F.softmax(logits, dim=-1) if logits.dtype == torch.float64 else probs
        return values.to(logits.dtype), indices
    k = spec.k or (num_experts - 1 if spec.mode == "ka" else router.top_k)
    if not 1 <= k <= num_experts:
        raise ValueError(f"{k} experts per token asked for a router of {num_experts} experts")
    if spec.mode == "topk":
        values, indices = torch.topk(probs, k, dim=-1)
        renormalise = router.norm_topk_prob
    else:
        indices = _draw(probs, k, spec)
        values = probs.gather(-1, indices)
        renormalise = True  # paper Eq. (8): the softmax over the selected logits
    if renormalise:
        values = values / values.sum(dim=-1, keepdim=True)
    return values.to(logits.dtype), indices


def _hook(layer: int, spec: RoutingSpec):
    def hook(module: nn.Module, args, output):
        original, inputs = output[0], args[0].reshape(-1, args[0].shape[-1])
        logits = original if spec.logit_offsets is None else spec.logit_offsets(layer, inputs, original)
        if spec.record:
            spec.recorded.append((original, logits))
        scores, indices = route(logits, module, spec)
        return (logits, scores, indices)

    return hook


@contextlib.contextmanager
def override_routing(model: nn.Module, spec: RoutingSpec) -> Iterator[list[nn.Module]]:
    """Route every MoE layer of ``model`` as ``spec`` says inside the context; the hooks are removed on
    exit (also on error), which restores the model exactly. The hooks run before any other forward hook
    of the routers, so ``output_router_logits`` records the logits actually routed with."""
    found = require_moe(model, "a routing override")
    handles = [r.register_forward_hook(_hook(i, spec), prepend=True) for i, r in enumerate(found)]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def block_generators(
    seed: int, step: int, sample_ids: list[int], samples: int, device: torch.device
) -> list[torch.Generator]:
    """One generator per (sample, block) -- sample-major, as the batch is repeated -- from a stable hash of
    (seed, step, sample id, sample index): the same draws however a step is split into micro-batches."""
    gens = []
    for m in range(samples):
        for sid in sample_ids:
            digest = hashlib.sha256(f"{seed}/{step}/{sid}/{m}".encode()).digest()
            gens.append(torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return gens


@dataclass
class AugmentedSignal(HiddenAndHead):
    """A KA teacher signal: ``samples`` ``[M, B, L, H]`` final hidden states of the M forwards (for forward KL
    the objective mixes their distributions); ``hidden``, ``layers`` and ``router`` are the means over M."""

    samples: torch.Tensor | None = None


def _mean_router(router: RouterSignal | None, samples: int) -> RouterSignal | None:
    if router is None:
        return None
    probs = [p.reshape(samples, -1, p.shape[-1]).mean(0) for p in router.probs]
    chosen = [torch.topk(p, router.top_k, dim=-1).indices for p in probs]
    mask = None if router.mask is None else router.mask.reshape(samples, -1)[0]
    shape = None if router.batch_shape is None else (router.batch_shape[0] // samples, router.batch_shape[1])
    return RouterSignal(probs, chosen, router.top_k, mask, shape)


def augmented_forward(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    spec: RoutingSpec,
    samples: int,
    *,
    keep_samples: bool,
    hidden_layers: list[int],
    attention_layers: list[int],
) -> HiddenAndHead:
    """M Knowledge-Augmentation forwards of the frozen teacher as one forward of the batch repeated M
    times (every row draws its own experts), without gradients."""
    b, length = ids.shape
    spec.rows_per_block = length
    with torch.no_grad(), override_routing(model, spec):
        out = hidden_and_head(
            model,
            model,
            ids.repeat(samples, 1),
            mask.repeat(samples, 1),
            router=True,
            hidden_layers=hidden_layers,
            attention_layers=attention_layers,
        )
    stacked = out.hidden.reshape(samples, b, length, -1)
    return AugmentedSignal(
        hidden=stacked.mean(0),
        head_weight=out.head_weight,
        head_bias=out.head_bias,
        router=_mean_router(out.router, samples),
        layers={i: t.reshape(samples, b, length, -1).mean(0) for i, t in out.layers.items()},
        attentions={i: t.reshape(samples, b, *t.shape[1:]).mean(0) for i, t in out.attentions.items()},
        samples=stacked if keep_samples else None,
    )


class RoutedTeacher:
    """The frozen MoE teacher as a teacher signal (``signal(batch) -> HiddenAndHead``, like
    :class:`sakd.teacher.signal.OnlineTeacher`) with its routing decided from outside: Knowledge
    Augmentation (``augment``: ``distillation.moe`` with ``augment_samples > 0``; ``keep_samples`` keeps the M
    final hidden states for a forward-KL mixture) or all experts through the Student-Aware Router's
    learned logits (``sar``, a :class:`sakd.teacher.moe_router.StudentAwareRouter`). ``step`` (set by the
    trainer before each step) seeds KA's draws together with ``seed`` and each block's sample id."""

    def __init__(
        self,
        model: nn.Module,
        *,
        aligned: bool,
        hidden_layers: list[int],
        attention_layers: list[int],
        seed: int,
        augment: MoEConfig | None = None,
        keep_samples: bool = False,
        sar: object | None = None,
    ) -> None:
        require_moe(model, "distillation.moe")
        self.model, self.aligned, self.seed, self.step = model, aligned, seed, 0
        self.hidden_layers, self.attention_layers = list(hidden_layers), sorted(set(attention_layers))
        self.augment, self.keep_samples, self.sar = augment, keep_samples, sar
        self.decisions, self.changed = 0, 0

    def pop_stats(self) -> tuple[torch.Tensor | int, int]:
        """KA since the last call: (routing decisions that chose other experts than the top k -- a tensor on
        the teacher's device, no host sync per forward --, decisions)."""
        out = (self.changed, self.decisions)
        self.decisions, self.changed = 0, 0
        return out

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's own tokens of ``batch`` (its tokenization when the tokenizers differ)."""
        if self.aligned:
            return batch["teacher_input_ids"], batch["teacher_attention_mask"]
        return batch["input_ids"], batch["attention_mask"]

    def __call__(self, batch: dict[str, torch.Tensor]) -> HiddenAndHead:
        ids, mask = self.inputs(batch)
        if self.sar is not None:
            with torch.no_grad(), override_routing(self.model, self.sar.routing()):
                return hidden_and_head(
                    self.model,
                    self.model,
                    ids,
                    mask,
                    router=True,
                    hidden_layers=self.hidden_layers,
                    attention_layers=self.attention_layers,
                )
        samples = self.augment.augment_samples
        sample_ids = (
            batch["sample_ids"].reshape(-1).tolist() if "sample_ids" in batch else list(range(len(ids)))
        )
        spec = RoutingSpec(
            "ka",
            k=self.augment.augment_experts,
            sampling_prob=self.augment.augment_sampling_prob,
            generators=block_generators(self.seed, self.step, sample_ids, samples, ids.device),
        )
        out = augmented_forward(
            self.model,
            ids,
            mask,
            spec,
            samples,
            keep_samples=self.keep_samples,
            hidden_layers=self.hidden_layers,
            attention_layers=self.attention_layers,
        )
        self.decisions += spec.decisions
        self.changed = self.changed + spec.changed
        return out
