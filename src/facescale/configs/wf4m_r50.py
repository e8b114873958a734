from _r50_recipe import config as recipe
from easydict import EasyDict as edict

# wf4m_r50: r50 on WebFace4M (205,990 identities, 4,235,242 images)
config = edict(recipe)
config.rec = "/train_tmp/WebFace4M"
config.num_classes = 205990
config.num_image = 4235242
