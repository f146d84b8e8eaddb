"""`sakd eval MODEL_DIR --data FILE`: held-out perplexity and bits per byte of a model directory.

The text is read as ``data.sample_by`` says (a .txt file is one document unless told otherwise), every
document's tokens joined by EOS into one stream -- nothing dropped -- and scored blocked (``--block-size``
windows, each alone) or strided (``--stride``: sliding windows, every token with at least
``block-size - stride`` tokens of context). The output says which, and how many tokens and bytes
were scored. With ``--format chat`` the rows are conversations rendered by the model's chat template,
each its own document (attention never crosses two), and only the assistant tokens (content and the
end-of-turn token) are scored; ``bpb`` is over the assistant contents' bytes.

With ``--teacher``: top-1 agreement (one vocabulary) and the teacher's loss on the model's own greedy and
sampled (seeded by ``--seed``) continuations of ``--prompts`` held-out prompts (``cont_*``). Text: the
first ``--prompt-tokens`` tokens of the first blocks, continued. Chat: the first conversations cut at
their last user turn, rendered by the model's template with its generation prompt; the model answers
(up to ``--max-new-tokens``, or its end-of-turn token) and the teacher scores the answer under its own
chat template: nats per answer token (``cont_*_teacher_nll``), bits per byte of the answer text
(``cont_*_teacher_bpb``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sakd.config.schema import SAMPLE_BY


def run(args: argparse.Namespace) -> int:
    from sakd.commands.console import runtime

    runtime()
    from sakd.data import DataError, load_text_dataset, text_stream
    from sakd.evaluation.heldout import evaluate
    from sakd.models import load_model, load_tokenizer

    if args.stride is not None and not 1 <= args.stride <= args.block_size:
        raise DataError(f"--stride {args.stride} must be between 1 and --block-size {args.block_size}")
    tokenizer = load_tokenizer(args.model_dir)
    if args.format == "chat":  # conversations: each its own document, assistant tokens scored
        from sakd.data.chat import chat_stream, load_conversations

        docs = load_conversations(args.data, messages_field=args.messages_field)
        stream = chat_stream(docs, tokenizer, loss_on=args.loss_on)
    else:
        docs = load_text_dataset(args.data, text_field=args.text_field, sample_by=args.sample_by)
        if len(docs) == 0:
            raise DataError(f"{args.data} holds no non-empty documents")
        stream = text_stream(docs, tokenizer)
    if args.max_blocks:
        stream = stream.prefix(args.max_blocks * args.block_size)
    if len(stream) < 2:
        raise DataError(f"{args.data} has fewer than 2 tokens: nothing to score")
    model = load_model(args.model_dir, tokenizer=tokenizer)
    teacher = teacher_tok = None
    if args.teacher:
        teacher_tok = load_tokenizer(args.teacher)
        teacher = load_model(args.teacher, tokenizer=teacher_tok).eval()
    same_vocab = teacher_tok is not None and teacher_tok.get_vocab() == tokenizer.get_vocab()
    result: dict[str, Any] = evaluate(
        model.eval(),
        stream,
        batch_size=args.batch_size,
        window=args.block_size,
        stride=args.stride,
        teacher=teacher if same_vocab else None,  # top-1 agreement needs one vocabulary
        vocab_size=len(tokenizer),
    )
    result.update(data=args.data, format=args.format, documents=stream.documents)
    if args.format == "chat":
        result.update(loss_on=args.loss_on)
    else:
        result.update(sample_by=args.sample_by)
    if (
        teacher is not None and args.prompts and args.format == "text"
    ):  # the teacher on what the model writes (sakd/policy)
        n = len(stream) // args.block_size
        blocks = stream.ids[: n * args.block_size].view(n, args.block_size)
        result.update(
            _continuations(args, model, teacher, tokenizer, None if same_vocab else teacher_tok, blocks)
        )
    if teacher is not None and args.prompts and args.format == "chat":  # the teacher on the model's answers
        result.update(_answers(args, model, teacher, tokenizer, teacher_tok, docs))
    print(json.dumps(result, indent=1))
    return 0


def _continuations(
    args: argparse.Namespace, model: Any, teacher: Any, tokenizer: Any, teacher_tok: Any, blocks: Any
) -> dict[str, float]:
    """The teacher's loss on the model's greedy and sampled continuations of the first tokens of the
    text's first blocks (``cont_*``; any teacher tokenizer: the text is re-tokenized for it)."""
    from sakd.policy import ContinuationSpec, heldout_prompts, score_continuations

    spec = ContinuationSpec(
        heldout_prompts(blocks, args.prompts, args.prompt_tokens),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    return score_continuations(
        model, teacher, spec, student_tokenizer=tokenizer, teacher_tokenizer=teacher_tok
    )


def _answers(
    args: argparse.Namespace, model: Any, teacher: Any, tokenizer: Any, teacher_tok: Any, docs: Any
) -> dict[str, float]:
    """The teacher's loss (under its own chat template) on the model's answers to the first ``--prompts``
    conversations cut at their last user turn (``cont_*``; :mod:`sakd.policy.chat_eval`)."""
    from sakd.data.chat import require_template
    from sakd.policy.chat_eval import chat_spec, score_chat_answers

    require_template(teacher_tok, "teacher")
    spec = chat_spec(
        list(docs.select(range(min(args.prompts, len(docs))))["messages"]),
        tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    return score_chat_answers(
        model, teacher, spec, student_tokenizer=tokenizer, teacher_tokenizer=teacher_tok
    )


def register(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "eval",
        help="held-out perplexity and bits per byte of a model directory (and, with a teacher, agreement and "
        "its loss on the model's own text)",
        description=__doc__.split("\n\n", 1)[1],
    )
    v.add_argument("model_dir", help="a Hugging Face model directory (with tokenizer files)")
    v.add_argument("--data", required=True, help="text file (.txt/.jsonl/.parquet)")
    v.add_argument(
        "--sample-by",
        choices=SAMPLE_BY,
        default="document",
        help="what one document of a .txt file is: document (the whole file; default), paragraph "
        "(blank-line separated) or line; .jsonl/.parquet records are documents",
    )
    v.add_argument(
        "--teacher",
        help="teacher model directory (with its tokenizer): top-1 agreement (same tokenizer) and the teacher's "
        "loss on the model's greedy and sampled continuations of held-out prompts (cont_*; any tokenizer)",
    )
    v.add_argument(
        "--prompts",
        type=int,
        default=16,
        help="held-out prompts to continue (chat: conversations to answer; 0: skip; default 16)",
    )
    v.add_argument("--prompt-tokens", type=int, default=32, help="prompt length: a block's first tokens")
    v.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    v.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of cont_sampled_*")
    v.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of cont_sampled_*")
    v.add_argument("--seed", type=int, default=0, help="seed of the sampled continuations")
    v.add_argument("--text-field", default="text", help="column of .jsonl/.parquet records holding the text")
    v.add_argument(
        "--format",
        choices=["text", "chat"],
        default="text",
        help="chat: rows of {role, content} messages (--messages-field), rendered by the model's chat template; "
        "each conversation is scored alone and only its assistant tokens count (--loss-on); bits per byte over "
        "the assistant contents. With --teacher, cont_* scores the model's answers to the conversations cut at "
        "their last user turn, read by the teacher under its own chat template",
    )
    v.add_argument(
        "--messages-field", default="messages", help="column holding the conversation (--format chat)"
    )
    v.add_argument(
        "--loss-on",
        choices=["assistant", "all"],
        default="assistant",
        help="which tokens are scored (--format chat)",
    )
    v.add_argument("--block-size", type=int, default=256, help="tokens per window (default 256)")
    v.add_argument(
        "--stride",
        type=int,
        default=None,
        help="strided scoring: advance windows this many tokens (<= block size); default: blocked",
    )
    v.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    v.add_argument(
        "--max-blocks", type=int, default=None, help="score only the first N x block-size tokens of the text"
    )
    v.set_defaults(func=run)
