"""The compatibility table of sakd's parts (README, "What composes with what"), generated from declarations:
what each part needs from the teacher signal (a capability of :class:`~sakd.teacher.capabilities.
Capabilities`; the loss terms' needs come from :mod:`sakd.objective.terms`) and what a teacher source gives
(a teacher cache: :func:`~sakd.teacher.signal.stored_capabilities`). A pair is refused when one side cannot
give what the other needs -- an intrinsic reason -- or when a part declares it does not run with the other
yet; a pair that works names the test that trains it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sakd.objective.terms import COMPONENTS
from sakd.teacher.cache.manifest import SignalSpec
from sakd.teacher.capabilities import Capabilities
from sakd.teacher.signal import stored_capabilities

CACHE = stored_capabilities(
    SignalSpec("topk", 64, None, 2.0, "float16", 49152, 16, 256, router_shape=[24, 8])
)
"""What a top-k teacher cache made with ``distillation.cache.router`` gives (:func:`stored_capabilities`)."""

NEW_TEXT = "new text cannot be scored from a cache (it holds the teacher's signal on the data's text only)"
HIDDEN = "hidden-state terms need the teacher's hidden states, which a cache does not store"


Section = dict[str, dict[str, object]]


@dataclass(frozen=True)
class Part:
    """A row of the table: ``requires`` capabilities of the teacher signal (``why``: the reason when they are
    missing), ``gives`` the signal's capabilities (a teacher source), and pairs it does not run with
    (``not_with``: other part -> (``intrinsic`` or ``not yet``, reason)). ``recipe``: how a recipe turns it on
    (None: not a key of one process's recipe) and ``metrics``: what every step then logs -- the composition
    test trains every pair of such parts."""

    name: str
    requires: tuple[str, ...] = ()
    why: str = ""
    gives: Capabilities | None = None
    not_with: dict[str, tuple[str, str]] = field(default_factory=dict)
    recipe: Section | None = None
    metrics: tuple[str, ...] = ()


GENERATION = {"prompt_tokens": 8, "max_new_tokens": 6, "eval_prompts": 0, "fraction": 0.5}
ONE_POLICY = ("intrinsic", "a run has one distillation.policy")
ONE_ZERO_STAGE = ("intrinsic", "a run has one ZeRO stage (training.deepspeed's zero_optimization.stage)")


def _policy(name: str) -> Part:
    others = {f"policy {p}": ONE_POLICY for p in ("on", "mixed", "sequence") if p != name}
    generation = {**GENERATION, "sequence_loss": "kd"} if name == "sequence" else GENERATION
    return Part(
        f"policy {name}",
        ("scores_new_text",),
        NEW_TEXT,
        not_with=others,
        recipe={"distillation": {"policy": name, "generation": generation}},
        metrics=("policy_step",),
    )


PARTS: tuple[Part, ...] = (
    Part(
        "teacher cache", gives=CACHE, recipe={"distillation": {"teacher_cache": "<a cache>"}}, metrics=("kd",)
    ),
    _policy("on"),
    _policy("mixed"),
    _policy("sequence"),
    Part(
        "KA",
        ("live",),
        "Knowledge Augmentation re-routes the live teacher's experts; a cache stores one routing",
        not_with={
            "SAR": ("intrinsic", "one forward has one routing: KA draws E-1 experts, SAR routes to all")
        },
        recipe={"distillation": {"moe": {"augment_samples": 2}}},
        metrics=("ka_changed_share",),
    ),
    Part(
        "SAR",
        ("live",),
        "the Student-Aware Router trains the live teacher's router",
        recipe={"distillation": {"moe": {"student_aware_router": True}}},
        metrics=("sar_kd",),
    ),
    Part(
        "token router",
        recipe={"distillation": {"router": {"enabled": True, "sharpen_start": 0.0, "sharpen_end": 0.5}}},
        metrics=("router_w_mean",),
    ),
    Part(
        "curriculum",
        recipe={"distillation": {"curriculum": {"phases": True, "balance": True, "structure_start": 0.0}}},
        metrics=("mult_kd",),
    ),
    *(
        Part(
            c.name,
            ("hidden_states",),
            HIDDEN,
            recipe={"distillation": {c.name: {"weight": 0.5}}},
            metrics=(c.name,),
        )
        for c in COMPONENTS
        if c.needs.hidden_states
    ),
    Part(
        "sparse modes",
        recipe={"distillation": {"loss": {"sparse": "subset", "kd_top_k": 16}}},
        metrics=("kd",),
    ),
    Part("LoRA", recipe={"model": {"peft": {"method": "lora"}}}, metrics=("kd",)),
    Part("DistillationTrainer"),
    Part("ZeRO-2", not_with={"ZeRO-3": ONE_ZERO_STAGE}),
    Part("ZeRO-3"),
    Part("stages"),
)

_C, _I, _D = "tests/test_composition.py::", "tests/test_integrations.py::", "tests/test_distributed.py::"
TRAINS = _C + "test_a_combination_trains_and_logs_its_parts"
WALK = _C + "test_every_pair_of_the_table_trains"
"""Every pair of parts that a recipe turns on (:attr:`Part.recipe`) that works, trained 2 steps."""
RESUMES = _C + "test_a_combination_resumes_exactly"
CACHE_REFUSALS = _C + "test_what_a_cache_cannot_give_is_refused_in_one_line"
MANY = _C + "test_many_parts_at_once_on_two_ranks"
"""Recipes that each turn several parts on, trained on 2 ranks under ZeRO-2 (as 2 stages) and ZeRO-3."""
MANY_RECIPES = {
    "ZeRO-2": [
        ("KA", "token router", "curriculum", "feature", "attention", "contrastive", "sparse modes"),
        ("teacher cache", "token router", "curriculum", "sparse modes"),
        ("policy mixed", "SAR"),
        ("policy sequence",),
        ("policy on",),
    ],
    "ZeRO-3": [
        ("KA", "token router", "curriculum", "feature", "attention", "contrastive", "sparse modes"),
        ("teacher cache", "token router", "curriculum", "sparse modes"),
        ("policy mixed", "SAR"),
    ],
}


def _many_parts() -> list[tuple[str, str]]:
    """The pairs :data:`MANY` trains: each ZeRO stage with every part of its recipes, and stages (ZeRO-2's
    recipes run as 2 stages) with every part of ZeRO-2's."""
    pairs = []
    for zero, recipes in MANY_RECIPES.items():
        parts = sorted({p for recipe in recipes for p in recipe})
        pairs += [(zero, p) for p in parts]
        if zero == "ZeRO-2":
            pairs += [("stages", p) for p in parts]
    return pairs


TESTS: dict[frozenset[str], str] = {
    frozenset(pair): test
    for test, pairs in {
        MANY: _many_parts(),  # first: a test of the pair alone, named below, wins
        TRAINS: [
            ("teacher cache", "curriculum"),
            ("teacher cache", "token router"),
            ("policy on", "token router"),
            ("policy on", "curriculum"),
            ("policy on", "feature"),
            ("policy sequence", "token router"),
            ("KA", "curriculum"),
            ("KA", "feature"),
            ("curriculum", "feature"),
            ("SAR", "token router"),
        ],
        RESUMES: [
            ("policy mixed", "token router"),
            ("policy mixed", "curriculum"),
            ("token router", "curriculum"),
        ],
        CACHE_REFUSALS: [
            ("teacher cache", "policy on"),
            ("teacher cache", "SAR"),
            ("teacher cache", "KA"),
            ("teacher cache", "feature"),
        ],
        _I + "test_each_per_step_part_under_the_trainer_repeats_sakd_distill": [
            ("DistillationTrainer", "curriculum"),
            ("DistillationTrainer", "token router"),
            ("DistillationTrainer", "SAR"),
        ],
        _I + "test_each_policy_under_the_trainer_repeats_sakd_distill": [
            ("DistillationTrainer", f"policy {p}") for p in ("on", "mixed", "sequence")
        ],
        _I + "test_stages_under_the_trainer_repeat_sakd_distill": [("DistillationTrainer", "stages")],
        "tests/test_integrations_block_ids.py::test_trainer_from_a_teacher_cache_repeats_sakd_distill": [
            ("DistillationTrainer", "teacher cache")
        ],
        "tests/test_teacher_cache_tokenizers.py::test_other_stored_modes_train": [
            ("teacher cache", "sparse modes")
        ],
        "tests/test_peft_distributed.py::test_lora_ddp_and_zero2": [("LoRA", "ZeRO-2")],
        "tests/test_peft_distributed.py::test_lora_zero3_partitions_exports_merged_and_resumes": [
            ("LoRA", "ZeRO-3")
        ],
        "tests/test_peft.py::test_stages_with_adapters_never_unfreeze_the_base": [("LoRA", "stages")],
        "tests/test_policy_distributed.py::test_on_policy_zero2_two_cpu_ranks": [("policy on", "ZeRO-2")],
        "tests/test_policy_distributed.py::test_on_policy_zero3_two_cpu_ranks_across_tokenizers": [
            ("policy on", "ZeRO-3")
        ],
        "tests/test_policy_distributed.py::test_sequence_level_zero3_teacher_writes_with_synced_ranks": [
            ("policy sequence", "ZeRO-3")
        ],
        _D + "test_student_aware_parts_on_two_ranks_equal_one_process": [
            ("SAR", "ZeRO-3"),
            ("token router", "ZeRO-3"),
            ("curriculum", "ZeRO-3"),
            ("SAR", "curriculum"),
        ],
        "tests/test_cross_tokenizer.py::test_cross_tokenizer_distill_with_all_aux_losses": [
            ("feature", "contrastive")
        ],
        _D + "test_stages_under_deepspeed_two_cpu_ranks_equal_one_process": [
            ("stages", "ZeRO-2"),
            ("stages", "ZeRO-3"),
        ],
        _I + "test_example_script_on_two_processes": [
            ("DistillationTrainer", "ZeRO-3"),
            ("DistillationTrainer", "ZeRO-2"),
        ],
        _I + "test_trainer_repeats_sakd_distill": [
            ("DistillationTrainer", "KA"),
            ("DistillationTrainer", "feature"),
            ("DistillationTrainer", "sparse modes"),
            ("DistillationTrainer", "attention"),
            ("DistillationTrainer", "contrastive"),
            ("DistillationTrainer", "LoRA"),
        ],
    }.items()
    for pair in pairs
}


@dataclass(frozen=True)
class Cell:
    """``works`` (``note``: the test that trains it, or "" when none does yet), ``refused`` (``note``: the
    intrinsic reason) or ``not yet`` (``note``: what is missing)."""

    status: str
    note: str
    test: str = ""


def cell(a: Part, b: Part) -> Cell:
    """Whether parts ``a`` and ``b`` run together, and why not."""
    walked = a.recipe is not None and b.recipe is not None
    test = TESTS.get(frozenset((a.name, b.name)), "")
    for x, y in ((a, b), (b, a)):
        if y.name in x.not_with:
            kind, reason = x.not_with[y.name]
            return Cell("refused" if kind == "intrinsic" else "not yet", reason, test)
        if x.gives is not None and not all(getattr(x.gives, cap) for cap in y.requires):
            return Cell("refused", y.why, test)
    test = test or (WALK if walked else "")
    return Cell("works", test, test)


def compatibility() -> dict[tuple[str, str], Cell]:
    """Every pair of :data:`PARTS` (first part first in table order)."""
    return {(a.name, b.name): cell(a, b) for i, a in enumerate(PARTS) for b in PARTS[i + 1 :]}


def table_markdown() -> str:
    """The table as Markdown: a matrix of symbols, then the refusals and the tests behind the cells."""
    cells = compatibility()
    reasons: list[str] = []
    tests: list[str] = []
    symbol: dict[tuple[str, str], str] = {}
    for pair, c in cells.items():
        if c.test and c.test not in tests:
            tests.append(c.test)
        number = str(tests.index(c.test) + 1) if c.test else ""
        if c.status == "works":
            symbol[pair] = f"✓{number}" if c.test else "·"
        else:
            if c.note not in reasons:
                reasons.append(c.note)
            symbol[pair] = (
                ("✗" if c.status == "refused" else "…") + chr(ord("a") + reasons.index(c.note)) + number
            )
    names = [p.name for p in PARTS]
    lines = ["| | " + " | ".join(str(i + 1) for i in range(len(names))) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for i, a in enumerate(names):
        row = [symbol.get((a, b)) or symbol.get((b, a)) or "" for b in names]
        row[i] = "—"
        lines.append(f"| {i + 1} {a} | " + " | ".join(row) + " |")
    lines += [
        "",
        "✓n: works, trained by test n; ·: expected to work, no test of the pair yet; ✗x: refused for the "
        "intrinsic reason x; …x: not yet, for the reason x (a number after the letter: the test that checks "
        "the refusal).",
        "",
    ]
    for i, reason in enumerate(reasons):
        kinds = {c.status for c in cells.values() if c.note == reason and c.status != "works"}
        lines.append(f"- {chr(ord('a') + i)} ({'/'.join(sorted(kinds))}): {reason}")
    lines.append("")
    lines += [f"{i + 1}. `{t}`" for i, t in enumerate(tests)]
    return "\n".join(lines) + "\n"


__all__ = ["PARTS", "TESTS", "Cell", "Part", "compatibility", "table_markdown"]
