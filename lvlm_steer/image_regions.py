"""Pixel-space geometry for input-refining methods (CARVE, AGLA): score maps, region masks, crops.

Pure functions on tensors, numpy arrays and PIL images, with no model knowledge, so they can be tested on
synthetic maps. A score map is assembled from per-token grids (each grid covers a box of the image; `tile_boxes`
places an adapter's image-token tiles in their image, `tile_score_map` lays per-cell scores out on them), the
top fraction of pixels is kept, connected regions are ranked by their summed score, and the image is masked,
cropped to the kept regions' bounding box and scaled back to its size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lvlm_steer.errors import SteeringError

Box = tuple[float, float, float, float]  # (top, left, bottom, right) as fractions of the image's height/width
WHOLE_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)


def score_map(grids: Sequence[tuple[torch.Tensor, Box]], size: tuple[int, int]) -> torch.Tensor:
    """(H, W) float32 sum of each (rows, cols) grid upsampled bilinearly onto its box of a ``size`` = (W, H) image.

    Bilinear resizing is linear, so resizing a sum of grids equals summing the resized grids: callers may
    combine steps and layers first and resize once.
    """
    width, height = size
    out = torch.zeros(height, width, dtype=torch.float32)
    for grid, (top, left, bottom, right) in grids:
        y0, y1 = _span(top, bottom, height)
        x0, x1 = _span(left, right, width)
        up = torch.nn.functional.interpolate(
            grid.float()[None, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False
        )
        out[y0:y1, x0:x1] += up[0, 0]
    return out


def tile_boxes(tiles: list) -> list[Box | None]:
    """Where each grid tile sits in its image; None for crops whose place the tokens do not tell (skipped)."""
    placed = [t for t in tiles if t.tile_row is not None and t.tile_col is not None]
    n_rows = max((t.tile_row for t in placed), default=0) + 1
    n_cols = max((t.tile_col for t in placed), default=0) + 1
    unplaced_crops = sum(1 for t in tiles if t.kind == "tile" and t.tile_row is None)
    boxes: list[Box | None] = []
    for t in tiles:
        if t.tile_row is not None and t.tile_col is not None:
            r, c = t.tile_row, t.tile_col
            boxes.append((r / n_rows, c / n_cols, (r + 1) / n_rows, (c + 1) / n_cols))
        elif t.kind == "tile" and unplaced_crops > 1:
            boxes.append(None)
        else:
            boxes.append(WHOLE_IMAGE)
    if all(b is None for b in boxes):
        raise SteeringError("carve: the adapter cannot place this image's crops in the image; no grid to map")
    return boxes


def tile_score_map(cells: torch.Tensor, tiles: list, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) pixel score map of per-cell scores (tiles' cells in order, row-major) laid out on the tiles' boxes."""
    grids, start = [], 0
    for tile, box in zip(tiles, tile_boxes(tiles), strict=True):
        n = tile.rows * tile.cols
        if box is not None:
            grids.append((cells[start : start + n].reshape(tile.rows, tile.cols), box))
        start += n
    return score_map(grids, size)


def _span(lo: float, hi: float, n: int) -> tuple[int, int]:
    a = min(n - 1, max(0, round(lo * n)))
    return a, max(a + 1, min(n, round(hi * n)))


def top_fraction(score: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask of the pixels at or above the (1 - p) quantile: the top ``p`` fraction (ties kept)."""
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    flat = score.flatten()
    keep = max(1, math.ceil(p * flat.numel()))
    threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values
    return score >= threshold


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a 2-D bool mask: (labels, n) with labels 1..n and 0 for background.

    Scanline labelling: each row's runs of True are nodes, runs that overlap in adjacent rows are joined
    with a union-find, so the work grows with the number of runs, not pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    runs: list[tuple[int, int, int]] = []  # (row, start, end)
    row_runs: list[range] = []
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    for y in range(mask.shape[0]):
        starts = np.flatnonzero(edges[y] == 1)
        ends = np.flatnonzero(edges[y] == -1)
        first = len(runs)
        runs += [(y, int(s), int(e)) for s, e in zip(starts, ends, strict=True)]
        row_runs.append(range(first, len(runs)))
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, mask.shape[0]):
        above, here = row_runs[y - 1], row_runs[y]
        i, j = above.start, here.start
        while i < above.stop and j < here.stop:
            _, s1, e1 = runs[i]
            _, s2, e2 = runs[j]
            if s1 < e2 and s2 < e1:  # overlapping columns: 4-connected
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if e1 <= e2:
                i += 1
            else:
                j += 1
    labels = np.zeros(mask.shape, dtype=np.int32)
    ids: dict[int, int] = {}
    for k, (y, s, e) in enumerate(runs):
        root = find(k)
        labels[y, s:e] = ids.setdefault(root, len(ids) + 1)
    return labels, len(ids)


def keep_regions(score: torch.Tensor, mask: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Rank the connected regions of ``mask`` by summed score; keep max(k, int(p * regions)) (all if fewer)."""
    labels, n = label_regions(mask.cpu().numpy())
    if n == 0:
        return mask.clone()
    sums = np.bincount(labels.ravel(), weights=score.cpu().double().numpy().ravel(), minlength=n + 1)[1:]
    count = min(n, max(k, int(n * p)))
    kept = np.argsort(-sums, kind="stable")[:count] + 1
    return torch.from_numpy(np.isin(labels, kept))


def region_mask(score: torch.Tensor, p: float = 0.2, k: int = 3) -> torch.Tensor:
    """CARVE's mask: the top ``p`` fraction of pixels, then the best ``k`` (or more) connected regions."""
    return keep_regions(score, top_fraction(score, p), k, p)


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixel box (right/bottom exclusive) of the True pixels; the whole mask if none."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return 0, 0, mask.shape[1], mask.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass
class Refined:
    """A refined image with what produced it: the pixel score map, the kept mask and the crop box."""

    image: Image.Image
    mask: torch.Tensor
    score: torch.Tensor
    box: tuple[int, int, int, int]


def refine_image(image: Image.Image, score: torch.Tensor, p: float = 0.2, k: int = 3) -> Refined:
    """Mask ``image`` to the kept regions of ``score`` (H, W), crop to their bounding box, upscale (Lanczos)."""
    width, height = image.size
    if tuple(score.shape) != (height, width):
        raise ValueError(f"score map {tuple(score.shape)} does not match the image's (H, W) = {(height, width)}")
    mask = region_mask(score, p, k)
    rgb = np.asarray(image.convert("RGB"))
    masked = Image.fromarray((rgb * mask.numpy()[..., None]).astype(np.uint8))
    box = bounding_box(mask)
    refined = masked.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return Refined(refined, mask, score, box)
