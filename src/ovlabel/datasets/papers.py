"""The papers' benchmark datasets, read from the files their users download. Torch-free.

* ImageNet-Segmentation (Guillaumin et al.; Chefer 2021, LeGrad): ``gtsegs_ijcv.mat``, MATLAB v7.3 (HDF5):
  ``/value/img`` is an N×1 array of object references, each to an image stored 3×W×H (transposed here to
  H×W×3); ``/value/gt`` is N×1 references, each to a 1×1 cell whose reference points to the W×H mask
  (transposed to H×W). Read with h5py (``pip install "ovlabel[benchmarks]"``).
* OpenImages V7 point labels: ``oidv7-*-annotations-point-labels.csv`` (ImageId, X, Y as fractions of the
  width and height, Label as a MID, EstimatedYesNo, Source, YesVotes, NoVotes, UnsureVotes) and
  ``oidv7-class-descriptions.csv`` (LabelName, DisplayName); images are ``<ImageId>.jpg`` in a folder.
* ImageNet validation (perturbation tests): a folder with one sub-folder per class (``n01440764/…``, the
  layout of ``torchvision.datasets.ImageFolder``), or a flat folder of ``ILSVRC2012_val_*.JPEG`` with the
  devkit's ``data/ILSVRC2012_validation_ground_truth.txt`` and ``data/meta.mat``. Class indices are the
  standard 0..999 (timm's ImageNet synset order), names open_clip's ImageNet class names.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

POINT_COLUMNS = ("ImageId", "X", "Y", "Label", "EstimatedYesNo", "Source", "YesVotes", "NoVotes", "UnsureVotes")


# ----------------------------------------------------------------------------- ImageNet-Segmentation
def _h5py():
    try:
        import h5py
    except ImportError:
        raise InputError("reading ImageNet-Segmentation's .mat (HDF5) needs h5py: pip install 'ovlabel[benchmarks]'"
                         ) from None
    return h5py


class ImageNetSegmentation:
    """``gtsegs_ijcv.mat``: ``len()`` samples, ``[i]`` → (image ``uint8 [H,W,3]``, mask ``bool [H,W]``)."""

    def __init__(self, path: str | Path) -> None:
        h5py = _h5py()
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise InputError(f"{self.path} does not exist") from None
        except OSError as e:
            raise InputError(f"{self.path} is not a MATLAB v7.3 (HDF5) file ({e}); expected gtsegs_ijcv.mat") from None
        missing = [k for k in ("value/img", "value/gt") if k not in self.file]
        if missing:
            found = sorted(self.file.keys())
            self.file.close()
            raise InputError(f"{self.path} has no dataset {', '.join('/' + m for m in missing)} (found {found}); "
                             "expected ImageNet-Segmentation's gtsegs_ijcv.mat with /value/img and /value/gt")
        self.img, self.gt = self.file["value/img"], self.file["value/gt"]
        if self.img.shape[0] != self.gt.shape[0]:
            raise InputError(f"{self.path}: /value/img has {self.img.shape[0]} entries but /value/gt has "
                             f"{self.gt.shape[0]}")

    def __len__(self) -> int:
        return int(self.img.shape[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            image = np.asarray(self.file[self.img[i, 0]])  # 3×W×H
            cell = self.file[self.gt[i, 0]]  # a 1×1 cell of references
            mask = np.asarray(self.file[cell[0, 0]])  # W×H
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"{self.path}: entry {i} is not an object reference to an image and a mask ({e})") \
                from None
        if image.ndim != 3 or image.shape[0] != 3 or mask.shape != image.shape[1:]:
            raise InputError(f"{self.path}: entry {i} has an image of shape {image.shape} and a mask of shape "
                             f"{mask.shape}; expected 3×W×H and W×H")
        return np.ascontiguousarray(image.transpose(2, 1, 0)).astype(np.uint8), mask.T.astype(bool)

    def close(self) -> None:
        self.file.close()


# ------------------------------------------------------------------------------ OpenImages V7 points
def _read_csv(path: Path, required: tuple[str, ...], what: str) -> Iterator[dict]:
    try:
        f = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist") from None
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{what} file {path} lacks the column(s) {missing}; expected {list(required)} "
                             f"(found {reader.fieldnames})")
        yield from reader


def read_class_descriptions(path: str | Path) -> dict[str, str]:
    """``oidv7-class-descriptions.csv`` → {MID: display name}."""
    return {r["LabelName"]: r["DisplayName"] for r in _read_csv(Path(path), ("LabelName", "DisplayName"),
                                                                 "OpenImages class descriptions")}


@dataclass(frozen=True)
class PointLabel:
    mid: str
    x: float  # fraction of the width
    y: float  # fraction of the height
    yes: bool | None  # None: unsure (not read)


def read_point_labels(path: str | Path, classes: dict[str, str]) -> dict[str, list[PointLabel]]:
    """Point labels by image id (file order kept). MIDs missing from ``classes`` and malformed values are
    refused, naming the line."""
    out: dict[str, list[PointLabel]] = {}
    unknown: dict[str, int] = {}
    for n, r in enumerate(_read_csv(Path(path), POINT_COLUMNS, "OpenImages point labels"), start=2):
        if r["Label"] not in classes:
            unknown.setdefault(r["Label"], n)
            continue
        try:
            x, y = float(r["X"]), float(r["Y"])
        except ValueError:
            raise InputError(f"{path}, line {n}: X and Y must be numbers (fractions of the image size), got "
                             f"{r['X']!r}, {r['Y']!r}") from None
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise InputError(f"{path}, line {n}: X and Y are fractions of the image size in [0, 1], got {x}, {y}")
        answer = r["EstimatedYesNo"].strip().lower()
        if answer not in ("yes", "no", "unsure"):
            raise InputError(f"{path}, line {n}: EstimatedYesNo must be yes, no or unsure, got {answer!r}")
        out.setdefault(r["ImageId"], []).append(PointLabel(r["Label"], x, y, None if answer == "unsure"
                                                           else answer == "yes"))
    if unknown:
        first = sorted(unknown.items(), key=lambda kv: kv[1])[:5]
        raise InputError(f"{path}: {len(unknown)} label MID(s) are not in the class descriptions, e.g. "
                         + ", ".join(f"{m} (line {ln})" for m, ln in first))
    return out


# ---------------------------------------------------------------------------- ImageNet validation
def imagenet_classes() -> tuple[list[str], list[str]]:
    """The 1,000 ImageNet-1k synsets (wnids) in the standard index order, and their class names."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names()), list(IMAGENET_CLASSNAMES)


