"""Dynamics of the reference data itself, for evaluate to compare models against: the self-diffusion
coefficient from the data's trajectory, and the velocity autocorrelation function (VACF) from its dense segment.

Both are measured the way evaluate measures a model's (:mod:`stable_md.evaluation`), with the same functions
of :mod:`stable_md.observables`, so a model and its data differ only in the dynamics. Units: fs, Å, m²/s.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from stable_md.data import DataError, Dataset
from stable_md.observables import diffusion_coefficient, mean_squared_displacement, velocity_autocorrelation
from stable_md.reporting import DisplacementRecorder


def reference_diffusion(data: Dataset, min_frames: int = 20) -> Optional[dict]:
    """The heavy atoms' self-diffusion coefficient (m²/s) of the data's own trajectory, the way evaluate measures
    a model's: the longest run of consecutive frames evenly spaced in time (``data.times_fs``) of a periodic box,
    unwrapped by minimum-image steps, MSD up to half its length. None for molecules, frames without times, or
    fewer than ``min_frames`` frames in one run."""
    if data.cells is None or data.times_fs is None or len(data) < min_frames:
        return None
    steps = np.diff(data.times_fs)
    spacing = float(np.median(steps))
    if not spacing > 0:
        return None
    regular = np.abs(steps - spacing) <= 1e-6 * spacing
    best_start, best_length, start = 0, 0, 0
    for k in range(len(regular) + 1):
        if k == len(regular) or not regular[k]:
            if k - start > best_length:
                best_start, best_length = start, k - start
            start = k + 1
    n_frames = best_length + 1
    if n_frames < min_frames:
        return None
    # evaluate's own recorder unwraps the frames, as it does a replica's
    recorder = DisplacementRecorder(1, np.flatnonzero(data.numbers > 1), data.cells[best_start], n_replicas=1)
    for positions in data.positions[best_start:best_start + n_frames]:
        recorder.record(positions[None], np.ones(1, dtype=bool))
    trajectory = np.stack(recorder.unwrapped)[:, 0]
    msd = mean_squared_displacement(trajectory, max_lag=n_frames // 2)
    return {"m2_per_s": float(diffusion_coefficient(msd, spacing)), "frames": int(n_frames),
            "frame_interval_fs": spacing,
            "definition": "heavy atoms of the data's longest evenly spaced run of frames, MSD up to half its length"}


def reference_vacf(data: Dataset, min_frames: int = 8) -> Optional[dict]:
    """The normalised VACF of the data's dense segment (frames one MD step apart with velocities, as
    ``stable-md data water|amber-peptide`` write after their frames), over every atom and every time origin, up to
    half the segment's length: ``{"lag_fs", "values", "frames", "interval_fs"}``. None when the data has no dense
    segment; :class:`DataError` when its frames are too few or not evenly spaced in time."""
    dense = data.dense
    if dense is None:
        return None
    if len(dense) < min_frames:
        raise DataError(f"{data.source}: its dense segment holds {len(dense)} frames; a reference VACF needs at "
                        f"least {min_frames}")
    steps = np.diff(dense.times_fs)
    spacing = float(np.median(steps))
    if not spacing > 0 or not np.allclose(steps, spacing, rtol=1e-6, atol=0.0):
        raise DataError(f"{data.source}: the frames of its dense segment are not evenly spaced in time "
                        f"(md_time_fs steps from {steps.min():g} to {steps.max():g} fs); a VACF needs equal steps")
    lags = len(dense) // 2
    values = velocity_autocorrelation(dense.velocities, window=lags)
    return {"lag_fs": (np.arange(lags) * spacing).tolist(), "values": values.tolist(), "frames": int(len(dense)),
            "interval_fs": spacing,
            "definition": "normalised VACF of every atom of the data's dense segment, lags up to half its length"}


def vacf_error(vacf: Optional[dict], reference: Optional[dict]) -> Optional[dict]:
    """Mean |C_model − C_ref| over the model's VACF lags (``evaluate``'s ``vacf``) that the reference covers, the
    reference interpolated linearly between its own lags (exact where both are one MD step of the same length
    apart): ``{"mean_abs": ..., "max_lag_fs": ..., "lags": ...}``, or None when either is missing or no lag is
    shared."""
    if not vacf or not reference:
        return None
    lags = np.asarray(vacf["lag_fs"], dtype=float)
    covered = lags <= reference["lag_fs"][-1] + 1e-9
    if not covered.any():
        return None
    expected = np.interp(lags[covered], reference["lag_fs"], reference["values"])
    difference = np.abs(np.asarray(vacf["mean"], dtype=float)[covered] - expected)
    return {"mean_abs": float(difference.mean()), "max_lag_fs": float(lags[covered][-1]), "lags": int(covered.sum())}
