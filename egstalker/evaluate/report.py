"""The HTML evaluation report: metrics, side-by-side frames, per-frame plots (inline SVG) and a short video.

Everything is written with the standard library, numpy and OpenCV (no plotting library): plots are SVG
polylines, frames are PNGs, the video is an H.264 mp4 of render | ground truth with the held-out audio.

    REPORT_DIR/
      index.html           open in a browser
      frames/NNNNNN.png    render | ground truth | error, for a few evenly spaced frames
      side_by_side.mp4     render | ground truth for the first seconds of the split (with sound)
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from egstalker.configs import atomic_write_text
from egstalker.errors import EgstalkerError

PLOT_WIDTH, PLOT_HEIGHT = 860, 220
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 14, 34


def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    multiples = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = min((m * magnitude for m in multiples if m * magnitude >= raw), default=raw)
    if integer:
        step = max(1.0, round(step))
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def svg_line_plot(series: Sequence[tuple[str, np.ndarray, str]], title: str, y_label: str,
                  x_label: str = "frame", x_offset: int = 0) -> str:
    """An inline SVG line chart. series: (label, [n] values with NaN gaps, CSS colour) per line."""
    values = [np.asarray(v, np.float64) for _, v, _ in series]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    n = max((len(v) for v in values), default=0)
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    lo, hi = lo - pad, hi + pad
    inner_w = PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    inner_h = PLOT_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x_of(i: float) -> float:
        return MARGIN_LEFT + (i / max(n - 1, 1)) * inner_w

    def y_of(v: float) -> float:
        return MARGIN_TOP + (1 - (v - lo) / (hi - lo)) * inner_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" '
             f'viewBox="0 0 {PLOT_WIDTH} {PLOT_HEIGHT}" role="img" aria-label="{html.escape(title)}" '
             'font-family="sans-serif" font-size="11">',
             f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{inner_w}" height="{inner_h}" fill="#fafafa" '
             'stroke="#bbb"/>']
    for tick in _nice_ticks(lo, hi):
        y = y_of(tick)
        parts.append(f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + inner_w}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#e3e3e3"/>')
        parts.append(f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for tick in _nice_ticks(0, max(n - 1, 1), 8, integer=True):
        x = x_of(tick)
        parts.append(f'<text x="{x:.1f}" y="{PLOT_HEIGHT - MARGIN_BOTTOM + 14}" text-anchor="middle">'
                     f'{int(tick) + x_offset}</text>')
    parts.append(f'<text x="{MARGIN_LEFT + inner_w / 2}" y="{PLOT_HEIGHT - 4}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text transform="translate(13 {MARGIN_TOP + inner_h / 2}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(y_label)}</text>')
    for k, ((label, _, colour), v) in enumerate(zip(series, values)):
        segment: list[str] = []
        segments = []
        for i, value in enumerate(v):
            if math.isfinite(value):
                segment.append(f"{x_of(i):.1f},{y_of(value):.1f}")
            elif segment:
                segments.append(segment)
                segment = []
        if segment:
            segments.append(segment)
        for seg in segments:
            if len(seg) == 1:
                x, y = seg[0].split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="1.5" fill="{colour}"/>')
            else:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.4" points="{" ".join(seg)}"/>')
        lx = MARGIN_LEFT + 10 + 150 * k
        parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{MARGIN_TOP + 12}" y2="{MARGIN_TOP + 12}" '
                     f'stroke="{colour}" stroke-width="3"/>')
        parts.append(f'<text x="{lx + 24}" y="{MARGIN_TOP + 16}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def error_image(render: np.ndarray, truth: np.ndarray, scale: float = 4.0) -> np.ndarray:
    """uint8 [H, W, 3] heat map of the per-pixel error (mean absolute difference over channels, x `scale`)."""
    import cv2

    error = np.abs(render.astype(np.int16) - truth.astype(np.int16)).mean(axis=-1)
    grey = np.clip(error * scale, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Concatenate uint8 [H, W, 3] images horizontally with a white gap."""
    h = images[0].shape[0]
    spacer = np.full((h, gap, 3), 255, np.uint8)
    row = []
    for i, image in enumerate(images):
        if i:
            row.append(spacer)
        row.append(image)
    return np.concatenate(row, axis=1)


REPORT_GENERATOR = "egstalker eval"
"""Marks a report's index.html, so a later report may replace that folder's files (and no other folder's)."""


