from easydict import EasyDict as edict
from glint360k_r50 import config as base_config

# glint360k_mbf: glint360k_r50 with network=mbf.
config = edict(base_config)
config.network = "mbf"
