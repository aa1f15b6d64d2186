"""Data sets of the trainer (``--data``): the embedded ``digits`` and ``digits-attrs`` (built from
scikit-learn's handwritten digits, cached on disk) and a registry for more.
"""
from __future__ import annotations

from .cache import cache_dir
from .digits import build_digits, build_digits_attrs
from .registry import (MTLData, Split, check_dataset, dataset_names, load_dataset,
                       register_dataset)

__all__ = ["MTLData", "Split", "cache_dir", "check_dataset", "dataset_names", "load_dataset",
           "register_dataset"]

register_dataset("digits", build_digits,
                 description="two-digit composites of sklearn's digits: left, right, sum")
register_dataset("digits-attrs", build_digits_attrs,
                 description="the same composites with 16 binary attribute tasks")

# data sets read from local files (--data-root PATH; layouts in docs/datasets.md)
from .celeba import build_celeba  # noqa: E402
from .cityscapes import build_cityscapes, build_cityscapes19  # noqa: E402
from .multi_mnist import (build_multi_fashion, build_multi_fashion_mnist,  # noqa: E402
                          build_multi_mnist)
from .nyuv2 import build_nyuv2  # noqa: E402

register_dataset("nyuv2", build_nyuv2, needs_root=True,
                 description="NYUv2 (MTAN's .npy layout): segmentation, depth, normals")
register_dataset("cityscapes", build_cityscapes, needs_root=True,
                 description="CityScapes 128x256 (MTAN's layout): 7-class segmentation, "
                             "inverse depth")
register_dataset("cityscapes-19", build_cityscapes19, needs_root=True,
                 description="CityScapes with the 19-class labels of label_19")
register_dataset("celeba", build_celeba, needs_root=True,
                 description="CelebA's 40 binary attributes, 64x64")
register_dataset("multi-mnist", build_multi_mnist, needs_root=True,
                 description="two MNIST digits per image (Sener & Koltun 2018)")
register_dataset("multi-fashion", build_multi_fashion, needs_root=True,
                 description="two Fashion-MNIST items per image")
register_dataset("multi-fashion-mnist", build_multi_fashion_mnist, needs_root=True,
                 description="an MNIST digit and a Fashion-MNIST item per 36x36 image")
