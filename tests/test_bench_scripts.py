"""The benchmark scripts still call sakd the way sakd is called now (BENCHMARKS.md cites their commands)."""

import ast
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def _sakd_callee(func: ast.expr, names: dict[str, tuple[str, str]]):
    """The sakd object a call's ``name(...)`` or ``name.attr(...)`` refers to (None: not a sakd name)."""
    if isinstance(func, ast.Name) and func.id in names:
        module, attr = names[func.id]
        return getattr(importlib.import_module(module), attr, None)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names:
        module, attr = names[func.value.id]
        base = getattr(importlib.import_module(module), attr, None)
        base = base if base is not None else importlib.import_module(f"{module}.{attr}")
        return getattr(base, func.attr, f"missing: {module}.{attr}.{func.attr}")
    return None


def test_benchmark_calls_bind_to_sakd_signatures():
    """Every call in benchmarks/*.py to a name imported from sakd binds to that function's current signature
    (on_policy.py and the single-pass ablation called the demo's prepare_teacher with its old five
    arguments after it was changed to take the demo's splits)."""
    bad = []
    for path in BENCHMARKS:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {
            alias.asname or alias.name: (node.module, alias.name)
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sakd")
            for alias in node.names
        }
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            target = _sakd_callee(call.func, names)
            if isinstance(target, str):
                bad.append(f"{path.name}:{call.lineno}: {target}")
                continue
            if target is None or any(isinstance(a, ast.Starred) for a in call.args):
                continue
            if any(k.arg is None for k in call.keywords) or not callable(target):
                continue
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError):
                continue
            try:
                signature.bind(*call.args, **{k.arg: k.value for k in call.keywords})
            except TypeError as err:
                bad.append(f"{path.name}:{call.lineno}: {ast.unparse(call.func)}{signature}: {err}")
    assert not bad, "\n".join(bad)


def test_bench_teacher_recipe_is_a_valid_config(tmp_path):
    """The benchmarks' teacher pretraining run loads as a config: tiny-moe, CE only, the old recipe's numbers."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_teacher import teacher_recipe
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from sakd.config import load_config

    train = tmp_path / "train.txt"
    train.write_text("one\ntwo\n")
    budget = {"teacher_steps": 1200, "block_size": 128, "batch_size": 16}
    cfg, _ = load_config(teacher_recipe(tmp_path / "run", train, tmp_path / "tok", budget, "line"))
    assert (cfg.model.student, cfg.distillation.loss.alpha, cfg.data.sample_by) == ("tiny-moe", 0.0, "line")
    assert (cfg.optimization.learning_rate, cfg.optimization.warmup_steps) == (2e-3, 20)
    assert (cfg.training.max_steps, cfg.training.batch_size, cfg.data.eval) == (1200, 16, None)
