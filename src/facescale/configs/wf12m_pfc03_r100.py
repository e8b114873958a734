from easydict import EasyDict as edict
from wf12m_pfc03_r50 import config as base_config

# wf12m_pfc03_r100: wf12m_pfc03_r50 with network=r100.
config = edict(base_config)
config.network = "r100"
