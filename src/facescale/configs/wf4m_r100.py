from easydict import EasyDict as edict
from wf4m_r50 import config as base_config

# wf4m_r100: wf4m_r50 with network=r100.
config = edict(base_config)
config.network = "r100"
