"""The `gpt2-jax` command line: download, sample, evaluate, encode, export, compare. Bad input exits 2 with one line.

Each command imports what it needs when it runs (JAX only for those that compute), so --help is quick.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Callable, Iterator, Sequence, TextIO

from gpt2_jax.errors import UserError


def _cmd_download(args: argparse.Namespace) -> None:
    from gpt2_jax import storage
    from gpt2_jax.download import download_model

    storage.check_writable(args.models_dir, "--models_dir")  # a missing bucket: one line before any download
    out = download_model(args.model, args.models_dir, base_url=args.base_url, retries=args.retries)
    print(f"downloaded {args.model} to {out}")


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Validate sampling flags before anything is loaded or compiled."""
    from gpt2_jax.sampling import check_settings

    if args.nsamples < 1 or args.batch_size < 1 or args.nsamples % args.batch_size:
        raise UserError(f"--nsamples={args.nsamples} must be a positive multiple of --batch_size={args.batch_size}")
    check_settings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, length=args.length, prefix="--")
    if args.prompt is not None and args.interactive:
        raise UserError("give either --prompt or --interactive, not both")


def cut_at_stop(encoder, ids: Sequence[int], stops: Sequence[str]) -> tuple[str, list[int]]:
    """Text of `ids` cut where the first stop string begins, and the ids wholly before that point."""
    text = encoder.decode(ids)
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    keep = len(ids)
    while keep and len(encoder.decode(ids[:keep])) > cut:
        keep -= 1
    return text[:cut], list(ids[:keep])


