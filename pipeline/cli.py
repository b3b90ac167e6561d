"""The ``imgpipe`` command (also ``python -m pipeline``): argument parsing and exit codes.

Thin by design: each subcommand parses its flags and calls one function of the
library; it holds no logic of its own. Exit codes: 0 success; 2 bad input
(:class:`~pipeline.errors.UserError`: one line, no traceback); 1 a failure while
running; 130 interrupted. The stdout of train, evaluate, predict, pack, retrain and demo is
one JSON line (the summary); ``--summary FILE`` also writes it to a file. Whatever else is
printed while a command runs goes to stderr: Ray's driver prints its raylet's notes ("N
PYTHON worker processes have been started ...") on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from typing import Any

from pipeline import config, storage
from pipeline.errors import JobFailed, UserError

log = logging.getLogger("imgpipe")


def _add_config_flags(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", metavar="CONFIG", help="YAML config (local path or URI)")
    else:
        p.add_argument("--config", metavar="CONFIG", help="YAML config (storage, ray, ... sections)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def _add_summary_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--summary", metavar="FILE", help="also write the summary JSON to FILE")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    """``--quiet``/``--verbose`` after the subcommand too (SUPPRESS: an absent flag keeps
    the value given before the subcommand)."""
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's own logs and its C++ warnings, and tracebacks of failures")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress output; only the summary line")


def _add_register_flags(p: argparse.ArgumentParser) -> None:
    how = p.add_mutually_exclusive_group()
    how.add_argument("--gate", dest="register_mode", action="store_const", const="gate",
                     help="promote only if it beats the champion on the same holdout by "
                          "registry.min_improvement (the default of train --register)")
    how.add_argument("--promote", dest="register_mode", action="store_const", const="promote",
                     help="make it the champion whatever its score")


def _add_models_actions(p: argparse.ArgumentParser) -> None:
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    m = msub.add_parser("list", help="versions of a model (or all models)",
                        description="A table of the registry's models, or of one model's versions.")
    m.add_argument("name", nargs="?", metavar="NAME", help="a model name (default: every model)")
    m.add_argument("--json", action="store_true", help="print the listing as one JSON object")
    m = msub.add_parser("show", help="one version's metadata",
                        description="One version's metadata: arch, classes, metrics, gate decision, sha256.")
    m.add_argument("ref", metavar="NAME@vN|NAME@champion", help="the version to show")
    m.add_argument("--json", action="store_true", help="print the whole meta.json (config included) as JSON")
    m = msub.add_parser("register", help="register a checkpoint or a run's best checkpoint as NAME@vN",
                        description="Copy a checkpoint's weights and meta (with their sha256) into the "
                                    "registry as the next version of NAME; with --gate or --promote it "
                                    "may become the champion. Registering the same checkpoint again "
                                    "returns the version it already is.")
    m.add_argument("model", metavar="MODEL",
                   help="a checkpoint folder (weights.pt + meta.json) or a training run folder "
                        "(train.storage/<run>: its best checkpoint by val accuracy)")
    m.add_argument("--name", required=True, help="model name in the registry, e.g. photos")
    _add_register_flags(m)
    m.add_argument("--data", metavar="MANIFEST",
                   help="--gate's holdout: the test split of this packed dataset (default: "
                        "data.manifest, else the dataset the model was trained on)")
    m = msub.add_parser("promote", help="make a version the champion")
    m.add_argument("ref", metavar="NAME@vN", help="the version to promote")
    m = msub.add_parser("rollback", help="restore the previous champion")
    m.add_argument("name", metavar="NAME", help="the model whose previous champion comes back")
    for m in msub.choices.values():
        m.add_argument("--registry", help="registry URI (default: registry.uri of the config)")
        _add_config_flags(m)
        _add_output_flags(m)


def _add_submit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, metavar="URL", help="Ray dashboard address, e.g. http://head:8265")
    p.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its outcome")
    p.add_argument("--submission-id", default=None, help="fixed id: a second submission is a no-op")
    p.add_argument("--working-dir", default=None, help="project folder shipped to the cluster (default: this project)")
    p.add_argument("--retry-s", type=float, default=120.0, metavar="S",
                   help="retry a job server that is still starting (HTTP 5xx, dropped connections) for up "
                        "to S seconds until the job is accepted (default: %(default)s; 0: no retries)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ARGS...",
                   help="the imgpipe command to run on the cluster, with its arguments")


def _add_setup_commands(sub: Any) -> None:
    """``init`` and ``config show``: starting a config file, reading every key."""
    p = sub.add_parser("init", help="write a complete, commented config file for a preset",
                       description="Write a config file holding every key with its comment, set up "
                                   "for the preset. photos: fine-tune an ImageNet-pretrained "
                                   "EfficientNet-Lite0 at 224 px; digits: a small CNN at 16 px.")
    p.add_argument("file", nargs="?", metavar="FILE", help="where to write it (default: PRESET.yaml)")
    p.add_argument("--preset", required=True, choices=sorted(config.PRESETS), help="what the config is for")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")

    p = sub.add_parser("config", help="every config key with its default and comment")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    c = csub.add_parser("show", help="print the config as commented YAML",
                        description="Print every config key with its value and comment, as YAML that "
                                    "loads as a config file. Values differing from the defaults say the "
                                    "default.")
    c.add_argument("--defaults", action="store_true", help="the built-in defaults, ignoring --config/--set")
    _add_config_flags(c)
    _add_output_flags(c)


def _add_train_command(sub: Any) -> None:
    p = sub.add_parser("train", help="Ray Train run; prints final metrics as JSON",
                       description="Train on data.manifest with Ray Train; rerun with the same "
                                   "train.run_name to resume. Every config key: imgpipe config show "
                                   "--defaults; a starting file: imgpipe init --preset photos.")
    _add_config_flags(p, positional=True)
    _add_summary_flag(p)
    p.add_argument("--register", action="store_true",
                   help="register the best checkpoint as registry.name@vN at the end, through the gate")
    p.add_argument("--name", default=None, help="with --register: model name (default: registry.name)")
    p.add_argument("--promote", dest="register_mode", action="store_const", const="promote", default="gate",
                   help="with --register: make it the champion whatever its score")


def _add_audit_commands(sub: Any) -> None:
    p = sub.add_parser("audit", help="re-run the dataset audit of a packed dataset; rewrite DST/_report/dataset.html")
    p.add_argument("dataset", metavar="DATASET", help="packed dataset (folder of manifest.json)")
    p.add_argument("--model", metavar="MODEL", help="also rank suspected label errors in val/test with this "
                                                   "model (confident learning; needs the [audit] extra)")
    _add_summary_flag(p)
    _add_config_flags(p)
    p = sub.add_parser("review", help="the N images a model is least sure of, as a Label Studio import and a CSV")
    p.add_argument("--predictions", required=True, metavar="DST", help="a committed `imgpipe predict` output")
    p.add_argument("--k", type=int, required=True, metavar="N", help="how many images to queue")
    p.add_argument("--strategy", choices=("margin", "entropy", "least-confident"), default="margin",
                   help="uncertainty measure over the top-k scores (default: %(default)s)")
    p.add_argument("--output", required=True, metavar="FILE", help="Label Studio tasks JSON to write")
    p.add_argument("--csv", metavar="FILE", help="CSV uri,predicted,score (default: FILE.csv)")
    _add_summary_flag(p)
    _add_config_flags(p)


def _add_learning_curve_command(sub: Any) -> None:
    p = sub.add_parser("learning-curve", help="train on growing stratified subsets: does more data help?",
                       description="Train the config on stratified subsets of data.manifest's training "
                                   "split (same val and test), plot test accuracy against images per "
                                   "class with a power-law fit of the error, and estimate the accuracy "
                                   "at 2x and 10x the data. Rerunning reuses finished points.")
    _add_config_flags(p, positional=True)
    p.add_argument("--fractions", default="0.1,0.25,0.5,1.0", metavar="F,F,...",
                   help="fractions of the training split, each in (0, 1] (default: %(default)s)")
    p.add_argument("--seeds", default="0,1", metavar="S,S,...",
                   help="seeds: each picks its own subsets and trains with train.seed=S (default: %(default)s)")
    p.add_argument("--output", default=None, metavar="OUT",
                   help="folder for subsets, runs and the figure (default: train.storage/learning-curve)")
    _add_summary_flag(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``imgpipe`` parser: global flags and one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="imgpipe",
        description="Image classification at cluster scale on Ray: pack, train, evaluate, predict, registry.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logs and its C++ warnings, and tracebacks of failures")
    parser.add_argument("--quiet", action="store_true", help="no progress output; only the summary line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_setup_commands(sub)

    p = sub.add_parser("demo", help="whole cycle on scikit-learn's digits, on a local Ray instance")
    p.add_argument("--workdir", default="imgpipe-demo", help="folder for the bucket, runs, registry (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help="a smaller, quicker demo: only the first N digits of each class "
                        "(when the workdir has no images yet; default: all 1,797)")
    _add_summary_flag(p)
    _add_config_flags(p)

    p = sub.add_parser("pack", help="list SRC (ImageFolder prefix, CSV/Parquet listing, or shard set) into Parquet shards")
    p.add_argument("src", metavar="SRC",
                   help="images in class folders (PREFIX/<class>/<image>, local or s3://), a CSV or "
                        "Parquet listing with uri,label columns, or an existing shard set to re-split")
    p.add_argument("dst", metavar="DST", help="where the shard set goes (a folder or s3:// prefix)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: by data.shard_mb)")
    p.add_argument("--val", type=float, default=None, help="validation fraction per class (default 0.15)")
    p.add_argument("--test", type=float, default=None, help="test fraction per class (default 0.15)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="store images longer than N px downscaled to N on the long side, re-encoded "
                        "as JPEG quality 90 (default: data.max_side, 0 = as they are)")
    _add_summary_flag(p)
    _add_config_flags(p)

    _add_train_command(sub)
    _add_learning_curve_command(sub)
    _add_audit_commands(sub)

    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a model on a split")
    p.add_argument("--model", required=True, metavar="MODEL", help="NAME@champion, NAME@vN or a checkpoint URI")
    p.add_argument("--data", required=True, metavar="MANIFEST", help="packed dataset (folder of manifest.json)")
    p.add_argument("--split", default="test", help="split of the dataset to score (default: %(default)s)")
    _add_summary_flag(p)
    _add_config_flags(p)

    p = sub.add_parser("predict", help="batch inference into Parquet")
    p.add_argument("--model", required=True, metavar="MODEL", help="NAME@champion, NAME@vN or a checkpoint URI")
    p.add_argument("--input", required=True, metavar="SRC", help="image prefix, listing file, or MANIFEST:split")
    p.add_argument("--output", required=True, metavar="DST")
    p.add_argument("--topk", type=int, default=None, help="top-k labels and scores per image (default 5)")
    p.add_argument("--rows-per-file", type=int, default=None, help="target rows per output file")
    p.add_argument("--skip-existing", action="store_true", default=None,
                   help="score only images not yet scored by this model version in DST")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace DST's committed predictions of another model or top-k (else exit 2)")
    _add_summary_flag(p)
    _add_config_flags(p)

    _add_models_actions(sub.add_parser("models", help="the model registry: list, show, register, promote, rollback"))

    p = sub.add_parser("retrain", help="nightly retraining: new data, warm start, gate, promote, re-score")
    _add_config_flags(p, positional=True)
    p.add_argument("--date", required=True, metavar="YYYY-MM-DD",
                   help="the night to train: reads data.incoming/dt=YYYY-MM-DD/")
    _add_summary_flag(p)

    _add_submit_flags(sub.add_parser("submit", help="run an imgpipe command as a Ray job on a cluster"))
    for name, p in sub.choices.items():
        if name not in ("models", "config"):  # their actions carry the flags
            _add_output_flags(p)
    return parser


# ---------------------------------------------------------------------- handlers
# Each handler imports its stage module when it runs: those pull in torch and Ray
# (seconds), which `imgpipe --help`, `imgpipe models ...` and a bad flag do not need.


def _config(args: argparse.Namespace, extra: list[str] | None = None) -> config.Config:
    """The config from ``--config``/``--set`` plus flag overrides; storage set up from it."""
    overrides = [*getattr(args, "overrides", []), *(extra or [])]
    if args.verbose:
        overrides.append("ray.verbose=true")
    cfg = config.load(getattr(args, "config", None), overrides, weights_norm=_weights_norm)
    storage.configure(config.storage_options(cfg))
    return cfg


def _weights_norm(spec: str, arch: str | None) -> tuple[list[float], list[float]] | None:
    from pipeline.workflows import presets  # deferred: torchvision, for model.pretrained only

    return presets.weights_normalization(spec, arch)


def _flag_overrides(args: argparse.Namespace, **keys: str) -> list[str]:
    """Command-line flags that were given -> ``--set`` style overrides (flag=config key)."""
    out = []
    for flag, key in keys.items():
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    return out


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.workflows import demo  # deferred: trains with torch + Ray (slow to import)

    return demo.run(args.workdir, cfg=_config(args), quiet=args.quiet, per_class=args.per_class)


def _cmd_pack(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.workflows import audit  # deferred: imports Ray Data

    extra = _flag_overrides(args, shard_rows="data.shard_rows", val="data.val_fraction", test="data.test_fraction",
                            max_side="data.max_side")
    return audit.pack(args.src, args.dst, _config(args, extra), seed=args.seed, quiet=args.quiet)


def _cmd_audit(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.workflows import audit  # deferred: imports Ray Data (through packing)

    return audit.run(args.dataset, _config(args), model=args.model, quiet=args.quiet)


def _cmd_review(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.workflows import review  # deferred: reads Parquet with pyarrow

    _config(args)  # storage options
    return review.run(args.predictions, args.k, args.strategy, args.output, args.csv)


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.training import driver  # deferred: imports torch and Ray Train

    cfg = _config(args)
    trained = driver.run(cfg, quiet=args.quiet)
    if not args.register:
        return trained
    from pipeline.workflows import register  # deferred: evaluates with torch + Ray

    name = args.name or cfg.registry.name
    reg = register.register(cfg, trained["best_checkpoint_uri"], name, args.register_mode,
                            holdout_accuracy=trained["test_accuracy"], data=cfg.data.manifest, quiet=args.quiet)
    return {**trained, "registered": reg}


def _cmd_learning_curve(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.workflows import learning_curve  # deferred: trains with torch + Ray

    cfg = _config(args)
    return learning_curve.run(cfg, learning_curve.parse_list(args.fractions, float, "fractions"),
                              learning_curve.parse_list(args.seeds, int, "seeds"), args.output, quiet=args.quiet)


def _cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.inference import evaluate  # deferred: imports torch and Ray Data

    return evaluate.run(args.model, args.data, args.split, _config(args), quiet=args.quiet)


def _cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.inference import predict  # deferred: imports torch and Ray Data

    extra = _flag_overrides(args, topk="predict.topk", rows_per_file="predict.rows_per_file",
                            skip_existing="predict.skip_existing", overwrite="predict.overwrite")
    return predict.run(args.model, args.input, args.output, _config(args, extra), quiet=args.quiet)


def _cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline import registry  # deferred: imports torch (artifact verification)

    cfg = _config(args)  # also points storage at the config's endpoint
    uri = args.registry or cfg.registry.uri
    if args.models_command in ("list", "show"):
        result = registry.list_versions(uri, args.name) if args.models_command == "list" else registry.show(uri, args.ref)
        if args.json:
            return result
        table = registry.format_list(result) if args.models_command == "list" else registry.format_show(result)
        print(storage.redact(table), file=args.stdout, flush=True)
        return None
    if args.models_command == "register":
        from pipeline.workflows import register  # deferred: evaluates with torch + Ray

        cfg.registry.uri = uri
        return register.register(cfg, args.model, args.name, args.register_mode or "none", data=args.data,
                                 quiet=args.quiet)
    if args.models_command == "promote":
        return registry.promote(uri, args.ref)
    return registry.rollback(uri, args.name)


def _cmd_retrain(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.workflows import retrain  # deferred: trains with torch + Ray (slow to import)

    return retrain.run(_config(args), args.date, quiet=args.quiet)


def _cmd_init(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.workflows import presets  # deferred: imports torchvision

    written = presets.write(args.preset, args.file, force=args.force)
    if not args.quiet:
        print(f"init: wrote {written['config']} (preset {args.preset}); next: imgpipe pack SRC DST, set "
              f"data.manifest to DST, then imgpipe train {args.file or args.preset + '.yaml'}",
              file=sys.stderr, flush=True)
    return written


def _cmd_config(args: argparse.Namespace) -> None:
    if args.defaults:
        text = config.render(header="imgpipe config: every key with its built-in default")
    else:
        text = config.render(_config(args), header="imgpipe config: every key, as loaded from "
                             f"{args.config or 'the defaults'} with --set overrides applied")
    print(text, end="", file=args.stdout, flush=True)


def _cmd_submit(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline import submit  # deferred: imports Ray's job client

    rest = args.args[1:] if args.args[:1] == ["--"] else list(args.args)
    return submit.run(args.address, rest, wait=args.wait, submission_id=args.submission_id,
                      working_dir=args.working_dir, quiet=args.quiet, retry_s=args.retry_s)


HANDLERS = {
    "demo": _cmd_demo, "pack": _cmd_pack, "train": _cmd_train, "evaluate": _cmd_evaluate,
    "predict": _cmd_predict, "models": _cmd_models, "retrain": _cmd_retrain, "submit": _cmd_submit,
    "init": _cmd_init, "config": _cmd_config, "audit": _cmd_audit, "review": _cmd_review,
    "learning-curve": _cmd_learning_curve,
}


def _emit(result: Any, summary_path: str | None, out: Any) -> None:
    if result is None:
        return
    result = storage.redact(result)  # a URI's user:password@ never reaches the console or a file
    line = json.dumps(result, sort_keys=True, default=str)
    if summary_path:
        storage.write_bytes(summary_path, (json.dumps(result, indent=2, sort_keys=True, default=str) + "\n").encode())
    print(line, file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # imgpipe's own INFO lines; libraries' (matplotlib's "generated new fontManager", Ray's)
    # only with --verbose
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if not args.verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    args.stdout = sys.stdout  # what a command means to print: its summary, a table, a config
    try:
        with contextlib.redirect_stdout(sys.stderr):  # everything else (Ray's notes included)
            result = HANDLERS[args.command](args)
        _emit(result, getattr(args, "summary", None), args.stdout)
        return 0
    except UserError as e:
        print(f"imgpipe: error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgpipe: interrupted", file=sys.stderr)
        return 130
    except JobFailed as e:
        print(f"imgpipe: failed: {storage.redact(str(e))}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - top level: report the cause, exit 1
        if args.verbose or os.environ.get("IMGPIPE_TRACEBACK"):
            traceback.print_exc()
        else:
            tb = traceback.extract_tb(e.__traceback__)
            where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
            print(f"imgpipe: failed: {type(e).__name__}: {storage.redact(str(e))}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
