"""Speed tricks, each a switch beside the readable code it replaces, with a parity test and a
measured reason (README, Speed). The readable code is the reference; nothing here changes what
is computed beyond float rounding (``winograd``: more rounding, stated there).

=====================  ==============================================  ========================
switch                 what                                            default
=====================  ==============================================  ========================
``model.fast.``        ``pool.py``: the ResNet stem's 3x3/2 max pool   on (CPU inference and
``stem_pool``          as two separable max passes, bit-identical       frozen stems only)
``model.fast.``        ``qfl.py``: the criterion's QFL sum and its     off (opt-in: the loss
``fused_qfl``          gradient in one pass over the logits            is ~1 % of an R50 step)
``model.fast.``        ``fold_bn.py``: the backbone's fixed-stats BNs  off (less memory,
``fold_bn``            folded into their convs in training             more launches: for a
                                                                       GPU to decide)
``model.fast.``        ``compile_loss.py``: the criterion's GFL terms  off (no gain on a CPU;
``compile_loss``       through torch.compile, one compilation for      27 launches instead of
                       every image shape                               337 per loss call)
``--fuse-conv-bn``,    ``fuse.py``: BN folded into the convs;          off (tools/test.py,
``--compile``          ``torch.compile`` for inference                 tools/demo.py flags)
``--cuda-graph``       ``cuda_graph.py``: everything before NMS        off (flag; CUDA only)
                       replayed as a CUDA graph per input shape
``--winograd``         ``winograd.py``: NNPACK Winograd 3x3 convs for  off (flag)
                       batch-1 CPU inference
``GFL_DET_MALLOC``     ``malloc.py``: keep freed CPU memory mapped     on in the tools
=====================  ==============================================  ========================

Parity tests: tests/test_fast.py (stem pool, fused QFL, fold_bn, compile_loss), tests/test_mmdet_parity.py (the
criterion with and without ``fused_qfl``, and ``fold_bn``, on MMDetection's golden files), tests/test_winograd.py,
tests/test_models.py (BN folding, compile), tests/test_malloc.py, tests/test_cuda_graph.py.
"""
