from easydict import EasyDict as edict
from ms1mv3_r50 import config as base_config

# ms1mv3_mbf: ms1mv3_r50 with network=mbf, weight_decay=1e-4, num_epoch=40.
config = edict(base_config)
config.network = "mbf"
config.weight_decay = 1e-4
config.num_epoch = 40
