from easydict import EasyDict as edict
from ms1mv3_r50 import config as base_config

# ms1mv3_r100: ms1mv3_r50 with network=r100.
config = edict(base_config)
config.network = "r100"
