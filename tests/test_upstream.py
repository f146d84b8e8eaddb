"""Each private upstream API behind sakd.upstream, checked against the installed versions: if accelerate,
transformers or DeepSpeed change one, this fails here rather than silently in a run."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from sakd import upstream


def test_forget_prepared_drops_the_optimizer_and_scheduler_from_checkpoints(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt, sched = acc.prepare(model, opt, sched)
    assert len(acc._optimizers) == 1 and len(acc._schedulers) == 1
    upstream.forget_prepared(acc, opt, sched)
    assert acc._optimizers == [] and acc._schedulers == []
    acc.save_state(str(tmp_path / "ckpt"))
    assert not list((tmp_path / "ckpt").glob("optimizer*")) and not list(
        (tmp_path / "ckpt").glob("scheduler*")
    )


def test_set_process_world_is_what_accelerate_reports():
    from accelerate.state import AcceleratorState, PartialState

    acc = Accelerator(cpu=True)
    before = (acc.num_processes, acc.process_index, acc.local_process_index)
    try:
        upstream.set_process_world(4, 3, 1)
        assert (acc.num_processes, acc.process_index, acc.local_process_index) == (4, 3, 1)
        assert (PartialState().num_processes, AcceleratorState().process_index) == (4, 3)
    finally:
        upstream.set_process_world(*before)


def test_attn_implementation_reads_what_set_attn_implementation_wrote():
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("eager")
    assert upstream.attn_implementation(model.config) == "eager"
    model.set_attn_implementation("sdpa")
    assert upstream.attn_implementation(model.config) == "sdpa"


def test_zero3_gathered_tracks_deepspeed_parameter_status():
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    plain = torch.nn.Parameter(torch.zeros(3))
    assert upstream.zero3_gathered(plain)
    fake = torch.nn.Parameter(torch.zeros(3))
    fake.ds_id = 0  # what DeepSpeed tags a ZeRO-3 parameter with, and the status names it uses
    fake.ds_status = ZeroParamStatus.NOT_AVAILABLE
    assert not upstream.zero3_gathered(fake)
    fake.ds_status = ZeroParamStatus.AVAILABLE
    assert upstream.zero3_gathered(fake)


def test_dataset_fingerprint_follows_content_and_transforms(tmp_path):
    import datasets

    a = datasets.Dataset.from_dict({"text": ["x", "y"]})
    b = datasets.Dataset.from_dict({"text": ["x", "y"]})
    assert isinstance(upstream.dataset_fingerprint(a), str)
    assert upstream.dataset_fingerprint(a) == upstream.dataset_fingerprint(b)  # same content, same hash
    c = a.map(lambda r: {"text": r["text"] * 2})
    assert upstream.dataset_fingerprint(c) != upstream.dataset_fingerprint(a)
    d = a.map(lambda r: r, new_fingerprint="chosen")  # what the packing relies on: its own key sticks
    assert upstream.dataset_fingerprint(d) == "chosen"


def test_zero3_whole_for_generation_uses_deepspeeds_hook_attributes():
    """The DeepSpeed helper behind :func:`sakd.upstream.zero3_whole_for_generation` removes the hooks
    ``parameter_offload`` keeps and re-registers them with ``_register_deepspeed_module``; the 2-rank ZeRO-3
    on-policy run exercises it (tests/test_policy_distributed.py), this pins the names it relies on."""
    import inspect

    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    source = inspect.getsource(unwrap_model_for_generation)
    for name in ("GatheredParameters", "parameter_offload", "forward_hooks", "_register_deepspeed_module"):
        assert name in source, name
    assert callable(DeepSpeedZeRoOffload._register_deepspeed_module)
    assert "forward_hooks" in inspect.getsource(DeepSpeedZeRoOffload.__init__)


def test_default_store_is_the_groups_store(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        store = upstream.default_store()
        store.set("k", "v")
        assert store.get("k") == b"v" and int(store.add("n", 2)) == 2
    finally:
        dist.destroy_process_group()
