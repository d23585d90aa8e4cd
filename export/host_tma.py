"""Host-side TMA descriptors through torch.export: a wrapped Triton kernel (`wrap_triton`) may take a
`triton.tools.tensor_descriptor.TensorDescriptor` argument (export/kernels/int4_matmul.py's
`_int4_gemv1_tma_kernel` does).

torch 2.11 carries such an argument into the graph only when dynamo traces the kernel: it puts the
descriptor's tensor among the kernel's tensor arguments and its block shape into the HOP's
`tma_descriptor_metadata` ("stable" metadata), from which Inductor's wrapper rebuilds the descriptor
at run time (AOTInductor's C++ wrapper: `cuTensorMapEncodeTiled` on the buffer). Non-strict export
(the project's, export/pipeline.py) traces through `TracingTritonHOPifier`, which passes an empty
metadata ("not yet supported in non-dynamo tracing") and files the descriptor among the constant
arguments, where Inductor later fails on it. `capture_host_tma` does for that tracer what dynamo
does: each descriptor argument becomes its tensor plus its block shape in the metadata.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from export.patches import patched


def capture_host_tma(original: Callable) -> Callable:
    """`TracingTritonHOPifier.call_HOP` with the kernel's TensorDescriptor arguments handed on as
    (tensor, "stable" block-shape metadata), as dynamo's tracer hands them on; without any, the original."""
    def call_HOP(self, variable, grids, combined_args, tx):
        from triton.tools.tensor_descriptor import TensorDescriptor
        from torch._higher_order_ops.triton_kernel_wrap import (create_tma_stable_metadata,
                                                                triton_kernel_wrapper_mutation)

        descs = {k: v for k, v in combined_args.items() if isinstance(v, TensorDescriptor)}
        if not descs:
            return original(self, variable, grids, combined_args, tx)
        if tx is not None or not isinstance(variable.kernel_idx, int):
            raise AssertionError("host TMA capture: the non-dynamo tracer's call only")
        args = {**combined_args, **{k: d.base for k, d in descs.items()}}
        meta = {k: create_tma_stable_metadata(list(d.block_shape)) for k, d in descs.items()}
        graphable, constant_args_idx = self.store_non_graphable_args(args)
        return triton_kernel_wrapper_mutation(kernel_idx=variable.kernel_idx, constant_args_idx=constant_args_idx,
                                              grid=grids, tma_descriptor_metadata=meta, kwargs=graphable)
    return call_HOP


@contextlib.contextmanager
def host_tma_descriptors() -> Iterator[None]:
    """torch.export traces inside this block carry wrapped kernels' host TMA descriptors (`capture_host_tma`)."""
    with patched("TracingTritonHOPifier.call_HOP", capture_host_tma):
        yield
