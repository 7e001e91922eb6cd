"""The whole pipeline in one call: calibrate, select, remove, compensate, save.

    python examples/prune_model.py                      # the embedded SmolLM2-135M, 6 of 30 layers
    python examples/prune_model.py --remove 9 --out out/p9

What `lorp-fx prune` does, from Python: `prune_model` returns the pruned model with
its plan, compensation fits, timings and report; `result.save` writes the checkpoint.
"""

import argparse

import lorp_fx

parser = argparse.ArgumentParser()
parser.add_argument("--remove", type=int, default=6)
parser.add_argument("--calib-file", nargs="+", help="calibration text (default: the model writes its own)")
parser.add_argument("--out", default="out/example-pruned")
args = parser.parse_args()

model, tokenizer = lorp_fx.load_model("smollm2-135m")
config = lorp_fx.PruneConfig(remove=args.remove, inplace=True)  # inplace: no second copy of the model
result = lorp_fx.prune_model(model, args.calib_file, config, tokenizer=tokenizer)
print("removed:", ", ".join(result.plan.remove))
print("timings:", result.timings)
result.save(args.out, tokenizer, overwrite=True)
print("written to", args.out)
