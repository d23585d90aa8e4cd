"""Decode replayed through a CUDA graph: one capture of the decode chain's `run` (every step's
container run, runtime/chain.py), then one `replay()` per token instead of the containers'
host-side work and kernel launches.

What the capture relies on (seen with torch 2.11's AOTIModelContainerRunnerCuda):
- `capture_error_mode="relaxed"`: the container queries its own CUDA event inside `run`,
  which the default ("global") mode forbids while any stream is capturing.
- After the capture, an eager `run` of the same container fails ("invalid argument": `run`
  queries the event its model instance recorded while capturing), so the captured chain is
  replay-only: every decode of its runner goes through the graph. For the same reason a
  container that several steps run holds one model instance per step (runtime/aoti.py).
- A replay reads and writes the very tensors seen at capture: the token and position inputs
  are static buffers the caller fills in place, the weights and KV stay bound at the same
  addresses (so `reset()` zeroes the KV in place), and the logits come back in one static
  output tensor that the next replay overwrites.
"""

from __future__ import annotations

import torch

from runtime.chain import MethodChain

WARMUP_RUNS = 2  # eager runs before the capture: first-call initialisation must not be captured


class DecodeGraph:
    """A decode chain captured once around static `tokens` [1, 1] and `pos` [1].

    The warm-up runs write the KV cache at `pos`: the caller zeroes it afterwards.
    """

    def __init__(self, method: MethodChain, tokens: torch.Tensor, pos: torch.Tensor):
        self.method, self.tokens, self.pos = method, tokens, pos
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(tokens.device):
            stream = torch.cuda.Stream()  # capture (and warm up) off the default stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    method.run([tokens, pos])
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="relaxed"):
                (logits,) = method.run([tokens, pos])
        self.logits = logits  # the graph's output: every replay overwrites it

    def replay(self) -> torch.Tensor:
        """Run the captured decode on whatever `tokens` and `pos` hold now."""
        self.graph.replay()
        return self.logits
