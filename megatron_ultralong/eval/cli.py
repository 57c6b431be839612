"""Command lines `mu-eval-niah`, `mu-eval-ruler`, `mu-eval-ppl` (tools/eval_*.py).

--model is an HF directory (config.json + weights; one process, CPU or GPU) or a Megatron
checkpoint written by the plugin (torch_dist model dir, a training iter_XXXXXXX/ dir or a save dir
with `latest`); a Megatron checkpoint runs under torchrun with TP x CP processes:

    mu-eval-niah --model hf_export/ --lengths 4096 8192 --depths 0 0.5 1 --out results/
    torchrun --nproc-per-node 8 -m megatron_ultralong.eval.cli niah --model ckpt/1m --cp 8 \
        --tokenizer hf_export/ --lengths 1048576 --depths 0 0.25 0.5 0.75 1 --out results/

Both backends give the same greedy answers; the HF one keeps the whole KV cache on one device, so a
prompt that does not fit one GPU goes through the Megatron one (prefill and KV cache split over
--cp). Re-running a command with the same --out resumes it (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, get_args


from megatron_ultralong.dtypes import DTYPES, DtypeName
from megatron_ultralong.eval.ruler.metrics import RULER_TASK_NAMES
from megatron_ultralong.eval.tasks import RULER_TASKS
from megatron_ultralong.parallel.config import CpCommType


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="HF model directory (config.json + weights) or Megatron checkpoint (torch_dist model "
                             "dir, iter_XXXXXXX/ or a save dir with `latest`)")
    parser.add_argument("--tokenizer", help="HF tokenizer directory or tokenizer.json (default: --model, or the "
                                            "Megatron checkpoint's hf_files/)")
    parser.add_argument("--out", required=True, help="output directory (JSON, JSON lines per cell, PNG); a re-run "
                                                     "with the same --out resumes")
    parser.add_argument("--no-verify-manifest", action="store_true",
                        help="Megatron: load the checkpoint even if its files differ from its manifest.json "
                             "(CRC-32 per file, checked by default)")
    parser.add_argument("--tp", type=int, default=1, help="Megatron: tensor-parallel size (default 1)")
    parser.add_argument("--cp", type=int, default=1,
                        help="Megatron: context-parallel size; the prompt's prefill and KV cache are split over "
                             "it (default 1)")
    parser.add_argument("--cp-comm-type", default="p2p", choices=get_args(CpCommType),
                        help="Megatron: CP attention algorithm for the prefill (default p2p, the ring)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--dtype", choices=get_args(DtypeName),
                        help="default: the checkpoint's dtype")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the generated prompts (default 0)")


def _grid_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int,
                        help="greedy decoding budget per answer (default: the answer's tokens + a margin)")
    parser.add_argument("--over-length", default="warn", choices=["warn", "refuse"],
                        help="when a prompt exceeds the model's max_position_embeddings: warn and evaluate "
                             "(default), or refuse")


def _add_niah(niah: argparse.ArgumentParser) -> None:
    niah.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt lengths in tokens")
    niah.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                      help="needle depths as fractions of the haystack (default 0 0.25 0.5 0.75 1)")
    niah.add_argument("--haystack", default="essay", choices=["essay", "noise"],
                      help="filler: shipped essays (default) or RULER's repeated noise sentence")
    niah.add_argument("--samples", type=int, default=1, help="prompts per cell (default 1)")
    niah.add_argument("--scorer", default="all", choices=["all", "part", "exact"],
                      help="answer matching (default all: every expected string present)")
    niah.add_argument("--no-snap", action="store_true", help="insert at the exact depth, not a sentence end")
    niah.add_argument("--trained-length", type=int,
                      help="mark this context length on the heatmap (default: the model config's "
                           "original_max_position_embeddings, else max_position_embeddings; 0: no line)")
    _grid_flags(niah)
    _common(niah)


def _add_ruler(ruler: argparse.ArgumentParser) -> None:
    ruler.add_argument("--lengths", type=int, nargs="+", required=True,
                       help="sequence lengths in tokens (RULER: prompt + tokens to generate)")
    ruler.add_argument("--tasks", nargs="+", help=f"tasks to run (default: all). RULER: {', '.join(RULER_TASK_NAMES)}; "
                                                 f"--styled: {', '.join(RULER_TASKS)}")
    ruler.add_argument("--samples", type=int, help="samples per task and length (default: RULER's 500; --styled 4)")
    ruler.add_argument("--scorer", default="ruler", choices=["ruler", "strict"],
                       help="ruler (default): RULER's string_match_all/part; strict: whole-token matches only")
    ruler.add_argument("--ruler-essays", help="PaulGrahamEssays.json (essay haystack tasks)")
    ruler.add_argument("--ruler-squad", help="SQuAD v2.0 dev JSON (qa_1)")
    ruler.add_argument("--ruler-hotpotqa", help="HotpotQA dev distractor JSON (qa_2)")
    ruler.add_argument("--ruler-english-words", help="RULER's english_words.json (cwe at long lengths)")
    ruler.add_argument("--save-inputs", action="store_true", help="write prompts into the prediction files' input")
    ruler.add_argument("--styled", action="store_true",
                       help="the project's RULER-style task families instead of RULER's own (docs/evaluation.md)")
    ruler.add_argument("--split-queries", action="store_true",
                       help="--styled: ask niah_multiquery's keys as separate questions of one prefilled context "
                            "(KV cache fork) instead of a single question")
    _grid_flags(ruler)
    _common(ruler)


def _add_ppl(ppl: argparse.ArgumentParser) -> None:
    ppl.add_argument("--documents", required=True, help="a text file (one document) or JSONL with 'text'")
    ppl.add_argument("--seq-len", type=int, required=True, help="tokens evaluated per document")
    ppl.add_argument("--buckets", type=int, default=8, help="position buckets (default 8)")
    ppl.add_argument("--log-buckets", action="store_true", help="log-spaced position buckets")
    _common(ppl)


_COMMANDS = {
    "niah": ("needle-in-a-haystack grid -> niah_results.json, niah_heatmap.png", _add_niah),
    "ruler": ("RULER's 13 tasks (or --styled) -> ruler_results.json, ruler/<length>/<task>.jsonl", _add_ruler),
    "ppl": ("loss by position -> ppl_by_position.json/.png", _add_ppl),
}


def check_out_dir(out: str, flag: str = "--out") -> None:
    """Create `out` and prove it writable with a probe file, before any model loads (a model can take
    minutes to load; a read-only or misspelled --out must not cost them)."""
    import tempfile

    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag}={out!r}: cannot create the directory ({e.strerror})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_probe"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}={out!r}: not writable ({e.strerror})") from None


def _backend(args: argparse.Namespace):
    """(backend, tokenizer, runtime or None) from the common flags."""
    from megatron_ultralong.eval.megatron_backend import resolve_megatron_checkpoint
    from megatron_ultralong.eval.tokenizer import EvalTokenizer

    dtype = None if args.dtype is None else DTYPES[args.dtype]
    megatron_dir = resolve_megatron_checkpoint(args.model)
    if megatron_dir is None:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise ValueError(f"--model={args.model!r}: neither an HF directory (config.json) nor a Megatron checkpoint")
        if args.tp != 1 or args.cp != 1:
            raise ValueError("--tp/--cp apply to Megatron checkpoints; an HF model runs in one process")
        from megatron_ultralong.eval.backends import HFBackend

        tokenizer = EvalTokenizer.from_path(args.tokenizer or args.model)
        return HFBackend.from_pretrained(args.model, dtype=dtype, device=args.device), tokenizer, None
    tokenizer_path = args.tokenizer
    if tokenizer_path is None:
        # Checkpoints started from an HF model carry its tokenizer files (checkpoint/torch_dist.py).
        from megatron_ultralong.checkpoint.torch_dist import SIDE_DIR

        side = megatron_dir / SIDE_DIR
        if not (side / "tokenizer.json").is_file() and not (side / "tokenizer_config.json").is_file():
            raise ValueError(f"--tokenizer is required: the Megatron checkpoint has no tokenizer in {side}")
        tokenizer_path = str(side)
    tokenizer = EvalTokenizer.from_path(tokenizer_path)
    from megatron_ultralong.eval.megatron_backend import MegatronBackend, init_eval_runtime

    runtime = init_eval_runtime(args.tp, args.cp, args.cp_comm_type, args.device)
    backend = MegatronBackend.from_checkpoint(str(megatron_dir), runtime, dtype,
                                              allow_unverified=args.no_verify_manifest)
    return backend, tokenizer, runtime


def _niah(args, backend, tokenizer) -> str:
    from megatron_ultralong.eval.niah import NiahConfig, run_niah

    cfg = NiahConfig(haystack=args.haystack, samples_per_cell=args.samples, max_new_tokens=args.max_new_tokens,
                     snap_to_sentence=not args.no_snap, seed=args.seed, scorer=args.scorer,
                     over_length=args.over_length)
    trained = backend.trained_length if args.trained_length is None else (args.trained_length or None)
    res = run_niah(backend, tokenizer, args.lengths, args.depths, args.out, cfg, trained_length=trained)
    return f"NIAH mean score {100 * res.mean_score:.1f}%; heatmap: {res.heatmap_path}; results: {res.json_path}"


def _ruler(args, backend, tokenizer) -> str:
    if args.styled:
        from megatron_ultralong.eval.ruler import run_ruler

        bad = [t for t in args.tasks or () if t not in RULER_TASKS]
        if bad:
            raise ValueError(f"--tasks {bad}: --styled tasks are {list(RULER_TASKS)}")
        res = run_ruler(backend, tokenizer, args.lengths, args.out, args.tasks or RULER_TASKS, args.samples or 4,
                        args.seed, max_new_tokens=args.max_new_tokens, split_queries=args.split_queries,
                        over_length=args.over_length)
        return f"RULER-style mean by length {json.dumps(res['mean'])}; results: {res.get('json_path')}"
    from megatron_ultralong.eval.ruler.inputs import RulerInputs
    from megatron_ultralong.eval.ruler.runner import RulerConfig, run_ruler_benchmark

    if args.max_new_tokens is not None or args.split_queries:
        raise ValueError("--max-new-tokens/--split-queries apply to --styled; RULER fixes each task's budget")
    cfg = RulerConfig(lengths=tuple(args.lengths), tasks=tuple(args.tasks or RULER_TASK_NAMES),
                      samples=args.samples or 500, seed=42 + args.seed, scorer=args.scorer,
                      inputs=RulerInputs(args.ruler_essays, args.ruler_squad, args.ruler_hotpotqa,
                                         args.ruler_english_words), save_inputs=args.save_inputs)
    res = run_ruler_benchmark(backend, tokenizer, cfg, args.out, args.over_length)
    return f"RULER {json.dumps(res.get('aggregates', {}))}; results: {res.get('json_path')}"


def _read_documents(path: str, tokenizer) -> list[list[int]]:
    """Plain text (one document) or JSONL with a "text" field per line -> token ids per document."""
    if not os.path.isfile(path):
        raise ValueError(f"--documents={path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            return [tokenizer.encode(f.read())]
        docs = []
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(tokenizer.encode(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"--documents={path!r} line {i}: expected JSON with a 'text' field ({e})") from e
        return docs


def _ppl(args, backend, tokenizer) -> str:
    from megatron_ultralong.eval.perplexity import loss_by_position

    docs = [d for d in _read_documents(args.documents, tokenizer) if len(d) >= args.seq_len]
    if not docs:
        raise ValueError(f"--documents={args.documents!r}: no document has --seq-len {args.seq_len} tokens")
    res = loss_by_position(backend, docs, args.seq_len, args.buckets, args.log_buckets, args.out)
    return f"loss by bucket {[round(x, 3) for x in res['mean_loss']]}; results: {res.get('json_path')}"


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of one command (`mu-eval-<command>`, whose usage line is then what one types), or
    with command=None the module's parser with the three subcommands."""
    if command is not None:
        if command not in _COMMANDS:
            raise ValueError(f"command={command!r}: expected one of {tuple(_COMMANDS)}")
        description, add = _COMMANDS[command]
        parser = argparse.ArgumentParser(prog=f"mu-eval-{command}", description=description)
        add(parser)
        parser.set_defaults(command=command)
        return parser
    parser = argparse.ArgumentParser(prog="python -m megatron_ultralong.eval.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (description, add) in _COMMANDS.items():
        add(sub.add_parser(name, help=description, description=description))
    return parser


def main(argv: Optional[list[str]] = None, command: Optional[str] = None) -> None:
    """`command` pre-selects a subcommand (the mu-eval-* entry points)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command).parse_args(argv)
    from megatron_ultralong.logs import setup_logging

    setup_logging()  # progress, ETA and length warnings from the grid runner (rank 0 only)
    runtime = None
    try:
        check_out_dir(args.out)
        backend, tokenizer, runtime = _backend(args)
        message = {"niah": _niah, "ruler": _ruler, "ppl": _ppl}[args.command](args, backend, tokenizer)
    except ValueError as e:
        print(f"mu-eval-{args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if runtime is not None:
            from megatron_ultralong.parallel.runtime import shutdown_runtime

            shutdown_runtime()
    if backend.is_writer:
        print(message)


def niah_main() -> None:
    main(command="niah")


def ruler_main() -> None:
    main(command="ruler")


def ppl_main() -> None:
    main(command="ppl")


if __name__ == "__main__":
    main()
