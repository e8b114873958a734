from _r50_recipe import config as recipe
from easydict import EasyDict as edict

# ms1mv3_r50: r50 on ms1m-retinaface-t1 (93,431 identities, 5,179,510 images)
config = edict(recipe)
config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