def _sample_prompts(args: argparse.Namespace, stdin: TextIO) -> Iterator[str | None]:
    if not args.interactive:
        yield args.prompt
        return
    while True:
        print("Model prompt >>> ", end="", flush=True)
        line = stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def _cmd_sample(args: argparse.Namespace) -> None:
    import jax

    from gpt2_jax import storage
    from gpt2_jax.api import load
    from gpt2_jax.sampling import SAMPLE_HEADER

    _check_sampling_args(args)
    out = storage.path(args.out) if args.out else None
    if out is not None:
        storage.check_writable(out.parent, "--out")  # a missing bucket: one line before the model loads
    model = load(args.model_dir, ema=args.ema, dtype=args.dtype)
    enc, cfg = model.encoder, model.config
    length = args.length or cfg.n_ctx // 2
    if length > cfg.n_ctx:
        raise UserError(f"--length={length} exceeds the model's context of {cfg.n_ctx} tokens")
    stop_ids = [enc.encode(s) for s in args.stop]
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = jax.random.key(seed)
    out_file = open(out, "w", encoding="utf-8") if out is not None and not storage.is_url(out) else None
    written: list[str] = []  # a URL's lines, written whole at the end (a store cannot append)
    try:
        count = 0
        for prompt in _sample_prompts(args, sys.stdin):
            prompt_ids = enc.encode(prompt) if prompt else [enc.eot_token]
            for _ in range(args.nsamples // args.batch_size):
                rng, key = jax.random.split(rng)
                gen = model.generate(prompt_ids, length, batch_size=args.batch_size, rng=key,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     stop_sequences=stop_ids)
                for row, n in zip(gen.tokens, gen.lengths):
                    count += 1
                    text, ids = cut_at_stop(enc, row[:n].tolist(), args.stop)
                    if args.include_prompt and prompt:
                        text = prompt + text
                    if args.json:
                        line = json.dumps({"text": text, "tokens": ids})
                    else:
                        line = SAMPLE_HEADER.format(count) + "\n" + text
                    print(line, flush=True)
                    if out_file:
                        out_file.write(line + "\n")
                    elif out is not None:
                        written.append(line + "\n")
            if not args.json:
                print("=" * 80)
    finally:
        if out_file:
            out_file.close()
        elif out is not None:
            out.write_text("".join(written), encoding="utf-8")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from gpt2_jax import objectives
    from gpt2_jax.api import load

    model = load(args.model_dir, dtype=args.dtype)
    kind = objectives.for_file(args.dataset)  # the objective the file's rows are for, and its evaluation
    if kind == "dpo":
        objective, reference = _pair_objective(args)
    else:
        objective, reference = (objectives.Examples() if kind == "sft" else objectives.NextToken()), None
    options = objectives.EvalOptions(args.window, args.stride, args.batch_size, args.combine, args.encoding,
                                     progress=not args.json)
    result = objective.evaluate_dataset(model, args.dataset, options, reference)
    print(json.dumps(result) if args.json else objective.result_line(result))


def _pair_objective(args: argparse.Namespace) -> tuple[Any, tuple]:
    """gpt2-jax evaluate on preference pairs: the objective with the run's DPO settings (beta, loss type, label
    smoothing and tokenization; flags override them), and the reference: --reference_model, else the run's own
    (resolve.dpo_reference, as its training chose it)."""
    import ml_collections

    from gpt2_jax import dpo
    from gpt2_jax.api import load
    from gpt2_jax.objectives import Preferences
    from gpt2_jax.resolve import dpo_reference
    from gpt2_jax.rundir import RunDir
    from gpt2_jax.weights import find_model_dir

    run = RunDir(find_model_dir(args.model_dir)).saved_config()
    trained = run.get("dpo", {}) if run.get("train", {}).get("objective") == "dpo" else {}
    pick = lambda given, name, default: given if given is not None else trained.get(name, default)  # noqa: E731
    settings = dpo.DPOSettings(beta=float(pick(args.beta, "beta", 0.1)), loss_type=pick(args.loss_type, "loss_type",
                               "sigmoid"), label_smoothing=float(pick(args.label_smoothing, "label_smoothing", 0.0)))
    dpo.check(settings.beta, settings.loss_type, settings.label_smoothing)
    if args.reference_model:
        reference = load(args.reference_model, dtype=args.dtype)
        reference = (reference.config, reference.params)
    elif run:  # the weights the run started from (a LoRA run: its base, adapters off), or its dpo.reference
        config = ml_collections.ConfigDict(run)
        config.model.remat = "none"
        reference = dpo_reference(config, dtype=args.dtype)
    else:
        raise UserError(f"--reference_model is required: {args.model_dir} is not a training run, so the weights it "
                        "started from are not known")
    return Preferences(settings=settings, tokenize=trained.get("tokenize", "apart")), reference


def _cmd_encode(args: argparse.Namespace) -> None:
    from gpt2_jax.data import encode_to_file, encode_to_shards
    from gpt2_jax.encoder import get_encoder
    from gpt2_jax.weights import find_model_dir

    if args.shard_tokens < 0:
        raise UserError(f"--shard_tokens={args.shard_tokens}: must be >= 0 (0: one file)")
    encoder = get_encoder(find_model_dir(args.model_dir))
    if args.shard_tokens:
        written, tokens = encode_to_shards(args.input, args.output, encoder, args.shard_tokens, encoding=args.encoding,
                                           encoding_errors=args.encoding_errors)
        glob = str(written[0]).replace("000000", "*")
        print(f"wrote {len(written)} shard(s) of <= {args.shard_tokens} tokens, {tokens} in all: {written[0]} ... "
              f"{written[-1]} (train on them with --config.data.dataset='{glob}')")
        return
    out = encode_to_file(args.input, args.output, encoder, combine=args.combine, encoding=args.encoding,
                         encoding_errors=args.encoding_errors)
    print(f"wrote {out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from gpt2_jax import storage
    from gpt2_jax.rundir import RunDir, files_dir, is_run_dir, load_run_params
    from gpt2_jax.weights import export_peft, export_transformers, find_model_dir, load_weights

    model_dir = find_model_dir(args.model_dir)
    storage.check_writable(args.out, "--out")  # a missing bucket: one line before the weights load
    hint = ", from a local copy" if storage.is_url(args.out) else ""  # transformers and peft read local files
    if args.adapter_only:  # a LoRA run's adapters alone, in peft's format
        if not is_run_dir(model_dir):
            raise UserError(f"--adapter_only: {model_dir} is not a training run; give a run trained with "
                            "train.lora_rank > 0 (WORKDIR/checkpoint/RUN)")
        config, params = load_run_params(model_dir, keep_adapters=True, ema=args.ema)
        base = RunDir(files_dir(model_dir)).saved_config().get("model", {}).get("name", "")
        out = export_peft(config, params, args.out, base or "gpt2")
        print(f"exported the adapters to {out} (peft: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained("
              f"{base or 'gpt2'!r}), {str(out)!r}){hint})")
        return
    config, params = load_weights(model_dir, ema=args.ema)  # a LoRA run's adapters merged in
    out = export_transformers(config, params, files_dir(model_dir), args.out)
    print(f"exported to {out} (transformers: GPT2LMHeadModel.from_pretrained({str(out)!r}){hint})")


def _cmd_lm_eval(args: argparse.Namespace) -> None:
    from gpt2_jax.harness import run_tasks

    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = run_tasks(args.model_dir, args.tasks, num_fewshot=args.num_fewshot, limit=limit,
                        batch_size=args.batch_size, include_path=args.include_path, output=args.output,
                        dtype=args.dtype)
    from lm_eval.utils import make_table

    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output:
        print(f"wrote lm-eval's results JSON under {args.output}")


def _cmd_hellaswag(args: argparse.Namespace) -> None:
    from gpt2_jax.api import load
    from gpt2_jax.hellaswag import read_items, score
    from gpt2_jax.steps import enable_compilation_cache

    items = read_items(args.file, args.limit)  # a bad file: one line before the model loads
    enable_compilation_cache()
    model = load(args.model_dir, dtype=args.dtype)
    result = score(model.config, model.params, model.encoder, items, batch_size=args.batch_size,
                   progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"hellaswag (llm.c's style) over {result['n']} items: acc {result['acc']:.4f}  "
              f"acc_norm {result['acc_norm']:.4f}")


def _cmd_viz(args: argparse.Namespace) -> None:
    from gpt2_jax.steps import enable_compilation_cache
    from gpt2_jax.viz import write_page

    enable_compilation_cache()
    shown = write_page(args.model_dir, args.dataset, args.out, compare=args.compare, max_tokens=args.max_tokens,
                       worst=args.worst, batch_size=args.batch_size, dtype=args.dtype, encoding=args.encoding,
                       progress=True)
    means = f"mean log p {shown['mean_logprob']:.4f}" + (f" (--compare: {shown['mean_logprob_compare']:.4f})"
                                                         if args.compare else "")
    print(f"wrote {args.out}: {shown['tokens']} tokens, {means}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from gpt2_jax import storage
    from gpt2_jax.report import compare

    if len(args.runs) < 2:
        raise UserError("compare needs at least two runs (WORKDIR/logs/RUN directories or run names)")
    workdir = storage.path(args.workdir)
    def is_log_dir(r: str) -> bool:  # its metrics.jsonl, or (a run in a store) that log's parts
        log = storage.path(r) / "metrics.jsonl"
        return log.is_file() or bool(storage.log_parts(log))

    dirs = [storage.path(r) if is_log_dir(r) else workdir / "logs" / r for r in args.runs]
    out = compare(dirs, storage.path(args.out) if args.out else workdir / "compare")
    print((out / "compare.md").read_text(), end="")
    print(f"wrote {out}/compare.md, compare.png and compare.json")


def _cmd_profile_summary(args: argparse.Namespace) -> None:
    from gpt2_jax.profiling import summary

    print(summary(args.directory, top=args.top))


class _ShowDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, where the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if "default" in text or unset or not action.option_strings:  # `is`: 0 and 0.0 are defaults to show
            return text
        return f"{text} (default: %(default)s)"


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """--model_dir and --dtype, as every command that reads a model takes them."""
    p.add_argument("--model_dir", default="models/124M",
                   help="a model or run directory, or a cached hub id (gpt2, ...)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from gpt2_jax.download import DEFAULT_BASE_URL

    parser = argparse.ArgumentParser(prog="gpt2-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=_ShowDefaults)

    p = sub.add_parser("download", help="download a released GPT-2 (124M, 355M, 774M, 1558M)")
    p.add_argument("model", help="124M, 355M, 774M or 1558M")
    p.add_argument("--models_dir", default="models", help="where <model>/ is created: a directory or a URL "
                   "(gs://BUCKET/models)")
    p.add_argument("--base_url", default=DEFAULT_BASE_URL, help="server holding <model>/<file>")
    p.add_argument("--retries", type=int, default=5, help="retries per file, resuming each time")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("sample", help="generate text (conditional, interactive or unconditional)")
    _model_arguments(p)
    p.add_argument("--prompt", help="text to continue (default: unconditional, from <|endoftext|>)")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--nsamples", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch_size", type=int, default=1, help="samples generated at once; divides --nsamples")
    p.add_argument("--length", type=int, default=None, help="tokens to generate (default n_ctx/2)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; lower is more deterministic")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0 = off, 1 = greedy)")
    p.add_argument("--top_p", type=float, default=0.0, help="nucleus sampling: the smallest set of tokens with "
                   "probability >= p, p in [0, 1] (0 = off); > 0 overrides --top_k")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one)")
    p.add_argument("--stop", action="append", default=[], help="end a sample where this text appears (repeatable)")
    p.add_argument("--include_prompt", action="store_true", help="print the prompt before each sample")
    p.add_argument("--json", action="store_true", help='one {"text", "tokens"} JSON object per sample per line')
    p.add_argument("--out", help="also write the samples to this file (a path or a URL: gs://...)")
    p.add_argument("--ema", action="store_true", help="a training run's moving average of its weights "
                   "(train.ema_decay) instead of its weights")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("evaluate", help="mean next-token loss and perplexity on a dataset")
    _model_arguments(p)
    p.add_argument("--dataset", required=True, help="text file, directory, glob or .npz; or .jsonl "
                   "prompt/completion examples (the loss on the completions), or prompt/chosen/rejected pairs (DPO)")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default n_ctx)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the window, "
                   "no overlap); smaller: each token scored with at least window - stride tokens before it")
    p.add_argument("--batch_size", type=int, default=8, help="windows per batch")
    p.add_argument("--combine", type=int, default=50000, help="characters per chunk when encoding text")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the dataset files")
    p.add_argument("--json", action="store_true", help='print {"loss", "perplexity", "tokens"} (pairs: the DPO loss '
                   "and metrics) as JSON")
    p.add_argument("--reference_model", default=None, help="pairs: the DPO reference (default: the weights the run "
                   "in --model_dir started from)")
    p.add_argument("--beta", type=float, default=None, help="pairs: DPO's beta (default: the run's, else 0.1)")
    p.add_argument("--loss_type", default=None, help="pairs: sigmoid, ipo, hinge or robust (default: the run's, else "
                   "sigmoid)")
    p.add_argument("--label_smoothing", type=float, default=None, help="pairs, robust loss: the flipped fraction "
                   "(default: the run's, else 0)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("lm-eval", help="benchmark tasks through EleutherAI's lm-evaluation-harness (pip install -e "
                       "'.[eval]')")
    _model_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (lambada_openai,hellaswag,...)")
    p.add_argument("--num_fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="at most N examples per task (< 1: that fraction)")
    p.add_argument("--batch_size", type=int, default=8, help="requests scored at once (a multiple of the devices)")
    p.add_argument("--include_path", default=None, help="a folder of task YAMLs to add, as lm-eval's own flag")
    p.add_argument("--output", default=None, help="write lm-eval's results JSON (and samples) under this folder")
    p.set_defaults(func=_cmd_lm_eval)

    p = sub.add_parser("hellaswag", help="HellaSwag as llm.c scores it, from its validation jsonl on disk")
    _model_arguments(p)
    p.add_argument("--file", required=True, help="HellaSwag's hellaswag_val.jsonl (as llm.c's dev/data/hellaswag.py "
                   "downloads it)")
    p.add_argument("--limit", type=int, default=None, help="score the first N items only (default: all)")
    p.add_argument("--batch_size", type=int, default=8, help="items scored at once (4 rows each)")
    p.add_argument("--json", action="store_true", help='print {"acc", "acc_norm", "n"} as JSON')
    p.set_defaults(func=_cmd_hellaswag)

    p = sub.add_parser("viz", help="an HTML page of a text coloured token by token by a model's log-probabilities (or "
                       "two models' difference)")
    _model_arguments(p)
    p.add_argument("--compare", default=None, help="a second model (same vocabulary): colour by log p(A) - log p(B)")
    p.add_argument("--dataset", required=True, help="a text file")
    p.add_argument("--out", required=True, help="the HTML page to write (self-contained: open it in any browser)")
    p.add_argument("--max_tokens", type=int, default=2048, help="show the text's first N tokens")
    p.add_argument("--worst", type=int, default=20, help="list the N worst tokens (lowest log p, or most negative "
                   "difference)")
    p.add_argument("--batch_size", type=int, default=8, help="windows of the model's context scored at once")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the dataset file")
    p.set_defaults(func=_cmd_viz)

    p = sub.add_parser("encode", help="pre-encode a dataset to .npz (as the original encode.py), flat .bin or llm.c "
                       "token shards")
    p.add_argument("input", help="text file, directory (recursive) or glob")
    p.add_argument("output", help="OUT.npz (one array per chunk) or OUT.bin (flat tokens, memory-mapped; with "
                   "--shard_tokens, the shards OUT_000000.bin, ...)")
    p.add_argument("--model_dir", default="models/124M", help="directory holding the vocabulary")
    p.add_argument("--combine", type=int, default=50000, help="concatenate files into chunks of >= N characters")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the input files")
    p.add_argument("--encoding_errors", default="strict", help="strict, or replace to substitute bad bytes")
    p.add_argument("--shard_tokens", type=int, default=0, help="> 0: llm.c-format shards of at most N tokens "
                   "(OUT_000000.bin, ...; --combine does not apply) instead of one OUT.bin; 0: one file")
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("compare", help="one table and plot of several training runs, by the settings that differ")
    p.add_argument("runs", nargs="+", help="WORKDIR/logs/RUN directories, or run names under --workdir")
    p.add_argument("--workdir", default=".", help="where run names are looked up (WORKDIR/logs/RUN)")
    p.add_argument("--out", default=None, help="output directory (default WORKDIR/compare)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("export", help="write a model in transformers' layout (config.json + model.safetensors)")
    p.add_argument("--model_dir", required=True, help="a model or run directory, or a cached hub id (gpt2, ...)")
    p.add_argument("--out", required=True, help="output directory (a path or a URL: gs://...)")
    p.add_argument("--adapter_only", action="store_true", help="a LoRA run: its adapters in peft's format "
                   "(adapter_config.json + adapter_model.safetensors) instead of the merged model")
    p.add_argument("--ema", action="store_true", help="a training run's moving average of its weights "
                   "(train.ema_decay) instead of its weights")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("profile-summary", help="the top ops by time of a profiler trace (a run's profile.start_step "
                       "window, or any jax.profiler trace)")
    p.add_argument("directory", help="WORKDIR/logs/RUN/profile (a path or a URL), or any folder holding a trace")
    p.add_argument("--top", type=int, default=16, help="ops listed, by time")
    p.set_defaults(func=_cmd_profile_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `gpt2-jax` and `python -m gpt2_jax`."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.func
    if args.command in ("sample", "evaluate", "lm-eval"):  # those that compile: a second launch loads the first's
        from gpt2_jax.steps import enable_compilation_cache

        enable_compilation_cache()
    try:
        run(args)
    except UserError as e:
        print(f"gpt2-jax {args.command}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
