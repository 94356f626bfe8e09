"""``cpsam train``: fine-tune (or train from scratch) on a folder of image/label pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..network import PRESETS, CPSAMNet, NetConfig, get_config
from ..segment import load_model
from ..training import train
from ..training.loop import load_training_state


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model on labelled images",
        description=(
            "Train on a folder of <id>_img.tif images with <id>_masks.tif integer labels. The "
            "starting model is validated first; the output holds the best validated weights and "
            "the log compares base vs final vs best. A killed run continues with --resume."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--train", required=True, type=Path, help="folder of training image/label pairs")
    p.add_argument("--val", type=Path, default=None, help="folder of validation pairs")
    p.add_argument("--model", default=None,
                   help="starting model: a file, a registry name, or a preset name (tiny, small, "
                        "vit_b, vit_l ...) for a randomly initialised network; default: the default model")
    p.add_argument("--out", required=True, type=Path, help="model file to write")
    p.add_argument("--recipe", default="finetune", help="finetune, full or shipped")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--nimg-per-epoch", type=int, default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--layer-drop", type=float, default=None,
                   help="skip probability of the deepest encoder block in training (recipe: 0.4, "
                        "the paper's; use the starting model's own, e.g. 0.1 for the shipped small model)")
    p.add_argument("--min-masks", type=int, default=None, help="skip images with fewer masks")
    p.add_argument("--no-val-ap", action="store_true", help="validate the loss only (faster)")
    p.add_argument("--resume", action="store_true", help="continue the run of --out")
    p.add_argument("--img-suffix", default="_img")
    p.add_argument("--mask-suffix", default="_masks")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", type=Path, default=None, help="JSON-lines log (default <out>.run/log.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def start_network(model: str | None, seed: int = 0):
    """The network to start from: a preset (random init), a file, or a registry name."""
    import torch

    if model in PRESETS:
        torch.manual_seed(seed)
        return CPSAMNet(get_config(model)), f"preset:{model}"

    m = load_model(model, device="cpu", dtype="fp32")
    return m.net, str(m.info.get("path", m.name))


def run(args) -> int:
    state = args.out.parent / (args.out.name + ".run") / "state.pt"
    if args.resume and state.exists():
        # the weights come from the saved state; only the network's size is needed here

        st = load_training_state(state)
        net, start = CPSAMNet(NetConfig.from_dict(st["config"])), st.get("start_model", "resumed")
    else:
        net, start = start_network(args.model, args.seed)
    res = train(
        net, args.train, args.val, recipe=args.recipe, out=args.out, resume=args.resume,
        epochs=args.epochs, lr=args.lr, seed=args.seed, device=args.device, log=args.log,
        batch_size=args.batch_size, nimg_per_epoch=args.nimg_per_epoch, val_every=args.val_every,
        min_masks=args.min_masks, layer_drop=args.layer_drop, val_ap=not args.no_val_ap,
        img_suffix=args.img_suffix, mask_suffix=args.mask_suffix, progress=not args.quiet,
        meta={"start_model": start},
    )
    print(res.report())
    return 130 if res.stopped else 0
