"""``segdist convert-t7 model.t7 out.safetensors``: an original DeepMask/SharpMask to a checkpoint."""

from __future__ import annotations

import argparse

HELP = "convert an original DeepMask/SharpMask model.t7 to a segdist checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the original model.t7 (any fsspec URI), e.g. the released "
                                       "deepmask/model.t7 or sharpmask/model.t7")
    parser.add_argument("out", help="output checkpoint URI (safetensors + JSON metadata), e.g. "
                                    "sharpmask.safetensors or s3://bucket/models/sharpmask.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    from segdist.errors import ConfigError
    from segdist.models.checkpoint import save_checkpoint
    from segdist.models.deepmask import count_parameters
    from segdist.models.t7 import load_t7
    from segdist.storage import exists

    if exists(args.out) and not args.overwrite:
        raise ConfigError(f"{args.out} exists; pass --overwrite to replace it")
    converted, digest = load_t7(args.source)
    metadata = {
        "converted_from": "t7",
        "source": args.source,
        "source_sha256": digest,
        "original_kind": "nn.SharpMask" if converted.kind == "sharpmask" else "nn.DeepMask",
        "original_config": converted.original_config,
    }
    save_checkpoint(converted.model, args.out, metadata)
    s = converted.settings
    print(f"{args.out}: {converted.kind} ({s['arch']}, layout {s['layout']}, i_sz {s['i_sz']}, "
          f"o_sz {s['o_sz']}{', km ' + str(s['km']) if 'km' in s else ''}), "
          f"{count_parameters(converted.model):,} parameters, from {args.source} "
          f"(sha256 {digest[:12]})")
    return 0
