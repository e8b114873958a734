from demo import config as demo
from easydict import EasyDict as edict

# small_real: 45 CPU minutes on a few thousand real photos of a few hundred people, faces not
# aligned to a template; against the demo recipe on the CFP split, see benchmarks/RESULTS.md
# ("Real faces: the small-data recipe"). The demo recipe (MobileFaceNet, 128-d, CosFace,
# Partial FC 0.5, bfloat16 and compiled where the CPU allows), with
config = edict(demo)
config.random_crop = 0.2  # each face at many scales and places, as unaligned photos show them
config.time_budget = "45m"  # the LR schedule follows the elapsed share of the budget
config.val_targets = []  # give your held-out pairs: val_targets=[faces_test/pairs.txt]
# `rec`, `num_classes` and `num_image` are your data's: `facescale convert folder2rec` prints them
