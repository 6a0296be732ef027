"""The twelve published weight sets: the one place that holds their URLs, hashes and numbers.

Docstrings (``torch.hub.help``), the metadata every model carries (``model.pretrained_cfg``) and
the README's model table are all derived from here; ``python -m models`` prints that table.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

PUBLISHED_BASE_URL = "https://dl.fbaipublicfiles.com/semiweaksupervision/model_files/"
MIRROR_ENV = "SEMI_SUPERVISED_WEIGHTS_MIRROR"  # a base URL (or directory) that replaces PUBLISHED_BASE_URL
LICENSE = "CC-BY-NC-4.0"
ORIGINAL_REPOSITORY = "https://github.com/facebookresearch/semi-supervised-ImageNet1K-models"
ARXIV = "1905.00546"
PAPER = ("Yalniz et al., \"Billion-scale semi-supervised learning for image classification\", "
         f"arXiv:{ARXIV} (2019)")

# The evaluation recipe the accuracies were measured with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
CROP_PCT = 0.875
INTERPOLATION = "bilinear"

# timm's pretrained tag for these weights: timm names them ARCH.TAG, e.g. resnet50.fb_swsl_ig1b_ft_in1k
TIMM_TAGS = {"ssl": "fb_ssl_yfcc100m_ft_in1k", "swsl": "fb_swsl_ig1b_ft_in1k"}
SUPERVISION = {
    "ssl": ("semi-supervised", "student pre-trained on a subset of unlabelled YFCC100M selected by a "
            "ResNeXt-101 32x48d teacher trained on ImageNet-1k, then fine-tuned on ImageNet-1k"),
    "swsl": ("semi-weakly supervised", "teacher (ResNeXt-101 32x48d) pre-trained on 940M Instagram images "
             "with 1.5k hashtags (IG-1B-Targeted), student pre-trained on the 64M of them it selected, "
             "then fine-tuned on ImageNet-1k"),
}


@dataclass(frozen=True)
class Arch:
    name: str
    title: str
    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]
    groups: int
    width_per_group: int
    params: int  # with the 1000-class head
    gmacs: float  # multiply-accumulates of one 224x224 image, in billions

    @property
    def num_features(self) -> int:
        return 512 if self.block == "basic" else 2048


ARCHS = {a.name: a for a in (
    Arch("resnet18", "ResNet-18", "basic", (2, 2, 2, 2), 1, 64, 11_689_512, 1.814),
    Arch("resnet50", "ResNet-50", "bottleneck", (3, 4, 6, 3), 1, 64, 25_557_032, 4.089),
    Arch("resnext50_32x4d", "ResNeXt-50 32x4d", "bottleneck", (3, 4, 6, 3), 32, 4, 25_028_904, 4.230),
    Arch("resnext101_32x4d", "ResNeXt-101 32x4d", "bottleneck", (3, 4, 23, 3), 32, 4, 44_177_704, 7.970),
    Arch("resnext101_32x8d", "ResNeXt-101 32x8d", "bottleneck", (3, 4, 23, 3), 32, 8, 88_791_336, 16.414),
    Arch("resnext101_32x16d", "ResNeXt-101 32x16d", "bottleneck", (3, 4, 23, 3), 32, 16, 194_026_792, 36.163),
)}


@dataclass(frozen=True)
class WeightSet:
    entry: str
    arch: Arch
    supervision: str  # "ssl" or "swsl"
    file_name: str
    reported: tuple[float, float]  # ImageNet-1k val top-1, top-5 in the original README
    measured: tuple[float, float]  # the same, independently re-measured (timm's results table)
    note: str = ""

    @property
    def url(self) -> str:
        return PUBLISHED_BASE_URL + self.file_name

    @property
    def hash_prefix(self) -> str:
        """The first hex digits of the file's SHA-256, as its name carries them (torch.hub's convention)."""
        return self.file_name.rsplit("-", 1)[1].split(".")[0]

    @property
    def timm_name(self) -> str:
        """timm's name of these weights: its architecture, a dot, its pretrained tag."""
        return f"{self.arch.name}.{TIMM_TAGS[self.supervision]}"

    def config(self) -> dict:
        """The metadata a model built from these weights carries as ``model.pretrained_cfg``."""
        classes = imagenet1k_classes()
        return {
            "entry": self.entry, "architecture": self.arch.title, "supervision": self.supervision,
            "url": self.url, "file_name": self.file_name, "hash_prefix": self.hash_prefix,
            "license": LICENSE, "paper": PAPER,
            "mean": MEAN, "std": STD, "input_size": (3, INPUT_SIZE, INPUT_SIZE), "crop_pct": CROP_PCT,
            "resize_size": resize_size(), "interpolation": INTERPOLATION,
            "metrics": {"imagenet1k_val": {"reported": dict(zip(("top1", "top5"), self.reported)),
                                           "measured": dict(zip(("top1", "top5"), self.measured))}},
            "params": self.arch.params, "gmacs": self.arch.gmacs, "num_features": self.arch.num_features,
            "num_classes": len(classes), "classes": [name for _, name in classes],
            "wnids": [wnid for wnid, _ in classes],
        }

    def docstring(self) -> str:
        """What ``torch.hub.help`` shows for this entry."""
        kind, how = SUPERVISION[self.supervision]
        (rep1, rep5), (mea1, mea5) = self.reported, self.measured
        note = f"{self.note}\n" if self.note else ""
        return f"""{self.arch.title}, {kind} ({self.supervision}): {how}.

ImageNet-1k val top-1/top-5: {rep1:.1f}/{rep5:.1f} reported, {mea1:.3f}/{mea5:.3f} measured independently.
{self.arch.params:,} parameters, {self.arch.gmacs:.3f} GMACs at 224x224. Weights: {LICENSE}, non-commercial use.
Paper: {PAPER}.
{note}
Args (keyword-only):
    pretrained=True: load the published weights; False initialises randomly.
    progress=True: show a progress bar while downloading.
    weights=None: a checkpoint (.pth, .safetensors), a model folder or an http(s)/file URL to load
        instead; a -<sha256 prefix> name is verified.
        ${MIRROR_ENV}, if set, is a base URL to fetch the published file from.
    num_classes=None: the head of the weights (1000 ImageNet classes; a file saved by python -m
        utils.finetune brings its own head, class names and input size). Another number puts a new
        random head on the pretrained backbone (or loads the head of a weights= file of that size);
        0 returns the pooled {self.arch.num_features}-d features.
    features_only=False, out_indices=(1, 2, 3, 4): return the feature maps of the stem and layer1-4
        (strides 2, 4, 8, 16, 32) instead of logits.
    zero_init_residual, replace_stride_with_dilation, norm_layer: as torchvision's ResNet.

Returns an nn.Module in eval mode with .pretrained_cfg (metadata, class names) and .preprocess
(the evaluation transform: image -> normalised 3x224x224 tensor).

Errors: RuntimeError when the weights cannot be fetched, verified or loaded (a download that
fails, a hash that does not match, a file that does not fit); ValueError or TypeError for an
argument that cannot work. Each message says what to do.
"""