def check_report_dir(report_dir: str | Path) -> None:
    """Refuse (EgstalkerError) a folder that holds files but no egstalker report: writing a report replaces its
    index.html, side_by_side.mp4 and frames/NNNNNN.png, which may be someone's own files (render --frames-dir
    writes that naming)."""
    report_dir = Path(report_dir)
    if report_dir.exists() and not report_dir.is_dir():
        raise EgstalkerError(f"--report {report_dir} is a file; give a folder for the report")
    if not report_dir.is_dir() or not any(report_dir.iterdir()):
        return
    try:
        head = (report_dir / "index.html").read_text(errors="replace")[:2000]
    except OSError:
        head = ""
    # a report's page is marked; one written before the mark has its title
    if f'content="{REPORT_GENERATOR}"' not in head and "<title>egstalker eval" not in head:
        raise EgstalkerError(f"--report {report_dir} holds other files, not an egstalker report; choose a new or "
                             "empty folder (a report replaces index.html, side_by_side.mp4 and frames/)")


def write_report(report_dir: str | Path, summary: dict, per_frame: dict[str, np.ndarray],
                 samples: Sequence[tuple[int, np.ndarray, np.ndarray]], video_name: str | None,
                 title: str) -> Path:
    """Write index.html (and the sample PNGs) into `report_dir`; returns the page's path.

    summary: metric name -> value (shown in a table; floats are rounded).
    per_frame: 'psnr', 'opening_pred', 'opening_true' -> [n] arrays (NaN where unknown); 'frame_ids' -> [n].
    samples: (frame position, render, ground truth) uint8 images for the side-by-side rows.
    video_name: file name of the side-by-side mp4 inside report_dir (or None).
    """
    import cv2

    report_dir = Path(report_dir)
    frames_dir = report_dir / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    for old in frames_dir.glob("*.png"):  # an earlier report's samples: the page would not show them
        if old.stem == "poster" or (old.stem.isdigit() and len(old.stem) == 6):
            old.unlink()
    which = "held-out" if summary.get("split", "val") == "val" else "training"
    rows = []
    scale = max(1, int(round(256 / samples[0][1].shape[0]))) if samples else 1  # show small renders larger
    poster = None
    if samples:
        position, render, truth = samples[0]
        poster = "frames/poster.png"
        cv2.imwrite(str(report_dir / poster), cv2.cvtColor(side_by_side(render, truth), cv2.COLOR_RGB2BGR))
    for position, render, truth in samples:
        name = f"frames/{position:06d}.png"
        image = side_by_side(render, truth, error_image(render, truth))
        cv2.imwrite(str(report_dir / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        psnr_value = per_frame["psnr"][position]
        rows.append(f'<figure><img src="{name}" width="{image.shape[1] * scale}" alt="frame {position}">'
                    f'<figcaption>{which} frame {position} '
                    f'(PSNR {psnr_value:.2f} dB): render | ground truth | error x4</figcaption></figure>')

    def fmt(value) -> str:
        if isinstance(value, float):
            return "n/a" if not math.isfinite(value) else f"{value:.4g}"
        return html.escape(str(value))

    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in summary.items())
    psnr_plot = svg_line_plot([("PSNR", per_frame["psnr"], "#1f6fb4")], "PSNR per frame", "PSNR (dB)")
    mouth_plot = svg_line_plot([("render", per_frame["opening_pred"], "#d9480f"),
                                ("ground truth", per_frame["opening_true"], "#2b8a3e")],
                               "Mouth opening per frame", "opening / eye distance")
    video_width = (2 * samples[0][1].shape[1] + 4) * scale if samples else 512
    poster_attr = f' poster="{poster}"' if poster else ""
    video = (f'<video src="{html.escape(video_name)}" width="{video_width}"{poster_attr} controls muted playsinline '
             'loop preload="metadata"></video>' if video_name else "<p>(no video)</p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{REPORT_GENERATOR}"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin-bottom: 12px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 10px; text-align: left; font-size: 14px; }}
th {{ background: #f1f3f5; font-weight: 600; }}
figure {{ display: inline-block; margin: 0 12px 12px 0; }}
figure img {{ image-rendering: auto; max-width: 100%; }}
figcaption {{ font-size: 12px; color: #555; }}
video {{ max-width: 100%; }}
.row {{ display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="row"><div><h2>Metrics</h2><table>{table}</table>
<p style="font-size:12px;color:#555">Self-reenactment on {which} frames with their own audio and head poses.
PSNR/SSIM/LPIPS on the full frame; LMD = mean lip-landmark distance / eye-corner distance (MediaPipe);
mouth_corr = correlation of mouth opening, render vs ground truth; fps = model frames per second.</p></div>
<div><h2>Render | ground truth</h2>{video}</div></div>
<h2>Per-frame PSNR</h2>
{psnr_plot}
<h2>Mouth opening</h2>
{mouth_plot}
<h2>Frames</h2>
{"".join(rows)}
</body></html>
"""
    path = report_dir / "index.html"
    atomic_write_text(path, page)
    os.chmod(path, 0o644)  # the atomic write's temporary file is private; the page is meant to be shared
    return path
