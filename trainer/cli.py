"""`loraplex train`: the command line over `loraplex.trainer.train`.

loraplex/cli.py registers `add_parser` and dispatches `train` to `run(args)`, which returns the exit status.
`python -m loraplex.trainer.cli train ...` runs it alone (what `accelerate launch -m` needs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import METHODS, SCHEDULERS, TrainConfig

EPILOG = """\
examples:
  loraplex train --method lora --data train.jsonl --out adapters/
  loraplex train --method mtl_lora --data train.jsonl --eval-data eval.jsonl --out adapters/ --num-b 3
  loraplex train --method hybrid --data train.jsonl --out fused/ --sources adapters/
  accelerate launch --multi_gpu $(which loraplex) train --method r_lora --data train.jsonl --out adapters/

Each single-task method (lora, gift, loratrf) writes one adapter per task, named after the task; the
multi-task methods (mtl_lora, r_lora, hybrid) write one adapter named --name (default: the method) that
lists every task. `loraplex serve --adapter-dir OUT` then serves every task of the data.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` on an argparse subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "train", help="train task adapters on multi-task JSONL", epilog=EPILOG,
        description="Train adapters for every task in a JSONL file ({\"task\", \"prompt\", \"completion\"} per line).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = TrainConfig(method="lora")
    g = p.add_argument_group("what to train")
    g.add_argument("--method", required=True, choices=METHODS, help="adapter family to train")
    g.add_argument("--data", required=True, metavar="TRAIN.jsonl",
                   help='training data: one {"task", "prompt", "completion"} object per line')
    g.add_argument("--out", required=True, metavar="DIR", help="adapter directories are written under DIR")
    g.add_argument("--base-model", default=None, metavar="PATH_OR_HUB_ID",
                   help="base model (default: the embedded default model, no network)")
    g.add_argument("--name", default=None, help="adapter name of mtl_lora / r_lora / hybrid (default: the method)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", default=None, metavar="EVAL.jsonl", help="held-out data (else --eval-fraction of each task)")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="share of each task held out (0: none)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="prompts per evaluation batch")
    g.add_argument("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens,
                   help="greedy generation limit (0: reference length + 4)")
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", "-r", type=int, default=d.rank, help="adapter rank r")
    g.add_argument("--alpha", type=float, default=None, help="scaling numerator (default 2 * rank)")
    g.add_argument("--target-modules", default=d.target_modules,
                   help="comma-separated module types (q_proj,v_proj) or all-linear (default)")
    g.add_argument("--dropout", type=float, default=None,
                   help="the method's training dropout (default: lora/mtl_lora/loratrf/hybrid sources 0.05, r_lora 0.1)")
    g.add_argument("--rslora", dest="use_rslora", action="store_true", help="lora: scaling alpha / sqrt(rank)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 5e-3 on the embedded default model, else 2e-4)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over each task's training rows")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="steps per adapter; overrides --epochs when > 0")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per task per step (a multi-task adapter's step mixes batch-size x tasks)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler, help="learning-rate schedule after warm-up")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0: no clipping")
    g.add_argument("--max-length", type=int, default=d.max_length, help="longest sequence in tokens (0: the model's)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, shuffling and dropout")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device, help="auto: cuda when present")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d.dtype,
                   help="base model dtype (adapters train in float32)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g = p.add_argument_group("mtl_lora")
    g.add_argument("--num-b", type=int, default=d.num_b, help="number of shared up-projections B_i")
    g.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature of the B mixture")
    g.add_argument("--lambda-format", choices=["full", "diagonal"], default=d.lambda_format,
                   help="per-task r x r transform: a full matrix or its diagonal")
    g = p.add_argument_group("r_lora")
    g.add_argument("--heads", type=int, default=d.heads, help="number of B heads")
    g.add_argument("--init-gamma", type=float, default=d.init_gamma, help="gamma of the random multi-head init")
    g.add_argument("--no-offset", dest="offset", action="store_false",
                   help="do not store the init offset correction (then the adapter does not start at the base)")
    g = p.add_argument_group("gift")
    g.add_argument("--share-projections", action="store_true", help="one (phi, psi) for every target module")
    g = p.add_argument_group("loratrf")
    g.add_argument("--filter-bias-init", type=float, default=d.filter_bias_init,
                   help="initial bias of the task filter gate (large: the filter starts open)")
    g = p.add_argument_group("hybrid")
    g.add_argument("--sources", default=None, metavar="DIR",
                   help="fuse the LoRA adapters under DIR instead of training one per task first")
    g.add_argument("--attention-dim", type=int, default=d.attention_dim, help="width of the fusion attention's query/key")
    g.add_argument("--fusion-temperature", type=float, default=d.fusion_temperature,
                   help="softmax temperature of the fusion attention")
    g.add_argument("--fusion-dropout", type=float, default=d.fusion_dropout,
                   help="dropout on the fusion attention scores (training only)")
    g.add_argument("--fusion-lr", type=float, default=None, help="stage-2 learning rate (default: --lr)")
    g.add_argument("--fusion-epochs", type=float, default=None, help="stage-2 epochs (default: --epochs)")
    g.add_argument("--fusion-max-steps", type=int, default=None, help="stage-2 steps (default: --max-steps)")
    g.add_argument("--unfreeze-sources", action="store_true", help="stage 2 also trains the source LoRAs")
    p.set_defaults(command="train")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and k != "extra"})


def run(args: argparse.Namespace) -> int:
    """Train; print where the adapters went and the held-out table. 0 on success, 2 on bad options, data,
    adapters or base model (one line on stderr); anything else propagates with its traceback."""
    from loraplex.adapters import AdapterError
    from loraplex.server.loader import ModelLoadError

    from .data import DataError
    from .evaluate import format_table
    from .run import REPORT_FILE, train

    try:
        cfg = config_from_args(args)
        cfg.check()
        result = train(cfg)
    except (DataError, ValueError, AdapterError, FileNotFoundError, ModelLoadError) as exc:
        print(f"loraplex train: error: {exc}", file=sys.stderr)
        return 2
    for name, path in result.paths.items():
        print(f"saved {name} -> {path}")
    if result.evaluation:
        print(format_table(result.evaluation))
    trained = sum(stage["seconds"] for stage in result.stages)
    print(f"done in {result.seconds:.1f}s ({trained:.1f}s training); report: {Path(cfg.out) / REPORT_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m loraplex.trainer.cli train ...`: the same command without the other subcommands."""
    parser = argparse.ArgumentParser(prog="loraplex")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
