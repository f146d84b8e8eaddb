"""Capturing internal signals of a forward pass: MoE routing, chosen hidden states, attention maps.

What transformers 5.x gives and how it is used here (checked against 5.23's source and by tests):

* **Router logits.** ``model(..., output_router_logits=True).router_logits`` is a tuple with one
  entry per MoE layer, recorded by an ``OutputRecorder`` on the router module (Qwen3-MoE:
  ``Qwen3MoeTopKRouter``, output index 0).  Each entry is the router's **raw logits**
  (``F.linear(hidden, weight)``, not softmaxed) of shape ``[B*L, E]`` (batch and sequence flattened,
  padding positions included), in the model's dtype.  The router itself takes
  ``softmax(logits, float32)`` and then ``topk(probs, k)`` with ``k = config.num_experts_per_tok``
  (the top-k is taken on the full softmax, before the optional ``norm_topk_prob``
  renormalisation, so the chosen experts are ``topk(softmax(logits))`` exactly).  A dense model has
  no ``router_logits`` attribute (or ``None``).  Use :func:`router_top_k` to read ``k`` off a config.
* **Hidden states.** ``output_hidden_states`` gives ``num_hidden_layers + 1`` entries: index 0 is
  the embedding output (the input of layer 0), index ``i`` the output of decoder layer ``i``, except
  that the **last entry is replaced by the final-normed** ``last_hidden_state`` (``capture_outputs``
  with ``tie_last_hidden_states=True``, the default for language models).  So ``hidden_states[-1]``
  is ``norm(output of the last layer)``, not the raw residual stream.  ``output_hidden_states`` may
  also be a list of indices; unselected entries are then ``None`` (and not kept alive).
* **Attention maps.** In 5.x each attention module calls
  ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)`` and
  returns ``(output, weights)``; ``output_attentions=True`` installs a forward hook on the attention
  class (``_can_record_outputs["attentions"]``, output index 1) that appends the weights **only when
  they are not None**.  :func:`enable_selective_attention` registers one attention function
  (``"sakd_selective"``) that runs the eager path (which returns probabilities) for attention modules
  marked as selected and the SDPA kernel (weights ``None``) for all others, plus the SDPA mask
  builder under the same name (a custom name without a mask builder would silently get **no mask at
  all** from ``masking_utils``).  The eager path converts SDPA's boolean / ``None`` mask into the
  additive float mask that ``eager_mask`` builds, so the probabilities equal a fully eager run.
  Consequently ``outputs.attentions`` holds one tensor per *selected* layer, in layer order;
  :func:`collect_attentions` maps them back to layer indices.
* **Documents.** A document mask (:mod:`sakd.data.documents`: document indices 1, 2, ... instead of 0/1)
  becomes ``position_ids`` that restart at each document and ``attention_mask=None``: ``masking_utils``
  (5.25: ``find_packed_sequence_indices``) then builds a block-diagonal causal mask, and the flash kernels
  take the varlen path from the same position ids (one row: ``[B, L]`` is flattened to ``[1, B*L]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sakd.data.documents import document_positions, is_document_mask
from sakd.upstream import attn_implementation

SELECTIVE_ATTENTION = "sakd_selective"
_MARK = "_sakd_return_attention"


# --------------------------------------------------------------------------------------------------
# Router signal
# --------------------------------------------------------------------------------------------------


def router_top_k(config) -> int | None:
    """Experts per token of an MoE config (``num_experts_per_tok``; a few models say ``top_k``/``moe_topk``)."""
    for name in ("num_experts_per_tok", "top_k", "moe_topk"):
        k = getattr(config, name, None)
        if isinstance(k, int) and k > 0:
            return k
    return None


@dataclass
class RouterSignal:
    """Per-layer routing of every token: softmax probabilities and the experts actually chosen.

    ``probs[i]``: ``[tokens, experts]`` float32, rows sum to 1.  ``chosen[i]``: ``[tokens, top_k]``
    int64 expert ids (``topk`` of ``probs``, the model's own selection, best first).  ``tokens`` is
    ``B*L`` in row-major (batch, position) order; ``mask`` (``[tokens]`` bool, or ``None``) marks
    real (non-padding) tokens and is used by :meth:`load`.
    """

    probs: list[torch.Tensor]
    chosen: list[torch.Tensor]
    top_k: int
    mask: torch.Tensor | None = None
    batch_shape: tuple[int, int] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.probs)

    @property
    def num_experts(self) -> int:
        return self.probs[0].shape[-1]

    def reshape(self, batch: int | None = None, length: int | None = None) -> list[torch.Tensor]:
        """``probs`` as ``[B, L, E]`` per layer (defaults to the batch shape the signal was built with)."""
        if batch is None or length is None:
            if self.batch_shape is None:
                raise ValueError("RouterSignal.reshape needs (batch, length): no batch_shape was recorded")
            batch, length = self.batch_shape
        return [p.reshape(batch, length, -1) for p in self.probs]

    def entropy(self) -> list[torch.Tensor]:
        """Routing entropy (nats) per layer and token: ``[tokens]`` each."""
        return [-(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1) for p in self.probs]

    def load(self) -> torch.Tensor:
        """``[layers, experts]``: fraction of (real) tokens routed to each expert; each row sums to ``top_k``."""
        rows = []
        for c in self.chosen:
            hits = torch.zeros(c.shape[0], self.num_experts, device=c.device, dtype=torch.float32)
            hits.scatter_(1, c, 1.0)
            if self.mask is not None:
                m = self.mask.to(hits.device)
                rows.append(hits[m].sum(0) / m.sum().clamp_min(1))
            else:
                rows.append(hits.mean(0))
        return torch.stack(rows)


def router_signal(
    router_logits: Sequence[torch.Tensor] | None,
    *,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    batch_shape: tuple[int, int] | torch.Size | None = None,
) -> RouterSignal | None:
    """Turn ``outputs.router_logits`` (raw logits, per layer ``[B*L, E]``) into a :class:`RouterSignal`.

    ``top_k`` is the model's ``config.num_experts_per_tok`` (see :func:`router_top_k`).  Returns
    ``None`` for a dense model (``router_logits`` is ``None`` or empty).  ``batch_shape`` is
    ``(B, L)``; if omitted it is taken from ``attention_mask``.
    """
    if not router_logits:
        return None
    probs = [torch.softmax(lg.reshape(-1, lg.shape[-1]).float(), dim=-1) for lg in router_logits]
    # Same op as the router (topk on the float32 softmax), so ties resolve identically.
    chosen = [torch.topk(p, top_k, dim=-1).indices.to(torch.int64) for p in probs]
    if batch_shape is None and attention_mask is not None:
        batch_shape = tuple(attention_mask.shape)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).bool()
        if mask.numel() != probs[0].shape[0]:
            raise ValueError(
                f"attention_mask has {mask.numel()} tokens but router logits have {probs[0].shape[0]}"
            )
    return RouterSignal(probs, chosen, top_k, mask, tuple(batch_shape) if batch_shape is not None else None)


# --------------------------------------------------------------------------------------------------
# Hidden states
# --------------------------------------------------------------------------------------------------


def select_hidden(
    hidden_states: Sequence[torch.Tensor | None], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Pick ``hidden_states[i]`` for ``i`` in ``layers`` (0 = embeddings, i = after layer i).

    Negative indices count from the end and are returned under their positive index.  The last
    entry (``num_layers``) is the **final-normed** hidden state in transformers 5 (see module doc).
    """
    n = len(hidden_states)
    out: dict[int, torch.Tensor] = {}
    for i in layers:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"hidden-state index {i} out of range for {n} hidden states")
        h = hidden_states[j]
        if h is None:
            raise ValueError(f"hidden state {j} was not recorded (output_hidden_states did not select it)")
        out[j] = h
    return out


