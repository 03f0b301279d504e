"""An OpenAI-compatible chat server (FastAPI + uvicorn) over the batching ``serving.Engine``.

    python scripts/serve_openai_api.py --model out/sft [--lora out/lora] [--port 8998]
    python scripts/serve_openai_api.py --model out/sft --draft-model out/student  # speculative

Loads the model, starts the engine and serves ``serving.openai_api.create_app`` (endpoints,
validation and streaming are described there) on a loopback address unless ``--host`` says
otherwise.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from inference import load_for_inference, load_speculation
from model.precision import DTYPE_CHOICES
from serving.engine import Engine
from serving.openai_api import create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + "
                   "model.safetensors; its own tokenizer files if present)")
    p.add_argument("--lora", default=None, help="LoRA adapter folder, merged at load")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bf16 where the hardware runs it natively, else fp32 (fp16 on a GPU "
                        "without bf16)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if any)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="requests decoded together (continuous batching: slots of the cache)")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens prefilled between two decode steps (bounds the stall a "
                        "new prompt causes to running streams)")
    p.add_argument("--idle-prefill", type=int, default=2048,
                   help="prompt tokens prefilled together before the first step while no stream "
                        "decodes (a burst of requests then starts decoding together)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the decode step (auto: on CUDA; on CPU it costs ~1 min "
                        "per batch bucket; see README)")
    p.add_argument("--draft-model", "--draft_model", default=None,
                   help="speculative decoding with this smaller model (same tokenizer); requests "
                        "are then decoded one at a time (serving/engine.py says why)")
    p.add_argument("--draft-tokens", "--draft_tokens", type=int, default=6,
                   help="tokens the draft model proposes per target forward")
    p.add_argument("--draft-p-min", "--draft_p_min", type=float, default=0.5,
                   help="stop proposing where the draft's top probability is below this")
    p.add_argument("--prompt-lookup", "--prompt_lookup", type=int, default=0,
                   help="N > 0: speculative decoding by n-gram lookup, N tokens proposed")
    p.add_argument("--max-pending", type=int, default=256, help="queued requests before 503")
    p.add_argument("--served-model-name", default=None, help="default: the model folder's name")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger bodies: 413")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    model, tokenizer = load_for_inference(args.model, args.lora, args.device, args.dtype)
    speculation = load_speculation(model, tokenizer, args.draft_model, args.prompt_lookup,
                                   args.draft_tokens, args.draft_p_min, args.device, args.dtype)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size,
                    max_pending=args.max_pending, prefill_chunk=args.prefill_chunk,
                    idle_prefill=args.idle_prefill,
                    compile=None if args.compile == "auto" else args.compile == "on",
                    speculation=speculation).start()
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, name, api_key=args.api_key,
                     max_request_bytes=args.max_request_bytes)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
