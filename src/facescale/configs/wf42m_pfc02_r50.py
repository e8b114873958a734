from _r50_recipe import config as recipe
from easydict import EasyDict as edict

# wf42m_pfc02_r50: r50 on WebFace42M (2,059,906 identities, 42,474,557 images)
config = edict(recipe)
config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.sample_rate = 0.2
