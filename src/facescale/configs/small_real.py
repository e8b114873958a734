from demo import config as demo
from easydict import EasyDict as edict

# small_real: 45 CPU minutes on a few thousand real photos of a few hundred people, packed with
# `facescale convert folder2rec --align` (faces aligned to the template by found landmarks);
# against the demo recipe on the CFP split, see benchmarks/RESULTS.md ("Real faces: the
# small-data recipe"). The demo recipe (128-d, CosFace, Partial FC 0.5, bfloat16 and compiled
# where the CPU allows), with the keys below. Evaluate and embed with `--network mbf_small
# --embedding-size 128`.
config = edict(demo)
config.network = "mbf_small"  # half mbf's multiply-adds: 1.6x the epochs in the same minutes
config.random_crop = 0.2  # each face at many scales and places, as unaligned photos show them
config.ema_decay = 0.999  # evaluate and save an average of the last steps' weights
config.time_budget = "45m"  # the LR schedule follows the elapsed share of the budget
config.val_targets = []  # your held-out pairs: `convert pairs2bin --align`, then [pairs.bin]
# `rec`, `num_classes` and `num_image` are your data's: `facescale convert folder2rec` prints them
