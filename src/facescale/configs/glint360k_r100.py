from easydict import EasyDict as edict
from glint360k_r50 import config as base_config

# glint360k_r100: glint360k_r50 with network=r100.
config = edict(base_config)
config.network = "r100"
