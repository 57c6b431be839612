"""`mu-build-dataset` / tools/build_dataset.py: YAML recipe -> Megatron .bin/.idx + report.

    mu-build-dataset --config examples/data/tiny_recipe.yaml [key.sub=value ...] \
        [--workers N] [--skip-bad] [--overwrite] [--output PREFIX]

The flags are shorthands for `workers=N`, `skip_bad=true`, `output.overwrite=true` and
`output.prefix=PREFIX`; any other recipe field is set with a `key.sub=value` override, before or
after the flags. Every failure (bad input, a corrupt or truncated file, an unwritable or full
output directory) exits with status 2 and one line naming the file, line, field or path.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mu-build-dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides")
    parser.add_argument("--workers", type=int, help="tokenizer processes (0: in-process)")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--output", help="output prefix (PREFIX.bin, PREFIX.idx, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    parser.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                        help="when stderr is not a terminal (Slurm logs): seconds between status "
                             "lines (documents, tokens, MB/s, ETA)")
    # Intermixed: `--output X a.b=c` is as valid as `a.b=c --output X`.
    args = parser.parse_intermixed_args(argv)

    from megatron_ultralong.logs import setup_logging

    setup_logging()
    from megatron_ultralong.data.preprocess.builder import BuildTerminated
    from megatron_ultralong.data.preprocess.readers import BadInputError
    from megatron_ultralong.data.preprocess.recipe import load_recipe

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    if args.skip_bad:
        overrides.append("skip_bad=true")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.output:
        overrides.append(f"output.prefix={args.output}")
    try:
        recipe = load_recipe(args.config, overrides)
        from megatron_ultralong.data.preprocess.builder import build_dataset

        report = build_dataset(recipe, progress=False if args.no_progress else None,
                               progress_interval_s=args.progress_interval)
    except (BadInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BuildTerminated as e:
        print("error: terminated by SIGTERM; temporary files removed", file=sys.stderr)
        return int(e.code)
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT); temporary files removed", file=sys.stderr)
        return 130
    except (OSError, EOFError) as e:
        print(f"error: {_os_error_line(e, overrides)}", file=sys.stderr)
        return 2
    out, tok, timing = report["output"], report["tokenizer"], report["timing"]
    blank = report["skipped"]["by_reason"].get("blank line", 0)
    print(f"wrote {out['prefix']}.bin/.idx: {out['documents']:,} documents, {out['tokens']:,} tokens "
          f"({out['dtype']}); tokenizer backend: {tok['backend']}")
    print(f"tokenized {report['input']['tokens']:,} source tokens at "
          f"{timing['tokenize_tokens_per_s']:,.0f} tokens/s with {timing['workers']} worker(s); "
          f"skipped {report['skipped']['total'] - blank} record(s) and {blank} blank line(s); "
          f"total {timing['total_s']:.1f} s")
    if tok.get("spot_mismatches"):
        print(f"warning: {tok['spot_mismatches']} fast-path spot-check mismatch(es); HF ids were "
              "used for those documents, but consider tokenizer.fast_path=off", file=sys.stderr)
    print(f"report: {out['prefix']}.stats.md, {out['prefix']}.lengths.png")
    return 0


def _os_error_line(e: BaseException, overrides: List[str]) -> str:
    """One line naming the path: OSError carries it for open/rename/makedirs, not for a write
    that hits a full disk, so the output prefix is named then."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, OSError) and e.errno is None:
        return str(e)  # raised by this package with its own one-line message
    prefix = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("output.prefix=")),
                  None)
    where = f" (while writing output {prefix})" if prefix else ""
    return f"{type(e).__name__}: {e}{where}"


if __name__ == "__main__":
    sys.exit(main())