# --------------------------------------------------------------------------------------------------
# Selective attention
# --------------------------------------------------------------------------------------------------


def _eager_mask_from_sdpa(attention_mask, query: torch.Tensor, key: torch.Tensor, dtype: torch.dtype):
    """The additive float mask ``eager_mask`` would build, from what ``sdpa_mask`` built (bool or None)."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask  # already additive
    min_dtype = torch.finfo(dtype).min
    zero = torch.zeros((), device=query.device, dtype=dtype)
    if attention_mask is None:
        # sdpa_mask skipped a plain causal mask (relying on is_causal); queries are the last q_len keys.
        q_len, kv_len = query.shape[-2], key.shape[-2]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        k_pos = torch.arange(kv_len, device=query.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    else:
        allowed = attention_mask
    return torch.where(allowed, zero, min_dtype)


def _selective_attention_forward(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(module, _MARK, False):
        eager = _eager_forward_for(module)
        mask = _eager_mask_from_sdpa(attention_mask, query, key, query.dtype)
        kwargs.pop("is_causal", None)
        return eager(module, query, key, value, mask, *args, **kwargs)
    # output_attentions reaches the attention function as a kwarg; SDPA would only warn about it.
    kwargs.pop("output_attentions", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _eager_forward_for(module: nn.Module):
    """The model's own ``eager_attention_forward`` (from the attention module's modeling file)."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: its modeling module has no eager_attention_forward")
    return fn


