"""A constant-velocity Kalman filter on boxes, the motion model of the tracker (``gdino.inference.tracking``).

The state of a box is its centre, width and height and their velocities, (cx, cy, w, h, vcx, vcy,
vw, vh), one step being one detection step. Noise scales with the box's size (as SORT and
ByteTrack scale theirs with its height), so small and large objects are followed alike. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_POSITION_NOISE = 1.0 / 20
_VELOCITY_NOISE = 1.0 / 160


@dataclass
class BoxState:
    """A filtered box: ``mean`` (8,) and ``covariance`` (8, 8), float64."""

    mean: np.ndarray
    covariance: np.ndarray

    def box(self) -> np.ndarray:
        """(4,) x0, y0, x1, y1 of the mean."""
        cx, cy, w, h = self.mean[:4]
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])

    def box_ahead(self, fraction: float) -> np.ndarray:
        """(4,) the mean box moved ``fraction`` of a step along its velocity (between detection steps)."""
        cx, cy, w, h = self.mean[:4] + fraction * self.mean[4:]
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _cxcywh(box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dtype=np.float64)


def _size(state_or_box: np.ndarray) -> np.ndarray:
    """(4,) the scale of each coordinate's noise: width for x and w, height for y and h."""
    w, h = max(float(state_or_box[2]), 1.0), max(float(state_or_box[3]), 1.0)
    return np.array([w, h, w, h])


_F = np.eye(8)
_F[:4, 4:] = np.eye(4)  # position += velocity, once a step
_H = np.eye(4, 8)


def start(box: np.ndarray) -> BoxState:
    """A new state at ``box`` (x0, y0, x1, y1), not moving, with wide velocity uncertainty."""
    z = _cxcywh(box)
    scale = _size(z)
    std = np.concatenate([2 * _POSITION_NOISE * scale, 10 * _VELOCITY_NOISE * scale])
    return BoxState(np.concatenate([z, np.zeros(4)]), np.diag(std**2))


def predict(state: BoxState) -> BoxState:
    """The state one step later."""
    scale = _size(state.mean)
    q = np.diag(np.concatenate([_POSITION_NOISE * scale, _VELOCITY_NOISE * scale]) ** 2)
    mean = _F @ state.mean
    mean[2:4] = np.maximum(mean[2:4], 1.0)  # a box never shrinks to nothing
    return BoxState(mean, _F @ state.covariance @ _F.T + q)


def correct(state: BoxState, box: np.ndarray) -> BoxState:
    """The state after observing ``box`` (x0, y0, x1, y1)."""
    z = _cxcywh(box)
    r = np.diag((_POSITION_NOISE * _size(z)) ** 2)
    s = _H @ state.covariance @ _H.T + r  # (4, 4)
    gain = np.linalg.solve(s, _H @ state.covariance).T  # (8, 4)
    mean = state.mean + gain @ (z - _H @ state.mean)
    covariance = state.covariance - gain @ s @ gain.T
    return BoxState(mean, covariance)
