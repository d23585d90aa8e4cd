"""Write a random-weight Gemma 4 checkpoint in Hugging Face layout.

    python -m scripts.make_checkpoint --preset 31b --layers 6 --dtype bfloat16 --out ckpt/31b-6l

config.json, sharded safetensors with model.safetensors.index.json, and a byte-level
tokenizer.json sized to the vocabulary. Tensors are generated one at a time and shards are
flushed as they fill, so a real-width slice needs about one shard of host memory.
`--multimodal` writes the `gemma4` layout (text under `model.language_model.`) beside a
stand-in vision tower, which a text export must never read.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from export.artifact import atomic_output_dir
from export.cli import finite_float, non_negative_int, positive_int, run
from export.gemma4.config import PRESETS, Gemma4Config
from export.gemma4.model import Gemma4Model
from export.gemma4.tokenizer import write_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def expected_shapes(cfg: Gemma4Config) -> dict[str, tuple[int, ...]]:
    """Our key -> shape for every checkpoint tensor of this config (built on meta: free)."""
    with torch.device("meta"):
        model = Gemma4Model(cfg, ctx=min(cfg.max_position_embeddings, 64), prefill_chunk=1)
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return {k: tuple(v.shape) for k, v in sd.items()}


DRAW_VALUES = 1 << 24  # float32 values drawn at a time for a large tensor


def random_tensor(key: str, shape: tuple[int, ...], seed: int, std: float = 0.02,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic per key, the same values in any `dtype` (drawn in float32, then cast). 1-D weights and
    layer_scalar (identity at init) land in [0.5, 1.5) so that a forgotten multiply changes the output.
    A large tensor is drawn in blocks of rows straight into its dtype (E2B's per-layer table is 2.3e9 values:
    9 GB at once in float32); the CPU generator turns its stream into normals 16 at a time, so blocks of a
    multiple of 16 values give the values of one draw."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    if len(shape) <= 1:
        return torch.empty(shape).uniform_(0.5, 1.5, generator=g).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(shape[0], -1)
    step = max(1, DRAW_VALUES // rows.shape[1])
    if step * rows.shape[1] % 16:
        step = shape[0]
    for r in range(0, shape[0], step):
        block = rows[r:r + step]
        block.copy_(torch.randn(block.shape, generator=g).mul_(std))
    return out


def random_tensors(cfg: Gemma4Config, seed: int, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    for key, shape in expected_shapes(cfg).items():
        yield key, random_tensor(key, shape, seed, dtype=dtype)


def write_checkpoint(out: str | Path, cfg: Gemma4Config, tensors: Iterable[tuple[str, torch.Tensor]],
                     dtype: torch.dtype = torch.bfloat16, multimodal: bool = False,
                     shard_bytes: int = 2 << 30) -> Path:
    """Write `tensors` (our key names) as a HF checkpoint directory; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "model.language_model." if multimodal else "model."
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, n = 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    extra = _vision_stand_in() if multimodal else []
    # an untied head sits at the top level, as transformers' save_pretrained writes it
    for key, t in list(extra) + [(k if k == "lm_head.weight" else prefix + k, v) for k, v in tensors]:
        t = t.to(dtype).contiguous()
        if size and size + t.nbytes > shard_bytes:
            flush()
        shard[key] = t
        size += t.nbytes
    flush()
    total = sum((out / s).stat().st_size for s in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    text = cfg.to_hf_dict()
    config = {"model_type": "gemma4", "text_config": text, "vision_config": {"hidden_size": 8}} if multimodal else text
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(out / "tokenizer.json", cfg.vocab_size)
    return out


def _vision_stand_in():
    """A few tensors where a real checkpoint keeps its vision tower."""
    g = torch.Generator().manual_seed(0)
    return [(f"model.vision_tower.encoder.layers.{i}.mlp.fc1.weight", torch.randn(8, 8, generator=g))
            for i in range(2)]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scripts.make_checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model config to write")
    ap.add_argument("--layers", type=positive_int, default=None, help="keep only the first N layers (a slice at real width)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--multimodal", action="store_true", help="gemma4 layout with a stand-in vision tower")
    ap.add_argument("--shard-gib", type=finite_float, default=2.0, help="shard size in GiB")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    if args.layers is not None:
        if not 1 <= args.layers <= cfg.num_hidden_layers:
            ap.error(f"--layers must be in 1..{cfg.num_hidden_layers} for {args.preset}")
        cfg = cfg.with_layers(args.layers)
    if args.shard_gib <= 0:
        ap.error(f"--shard-gib must be > 0, got {args.shard_gib}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is a file; pass a directory path")
    if Path(args.out).is_dir() and any(Path(args.out).iterdir()):  # the write replaces the whole directory
        ap.error(f"--out {args.out} is not empty (the checkpoint replaces the whole directory); pass a new or "
                 "empty directory")
    with atomic_output_dir(Path(args.out)) as tmp:  # an interrupted write leaves nothing behind
        write_checkpoint(tmp, cfg, random_tensors(cfg, args.seed, DTYPES[args.dtype]), DTYPES[args.dtype],
                         multimodal=args.multimodal, shard_bytes=int(args.shard_gib * (1 << 30)))
    print(f"wrote {args.out} ({cfg.num_hidden_layers} layers, {args.dtype})")


if __name__ == "__main__":
    raise SystemExit(run(main, prog="python -m scripts.make_checkpoint"))
