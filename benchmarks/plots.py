"""Pictures for the benchmark report: FID against bits per weight, and sample grids side by side."""
import numpy as np
from PIL import Image, ImageDraw


def _pyplot():
    """matplotlib.pyplot drawing to files only (no display here), imported when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_fid_vs_bits(rows, fp_fid, path):
    """One point per method (rows with bits_per_weight_with_codebook, fid, method); FP as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = {}
    for r in rows:
        families.setdefault(r["method"].split(" ")[0], []).append(r)
    for name, members in families.items():
        ax.scatter([r["bits_per_weight_with_codebook"] for r in members], [r["fid"] for r in members], label=name)
    # labels right of their points; points at one x with close FIDs get labels pushed apart (log10 gap 0.03)
    columns = {}
    for r in rows:
        columns.setdefault(round(r["bits_per_weight_with_codebook"], 2), []).append(r)
    for members in columns.values():
        last = -np.inf
        for r in sorted(members, key=lambda r: r["fid"]):
            x, fid = r["bits_per_weight_with_codebook"], r["fid"]
            last = max(np.log10(fid), last + 0.03)
            ax.annotate(r["method"], (x, fid), xytext=(x + 0.04, 10**last), fontsize=7, va="center",
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
    ax.set_xlim(right=max(r["bits_per_weight_with_codebook"] for r in rows) + 0.5)  # room for the last labels
    ax.axhline(fp_fid, color="gray", linestyle="--", label="full precision")
    ax.set_xlabel("bits per weight (with codebooks / scales)")
    ax.set_ylabel("FID (digits-classifier features, lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_bits_curve(series, fp_fid, path):
    """series {name: [(bits per weight, FID or None: not sampled, noise MSE)]}: FID and noise MSE against bits,
    one line per name."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (name, points) in enumerate(series.items()):
        points, color = sorted(points), f"C{i}"  # one colour per series in both panels
        sampled = [(b, fid) for b, fid, _ in points if fid is not None]
        if sampled:
            left.plot(*zip(*sampled), marker="o", color=color, label=name)
        right.plot([b for b, _, _ in points], [n for _, _, n in points], marker="o", color=color, label=name)
    left.axhline(fp_fid, color="gray", linestyle="--", label="full precision")
    left.set_ylabel("FID (digits-classifier features, lower is better)")
    right.set_ylabel("noise-prediction MSE vs FP (held-out calls)")
    for ax in (left, right):
        ax.set_xlabel("bits per weight (with codebooks / scales)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    _save(fig, path)


COLS, SCALE, PAD, TITLE_H = 10, 3, 2, 18  # side_by_side's grid: samples per row, upscaling, gaps, title band (px)


def side_by_side(panels, path, count=40):
    """panels: [(title, npz path)]; the first `count` samples of each (same seeds), tiled, next to each other."""
    cols, scale, pad, title_h = COLS, SCALE, PAD, TITLE_H
    tiles = []
    for title, npz in panels:
        images = np.load(npz)["arr_0"][:count]  # (count, H, W, 3) uint8
        n, h, w, _ = images.shape
        rows = -(-n // cols)
        canvas = np.full((title_h + rows * (h * scale + pad), cols * (w * scale + pad), 3), 255, np.uint8)
        for i, img in enumerate(images):
            r, c = divmod(i, cols)
            big = img.repeat(scale, 0).repeat(scale, 1)
            y, x = title_h + r * (h * scale + pad), c * (w * scale + pad)
            canvas[y:y + h * scale, x:x + w * scale] = big
        panel = Image.fromarray(canvas)
        ImageDraw.Draw(panel).text((2, 2), title, fill=(0, 0, 0))
        tiles.append(panel)
    gap = 12
    out = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)),
                    (255, 255, 255))
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    out.save(path)
