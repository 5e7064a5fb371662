"""Array shapes, axis order and prompt-label values: the one statement the whole package follows.

Axis order
- Volumes are channels-last ``[b, h, w, d, c]``. ``(h, w, d)`` are the nibabel voxel axes ``(i, j, k)`` of the
  image after reorientation to RAS+, i.e. "spatial axis 0, 1, 2". Upstream SAM-Med3D feeds torchio tensors
  ``(B, 1, X0, X1, X2)`` whose spatial axes are exactly these; PyTorch calls them ``(D, H, W)``.
- Points are ``[b, n, 3]`` float voxel indices in the same order as the array axes: ``point[..., k]`` indexes
  spatial axis ``k``. There is no 2-D-SAM ``(x, y)`` swap on the way in (the model reproduces upstream's own
  dense-PE swap internally, see ``model/prompt_encoder.py``).
- Spacing is a tuple in millimetres in array-axis order.
- Low-resolution mask logits are ``[b, h/4, w/4, d/4, m]`` (m masks, channels-last).

Point labels (int32)
- ``POSITIVE = 1`` and ``NEGATIVE = 0``: clicks.
- ``NOT_A_POINT = -1``: upstream's padding point. It still becomes a token (the not-a-point embedding) and takes
  part in attention, exactly as in upstream; the model appends one such point itself after the user's points.
- ``ABSENT = -2``: an empty slot of a fixed-size point buffer. Its token is masked out of every attention, so a
  buffer holding t present points gives exactly upstream's result for those t points. When every point of a
  batch row is ABSENT the appended padding point is masked too, which reproduces upstream's ``points=None``
  (prompt-less) call.
"""

POSITIVE = 1
NEGATIVE = 0
NOT_A_POINT = -1
ABSENT = -2
