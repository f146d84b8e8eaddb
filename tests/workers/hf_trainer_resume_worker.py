"""A DistillationTrainer under DeepSpeed ZeRO-2 in one process (``torchrun --nproc_per_node 1``): 4 steps in
one go, then 2 steps with a checkpoint and a resumed run to 4 from it. Writes ``OUT/result.json``: each
run's logged per-step values and the student's weights (as lists).

    python -m torch.distributed.run --standalone --nproc_per_node 1 hf_trainer_resume_worker.py \
        TOKENIZER_DIR CORPUS OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainingArguments

from sakd.integrations import DistillationTrainer, leave_process_group, prepare_distillation_data
from sakd.models import load_model, load_tokenizer

ROOT = Path(__file__).parents[2]
PARTS = {
    "feature": {"weight": 0.5},
    "curriculum": {"balance": True},
    "router": {"enabled": True, "sharpen_start": 0.0, "sharpen_end": 0.5},
}
KEYS = ("loss", "kd", "mult_kd", "mult_feature", "router_w_max", "router_w_mean")


def trainer(tokenizer_dir: str, corpus: str, out: Path, **kw: object) -> DistillationTrainer:
    tok = load_tokenizer(tokenizer_dir)
    data = prepare_distillation_data({"train": corpus, "block_size": 32, "max_eval_blocks": 8}, tok)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        warmup_steps=1,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        deepspeed=str(ROOT / "ds_configs" / "zero2.json"),
        **kw,
    )
    return DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=0),
        args,
        teacher=load_model("tiny-moe", tokenizer=tok, seed=1),
        distillation=PARTS,
        train_dataset=data.train,
        data_collator=data.collator,
        processing_class=tok,
    )


def logged(t: DistillationTrainer) -> dict[int, dict[str, float]]:
    return {h["step"]: {k: h[k] for k in KEYS} for h in t.state.log_history if "loss" in h}


if __name__ == "__main__":
    tokenizer_dir, corpus, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    full = trainer(tokenizer_dir, corpus, out / "full", save_strategy="no")
    full.train()
    trainer(tokenizer_dir, corpus, out / "resumed", save_strategy="steps", save_steps=2).train()
    resumed = trainer(tokenizer_dir, corpus, out / "resumed", save_strategy="no")
    resumed.train(resume_from_checkpoint=str(out / "resumed" / "checkpoint-2"))
    weights = {
        name: {k: v.float().flatten().tolist() for k, v in t.student.state_dict().items()}
        for name, t in (("full", full), ("resumed", resumed))
    }
    result = {"full": logged(full), "resumed": logged(resumed), "weights": weights}
    (out / "result.json").write_text(json.dumps(result))
    leave_process_group()
