from _r50_recipe import config as recipe
from easydict import EasyDict as edict

# Speed test: r50 with Partial FC 0.1 over 3,000,000 synthetic identities (no data needed).
config = edict(recipe)
config.sample_rate = 0.1
config.verbose = 10000000
config.frequent = 10
config.rec = "synthetic"
config.num_classes = 3_000_000
config.num_image = 10_000_000
config.num_epoch = 1
config.val_targets = []