def _register_selective_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SELECTIVE_ATTENTION, _selective_attention_forward)
    AttentionMaskInterface.register(SELECTIVE_ATTENTION, sdpa_mask)


def _attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Attention modules by ``layer_idx``: instances of the class that records ``attentions``."""
    targets: list[type] = []
    specs = getattr(model, "_can_record_outputs", None) or {}
    spec_list = specs.get("attentions")
    spec_list = spec_list if isinstance(spec_list, list) else [spec_list] if spec_list is not None else []
    for s in spec_list:
        cls = getattr(s, "target_class", s)
        if isinstance(cls, type):
            targets.append(cls)
    found: dict[int, nn.Module] = {}
    for m in model.modules():
        if targets and not isinstance(m, tuple(targets)):
            continue
        if not targets and not type(m).__name__.endswith("Attention"):
            continue
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int):
            found[idx] = m
    return found


def enable_selective_attention(model: nn.Module, layers: Sequence[int]) -> None:
    """Make ``model`` return attention probabilities for ``layers`` only (eager there, SDPA elsewhere).

    Afterwards ``model(..., output_attentions=True).attentions`` holds ``[B, heads, L, L]`` tensors
    for the selected layers only, in layer order (read them with :func:`collect_attentions`); without
    ``output_attentions`` the weights are computed by the selected layers but not kept.  Calling it
    again replaces the selection; an empty ``layers`` clears it (the model stays on the selective
    implementation, which is then plain SDPA).  Gradients flow through the returned probabilities.
    """
    _register_selective_attention()
    model = _unwrap(model)
    modules = _attention_modules(model)
    n = len(modules)
    wanted = {i + n if i < 0 else i for i in layers}
    missing = sorted(wanted - modules.keys())
    if missing:
        raise ValueError(f"no attention module for layer(s) {missing} (model has {n})")
    for idx, m in modules.items():
        setattr(m, _MARK, idx in wanted)
    if attn_implementation(model.config) != SELECTIVE_ATTENTION:
        model.set_attn_implementation(SELECTIVE_ATTENTION)


def selected_attention_layers(model: nn.Module) -> list[int]:
    """The layers :func:`enable_selective_attention` selected (empty if none)."""
    return sorted(i for i, m in _attention_modules(model).items() if getattr(m, _MARK, False))


def collect_attentions(
    outputs, layers: Sequence[int], num_layers: int | None = None
) -> dict[int, torch.Tensor]:
    """``{layer: [B, heads, L, L]}`` from ``outputs.attentions``.

    With selective attention the tuple holds only the selected layers (in layer order), so ``layers``
    must be exactly the selection; with a fully eager model (one entry per layer) any subset may be
    asked for.  ``num_layers`` resolves negative indices (defaults to the tuple length).
    """
    atts = getattr(outputs, "attentions", None)
    if atts is None:
        raise ValueError("outputs have no attentions: run the model with output_attentions=True")
    n = num_layers if num_layers is not None else len(atts)
    wanted = sorted({i + n if i < 0 else i for i in layers})
    if num_layers is not None and len(atts) == num_layers:
        return {i: atts[i] for i in wanted}
    if len(atts) == len(wanted):
        return dict(zip(wanted, atts, strict=True))
    if num_layers is None and all(i < len(atts) for i in wanted):
        # Assume one entry per layer (fully eager model)
        return {i: atts[i] for i in wanted}
    raise ValueError(
        f"{len(atts)} attention maps recorded but layers {wanted} requested; pass the selected layers "
        "(enable_selective_attention) or num_layers for a fully eager model"
    )


# --------------------------------------------------------------------------------------------------
# One-call capture
# --------------------------------------------------------------------------------------------------


@dataclass
class Captured:
    hidden: torch.Tensor  # [B, L, H] final (normed) hidden states
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # hidden_states[i], [B, L, H]
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, heads, L, L]
    router: RouterSignal | None = None
    logits: torch.Tensor | None = None  # [B, 1, V] (logits_to_keep=1)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    hidden_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
    router: bool = False,
) -> Captured:
    """One forward (``logits_to_keep=1``, ``use_cache=False``) returning the requested signals.

    ``attention_layers`` must already be enabled with :func:`enable_selective_attention` (or the
    model must be fully eager).  ``router=True`` on a dense model yields ``router=None``.  Only the
    requested hidden states (plus the final one) are recorded.
    """
    bare = _unwrap(model)
    config = bare.config
    n_layers = config.num_hidden_layers
    n_hidden = n_layers + 1
    wanted_hidden = sorted({i + n_hidden if i < 0 else i for i in hidden_layers} | {n_layers})
    attention_layers = list(attention_layers)
    if attention_layers and attn_implementation(config) == SELECTIVE_ATTENTION:
        selected = selected_attention_layers(bare)
        asked = sorted({i + n_layers if i < 0 else i for i in attention_layers})
        if not set(asked) <= set(selected):
            raise ValueError(
                f"attention layers {asked} requested but enable_selective_attention selected {selected}"
            )
    elif attention_layers and attn_implementation(config) != "eager":
        raise ValueError(
            "attention_layers need enable_selective_attention(model, layers) or an eager model "
            f"(attn_implementation is {attn_implementation(config)!r})"
        )
    is_moe = router_top_k(config) is not None and getattr(config, "num_experts", None) not in (None, 0)
    kwargs = {}
    if router and is_moe:
        kwargs["output_router_logits"] = True
    if attention_layers:
        kwargs["output_attentions"] = True
    ids, model_mask, shape = input_ids, attention_mask, tuple(input_ids.shape)
    if is_document_mask(attention_mask):  # packed within_document: see sakd.data.documents
        model_mask, kwargs["position_ids"] = None, document_positions(attention_mask)
        if attn_implementation(config).startswith("flash") and shape[0] > 1:
            # flash-attention's varlen path reads the documents from the position ids of one row
            ids, kwargs["position_ids"] = ids.reshape(1, -1), kwargs["position_ids"].reshape(1, -1)
    out = model(
        input_ids=ids,
        attention_mask=model_mask,
        output_hidden_states=wanted_hidden,
        logits_to_keep=1,
        use_cache=False,
        **kwargs,
    )
    hs = out.hidden_states
    if ids.shape != shape:  # flattened for flash-attention: back to [B, L, H]
        hs = tuple(None if h is None else h.reshape(*shape, h.shape[-1]) for h in hs)
    captured = Captured(hidden=hs[-1], logits=out.logits)
    captured.layers = select_hidden(hs, list(hidden_layers))
    if attention_layers:
        if attn_implementation(config) == SELECTIVE_ATTENTION:
            recorded = collect_attentions(out, selected_attention_layers(bare))
        else:
            recorded = collect_attentions(out, range(n_layers), num_layers=n_layers)
        captured.attentions = {i % n_layers: recorded[i % n_layers] for i in attention_layers}
    if router:
        captured.router = router_signal(
            getattr(out, "router_logits", None) if is_moe else None,
            top_k=router_top_k(config) or 1,
            attention_mask=attention_mask,
            batch_shape=tuple(input_ids.shape),
        )
    return captured
