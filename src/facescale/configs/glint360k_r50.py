from _r50_recipe import config as recipe
from easydict import EasyDict as edict

# glint360k_r50: r50 on glint360k (360,232 identities, 17,091,657 images), with the CosFace
# margin and weight_decay 1e-4
config = edict(recipe)
config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.margin_list = (1.0, 0.0, 0.4)
config.weight_decay = 0.0001
