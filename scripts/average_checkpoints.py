#!/usr/bin/env python
"""Average the weights of checkpoints fine-tuned from one parent (a weight average, or "model soup").

    python scripts/average_checkpoints.py [--preset small] OUT SRC SRC [SRC ...]

Every tensor of OUT is the element-wise mean of the sources' tensors, computed in float64 and stored in
float32 (convert it afterwards with `mla-mnist convert OUT OUT-fp16 --dtype float16`). The sources must share
one model config; only dropout may differ, since it changes no weight. OUT records the first source's config,
or with --preset the named preset's config (which must then match the sources apart from dropout) and the
preset's name. OUT is written atomically, like every checkpoint. Averaging only makes sense for models that
share a parent: two independently trained models have unrelated weights and their mean reads nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/average_checkpoints.py` from a checkout
    sys.path.insert(0, str(ROOT))

from convert import checkpoint  # noqa: E402
from convert.config import PRESETS, ModelConfig  # noqa: E402
from convert.errors import UserError  # noqa: E402

PROG = "average_checkpoints"


def _without_dropout(config: ModelConfig) -> dict:
    d = config.to_dict()
    d.pop("dropout")
    return d


def _differences(a: ModelConfig, b: ModelConfig) -> str:
    da, db = _without_dropout(a), _without_dropout(b)
    return ", ".join(f"{k} {da[k]!r} vs {db[k]!r}" for k in sorted(da) if da[k] != db[k])


def average(out, sources, preset: str | None = None) -> Path:
    """Write the element-wise mean of the checkpoints `sources` to the checkpoint directory `out`."""
    out = Path(out)
    if len(sources) < 2:
        raise UserError("give at least two checkpoints to average")
    if any(Path(s).resolve() == out.resolve() for s in sources):
        raise UserError(f"{out} is also a source: choose a new output directory")
    checkpoint.check_writable(out)
    loaded = [(Path(s), *checkpoint.load(s)[:2]) for s in sources]
    first, config, weights = loaded[0]
    if config.quantization is not None:
        raise UserError(f"{first} is quantized: average the float checkpoints, then quantize the result")
    for src, cfg, w in loaded[1:]:
        diff = _differences(config, cfg)
        if diff:
            raise UserError(
                f"{src} has another model config than {first} ({diff}): only checkpoints that "
                "differ in dropout alone can be averaged"
            )
        if set(w) != set(weights):  # the schema check in load() makes this unlikely; the message helps if not
            raise UserError(f"{src} and {first} hold different tensors: they are not the same model")
    if preset is not None:
        target = ModelConfig.preset(preset)
        diff = _differences(target, config)
        if diff:
            raise UserError(f"the sources are not the {preset!r} preset ({diff}): drop --preset")
        config = target
    mean = {k: np.mean([w[k].astype(np.float64) for _, _, w in loaded], axis=0).astype(np.float32) for k in weights}
    return checkpoint.save(out, config, mean, dtype="float32", preset=preset)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("out", metavar="OUT", help="output checkpoint directory")
    parser.add_argument("sources", metavar="SRC", nargs="+", help="checkpoint directories to average (two or more)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="record OUT with this preset's config and name (dropout included)"
    )
    args = parser.parse_args(argv)
    try:
        path = average(args.out, args.sources, args.preset)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: mean of {len(args.sources)} checkpoints ({', '.join(args.sources)}), float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
