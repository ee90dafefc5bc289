"""Inference in three lines::

    from gfl_det.apis import init_detector, inference_detector
    model = init_detector('configs/gfl_r50.py', 'gfl_r50_fpn_1x_coco.pth', device='cuda')
    result = inference_detector(model, 'demo.jpg')
    # {'bboxes': (k, 4) float32 xyxy in the image's pixels, 'scores': (k,), 'labels': (k,) int64,
    #  'class_names': [k names]: the name of each detection's label (None when the checkpoint
    #  has no class names); the model's class list is model.class_names;
    #  'embeddings': (k, D) unit vectors, with an embedding branch (bbox_head.embed)}

Drawing lives in :mod:`gfl_det.visualize` (``draw_detections``, ``save_image``).

Checkpoints load with ``weights_only=True`` (MMDetection model-zoo files included); class names
come from the checkpoint's meta (mmdet 3.x ``dataset_meta['classes']``, 2.x ``CLASSES``).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from . import data as gdata

__all__ = ['init_detector', 'inference_detector', 'build_test_transforms', 'optimize_for_inference',
           'add_inference_args', 'read_images', 'IMAGE_EXTS']

ImageLike = Union[str, os.PathLike, np.ndarray]
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def _load_config(config: Any, cfg_options: Optional[dict] = None):
    from mmengine.config import Config
    if isinstance(config, (str, os.PathLike)):
        cfg = Config.fromfile(os.fspath(config))
    elif isinstance(config, Config):
        cfg = copy.deepcopy(config)
    else:
        raise TypeError(f'config must be a path or an mmengine Config, got {type(config).__name__}')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_test_transforms(cfg) -> gdata.Compose:
    """The test-time transforms of a config (``test_dataloader.dataset.pipeline``), or the
    default 1333x800 keep-ratio resize when the config has none."""
    from .mm import build_pipeline
    pipeline = None
    try:
        pipeline = cfg.test_dataloader.dataset.pipeline
    except AttributeError:
        pass
    return build_pipeline(pipeline) if pipeline else gdata.build_transforms(train=False)


def init_detector(config: Any, checkpoint: Union[str, os.PathLike, None] = None,
                  device: str = 'cpu', cfg_options: Optional[dict] = None,
                  fuse_conv_bn: bool = False, compile: bool = False,
                  channels_last: bool = False, winograd: bool = False, cuda_graph: bool = False):
    """Build the detector of ``config`` and load ``checkpoint`` (weights only).

    Args:
        config: config path or mmengine ``Config``.
        checkpoint: a gfl_det or MMDetection checkpoint; None keeps the random init.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ...
        cfg_options: config overrides, as ``--cfg-options``.
        fuse_conv_bn: fold the backbone's BatchNorms into its convs (same detections to float
            rounding, a little faster).
        compile: ``torch.compile`` backbone + neck + head for inference (implies
            ``fuse_conv_bn``; see :func:`gfl_det.models.compile_for_inference`): the first
            image pays ~20 s of compilation, every later one runs faster (measured in README).
        channels_last: weights and inputs in the NHWC layout (``model.channels_last``): the
            same detections to float rounding, ~25 % faster R50 inference on a CPU.
        winograd: run the 3x3 stride-1 convs of CPU batch-1 inference as NNPACK Winograd
            (:func:`gfl_det.models.use_winograd`): fewer multiplications, float32 rounding
            ~1e-5 of the outputs instead of ~1e-7; not with ``channels_last`` or ``compile``.
        cuda_graph: CUDA only: everything before NMS replayed as a CUDA graph, one per input
            shape (:mod:`gfl_det.fast.cuda_graph`; implies ``fuse_conv_bn``).

    Returns:
        the model (a :class:`gfl_det.models.GFL`) in eval mode on ``device``, with ``.cfg``,
        ``.class_names`` and ``.test_transforms``.
    """
    from .checkpoint import load_weights
    from .mm import GFLDetector
    check_inference_flags(channels_last=channels_last, compile=compile, winograd=winograd, cuda_graph=cuda_graph)
    cfg = _load_config(config, cfg_options)
    model_cfg = cfg.model.to_dict() if hasattr(cfg.model, 'to_dict') else dict(cfg.model)
    if model_cfg.pop('type', 'GFL') != 'GFL':
        raise ValueError('init_detector builds GFL models only')
    model_cfg['backbone'] = dict(model_cfg['backbone'], init_cfg=None)  # no ImageNet download
    if channels_last:
        model_cfg['channels_last'] = True
    model = GFLDetector(**model_cfg)
    if checkpoint is not None:
        meta = load_weights(model, checkpoint, strict=True)  # weights_only=True, always
        if meta.get('classes'):
            model.class_names = tuple(meta['classes'])
    if model.class_names is None:
        try:
            classes = cfg.test_dataloader.dataset.metainfo.classes
            model.class_names = tuple(classes)
        except AttributeError:
            pass
    if model.class_names is not None and len(model.class_names) != model.num_classes:
        raise ValueError(f'{len(model.class_names)} class names for a {model.num_classes}-class '
                         f'model; check bbox_head.num_classes in the config')
    model.cfg = cfg
    model.test_transforms = build_test_transforms(cfg)
    model = model.to(device).eval()
    optimize_for_inference(model, fuse_conv_bn=fuse_conv_bn, compile=compile, winograd=winograd,
                           cuda_graph=cuda_graph)
    return model


def check_inference_flags(channels_last: bool = False, compile: bool = False, winograd: bool = False,
                          cuda_graph: bool = False) -> None:
    """Refuse flag combinations that would silently do nothing: NNPACK's Winograd kernels take
    NCHW float32 tensors in eager mode, so ``winograd`` excludes ``channels_last`` and ``compile``;
    ``cuda_graph`` records the eager model (a GPU's answer to launch overhead, as ``compile``'s),
    so it excludes ``compile`` and the CPU-only ``winograd``."""
    if winograd and (channels_last or compile):
        other = '--channels-last' if channels_last else '--compile'
        raise ValueError(f'--winograd cannot be combined with {other}: the Winograd kernels take NCHW '
                         f'tensors outside torch.compile; pick one (README, Speed, compares them)')
    if cuda_graph and (compile or winograd):
        other = '--compile' if compile else '--winograd'
        raise ValueError(f'--cuda-graph cannot be combined with {other}: it records the eager model\'s '
                         f'launches on a GPU; pick one (README, Speed)')


def optimize_for_inference(model, fuse_conv_bn: bool = True, compile: bool = False, winograd: bool = False,
                           cuda_graph: bool = False, compile_mode: Optional[str] = None):
    """BN folding, ``torch.compile`` (in ``compile_mode``, torch's default when None), Winograd
    convolutions or CUDA graphs for a loaded model, in place, for inference only."""
    from .fast.fuse import compile_for_inference, fuse_for_inference
    from .fast.winograd import use_winograd
    check_inference_flags(channels_last=getattr(model, 'channels_last', False), compile=compile, winograd=winograd,
                          cuda_graph=cuda_graph)
    if cuda_graph:
        p = next(model.parameters())
        if not p.is_cuda:
            raise ValueError(f'--cuda-graph needs the model on a CUDA device, it is on {p.device}: run with '
                             f'--device cuda (or drop --cuda-graph)')
    if compile:
        compile_for_inference(model, mode=compile_mode)
    elif fuse_conv_bn or winograd or cuda_graph:
        fuse_for_inference(model)
    if winograd:
        use_winograd(model)
    if cuda_graph:
        from .fast.cuda_graph import use_cuda_graphs
        use_cuda_graphs(model)
    return model


def add_inference_args(parser) -> None:
    """The inference-speed flags of tools/test.py and tools/demo.py: ``--channels-last``,
    ``--fuse-conv-bn``, ``--compile``, ``--winograd`` (argparse; see :func:`init_detector`)."""
    parser.add_argument('--channels-last', action='store_true',
                        help='run the network in the NHWC memory layout (model.channels_last): '
                             'same detections, faster convolutions on a CPU (see README, Speed)')
    parser.add_argument('--fuse-conv-bn', action='store_true',
                        help='fold the backbone BatchNorms into its convs (same detections, a '
                             'little faster)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile backbone + neck + head (implies --fuse-conv-bn): '
                             '~20-50 s to compile once, then faster on every image; worth it for '
                             'many images (see README, Speed)')
    parser.add_argument('--winograd', action='store_true',
                        help='CPU, one image per batch: 3x3 convs as Winograd (NNPACK; implies '
                             '--fuse-conv-bn): fewer multiplications, float32 rounding ~1e-5 of the '
                             'outputs instead of ~1e-7 (see README, Speed)')
    parser.add_argument('--cuda-graph', action='store_true',
                        help='CUDA: record everything before NMS as a CUDA graph per input shape and '
                             'replay it (implies --fuse-conv-bn): the same detections without the '
                             'launch overhead of ~400 kernels per batch (see README, Speed)')


def parse_inference_args(parser, argv=None):
    """``parser.parse_args(argv)`` for a parser with :func:`add_inference_args`, refusing flag
    combinations :func:`check_inference_flags` rejects as an argparse error (message, exit 2)."""
    args = parser.parse_args(argv)
    try:
        check_inference_flags(channels_last=args.channels_last, compile=args.compile, winograd=args.winograd,
                              cuda_graph=args.cuda_graph)
    except ValueError as e:
        parser.error(str(e))
    on_cpu = str(getattr(args, 'device', None) or '').startswith('cpu')
    if args.cuda_graph and (on_cpu or not torch.cuda.is_available()):
        where = '' if torch.cuda.is_available() else ' and this machine has none'
        parser.error(f'--cuda-graph needs a CUDA device{where}; drop --cuda-graph')
    return args


def optimize_for_inference_hook(fuse_conv_bn: bool = True, compile: bool = False, winograd: bool = False,
                                cuda_graph: bool = False):
    """An mmengine hook for tools/test.py that fuses / compiles the model once its weights are
    loaded (``before_test`` runs after the Runner has loaded ``load_from``)."""
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper

    class OptimizeForInferenceHook(Hook):
        def before_test(self, runner) -> None:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            optimize_for_inference(model, fuse_conv_bn, compile, winograd, cuda_graph)
            fused = fuse_conv_bn or compile or winograd or cuda_graph
            runner.logger.info(f'inference model: fuse_conv_bn={fused}, compile={compile}, winograd={winograd}, '
                               f'cuda_graph={cuda_graph}')

        def after_test(self, runner) -> None:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            graphed = model.__dict__.get('graphed_predict')
            if graphed is not None:
                runner.logger.info(f'--cuda-graph: {graphed.captures} input shapes recorded as CUDA graphs, '
                                   f'{graphed.eager_calls} batches run eagerly (shapes seen once, or past '
                                   f'{graphed.max_graphs} graphs)')

    return OptimizeForInferenceHook()


def read_images(paths: Sequence[str]):
    """For each path (path, RGB uint8 image, None), or (path, None, why not): 'not an image file'
    (by extension), 'a folder: not searched', or the decoding problem ('corrupt image', 'missing
    image'). What the tools that walk a folder skip, name and count instead of stopping."""
    for path in paths:
        if os.path.isdir(path):
            yield path, None, 'a folder: not searched'
            continue
        if not str(path).lower().endswith(IMAGE_EXTS):
            yield path, None, 'not an image file'
            continue
        try:
            yield path, gdata.load_image(path), None
        except gdata.BadImageError as e:
            yield path, None, e.reason.replace('_', ' ')


def _as_rgb(img: ImageLike, channel_order: str) -> tuple[np.ndarray, str]:
    if isinstance(img, (str, os.PathLike)):
        return gdata.load_image(img), os.path.basename(os.fspath(img))
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f'image arrays must be uint8 (H, W, 3), got {img.dtype} {img.shape}')
        if channel_order == 'bgr':
            img = img[:, :, ::-1]
        elif channel_order != 'rgb':
            raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
        return np.ascontiguousarray(img), ''
    raise TypeError(f'expected an image path or a numpy array, got {type(img).__name__}')


@torch.no_grad()
def inference_detector(model, imgs: Union[ImageLike, Sequence[ImageLike]],
                       channel_order: str = 'bgr', batch_size: int = 1
                       ) -> Union[dict, list[dict]]:
    """Detect objects in one image or a list of images.

    Args:
        model: from :func:`init_detector`.
        imgs: a path, a uint8 (H, W, 3) array, or a list of them. Arrays are BGR by default
            (what ``cv2.imread`` gives, as in MMDetection); pass ``channel_order='rgb'`` for RGB.
        batch_size: images per forward pass.

    Returns:
        per image ``dict(bboxes=(k, 4) float32 xyxy in original-image pixels,
        scores=(k,) float32, labels=(k,) int64, class_names=list of k names or None)``:
        ``class_names[i]`` is the name of ``labels[i]`` (one per detection, not the class list,
        which is ``model.class_names``); with an embedding branch (``bbox_head.embed``) also
        ``embeddings=(k, D) float32``, each detection's unit-length identity embedding; a single
        dict for a single image.
    """
    single = not isinstance(imgs, (list, tuple))
    imgs = [imgs] if single else list(imgs)
    transforms = getattr(model, 'test_transforms', None) or gdata.build_transforms(train=False)
    names = getattr(model, 'class_names', None)
    was_training = model.training
    model.eval()
    out: list[dict] = []
    for start in range(0, len(imgs), batch_size):
        samples = []
        for i, img in enumerate(imgs[start:start + batch_size]):
            rgb, name = _as_rgb(img, channel_order)
            h, w = rgb.shape[:2]
            results = {'image': rgb, 'boxes': np.zeros((0, 4), np.float32),
                       'labels': np.zeros((0,), np.int64),
                       'meta': {'img_id': start + i, 'file_name': name, 'ori_shape': (h, w),
                                'img_shape': (h, w), 'scale_factor': (1.0, 1.0), 'flip': False}}
            samples.append(gdata.to_sample(transforms(results)))
        batch = gdata.collate(samples, size_divisor=32)
        for p in model.test_step(batch):
            labels = p['labels'].cpu().numpy().astype(np.int64)
            out.append({'bboxes': p['bboxes'].float().cpu().numpy(),
                        'scores': p['scores'].float().cpu().numpy(), 'labels': labels,
                        'class_names': [names[j] for j in labels] if names else None,
                        **({'embeddings': p['embeddings'].float().cpu().numpy()} if 'embeddings' in p else {})})
    model.train(was_training)
    return out[0] if single else out