def imagenet_val(root: str | Path, devkit: str | Path | None = None) -> list[tuple[Path, int]]:
    """``(image path, true class index)`` of an ImageNet validation folder (see the module docstring),
    sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--imagenet-val {root} is not a folder")
    wnids, _ = imagenet_classes()
    index = {w: i for i, w in enumerate(wnids)}
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"n\d{8}", p.name))
    if dirs:
        unknown = [d.name for d in dirs if d.name not in index]
        if unknown:
            raise InputError(f"{root}: class folders {unknown[:5]} are not ImageNet-1k synsets")
        return [(f, index[d.name]) for d in dirs for f in sorted(d.iterdir()) if f.is_file()]
    files = sorted(p for p in root.iterdir() if p.is_file() and re.fullmatch(r"ILSVRC2012_val_\d{8}\.\w+", p.name))
    if not files:
        raise InputError(f"{root} holds neither class folders (n01440764/…) nor ILSVRC2012_val_*.JPEG files; "
                         "expected an ImageNet validation folder")
    if devkit is None:
        raise InputError(f"{root} is a flat ImageNet validation folder: its labels are in the devkit; pass "
                         "--devkit ILSVRC2012_devkit_t12")
    dk = Path(devkit)
    truth, meta = dk / "data" / "ILSVRC2012_validation_ground_truth.txt", dk / "data" / "meta.mat"
    for f in (truth, meta):
        if not f.is_file():
            raise InputError(f"the devkit {dk} has no {f.relative_to(dk)}")
    try:  # the benchmarks extra: only this reader needs scipy
        from scipy.io import loadmat
    except ImportError:
        raise InputError("reading the ImageNet devkit needs scipy: pip install 'ovlabel[benchmarks]'") from None

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    labels = [int(v) for v in truth.read_text().split()]
    out = []
    for f in files:
        n = int(f.name.split("_")[-1].split(".")[0])
        if n > len(labels):
            raise InputError(f"{f.name}: the devkit's ground truth has only {len(labels)} labels")
        wnid = id_to_wnid.get(labels[n - 1])
        if wnid not in index:
            raise InputError(f"{f.name}: ground-truth id {labels[n - 1]} is not an ImageNet-1k class in {meta}")
        out.append((f, index[wnid]))
    return out
