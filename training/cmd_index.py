"""`ace index build | add | remove | merge | publish | rollback | list` (docs/index.md)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from ace_model import index as ix
from ace_model.errors import InputError
from training.cmd_options import add_device_arguments

if TYPE_CHECKING:
    from training.build_index import EmbedOptions


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("index", help="build, refresh and publish the patch index")
    actions = parser.add_subparsers(dest="index_command", required=True)
    _add_build(actions)
    _add_merge(actions)
    _add_add(actions)
    _add_remove(actions)
    publish = actions.add_parser("publish", help="make VERSION the served version")
    publish.add_argument("version")
    _root(publish, "--root")
    publish.add_argument("--keep", type=int, default=ix.DEFAULT_KEEP, help="versions kept on disk")
    publish.set_defaults(func=_publish)
    rollback = actions.add_parser("rollback", help="publish the previously published version again")
    _root(rollback, "--root")
    rollback.set_defaults(func=_rollback)
    listing = actions.add_parser("list", help="versions under a root, the published one marked *")
    _root(listing, "--root")
    listing.set_defaults(func=_list)


def _root(parser: argparse.ArgumentParser, *flags: str) -> None:
    parser.add_argument(*flags, dest="root", required=True, help="index root directory")


def _embedding_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", nargs="+", required=True,
                        help="folders (recursive PNG/JPEG/DICOM), list files or landmark data set dirs")
    parser.add_argument("--metadata", help="CSV with image or image_id, and patient_id columns")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (0 = inline; default: the cores the encoder leaves free, "
                             "inline on <= 4 cores)")
    add_device_arguments(parser)
    parser.add_argument("--publish", action="store_true", help="publish the new version when done")
    parser.add_argument("--keep", type=int, default=ix.DEFAULT_KEEP, help="versions kept on disk")


def _index_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", choices=ix.INDEX_TYPES, default="auto",
                        help="auto: exact flat up to --flat-max patches, IVF-PQ + re-rank beyond")
    parser.add_argument("--flat-max", type=int, default=ix.IndexParams.flat_max_patches)
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4 sqrt(patches))")
    parser.add_argument("--pq-bytes", type=int, default=ix.IndexParams.pq_bytes)
    parser.add_argument("--opq", action=argparse.BooleanOptionalAction, default=ix.IndexParams.opq,
                        help="IVF-PQ: learn an OPQ rotation before PQ")
    parser.add_argument("--nprobe", type=int, default=ix.IndexParams.nprobe, help="default lists probed")
    parser.add_argument("--rerank", type=int, default=ix.IndexParams.rerank,
                        help="IVF-PQ re-ranks k * RERANK candidates exactly")
    parser.add_argument("--chunk-size", type=int, default=256, help="images per resumable chunk")


def _add_build(actions: Any) -> None:
    build = actions.add_parser("build", help="embed a corpus and write a new index version")
    build.add_argument("--encoder", required=True, help="encoder artifact directory")
    _embedding_args(build)
    _index_args(build)
    _root(build, "--out", "--root")
    build.add_argument("--num-shards", type=int, default=None,
                       help="split the embedding between K processes (default: torchrun WORLD_SIZE or 1)")
    build.add_argument("--shard", type=int, default=None, help="this process's shard (default: RANK or 0)")
    build.set_defaults(func=_build)


def _add_merge(actions: Any) -> None:
    merge = actions.add_parser("merge", help="write one version from the chunks of a sharded build")
    merge.add_argument("--encoder", required=True)
    _embedding_args(merge)
    _index_args(merge)
    _root(merge, "--out", "--root")
    merge.set_defaults(func=lambda args: _build(args, merge_only=True))


def _add_add(actions: Any) -> None:
    add = actions.add_parser("add", help="new version = published version + more images")
    add.add_argument("--encoder", help="encoder artifact (default: the one the index was built with)")
    _embedding_args(add)
    _root(add, "--root")
    add.set_defaults(func=_add)


def _add_remove(actions: Any) -> None:
    remove = actions.add_parser("remove", help="new version = published version without some images")
    remove.add_argument("--image-ids", nargs="+", required=True)
    _root(remove, "--root")
    remove.add_argument("--publish", action="store_true")
    remove.add_argument("--keep", type=int, default=ix.DEFAULT_KEEP)
    remove.set_defaults(func=_remove)


def _params(args: argparse.Namespace) -> ix.IndexParams:
    return ix.IndexParams(kind=args.type, flat_max_patches=args.flat_max, nlist=args.nlist,
                          pq_bytes=args.pq_bytes, opq=args.opq, nprobe=args.nprobe, rerank=args.rerank)


def _options(args: argparse.Namespace, merge_only: bool = False) -> EmbedOptions:
    from training.build_index import EmbedOptions

    shards = getattr(args, "num_shards", None) or int(os.environ.get("WORLD_SIZE", "1"))
    shard = getattr(args, "shard", None)
    shard = int(os.environ.get("RANK", "0")) if shard is None else shard
    if not 0 <= shard < shards:
        raise InputError(f"--shard {shard} is outside 0..{shards - 1}")
    return EmbedOptions(batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                        num_shards=1 if merge_only else shards, shard=shard, fp32=args.fp32,
                        local_rank=int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None)


def _build(args: argparse.Namespace, merge_only: bool = False) -> int:
    from training.build_index import run_build

    summary = run_build(args.encoder, args.images, args.root, args.publish, metadata=args.metadata,
                        params=_params(args), options=_options(args, merge_only),
                        chunk_size=args.chunk_size, keep=args.keep, merge_only=merge_only)
    print(summary.text())
    return 0


def _add(args: argparse.Namespace) -> int:
    from training.build_index import run_add

    summary = run_add(args.images, args.root, args.encoder, args.publish, metadata=args.metadata,
                      options=_options(args), keep=args.keep)
    print(summary.text())
    return 0


def _remove(args: argparse.Namespace) -> int:
    version = ix.remove_images(args.root, args.image_ids)
    if args.publish:
        ix.publish(args.root, version, args.keep)
    print(f"version {version}: removed {len(args.image_ids)} images{' (published)' if args.publish else ''}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    ix.publish(args.root, args.version, args.keep)
    print(f"published {args.version}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    print(f"published {ix.rollback(args.root)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    current = ix.current_version(args.root)
    for version in ix.list_versions(args.root):
        manifest = ix.read_manifest(args.root, version)
        mark = "*" if version == current else " "
        print(f"{mark} {version}  {manifest.index_type:5s}  {manifest.num_images:8d} images  "
              f"{manifest.num_patches:10d} patches  encoder {manifest.encoder_fingerprint}")
    return 0
