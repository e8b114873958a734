from _r50_recipe import config as recipe
from easydict import EasyDict as edict

# wf12m_pfc03_r50: r50 on WebFace12M (617,970 identities, 12,720,066 images)
config = edict(recipe)
config.rec = "/train_tmp/WebFace12M"
config.num_classes = 617970
config.num_image = 12720066
config.sample_rate = 0.3