# entry: published file, ImageNet-1k val top-1/top-5 reported by the authors, and re-measured by timm.
_PUBLISHED = {
    "resnet18_ssl": ("semi_supervised_resnet18-d92f0530.pth", (72.8, 91.5), (72.636, 91.416)),
    "resnet50_ssl": ("semi_supervised_resnet50-08389792.pth", (79.3, 94.9), (79.252, 94.826)),
    "resnext50_32x4d_ssl": ("semi_supervised_resnext50_32x4-ddb3e555.pth", (80.3, 95.4), (80.316, 95.386)),
    "resnext101_32x4d_ssl": ("semi_supervised_resnext101_32x4-dc43570a.pth", (81.0, 95.7), (80.936, 95.732)),
    "resnext101_32x8d_ssl": ("semi_supervised_resnext101_32x8-2cfe2f8b.pth", (81.7, 96.1), (81.620, 96.036)),
    "resnext101_32x16d_ssl": ("semi_supervised_resnext101_32x16-15fffa57.pth", (81.9, 96.2), (81.856, 96.084)),
    "resnet18_swsl": ("semi_weakly_supervised_resnet18-118f1556.pth", (73.4, 91.9), (73.286, 91.754)),
    "resnet50_swsl": ("semi_weakly_supervised_resnet50-16a12f1b.pth", (81.2, 96.0), (81.146, 95.980)),
    "resnext50_32x4d_swsl": ("semi_weakly_supervised_resnext50_32x4-72679e44.pth", (82.2, 96.3), (82.162, 96.224)),
    "resnext101_32x4d_swsl": ("semi_weakly_supervised_resnext101_32x4-3f87e46b.pth", (83.4, 96.8),
                              (83.268, 96.760)),
    "resnext101_32x8d_swsl": ("semi_weakly_supervised_resnext101_32x8-b4712904.pth", (84.3, 97.2),
                              (84.276, 97.188)),
    "resnext101_32x16d_swsl": ("semi_weakly_supervised_resnext101_32x16-f3559a9c.pth", (84.8, 97.4),
                               (83.340, 96.844)),
}
_NOTES = {"resnext101_32x16d_swsl": "The authors said this file was saved incorrectly (original repository, "
                                    "issue #1): it measures 83.3, not 84.8, top-1."}

WEIGHTS = {entry: WeightSet(entry, ARCHS[entry.rsplit("_", 1)[0]], entry.rsplit("_", 1)[1], *row,
                            note=_NOTES.get(entry, ""))
           for entry, row in _PUBLISHED.items()}
def resize_size(img_size: int = INPUT_SIZE, crop_pct: float = CROP_PCT) -> int:
    """The shorter side images are resized to before the centre crop: int(224 / 0.875) = 256."""
    return max(img_size, int(img_size / crop_pct + 1e-9))


@functools.cache
def imagenet1k_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet-1k classes in model-output order, as (WordNet id, name) pairs."""
    lines = (Path(__file__).with_name("imagenet1k_classes.tsv").read_text(encoding="utf-8").splitlines())
    rows = [line.split("\t") for line in lines[1:]]
    return tuple((wnid, name) for _, wnid, name in rows)


def markdown_table() -> str:
    """The README's model table."""
    rows = ["| entry | architecture | params | GMACs | top-1 / top-5 reported | top-1 / top-5 measured | file |",
            "|---|---|---:|---:|---:|---:|---|"]
    for w in WEIGHTS.values():
        rows.append(f"| `{w.entry}` | {w.arch.title} | {w.arch.params:,} | {w.arch.gmacs:.3f} | "
                    f"{w.reported[0]:.1f} / {w.reported[1]:.1f} | {w.measured[0]:.3f} / {w.measured[1]:.3f} | "
                    f"[{w.file_name}]({w.url}) |")
    return "\n".join(rows)
