"""Tiny inline-SVG charts for the inspect report (no plotting library, no network, no scripts)."""
from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#ad494a")
FONT = 'font-family="system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif"'


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-2:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.2f}".rstrip("0").rstrip(".")


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels that tell neighbouring ticks apart (more decimals when the ticks are close)."""
    labels = [_fmt(t) for t in ticks]
    if len(set(labels)) == len(labels):
        return labels
    for d in range(2, 8):
        labels = [f"{t:.{d}f}" for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step - 1e-9) * step
    out = []
    v = start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 12))
        v += step
    return out


class Axes:
    """A plot area with linear or log10 axes, mapping data to pixels."""

    def __init__(self, width: int, height: int, xlim, ylim, *, logx=False, logy=False, margin=(44, 14, 30, 58)):
        self.w, self.h = width, height
        self.top, self.right, self.bottom, self.left = margin
        self.logx, self.logy = logx, logy
        self.x0, self.x1 = self._t(xlim[0], logx), self._t(xlim[1], logx)
        self.y0, self.y1 = self._t(ylim[0], logy), self._t(ylim[1], logy)
        if self.x1 == self.x0:
            self.x1 = self.x0 + 1
        if self.y1 == self.y0:
            self.y1 = self.y0 + 1

    @staticmethod
    def _t(v, log):
        return math.log10(v) if log else v

    def px(self, x: float) -> float:
        t = (self._t(x, self.logx) - self.x0) / (self.x1 - self.x0)
        return self.left + t * (self.w - self.left - self.right)

    def py(self, y: float) -> float:
        t = (self._t(y, self.logy) - self.y0) / (self.y1 - self.y0)
        return self.h - self.bottom - t * (self.h - self.top - self.bottom)

    def frame(self, title: str, xlabel: str, ylabel: str, xticks=None, yticks=None, xticklabels=None) -> list[str]:
        L, R, T, B = self.left, self.w - self.right, self.top, self.h - self.bottom
        out = [f'<rect x="{L}" y="{T}" width="{R - L}" height="{B - T}" fill="#fff" stroke="#bbb"/>']
        if yticks is None:
            yticks = self._log_ticks(self.y0, self.y1) if self.logy else nice_ticks(self.y0, self.y1)
        ylabels = [_fmt(v) for v in yticks] if self.logy else tick_labels(yticks)
        for v, lab in zip(yticks, ylabels):
            y = self.py(v)
            if T - 0.5 <= y <= B + 0.5:
                out.append(f'<line x1="{L}" x2="{R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
                out.append(f'<text x="{L - 5}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#444">'
                           f'{lab}</text>')
        if xticks is None:
            xticks = self._log_ticks(self.x0, self.x1) if self.logx else nice_ticks(self.x0, self.x1, 8)
        for i, v in enumerate(xticks):
            x = self.px(v)
            if L - 0.5 <= x <= R + 0.5:
                lab = xticklabels[i] if xticklabels else _fmt(v)
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{B}" y2="{B + 4}" stroke="#888"/>')
                out.append(f'<text x="{x:.1f}" y="{B + 16}" font-size="11" text-anchor="middle" fill="#444">'
                           f'{escape(str(lab))}</text>')
        out.append(f'<text x="{(L + R) / 2:.1f}" y="{self.h - 4}" font-size="12" text-anchor="middle" '
                   f'fill="#222">{escape(xlabel)}</text>')
        out.append(f'<text transform="translate(13,{(T + B) / 2:.1f}) rotate(-90)" font-size="12" '
                   f'text-anchor="middle" fill="#222">{escape(ylabel)}</text>')
        out.append(f'<text x="{L}" y="17" font-size="13" font-weight="600" fill="#111">{escape(title)}</text>')
        return out

    @staticmethod
    def _log_ticks(a: float, b: float) -> list[float]:
        lo, hi = math.floor(a), math.ceil(b)
        step = max(1, (hi - lo) // 6)
        return [10.0 ** e for e in range(lo, hi + 1, step)]


def svg(width: int, height: int, parts: list[str], label: str = "") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT} role="img" aria-label="{escape(label)}">' + "".join(parts)
            + "</svg>")


def _lim(vals, pad=0.05, log=False):
    v = [x for x in vals if x is not None and math.isfinite(x) and (x > 0 or not log)]
    if not v:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(v), max(v)
    if log:
        return lo / 10 ** (pad * 4), hi * 10 ** (pad * 4)
    span = (hi - lo) or (abs(hi) or 1.0)
    return lo - pad * span, hi + pad * span


def legend(groups: dict[str, str], x: int, y: int, width: int) -> list[str]:
    out, cx, cy = [], x, y
    for name, color in groups.items():
        w = 16 + 7 * len(name)
        if cx + w > x + width:
            cx, cy = x, cy + 15
        out.append(f'<circle cx="{cx + 4}" cy="{cy - 4}" r="4" fill="{color}"/>'
                   f'<text x="{cx + 11}" y="{cy}" font-size="11" fill="#333">{escape(name)}</text>')
        cx += w + 8
    return out


def scatter(points: list[tuple[float, float | None, str, str]], groups: dict[str, str], *, title: str, xlabel: str,
            ylabel: str, width: int = 560, height: int = 250, band: tuple[float, float] | None = None,
            hlines: tuple[float, ...] = (), logy: bool = False, ylim=None, connect: bool = False) -> str:
    """points: (x, y, group, tooltip). Groups map to colours (shown in a legend)."""
    pts = [p for p in points if p[1] is not None and math.isfinite(p[1]) and (p[1] > 0 or not logy)]
    xs = [p[0] for p in points] or [0, 1]
    ylim = ylim or _lim([p[1] for p in pts] + list(hlines) + (list(band) if band else []), log=logy)
    leg_rows = 1 + sum(16 + 7 * len(g) + 8 for g in groups) // max(1, width - 70)
    top = 44 + 15 * (leg_rows if len(groups) > 1 else 0)
    integer_x = all(float(x).is_integer() for x in xs)
    pad = 0.5 if integer_x else 0.05 * ((max(xs) - min(xs)) or 1.0)
    ax = Axes(width, height + top - 44, (min(xs) - pad, max(xs) + pad), ylim, logy=logy, margin=(top, 14, 30, 58))
    xt = None
    if integer_x:
        xt = [t for t in nice_ticks(ax.x0, ax.x1, 8) if float(t).is_integer()]
    parts = ax.frame(title, xlabel, ylabel, xticks=xt)
    if band:
        y0, y1 = ax.py(max(band[0], ylim[0])), ax.py(min(band[1], ylim[1]))
        if y0 > y1:
            parts.insert(1, f'<rect x="{ax.left}" y="{y1:.1f}" width="{ax.w - ax.left - ax.right}" '
                            f'height="{y0 - y1:.1f}" fill="#2ca02c" fill-opacity="0.08"/>')
    for h in hlines:
        if ylim[0] <= h <= ylim[1]:
            parts.append(f'<line x1="{ax.left}" x2="{ax.w - ax.right}" y1="{ax.py(h):.1f}" y2="{ax.py(h):.1f}" '
                         'stroke="#999" stroke-dasharray="4 3"/>')
    if connect and len(pts) > 1:
        d = " ".join(f"{ax.px(x):.1f},{ax.py(y):.1f}" for x, y, _, _ in pts)
        parts.append(f'<polyline points="{d}" fill="none" stroke="#bbb" stroke-width="1"/>')
    r = 3.2 if len(pts) < 120 else 2.4
    for x, y, g, tip in pts:
        yc = min(max(y, ylim[0]), ylim[1])
        parts.append(f'<circle cx="{ax.px(x):.1f}" cy="{ax.py(yc):.1f}" r="{r}" fill="{groups.get(g, "#555")}" '
                     f'fill-opacity="0.85"><title>{escape(tip)}</title></circle>')
    if len(groups) > 1:
        parts += legend(groups, ax.left, 34, width - ax.left - 10)
    return svg(width, ax.h, parts, title)


def bars(values: list[tuple[str, float | None, str, str]], groups: dict[str, str], *, title: str, xlabel: str,
         ylabel: str, width: int = 1140, height: int = 250, logy: bool = False) -> str:
    """values: (label, value, group, tooltip), drawn left to right in order."""
    vals = [v for _, v, _, _ in values if v is not None and math.isfinite(v) and (v > 0 or not logy)]
    if logy:
        ylim = _lim(vals, log=True)
    else:
        ylim = (0.0, (max(vals) * 1.08) if vals and max(vals) > 0 else 1.0)
    leg_rows = 1 + sum(16 + 7 * len(g) + 8 for g in groups) // max(1, width - 70)
    top = 44 + 15 * (leg_rows if len(groups) > 1 else 0)
    n = max(1, len(values))
    ax = Axes(width, height + top - 44, (-0.5, n - 0.5), ylim, logy=logy, margin=(top, 14, 30, 58))
    parts = ax.frame(title, xlabel, ylabel, xticks=[])
    bw = max(1.0, (ax.w - ax.left - ax.right) / n * 0.8)
    base_y = ax.py(ylim[0])
    for i, (lab, v, g, tip) in enumerate(values):
        if v is None or not math.isfinite(v) or (logy and v <= 0):
            continue
        y = ax.py(min(v, ylim[1]))
        parts.append(f'<rect x="{ax.px(i) - bw / 2:.1f}" y="{y:.1f}" width="{bw:.1f}" '
                     f'height="{max(0.5, base_y - y):.1f}" '
                     f'fill="{groups.get(g, "#555")}"><title>{escape(tip)}</title></rect>')
    if len(groups) > 1:
        parts += legend(groups, ax.left, 34, width - ax.left - 10)
    return svg(width, ax.h, parts, title)


def esd_plot(hist: dict, *, title: str, alpha: float | None, xmin: float | None, n_tail: int | None,
             mp_edge: float | None = None, width: int = 370, height: int = 260) -> str:
    """Log-log histogram of an ESD with the fitted power law p(x) ~ x^-alpha above xmin."""
    edges, dens, n = hist["edges"], hist["density"], hist["n"]
    pos = [d for d in dens if d > 0]
    ylo, yhi = (min(pos), max(pos)) if pos else (1e-3, 1.0)
    fit_pts = []
    if alpha is not None and xmin and n_tail:
        frac = n_tail / n
        xs = [xmin * (edges[-1] / xmin) ** (i / 40) for i in range(41)] if edges[-1] > xmin else [xmin]
        fit_pts = [(x, frac * (alpha - 1) / xmin * (x / xmin) ** (-alpha)) for x in xs]
        ylo = max(min(ylo, min(y for _, y in fit_pts if y > 0)), ylo / 100)  # the line may run off the bottom
        yhi = max(yhi, max(y for _, y in fit_pts))
    ylo = max(ylo, yhi * 1e-9)
    ax = Axes(width, height, (edges[0], edges[-1]), (ylo / 1.5, yhi * 1.5), logx=True, logy=True,
              margin=(30, 10, 30, 52))
    parts = ax.frame(title, "eigenvalue", "density")
    d = []
    for i, v in enumerate(dens):
        x0, x1 = ax.px(edges[i]), ax.px(edges[i + 1])
        y = ax.py(v) if v > 0 else ax.py(ylo / 1.5)
        d.append(f"M{x0:.1f},{ax.py(ylo / 1.5):.1f}V{y:.1f}H{x1:.1f}V{ax.py(ylo / 1.5):.1f}")
    parts.append(f'<path d="{"".join(d)}" fill="#1f77b4" fill-opacity="0.35" stroke="#1f77b4" stroke-width="0.6"/>')
    if fit_pts:
        pl = " ".join(f"{ax.px(x):.1f},{ax.py(max(y, ylo / 1.5)):.1f}" for x, y in fit_pts)
        parts.append(f'<polyline points="{pl}" fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="6 3"/>')
        parts.append(f'<line x1="{ax.px(xmin):.1f}" x2="{ax.px(xmin):.1f}" y1="{ax.top}" y2="{ax.h - ax.bottom}" '
                     'stroke="#d62728" stroke-width="1"/>')
    if mp_edge and edges[0] <= mp_edge <= edges[-1]:
        parts.append(f'<line x1="{ax.px(mp_edge):.1f}" x2="{ax.px(mp_edge):.1f}" y1="{ax.top}" '
                     f'y2="{ax.h - ax.bottom}" stroke="#ff7f0e" stroke-dasharray="3 3"/>')
    lab = []
    if alpha is not None:
        lab.append(f"alpha = {alpha:.2f}, xmin = {_fmt(xmin)}")
    if mp_edge:
        lab.append("orange: MP bulk edge")
    for i, t in enumerate(lab):
        parts.append(f'<text x="{ax.w - ax.right - 4}" y="{ax.top + 14 + 13 * i}" font-size="11" text-anchor="end" '
                     f'fill="{"#d62728" if i == 0 and alpha is not None else "#b35900"}">{escape(t)}</text>')
    return svg(width, height, parts, title)
