"""Real conversation data that installs from PyPI, as ``data.format: chat`` JSONL (issue 24, part 6).

Two packages on PyPI ship real conversations inside the wheel (found by searching the package index's
names and summaries for dialog/chat/instruction data sets; Debian's archive had none):

* ``chatterbot-corpus`` 1.3.3 (BSD-3-Clause, gunthercox/chatterbot-corpus): hand-written question ->
  answer exchanges by topic (``data/english/*.yml``, 2,026 conversations in English). Instruction-like:
  a user asks, a bot answers -- but the answers are short and often jokes, not an assistant's.
* ``chitchat-dataset`` 0.9.0 (MIT, BYU PCC lab's Chit-Chat Challenge): 7,168 open-domain conversations
  between two people (``dataset.json``). The first speaker becomes ``user``, the second ``assistant``;
  a speaker's consecutive messages are one turn (joined by newlines). Human small talk, not instructions.

Install them somewhere that is not the project's environment and point ``--site`` there::

    pip install --no-deps --target /tmp/chat-site chatterbot-corpus==1.3.3 chitchat-dataset==0.9.0
    python benchmarks/chat_data.py --site /tmp/chat-site --out data/chat

writes ``OUT/chatterbot.jsonl`` and ``OUT/chitchat.jsonl`` (``{"messages": [...], "source": ...}`` rows;
``--max-turns`` caps a chitchat conversation's turns, ``--max-chitchat`` the number of its conversations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def chatterbot(root: Path) -> list[dict]:
    import yaml

    rows = []
    for path in sorted((root / "chatterbot_corpus" / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            lines = [str(x).strip() for x in conv]
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": text}
                for i, text in enumerate(lines)
            ]
            if len(messages) >= 2 and all(m["content"] for m in messages):
                rows.append({"messages": messages, "source": f"chatterbot-corpus/{path.stem}"})
    return rows


def chitchat(root: Path, max_turns: int, limit: int) -> list[dict]:
    data = json.loads((root / "chitchat_dataset" / "dataset.json").read_text(encoding="utf-8"))
    rows = []
    for key, conv in data.items():
        senders, messages = [], []
        for group in conv["messages"]:
            text = "\n".join(m["text"].strip() for m in group if m["text"].strip())
            sender = group[0]["sender"]
            if not text:
                continue
            if sender not in senders:
                senders.append(sender)
            role = "user" if sender == senders[0] else "assistant"
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + text
            else:
                messages.append({"role": role, "content": text})
        messages = messages[:max_turns]
        if len(senders) == 2 and any(m["role"] == "assistant" for m in messages):
            rows.append({"messages": messages, "source": f"chitchat-dataset/{key}"})
        if len(rows) == limit:
            break
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", required=True, help="folder the two packages were installed into (pip --target)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-turns", type=int, default=8)
    p.add_argument("--max-chitchat", type=int, default=0, help="0: all")
    args = p.parse_args()
    root, out = Path(args.site), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (
        ("chatterbot", chatterbot(root)),
        ("chitchat", chitchat(root, args.max_turns, args.max_chitchat or -1)),
    ):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        turns = sum(m["role"] == "assistant" for r in rows for m in r["messages"])
        chars = sum(len(m["content"]) for r in rows for m in r["messages"] if m["role"] == "assistant")
        print(f"{name}: {len(rows)} conversations, {turns} assistant turns, {chars} assistant characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
