"""Distill inside your own ``transformers.Trainer`` script: the only change is the class.

    python examples/hf_trainer.py --student STUDENT_DIR --teacher TEACHER_DIR --data corpus.txt \
        --output_dir runs/hf --max_steps 100 --per_device_train_batch_size 8 --learning_rate 3e-4

Every ``TrainingArguments`` flag works (``--deepspeed ds_configs/zero3.json`` under ``accelerate launch``,
``torchrun`` or ``deepspeed``: the teacher is then partitioned too). The student and teacher may tokenize
differently (``--teacher_tokenizer``, default the teacher's directory): the data then carries the
teacher's tokens of the same text, aligned by character spans. ``--lora_rank R`` trains LoRA adapters
through ``peft`` instead of every weight. The trained student is in ``--output_dir`` (``from_pretrained``
loads it); ``trainer_state.json`` there holds the logged losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

from sakd.integrations import DistillationTrainer, prepare_distillation_data


@dataclass
class DistillArguments:
    student: str = field(metadata={"help": "student model directory (or hub id)"})
    teacher: str = field(metadata={"help": "teacher model directory (or hub id)"})
    data: str = field(metadata={"help": "training text: .txt (one document per line), .jsonl or .parquet"})
    teacher_tokenizer: str | None = field(default=None, metadata={"help": "default: the teacher's directory"})
    block_size: int = field(default=256, metadata={"help": "tokens per packed block"})
    alpha: float = field(default=0.5, metadata={"help": "alpha * T^2 * KL + (1 - alpha) * CE"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature on both sides"})
    feature_weight: float = field(default=0.0, metadata={"help": "hidden-state feature loss (0: off)"})
    lora_rank: int = field(default=0, metadata={"help": "train LoRA adapters of this rank (0: every weight)"})


def main() -> None:
    script, args = HfArgumentParser((DistillArguments, TrainingArguments)).parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(script.student)
    teacher_tokenizer = AutoTokenizer.from_pretrained(script.teacher_tokenizer or script.teacher)
    student = AutoModelForCausalLM.from_pretrained(script.student)
    teacher = AutoModelForCausalLM.from_pretrained(script.teacher)
    if script.lora_rank:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=script.lora_rank, target_modules="all-linear"))
    data = prepare_distillation_data(
        {"train": script.data, "block_size": script.block_size}, tokenizer, teacher_tokenizer, seed=args.seed
    )
    trainer = DistillationTrainer(  # was: Trainer(
        model=student,
        args=args,
        teacher=teacher,
        teacher_tokenizer=teacher_tokenizer,
        distillation={
            "loss": {"alpha": script.alpha, "temperature": script.temperature},
            "feature": {"weight": script.feature_weight},
        },
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    trainer.end()  # under torchrun / accelerate launch: the ranks leave the process group together


if __name__ == "__main__":
    main()
