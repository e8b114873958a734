from easydict import EasyDict as edict
from wf42m_pfc02_r50 import config as base_config

# wf42m_pfc02_r100: wf42m_pfc02_r50 with network=r100.
config = edict(base_config)
config.network = "r100"
