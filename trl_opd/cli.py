"""The `trl-opd` command line: `trl-opd serve-teacher MODEL` serves a teacher over vLLM's HTTP protocol."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from trl_opd.horizon import HorizonPairConfig
from trl_opd.teacher_server import serve
from trl_opd.toy import ToyPairConfig, build_toy_pair

GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}
WORLDS = {"horizon": HorizonPairConfig, "toy": ToyPairConfig}  # MODEL names of the embedded worlds' teachers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-opd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    teacher = commands.add_parser(
        "serve-teacher",
        help="serve a causal LM for teacher scoring, speaking vLLM's OpenAI-compatible protocol",
        description="Serve MODEL (a local directory or a hub id) with /health, /v1/models, /v1/completions "
        "(prompt_logprobs scoring and sampling), /tokenize and /detokenize, as `vllm serve` does.",
    )
    teacher.add_argument(
        "model",
        metavar="MODEL",
        help="a directory saved with save_pretrained, a hub id, or 'horizon' / 'toy' (the teacher of the example's "
        "preset of that name, `trl_opd.horizon` / `trl_opd.toy`, built or loaded from its cache as the example does)",
    )
    teacher.add_argument("--host", default="127.0.0.1")
    teacher.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    teacher.add_argument("--served-model-name", default=None, help="the name /v1/models reports (default: MODEL)")
    teacher.add_argument(
        "--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 (default: $VLLM_API_KEY)"
    )
    teacher.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    teacher.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer`, except for a local tokenizer saved as a generic fast tokenizer (the toy one): transformers 5
    would rebuild that as the config's model-type class (`Qwen2Tokenizer`), swapping its pre-tokenizer for Qwen's."""
    config = Path(model) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in GENERIC_TOKENIZERS:
        return PreTrainedTokenizerFast.from_pretrained(model)
    return AutoTokenizer.from_pretrained(model)


def serve_teacher(args: argparse.Namespace) -> None:
    """Load MODEL and its tokenizer, serve them until SIGTERM or Ctrl-C."""
    if args.model in WORLDS:
        model, _, tokenizer = build_toy_pair(config=WORLDS[args.model]())
        model = model.to(dtype=getattr(torch, args.dtype), device=args.device)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
        tokenizer = load_tokenizer(args.model)
    api_key = args.api_key or os.environ.get("VLLM_API_KEY") or None
    server = serve(
        model,
        tokenizer,
        args.host,
        args.port,
        served_model_name=args.served_model_name or args.model,
        api_key=api_key,
        model_path=args.model,
    )
    signal.signal(signal.SIGTERM, lambda *_: server.httpd.shutdown())
    auth = "API key required on /v1" if api_key else "no API key"
    print(f"trl-opd teacher server: {args.model} on {server.url} ({args.device}, {args.dtype}, {auth})", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "serve-teacher":
        serve_teacher(args)


if __name__ == "__main__":
    main(sys.argv[1:])
