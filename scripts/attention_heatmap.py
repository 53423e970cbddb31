"""Attention heat map of one sentence, saved as a PNG: rows are queries, columns keys, one layer and
one head (or the mean over heads), from ``SentenceEncoder.trace``.

    python scripts/attention_heatmap.py --model MODEL --text "고양이가 창문 밖의 새를 본다." \
        --layer 2 --head mean --output attention.png

Needs matplotlib (``pip install 'minisbert[plot]'``). Hangul labels need a font with Hangul glyphs:
the script looks for NanumGothic / Noto Sans CJK KR / Malgun Gothic / AppleGothic, or takes ``--font
FILE.ttf`` (Debian/Ubuntu: ``apt-get install fonts-nanum``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

KOREAN_FONTS = ("NanumGothic", "NanumBarunGothic", "Noto Sans CJK KR", "Noto Sans KR", "Malgun Gothic",
                "AppleGothic", "UnDotum")
HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]")  # jamo, compatibility jamo, syllables


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder, manifest short name, or hub id")
    p.add_argument("--text", required=True, help="the sentence")
    p.add_argument("--layer", type=int, default=-1, help="block index, negative counts from the end (default -1)")
    p.add_argument("--head", default="mean", help="head index, or 'mean' to average the heads (default)")
    p.add_argument("--output", default="attention.png", help="PNG file to write")
    p.add_argument("--font", help="a .ttf/.otf file with Hangul glyphs (default: look for a Korean font)")
    p.add_argument("--label", help="model name for the title (default: the folder name)")
    p.add_argument("--dpi", type=int, default=100)
    return p.parse_args(argv)


def pick_font(font_manager, path: str | None) -> str | None:
    """Family name of ``path`` or of the first installed Korean font; None if there is none."""
    if path:
        font_manager.fontManager.addfont(path)
        return font_manager.FontProperties(fname=path).get_name()
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in KOREAN_FONTS if name in installed), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
        from matplotlib import font_manager
    except ImportError:
        print("attention_heatmap.py: matplotlib is not installed; install it with "
              "pip install 'minisbert[plot]' (or pip install matplotlib)", file=sys.stderr)
        return 2
    from minisbert import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(args.model)
    (tr,) = encoder.trace([args.text])
    L, H, T, _ = tr.attentions.shape
    if not -L <= args.layer < L:
        print(f"attention_heatmap.py: --layer {args.layer} is out of range: the model has {L} layers", file=sys.stderr)
        return 2
    layer = args.layer % L
    if args.head == "mean":
        weights, which = tr.attentions[layer].mean(dim=0), f"mean of {H} heads"  # (T, T)
    elif args.head.lstrip("-").isdigit() and -H <= int(args.head) < H:
        head = int(args.head) % H
        weights, which = tr.attentions[layer, head], f"head {head}"  # (T, T)
    else:
        print(f"attention_heatmap.py: --head {args.head!r} must be 'mean' or an index below {H}", file=sys.stderr)
        return 2

    family = pick_font(font_manager, args.font)
    if family:
        plt.rcParams["font.family"] = [family, "DejaVu Sans"]
    elif any(HANGUL.search(t) for t in tr.tokens):
        print("attention_heatmap.py: warning: no Korean font found (pass --font, or install NanumGothic, e.g. "
              "apt-get install fonts-nanum); Hangul labels will show as boxes", file=sys.stderr)

    side = min(3.0 + 0.28 * T, 24.0)  # inches: readable labels up to ~75 tokens
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xticks(range(T), tr.tokens, rotation=90, fontsize=9)
    ax.set_yticks(range(T), tr.tokens, fontsize=9)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    label = args.label or Path(str(args.model).rstrip("/")).name
    ax.set_title(f"{label} · layer {layer} of {L} · {which}\n{args.text}",
                 fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=args.dpi)
    plt.close(fig)
    print(f"wrote {args.output}: {T} tokens, layer {layer}, {which}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
