#!/usr/bin/env python
"""Turn the GPU run's ``gpu.json`` (and ``log.jsonl``) into the GPU table of docs/benchmarks.md.

    python scripts/gpu_results_to_docs.py /work/.device/.../gpu.json [--log .../log.jsonl]

Replaces the text between ``<!-- gpu-table:start -->`` and ``<!-- gpu-table:end -->`` in
``docs/benchmarks.md`` (``--print`` only prints it) and copies ``gpu.json`` to
``benchmarks/results/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"


def _f(v, fmt: str = "{:.2f}", none: str = "–") -> str:
    return none if v is None else fmt.format(v)


def table(res: dict, log: list[dict] | None = None) -> str:
    """Markdown for one GPU run."""
    lines = [f"Measured on **{res.get('device')}** on {res.get('date')} (torch {res.get('torch')}, "
             f"{res.get('reference')}), ours and the reference in one process, same device, same "
             f"random ViT-L weights (depth {res.get('depth')}), batch {res.get('batch_size')}. Ratios "
             "are reference time / our time (> 1: we are faster). Raw figures: "
             "`benchmarks/results/gpu.json`.", ""]
    dt = "fp32" if str(res.get("device", "")).startswith("cpu") else "bf16"
    lines += ["| what | reference | ours | ratio | note |", "|---|---|---|---|---|"]
    e = res.get("end_to_end") or {}
    if e:
        lines.append(f"| end to end, {' + '.join(e.get('images', []))}, {dt} | "
                     f"{e['reference']['seconds']:.2f} s | {e['ours']['seconds']:.2f} s | "
                     f"**{e['speedup']:.2f}x** | peak GPU memory {_f(e['reference'].get('peak_memory_gb'))}"
                     f" / {_f(e['ours'].get('peak_memory_gb'))} GB |")
    enc = res.get("encoder") or {}
    if enc:
        share = res.get("encoder_share_of_peak")
        rf, us = enc["reference"], enc["ours"]
        lines.append(f"| encoder alone, {enc['tiles']} tiles of 256² | {rf['tiles_per_s']:.3g} tiles/s "
                     f"({rf['tflops']:.3g} TFLOP/s) | {us['tiles_per_s']:.3g} tiles/s ({us['tflops']:.3g} "
                     f"TFLOP/s) | **{enc['speedup']:.2f}x** | {_f(share, '{:.0%}')} of the measured {dt} "
                     f"peak ({_f(res.get('peak_tflops'), '{:.3g}')} TFLOP/s); "
                     f"{enc['flop_per_tile'] / 1e12:.3g} TFLOP per tile |")
    d = res.get("dynamics") or {}
    for key, name in (("masks_to_flows", "masks → flows"), ("flows_to_masks", "flows → masks (flow QC)")):
        row = d.get(key)
        if row:
            note = f"{d.get('image')}"
            if "identical" in row:
                note += ", masks identical" if row["identical"] else ", masks differ"
            if "mean_cosine" in row:
                note += f", mean cosine {row['mean_cosine']:.6f}"
            lines.append(f"| {name}, GPU | {row['reference_s']:.3f} s | {row['ours_s']:.3f} s | "
                         f"**{row['speedup']:.1f}x** | {note} |")
    o = res.get("oom") or {}
    if o:
        ours, ref = o.get("ours", {}), o.get("reference", {})
        ref_txt = ("finished" if ref.get("finished") else f"failed: {ref.get('error', '')[:80]}"
                   if ref.get("finished") is False else ref.get("note", "–"))
        lines.append(f"| batch {o.get('batch_size')} on a {o.get('image')} image, GPU memory capped at "
                     f"{o.get('memory_cap_gb', '–')} GB | {ref_txt} | finished with batch "
                     f"{ours.get('batch_used')} in {_f(ours.get('seconds'))} s | | "
                     f"peak {_f(ours.get('peak_memory_gb'))} GB |")
    m = res.get("masks") or {}
    if m:
        same = sum(r["identical"] for r in m["images"])
        lines.append(f"| masks, shipped model through both pipelines ({m.get('dtype')}) | | | | "
                     f"{same} of {len(m['images'])} images identical label for label; "
                     + ", ".join(f"{r['image']}: {r['pixels_equal']:.4%} px equal" for r in m["images"])
                     + " |")
    if res.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in res["errors"].items())]
    if log:
        final = next((r["final"] for r in reversed(log) if "final" in r), None)
        if final:
            ap = final.get("val_ap50") or {}
            best = max(ap, key=lambda k: ap[k]["mean"]) if ap else None
            lines += ["", f"Training (scripts/train_gpu.py): {final['samples']:,} samples in "
                      f"{final['train_seconds']:.0f} s ({final['samples_per_s']:.0f}/s), validation loss "
                      f"{_f(final.get('val_loss'), '{:.4f}')}"
                      + (f"; validation AP@0.5 at flow threshold {best}: mean {ap[best]['mean']:.3f} ("
                         + ", ".join(f"{g} {v:.3f}" for g, v in ap[best]["groups"].items()) + ")"
                         if best else "") + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gpu_json", type=Path)
    ap.add_argument("--log", type=Path, default=None,
                    help="the training log.jsonl (default: beside gpu.json)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--print", action="store_true", help="print the table; change no file")
    args = ap.parse_args(argv)
    res = json.loads(args.gpu_json.read_text())
    log_path = args.log or args.gpu_json.with_name("log.jsonl")
    log = None
    if log_path.is_file():
        log = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    text = table(res, log)
    if args.print:
        print(text)
        return 0
    doc = args.docs.read_text()
    if START not in doc or END not in doc:
        print(f"{args.docs} has no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = doc.split(START, 1)
    tail = rest.split(END, 1)[1]
    new = f"{head}{START}\n{text}\n{END}{tail}"
    tmp = args.docs.with_name(f".{args.docs.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, args.docs)
    dest = ROOT / "benchmarks" / "results" / "gpu.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if args.gpu_json.resolve() != dest.resolve():
        shutil.copyfile(args.gpu_json, dest)
    print(f"updated {args.docs} and {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
