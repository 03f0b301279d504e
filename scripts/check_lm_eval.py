"""lm-evaluation-harness against our server: a local multiple-choice task through
``local-completions`` (``/v1/completions`` with ``echo`` + ``logprobs``), checked against scores
computed independently by a plain forward of the same model.

    pip install --no-deps lm_eval==0.4.13 datasets dill sacrebleu portalocker tabulate colorama \
        lxml multiprocess aiohttp tenacity aiosignal frozenlist multidict yarl propcache \
        aiohappyeyeballs sqlitedict     # the rest (pyarrow, pandas, ...) comes with the project
    python scripts/check_lm_eval.py [--model DIR] [--questions 40]

Without ``--model`` it serves the ``tiny`` preset with random weights (its accuracy is chance;
the point is that lm-eval's per-question choice and accuracy equal ours). lm-eval is kept out of
requirements.txt and out of the test suite: it is heavy and needs nothing but this check.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch

from common.atomic import atomic_write_text
from common.errors import UserError
from convert.hf import find_tokenizer_dir
from inference import load_for_inference
from model.config import MiniMindConfig
from model.io import save_pretrained
from model.model import MiniMindLM

TASK = "forge_arith_mc"
TASK_YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def make_questions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        right = a + b
        wrong = rng.sample([x for x in range(right - 5, right + 6) if x != right and x > 0], 3)
        choices = [f" {x}" for x in [right] + wrong]
        rng.shuffle(choices)
        docs.append({"question": f"{a} + {b} = ?", "choices": choices,
                     "label": choices.index(f" {right}")})
    return docs


@torch.no_grad()
def reference_choices(model, tokenizer, docs: list[dict]) -> list[int]:
    """The choice with the highest summed continuation log-prob, by a plain forward (lm-eval's
    ``acc`` rule), with lm-eval's tokenisation: context and continuation encoded apart."""
    picks = []
    for doc in docs:
        context = tokenizer.encode(f"Question: {doc['question']}\nAnswer:")
        scores = []
        for choice in doc["choices"]:
            cont = tokenizer.encode(choice)
            ids = torch.tensor([context + cont])
            logp = model(ids).logits[0].float().log_softmax(-1)
            scores.append(sum(float(logp[len(context) + i - 1, t]) for i, t in enumerate(cont)))
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: a random tiny model)")
    ap.add_argument("--questions", type=int, default=40)
    args = ap.parse_args()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"lm_eval is not installed ({e}); see the install line in "
                        "scripts/check_lm_eval.py") from None
    import uvicorn

    from serving.engine import Engine
    from serving.openai_api import create_app

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.model) if args.model else tmp / "tiny"
        if not args.model:
            torch.manual_seed(0)
            save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny")).eval(), folder)
        model, tokenizer = load_for_inference(folder, device="cpu", dtype="fp32")
        docs = make_questions(args.questions)
        data = tmp / "questions.jsonl"
        atomic_write_text(data, "".join(json.dumps(d) + "\n" for d in docs))
        atomic_write_text(tmp / f"{TASK}.yaml", TASK_YAML.replace("{data}", str(data)))

        engine = Engine(model, tokenizer).start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(engine, "forge"), host="127.0.0.1",
                                               port=port, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        try:
            t0 = time.perf_counter()
            results = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=(f"model=forge,base_url=http://127.0.0.1:{port}/v1/completions,"
                            f"tokenizer_backend=huggingface,tokenizer={find_tokenizer_dir(folder)},"
                            f"num_concurrent=8,max_retries=1,max_length="
                            f"{model.config.max_position_embeddings}"),
                tasks=[TASK], task_manager=TaskManager(include_path=str(tmp)),
                log_samples=True)
            wall = time.perf_counter() - t0
        finally:
            server.should_exit = True
            thread.join(10)
            engine.shutdown()
        got_acc = results["results"][TASK]["acc,none"]
        samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
        lm_eval_picks = [max(range(len(s["filtered_resps"])),
                             key=lambda i: s["filtered_resps"][i][0]) for s in samples]
        ours = reference_choices(model, tokenizer, docs)
        ours_acc = sum(p == d["label"] for p, d in zip(ours, docs)) / len(docs)
        agree = sum(a == b for a, b in zip(lm_eval_picks, ours))
        print(f"lm-eval {lm_eval.__version__} local-completions on {len(docs)} questions "
              f"({len(docs) * 4} loglikelihood requests) in {wall:.1f} s: acc {got_acc:.3f}; "
              f"a plain forward: acc {ours_acc:.3f}; same choice on {agree}/{len(docs)}; "
              f"engine {engine.stats_snapshot()['requests_finished']} requests")
        if agree != len(docs) or abs(got_acc - ours_acc) > 1e-9:
            raise SystemExit("lm-eval's scores differ from the plain forward's")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
