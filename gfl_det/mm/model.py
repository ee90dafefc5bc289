"""The model side of the adapter: :class:`GFLDetector` (the detector mmengine's Runner drives)
and :class:`GFLDataPreprocessor` (moves a collated batch to the device)."""
from __future__ import annotations

from typing import Any, Sequence

from mmengine.model import BaseDataPreprocessor, BaseModel
from torch import Tensor

from ..models import GFL, build_detector
from .registry import MODELS

__all__ = ['GFLDataPreprocessor', 'GFLDetector']


@MODELS.register_module(name='DetDataPreprocessor')
class GFLDataPreprocessor(BaseDataPreprocessor):
    """Moves a :func:`gfl_det.data.collate` batch to the model's device.

    The images stay uint8 (4x less to copy than float); :meth:`GFL.preprocess` normalises them on
    the device. Copies are ``non_blocking`` -- asynchronous when the DataLoader pins its memory,
    which :class:`GFLRunner` turns on whenever CUDA is present.

    MMDetection's ``DetDataPreprocessor`` keys are checked by
    :func:`gfl_det.models.build_detector`; ``mean``/``std`` are the model's normalisation (it
    reads them), ``pad_size_divisor`` is checked against the batch here (padding is done by the
    collate function, ``collate_fn=dict(type='gfl_collate', size_divisor=32)``).

    Returns ``dict(inputs=uint8 (B, 3, Hb, Wb), data_samples=dict(metas=[...], targets=Targets))``
    (the :class:`gfl_det.structures.Targets` of the batch as collate made it, moved to the device;
    training only) -- the keyword arguments of :meth:`GFLDetector.forward`.
    """

    def __init__(self, pad_size_divisor: int = 32, non_blocking: bool = True, **checked_by_build_detector: Any):
        super().__init__(non_blocking=non_blocking)
        self.pad_size_divisor = int(pad_size_divisor)

    def forward(self, data: dict, training: bool = False) -> dict:
        inputs = data['inputs']
        d = self.pad_size_divisor
        if d > 1 and (inputs.shape[-1] % d or inputs.shape[-2] % d):
            raise ValueError(f'batch of shape {tuple(inputs.shape)} is not padded to a multiple of '
                             f'pad_size_divisor={d}; set the dataloader\'s collate_fn='
                             f"dict(type='gfl_collate', size_divisor={d})")
        dev, nb = self.device, self._non_blocking
        samples = {'metas': data['metas']}
        if training:
            samples['targets'] = data['targets'].to(dev, non_blocking=nb)
        return {'inputs': inputs.to(dev, non_blocking=nb), 'data_samples': samples}


@MODELS.register_module(name='GFL')
class GFLDetector(GFL, BaseModel):
    """:class:`gfl_det.models.GFL` that mmengine's Runner can drive.

    It IS the detector (not a wrapper around one): ``state_dict()`` keys are exactly
    MMDetection's, so checkpoints go both ways without conversion. The data preprocessor holds
    no parameters or persistent buffers, so it adds no keys.

    Built from an MMDetection model dict (``type='GFL'`` plus backbone / neck / bbox_head /
    train_cfg / test_cfg / data_preprocessor) through :func:`gfl_det.models.build_detector`.
    """

    def __init__(self, class_names: Sequence[str] | None = None, **model_cfg: Any):
        core = build_detector(dict(model_cfg, type='GFL'), class_names=class_names)
        # GFL.__init__ -> super().__init__() is BaseModel.__init__ (MRO), which sets up BaseModule
        GFL.__init__(self, core.backbone, core.neck, core.bbox_head, core.criterion, core.test_cfg,
                     class_names=core.class_names, mean=core.pixel_mean.flatten().tolist(),
                     std=core.pixel_std.flatten().tolist(), channels_last=core.channels_last)
        dp = dict(model_cfg.get('data_preprocessor') or {})
        dp.setdefault('type', 'DetDataPreprocessor')
        self.data_preprocessor = MODELS.build(dp)

    def parse_losses(self, losses: dict) -> tuple[Tensor, dict]:
        """mmengine's, also keeping the (detached) loss terms in ``last_loss_terms`` so that the
        non-finite guard of :class:`OptimWrapper` can name the bad term when a step fails
        (mmengine's DDP wrapper calls ``module.parse_losses`` too, so this works under DDP)."""
        loss, log_vars = super().parse_losses(losses)
        self.last_loss_terms = {k: v.detach() for k, v in log_vars.items()
                                if isinstance(v, Tensor) and k != 'loss'}
        return loss, log_vars

    def init_weights(self) -> None:
        """Nothing to do: every part is initialised (MMDetection's init) when it is built, and
        the backbone loads its ``init_cfg`` pretrained weights there. mmengine's default would
        call the backbone's own ``init_weights`` again and wipe pretrained weights."""

    def forward(self, inputs: Tensor, data_samples: dict | list | None = None,
                mode: str = 'tensor') -> Any:
        """``mode='loss'``: dict of losses; ``'predict'``: list over images of
        ``dict(bboxes (k, 4) xyxy in original-image pixels, scores, labels, prior_idx, img_id)``
        (and ``embeddings`` (k, D) with an embedding branch);
        ``'tensor'``: the :class:`gfl_det.structures.HeadOutputs`.

        ``data_samples`` is what :class:`GFLDataPreprocessor` returns (``metas`` plus the
        batch's ``targets``), or simply the list of metas. In ``'tensor'`` mode uint8 inputs are
        normalised first; floating inputs are taken as already normalised (the output of
        :meth:`GFL.preprocess`) -- that is how :meth:`GFL.loss` calls ``self(x)``.
        """
        if isinstance(data_samples, dict):
            metas = data_samples['metas']
        else:
            metas = data_samples
        if mode == 'tensor':
            x = inputs if inputs.is_floating_point() else self.preprocess(
                inputs, metas or [{'img_shape': tuple(inputs.shape[-2:])}] * len(inputs))
            return GFL.forward(self, x)
        if metas is None:
            raise ValueError(f"GFLDetector.forward(mode='{mode}') needs the batch metas")
        x = self.preprocess(inputs, metas)
        if mode == 'loss':
            return self.loss(x, data_samples['targets'], metas)
        if mode == 'predict':
            preds = self.predict(x, metas, rescale=True)
            for p, m in zip(preds, metas):
                p['img_id'] = m['img_id']
                if m.get('load_failed'):  # the dataset's stand-in for an unreadable image
                    for k in ('bboxes', 'scores', 'labels', 'prior_idx', 'embeddings'):
                        if k in p:
                            p[k] = p[k][:0]
                    p['load_failed'] = m['load_failed']
                    p['file_name'] = m.get('file_name')
            return preds
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")
