"""The benchmarks, one module each (nanochat's ``tasks/``): ``toolcall``, ``gsm8k``, ``math``,
``commonsense``.

Scope: everything a benchmark owns (its data format and converter, its prompt, answer extraction,
scoring, and the RL prompt + gold that GRPO trains on), plus this registry, which lets the
evaluation runner and the trainer ask a task by name instead of special-casing it. Pure Python
over ``dataset/``: nothing here imports ``evaluation`` or ``trainer`` (they import this).

Every task module has the same shape:

- ``NAME``: its registry name (the ``task`` of its RL prompt records, its ``--bench`` name);
- data: ``convert_file(src, out, kind, ...)`` and ``main(argv)``, the command line
  ``python -m tasks.<name> convert --src ... --out ...``; ``load(path, limit)``: items to score;
- prompt: ``question(item)``, the user turn; when ``FEWSHOT``, ``exemplars(items)``, few-shot
  turns in the answer format its SFT records teach;
- scoring: ``score(item, text)``, one report row (``{"id", "category", "extracted", "gold",
  "correct", "error_kind", ...}``, ``text`` = the answer part of a completion);
  ``summarize(results)``, extra summary fields of a report;
- multi-turn: a task with ``AGENT = True`` (``toolcall``) is scored by its own
  ``run_agent(items, render, generate, batch_size=, exemplars=, log=)`` (the tool loop) instead
  of one generation per item;
- RL: ``is_record(obj)`` (is a data record in this task's format), ``rl_prompt(obj, where)``
  (``{"messages", "task", "gold", ...}``), ``gold_of_reply(text)`` (the gold a worked SFT reply
  carries, or None), ``correct(text, sample)`` (the reward's verdict on an RL sample) and
  ``ANSWER_MARKER`` (what "an answer was given" looks like, for the format reward).

Modules are imported on first use (``get``), so ``python -m tasks.gsm8k`` does not find its own
module already imported by this package.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Mapping

from dataset.jsonl import DataError

__all__ = ["NAMES", "get", "rl_prompt"]

# Registry order is also the order in which a data record's format and a reply's gold are
# recognised: tool-use items (question + answer + a tools list) before GSM8K's question + answer;
# GSM8K's "#### n" before MATH's \boxed{} (a GSM8K reply may box its answer too).
NAMES = ("toolcall", "gsm8k", "math", "commonsense")


def get(name: str) -> ModuleType:
    """The task module called ``name`` (one of ``NAMES``); ValueError naming them otherwise."""
    if name not in NAMES:
        raise ValueError(f"unknown task {name!r} (one of {NAMES})")
    return importlib.import_module(f"{__name__}.{name}")


def _gold_of_reply(text: str) -> tuple[str, str] | None:
    """(task, gold) of a reference reply: the first task that finds its gold in it, else None."""
    for name in NAMES:
        gold = get(name).gold_of_reply(text)
        if gold is not None:
            return name, gold
    return None


def rl_prompt(obj: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """{"messages", "task", "gold", ...} of one data record, or None when it has no gold answer.

    SFT (``conversations``): the turns before the last assistant one, gold from that reply (its
    content, else its reasoning). Otherwise the first task whose format the record is in:
    GSM8K (``question``, ``answer``), MATH (``problem``, ``answer`` or ``solution``), commonsense
    eval records (``instruction``, ``label``, ``dataset``, ``choices``). ``where`` ("file:line")
    prefixes the DataError of a record in no known format.
    """
    if "conversations" in obj:
        turns = obj["conversations"]
        last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0:
            return None
        reply = turns[last]
        found = _gold_of_reply(str(reply.get("content") or "")) or \
            _gold_of_reply(str(reply.get("reasoning_content") or ""))
        if found is None:
            return None
        return {"messages": list(turns[:last]), "task": found[0], "gold": found[1]}
    for name in NAMES:
        task = get(name)
        if task.is_record(obj):
            return task.rl_prompt(obj, where)
    raise DataError(f"{where}: not a prompt record (need conversations, question+answer, problem, "
                    "or a commonsense eval record)")
